"""MLflow: one run per training run name, rank-0 metric logging, sample grids, the model registry.

The driver owns the run (params, config, the final model); rank 0 of the workers logs metrics
and sample grids into it. Metrics are buffered and flushed when a checkpoint is saved, so after
a worker failure and resume no step appears twice in a metric's history.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from typing import Callable
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from torchvision.utils import make_grid

from dcgan_dist.config import Config
from dcgan_dist.errors import TrackingError

log = logging.getLogger(__name__)

RUN_NAME_TAG = "dcgan.run_name"
CHAMPION = "champion"


def resolve_uri(uri: str) -> str:
    """Make a relative `sqlite:///file.db` absolute, so Ray workers in other folders find the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def redact(value: object) -> str:
    """Drop `user:password@` from URIs so credentials never reach MLflow params or logs."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", str(value))


def artifact_location(uri: str) -> str | None:
    """For a sqlite store, artifacts go in `mlartifacts/` beside the database file, not in whatever folder the
    first run happened to start in (MLflow's default is `./mlruns` of the current directory)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix + "/"):
        return (Path(uri[len(prefix):]).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides (its --artifacts-destination)


def experiment_id(cfg: Config) -> str:
    uri = cfg.tracking.uri
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp:
            return exp.experiment_id
        return client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(uri))
    except MlflowException as e:
        raise TrackingError(f"tracking.uri {uri!r}: cannot reach MLflow ({e.message.splitlines()[0]})") from None


def _find(cfg: Config, exp_id: str, run_name: str):
    found = MlflowClient(cfg.tracking.uri).search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    return found[0] if found else None


def find_run(cfg: Config, run_name: str) -> str:
    """The id of the MLflow run that tracks run name `run_name`."""
    run = _find(cfg, experiment_id(cfg), run_name)
    if run is None:
        raise TrackingError(f"no MLflow run named {run_name!r} in experiment {cfg.tracking.experiment!r}")
    return run.info.run_id


def start_run(cfg: Config, run_name: str, parent_run_id: str | None = None) -> tuple[str, bool]:
    """Create the MLflow run for `run_name`, or find it again when the run resumes. Returns (id, resumed).

    `parent_run_id` nests the run under a search's run (a Tune trial).
    """
    exp_id = experiment_id(cfg)
    client = MlflowClient(cfg.tracking.uri)
    found = _find(cfg, exp_id, run_name)
    if found:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        client.log_text(run_id, redact(cfg.to_yaml()), f"config-resumed-{int(time.time())}.yaml")
        return run_id, True
    tags = {RUN_NAME_TAG: run_name, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    params = [mlflow.entities.Param(k, redact(v)) for k, v in cfg.flat().items()]
    client.log_batch(run_id, params=params)
    client.log_text(run_id, redact(cfg.to_yaml()), "config.yaml")
    return run_id, False


def tag_run(cfg: Config, run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient(cfg.tracking.uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, redact(v))


def log_values(cfg: Config, run_id: str, values: dict[str, float], step: int) -> None:
    ts = int(time.time() * 1000)
    MlflowClient(cfg.tracking.uri).log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in values.items()])


def end_run(cfg: Config, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(cfg.tracking.uri).set_terminated(run_id, status)


class RunLogger:
    """Rank 0's handle on the run: buffered metrics, sample grids, protocol tags.

    Everything goes out through one background sender, in order, so a slow or unreachable MLflow
    server never stalls or crashes training: while it is down, items are held (the oldest metric
    batches are dropped beyond `max_held` values, with a warning) and retried every `retry_s`;
    `close` waits up to `close_timeout_s` for the rest and warns about anything undelivered.
    """

    def __init__(self, uri: str, run_id: str, *, max_held: int = 200_000, retry_s: float = 5.0,
                 close_timeout_s: float = 60.0, skip_logged: bool = False):
        self.client, self.run_id, self.uri = MlflowClient(uri), run_id, redact(uri)
        self.logged_until = 0  # steps up to here are already in the run and are not sent again
        self.pending: list[Metric] = []  # since the last checkpoint
        self._tags: dict[str, str] = {}
        self.max_held, self.retry_s, self.close_timeout_s = max_held, retry_s, close_timeout_s
        self._outbox: collections.deque[tuple[int, Callable[[], None]]] = collections.deque()  # (metric count, send)
        self._cond = threading.Condition()
        self._closing = False
        self.dropped = 0
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._sender.start()
        if skip_logged:
            # A report can return before Ray's controller registers its checkpoint, so a crash in between
            # resumes from an older checkpoint and redoes steps whose metrics were already sent. Read where
            # the run stands first (in the sender, so an unreachable server stalls nothing).
            self._enqueue(0, self._read_logged_until)

    def _read_logged_until(self) -> None:
        history = self.client.get_metric_history(self.run_id, "loss_d")
        self.logged_until = max((m.step for m in history), default=0)

    def _send_metrics(self, batch: list[Metric]) -> None:
        fresh = [m for m in batch if m.step > self.logged_until]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    def _enqueue(self, n_metrics: int, send: Callable[[], None]) -> None:
        with self._cond:
            self._outbox.append((n_metrics, send))
            held = sum(n for n, _ in self._outbox)
            while held > self.max_held and any(n for n, _ in self._outbox):
                oldest = next(i for i, (n, _) in enumerate(self._outbox) if n)
                held -= self._outbox[oldest][0]
                self.dropped += self._outbox[oldest][0]
                del self._outbox[oldest]
                log.warning("MLflow at %s unreachable: %d metric values dropped so far (over %d held)",
                            self.uri, self.dropped, self.max_held)
            self._cond.notify_all()

    def _send_loop(self) -> None:
        down_since = None
        while True:
            with self._cond:
                while not self._outbox and not self._closing:
                    self._cond.wait()
                if not self._outbox:
                    return
                _, send = self._outbox[0]
            try:
                send()
            except Exception as e:  # the server is down or refusing: hold everything, retry later
                if down_since is None:
                    down_since = time.time()
                    log.warning("MLflow at %s unreachable (%s): holding metrics and images, retrying every %.0f s",
                                self.uri, str(e).splitlines()[0][:200], self.retry_s)
                with self._cond:
                    self._cond.wait(self.retry_s)
                continue
            with self._cond:
                if self._outbox and self._outbox[0][1] is send:
                    self._outbox.popleft()
                self._cond.notify_all()
            if down_since is not None:
                log.warning("MLflow at %s reachable again after %.0f s: delivering held items", self.uri,
                            time.time() - down_since)
                down_since = None

    def add(self, step: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()]

    def flush(self) -> None:
        """Hand buffered metrics to the sender; called right after a checkpoint is persisted."""
        for i in range(0, len(self.pending), 1000):  # MLflow's per-request limit
            batch = self.pending[i : i + 1000]
            self._enqueue(len(batch), lambda b=batch: self._send_metrics(b))
        self.pending = []

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tag the run; a tag is sent again only when its value changes."""
        new = {k: v for k, v in tags.items() if self._tags.get(k) != v}
        for k, v in new.items():
            self._enqueue(0, lambda k=k, v=v: self.client.set_tag(self.run_id, k, v))
        self._tags.update(new)

    def set_protocols(self, protocols: dict[str, str]) -> None:
        """Tag the run with each metric's protocol (`protocol.swd` = its key)."""
        self.set_tags({f"protocol.{k}": v for k, v in protocols.items()})

    def log_grid(self, step: int, images: torch.Tensor) -> None:
        """An 8x8 grid as `samples/step_NNNNNN.png` and in the run's image view (key `samples`)."""
        grid = make_grid(images.detach().float().cpu(), nrow=8, padding=2, normalize=True, value_range=(-1, 1))
        arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        self._enqueue(0, lambda: self.client.log_image(self.run_id, arr, artifact_file=f"samples/step_{step:06d}.png"))
        self._enqueue(0, lambda: self.client.log_image(self.run_id, arr, key="samples", step=step))

    def close(self) -> int:
        """Deliver what is held (waiting up to close_timeout_s); returns, and warns about, undelivered metric values."""
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._outbox, timeout=self.close_timeout_s)
            lost = self.dropped + sum(n for n, _ in self._outbox)
            items = len(self._outbox)
        if items or self.dropped:
            log.warning("MLflow at %s: %d metric values and %d items (grids, tags) were not delivered",
                        self.uri, lost, items)
        return lost


def log_generator(cfg: Config, run_id: str, generator: torch.nn.Module, step: int,
                  scores: dict[str, float] | None = None, protocols: dict[str, str] | None = None) -> str:
    """Log G as an MLflow pytorch model and register it as a new version, tagged with its scores.

    Tags: `step`, the run name, and for each metric `metric.NAME` (value) and `protocol.NAME` (how it
    was measured). Whether it becomes `champion` is `champion.promote_if_better`'s call. Re-running a
    finished run does not register the same step twice: the existing version is returned.
    """
    from mlflow.models import infer_signature

    client = MlflowClient(cfg.tracking.uri)
    name = cfg.tracking.model_name
    for mv in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if mv.tags.get("step") == str(step):
            log.info("%s version %s already holds step %d of this run", name, mv.version, step)
            return str(mv.version)

    generator = generator.cpu().eval()
    z = torch.randn(4, cfg.model.nz, generator=torch.Generator().manual_seed(0)).numpy()
    with torch.no_grad():
        out = generator(torch.from_numpy(z)).numpy()
    torch_req = torch.__version__.split("+")[0]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            generator,
            name="generator",
            input_example=z,
            signature=infer_signature(z, out),
            pip_requirements=[f"torch=={torch_req}", "numpy"],
            registered_model_name=name,
            step=step,
        )
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, RUN_NAME_TAG, client.get_run(run_id).data.tags[RUN_NAME_TAG])
    client.set_model_version_tag(name, version, "step", str(step))
    tag_scores(cfg, version, scores or {}, protocols or {})
    return version


def tag_scores(cfg: Config, version: str, scores: dict[str, float], protocols: dict[str, str]) -> None:
    """Record measured metrics on a model version, each with its protocol."""
    client = MlflowClient(cfg.tracking.uri)
    for metric, key in protocols.items():
        if metric in scores:
            client.set_model_version_tag(cfg.tracking.model_name, version, f"metric.{metric}", repr(float(scores[metric])))
            client.set_model_version_tag(cfg.tracking.model_name, version, f"protocol.{metric}", key)


# --- searches (Ray Tune): a parent run, nested trial runs, a summary ---

SEARCH_TAG = "dcgan.search"
TRIAL_STATUS = {"FINISHED": "FINISHED", "STOPPED": "KILLED", "FAILED": "FAILED"}


def start_search_run(cfg: Config, name: str, space: dict) -> str:
    """The parent run of a search: its settings as params, the space and base config as files."""
    client = MlflowClient(cfg.tracking.uri)
    run = client.create_run(experiment_id(cfg), run_name=name, tags={SEARCH_TAG: name})
    params = {k: v for k, v in cfg.flat().items() if k.startswith(("tune.", "metrics.", "data.", "ray."))}
    params["search.params"] = ",".join(space.get("space", {}))
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, redact(v)) for k, v in params.items()])
    client.log_text(run.info.run_id, yaml.safe_dump(space, sort_keys=False), "search_space.yaml")
    client.log_text(run.info.run_id, redact(cfg.to_yaml()), "config.yaml")
    return run.info.run_id


def close_trial_runs(cfg: Config, parent_run_id: str, statuses: dict[str, str]) -> None:
    """End every nested trial run with its real outcome; a trial the scheduler stopped ends KILLED."""
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([experiment_id(cfg)], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    for run in runs:
        status = statuses.get(run.data.tags.get(RUN_NAME_TAG, ""), "FAILED")
        client.set_tag(run.info.run_id, "tune.outcome", status.lower())
        client.set_terminated(run.info.run_id, TRIAL_STATUS.get(status, "FAILED"))


def log_search_summary(cfg: Config, run_id: str, rows: list[dict], metric: str, best: dict, version) -> None:
    """The parent run's summary: a table of trials, metric-vs-hyperparameter plots, the winner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    client = MlflowClient(cfg.tracking.uri)
    table = pd.DataFrame(rows).sort_values(metric, na_position="last")
    client.log_table(run_id, table, "trials.json")
    client.log_text(run_id, table.to_csv(index=False), "trials.csv")
    client.log_metric(run_id, f"best_{metric}", best["value"], step=best["step"])
    tag_run(cfg, run_id, {"best_trial": best["trial"], "best_step": str(best["step"]),
                          "registered_version": str(version or "")})

    params = [c for c in table.columns if "." in c and c not in ("trial",)]
    fig, axes = plt.subplots(1, max(len(params), 1), figsize=(3.2 * max(len(params), 1), 3.2), squeeze=False)
    for ax, p in zip(axes[0], params):
        x = table[p]
        numeric = pd.api.types.is_numeric_dtype(x)
        ax.scatter(x if numeric else x.astype(str), table[metric], c=table["status"].eq("FINISHED").map(
            {True: "tab:blue", False: "tab:gray"}), s=24)
        if numeric and p.split(".")[-1].startswith("lr"):
            ax.set_xscale("log")
        ax.set_xlabel(p)
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric} by hyperparameter (blue: ran to the end, gray: stopped early)")
    fig.tight_layout()
    client.log_figure(run_id, fig, "search_summary.png")
    plt.close(fig)
