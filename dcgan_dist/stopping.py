"""A clean stop: SIGTERM (what `ray job stop` and schedulers send) ends training with a checkpoint, not a loss.

The driver holds a `StopRequest` actor for the job; on the first SIGTERM it sets it. Rank 0 asks it at every log
step and sends the answer with the step's metrics, so all ranks agree on the step; they save a checkpoint there and
leave the loop. The driver then ends the MLflow run as KILLED. If the workers have not finished within
`train.stop_timeout_s` (or a second SIGTERM comes), the driver stops waiting.

Why an actor of the driver, not a record in a cluster-wide store: the request must belong to one job and die with
it. `ray job stop` sends SIGKILL `RAY_JOB_STOP_WAIT_TIME_S` (3 s by default) after SIGTERM, before any clean-up of
the driver can run; a record left in Ray's key-value store (as this module once did, through a private API)
outlived the job, and the next submit of the same run found it and stopped at its first log step. An actor is
owned by the driver's job, and Ray ends it with the job however the job ends. (Set RAY_JOB_STOP_WAIT_TIME_S in the
job's runtime_env env_vars to give the workers time to checkpoint: docs/cluster.md, "Stopping a job".)
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dcgan_dist import errors
from dcgan_dist.errors import Stopped

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class StopRequest:
    """Whether this job was asked to stop, and the error no restart can fix if a worker met one. Owned by the
    driver: it ends with the job."""

    def __init__(self):
        self.requested, self.fatal = False, None

    def request(self) -> None:
        self.requested = True

    def get(self) -> bool:
        return self.requested

    def fail(self, kind: str, message: str) -> None:
        self.fatal = self.fatal or (kind, message)

    def get_fatal(self) -> tuple[str, str] | None:
        return self.fatal


# Errors that a restart from the last checkpoint meets again: bad or changed data past the data.* limits, no
# readable checkpoint, a config the workers refuse. Ray Train would retry them ray.max_failures times (forever
# with -1, the spot recipe), so a worker that meets one records it and the restarted group stops at once.
UNFIXABLE = (errors.DataError, errors.CheckpointError, errors.ConfigError, errors.RunBusy)


def report_fatal(request, error: errors.DcganError) -> None:
    if request is not None:
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(request.fail.remote(type(error).__name__, str(error.one_line())), timeout=10)


def fatal_error(request) -> errors.DcganError | None:
    """The error a worker of this job recorded as one no restart can fix, or None."""
    if request is None:
        return None
    try:
        found = ray.get(request.get_fatal.remote(), timeout=30)
    except ray.exceptions.RayError:
        return None
    return getattr(errors, found[0], errors.DcganError)(found[1]) if found else None


def stop_requested(request) -> bool:
    """Rank 0's question at a log step. No answer is no request: a job whose driver is gone has its workers ended
    by Ray, and taking a lost actor for a request stopped healthy runs early."""
    if request is None:  # a search's trial: Tune stops its trials itself
        return False
    try:
        return ray.get(request.get.remote(), timeout=30)
    except ray.exceptions.RayError as e:
        log.warning("no answer from the job's stop request (%s); going on", type(e).__name__)
        return False


@contextlib.contextmanager
def stop_on_sigterm(timeout_s: float) -> Iterator[dict]:
    """While the driver waits for training: the first SIGTERM asks the workers to checkpoint and leave. Yields a
    dict: "request", the handle to give the workers, "requested", whether a stop was asked for, and at the end
    "fatal", the error a worker met that no restart can fix (or None). Only the main thread can take signals;
    elsewhere (a Tune trial) this does nothing and the handle is None."""
    state = {"requested": False, "request": None, "fatal": None}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    # On the driver's own node: an actor elsewhere would die with a worker host and read as "the driver is gone".
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    request = state["request"] = StopRequest.options(scheduling_strategy=here).remote()

    def on_alarm(signum, frame):
        raise Stopped(f"the workers did not save a checkpoint within train.stop_timeout_s={timeout_s:g} s")

    def on_term(signum, frame):
        if state["requested"]:
            raise Stopped("a second SIGTERM: stopped without waiting for a checkpoint")
        state["requested"] = True
        request.request.remote()
        log.warning("SIGTERM: the workers save a checkpoint at their next log step and stop (waiting at most %g s)",
                    timeout_s)
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, previous)
        state["fatal"] = fatal_error(request)
        with contextlib.suppress(Exception):  # it ends with the job anyway; now it can go
            ray.kill(request)
