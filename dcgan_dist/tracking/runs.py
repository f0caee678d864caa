"""MLflow runs: the experiment, the one way a run is created, finding a training run again by its name.

The driver owns a training run (params, config, the final model); rank 0 of the workers logs metrics and sample
grids into it (`run_logger.py`). Searches, evaluations and experiments create their runs here too.
"""

from __future__ import annotations

import json
import logging
import time

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags

from dcgan_dist.config import Config
from dcgan_dist.errors import TrackingError
from dcgan_dist.tracking.uris import artifact_location, redact

log = logging.getLogger(__name__)
RUN_NAME_TAG = "dcgan.run_name"


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


def create_run(cfg: Config, run_name: str, tags: dict[str, str], params: dict | None = None) -> str:
    """The one way a run is created: in the config's experiment, named and tagged, with params (redacted, each
    cut to 500 characters). Returns the run id."""
    client = MlflowClient(cfg.tracking.uri)
    # MLflow's standard context (mlflow.user, mlflow.source.name and .type, the git commit where there is one), as
    # mlflow.start_run adds it and MlflowClient.create_run does not; our tags win.
    tags = resolve_tags(tags)
    run_id = client.create_run(experiment_id(cfg), run_name=run_name, tags=tags).info.run_id
    if params:
        client.log_batch(run_id, params=[Param(k, redact(v)[:500]) for k, v in params.items()])
    return run_id


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
    run_id = create_run(cfg, run_name, tags, cfg.flat())
    client.log_text(run_id, redact(cfg.to_yaml()), "config.yaml")
    return run_id, False


def log_dataset(cfg: Config, run_id: str, shard_set) -> None:
    """The run's training data as its MLflow input dataset (lineage, shown on the run's page): data.url, the
    manifest's digest, its size. A resume on changed data (data.allow_changed) adds the new one beside it."""
    manifest = shard_set.manifest or {}
    profile = {"shards": len(shard_set.urls), "images": sum(s["count"] for s in manifest.get("shards", [])),
               "resolution": shard_set.resolution, "channels": shard_set.channels}
    url = cfg.data.url
    dataset = Dataset(name=url.rstrip("/").rsplit("/", 1)[-1] or url, digest=shard_set.fingerprint[:32],
                      source_type="s3" if url.startswith("s3://") else "local", source=json.dumps({"uri": url}),
                      profile=json.dumps(profile))
    MlflowClient(cfg.tracking.uri).log_inputs(
        run_id, [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])])


class SystemWatch:
    """MLflow's own system-metrics monitor for this node, started: one per node, named by its address, so the run's
    page shows every node's CPU, memory, disk, network and GPU side by side. `finish` also takes a last sample
    (MLflow's monitor drops the one in progress, so a run shorter than its interval would log none)."""

    def __init__(self, uri: str, run_id: str, node: str):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(run_id, node_id=node, tracking_uri=uri, resume_logging=True)
        self.monitor.start()

    def finish(self) -> None:
        self.monitor.finish()
        try:
            self.monitor.collect_metrics()
            self.monitor.publish_metrics(self.monitor.aggregate_metrics())
            self.monitor.mlflow_logger.flush()
        except Exception as e:  # noqa: BLE001 - the server gone at the end: a lost sample, not a failed run
            log.warning("system metrics: the last sample was not logged (%s)", str(e).splitlines()[0][:200])


def tag_run(cfg: Config, run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient(cfg.tracking.uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, redact(v))


def log_values(cfg: Config, run_id: str, values: dict[str, float], step: int) -> None:
    ts = int(time.time() * 1000)
    MlflowClient(cfg.tracking.uri).log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in values.items()])


def end_run(cfg: Config, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(cfg.tracking.uri).set_terminated(run_id, status)
