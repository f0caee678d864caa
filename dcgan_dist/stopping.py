"""A clean stop: SIGTERM (what `ray job stop` and schedulers send) ends training with a checkpoint, not a loss.

The driver, on the first SIGTERM, leaves a stop request in Ray's key-value store; rank 0 reads it at every log
step and sends it with the step's metrics, so all ranks agree on the step; they save a checkpoint there and leave the loop. The
driver then ends the MLflow run as KILLED. If the workers have not finished within `train.stop_timeout_s` (or a
second SIGTERM comes), the driver stops waiting. `ray job stop` waits only RAY_JOB_STOP_WAIT_TIME_S (3 s by
default) before SIGKILL: set it in the job's runtime_env env_vars to give the workers time (README).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

from ray.experimental import internal_kv

from dcgan_dist.errors import Stopped

log = logging.getLogger(__name__)
NAMESPACE = "dcgan-dist"


def _key(run_id: str) -> str:
    return f"stop/{run_id}"


def stop_requested(run_id: str) -> bool:
    """Rank 0 asks the store; the training loop hands its answer to every rank with the log step's metrics."""
    return bool(internal_kv._internal_kv_get(_key(run_id), namespace=NAMESPACE))


@contextlib.contextmanager
def stop_on_sigterm(run_id: str, timeout_s: float) -> Iterator[dict]:
    """While the driver waits for training: the first SIGTERM asks the workers to checkpoint and leave. Yields a
    dict whose "requested" says whether that happened. Only the main thread can take signals; elsewhere (a Tune
    trial) this does nothing."""
    state = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def on_alarm(signum, frame):
        raise Stopped(f"the workers did not save a checkpoint within train.stop_timeout_s={timeout_s:g} s")

    def on_term(signum, frame):
        if state["requested"]:
            raise Stopped("a second SIGTERM: stopped without waiting for a checkpoint")
        state["requested"] = True
        internal_kv._internal_kv_put(_key(run_id), b"1", namespace=NAMESPACE)
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
        with contextlib.suppress(Exception):  # Ray may be gone already; the key dies with the cluster anyway
            internal_kv._internal_kv_del(_key(run_id), namespace=NAMESPACE)
