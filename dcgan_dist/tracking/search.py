"""A search's MLflow runs: the parent run, its trials' outcomes, and the summary table and figure."""

from __future__ import annotations

import yaml
from mlflow import MlflowClient

from dcgan_dist.config import Config
from dcgan_dist.tracking.runs import RUN_NAME_TAG, create_run, experiment_id, tag_run
from dcgan_dist.tracking.uris import redact

SEARCH_TAG = "dcgan.search"
TRIAL_STATUS = {"FINISHED": "FINISHED", "STOPPED": "KILLED", "FAILED": "FAILED"}


def start_search_run(cfg: Config, name: str, space: dict) -> str:
    """The parent run of a search: its settings as params, the space and base config as files."""
    params = {k: v for k, v in cfg.flat().items() if k.startswith(("tune.", "metrics.", "data.", "ray."))}
    params["search.params"] = ",".join(space.get("space", {}))
    run_id = create_run(cfg, name, {SEARCH_TAG: name}, params)
    client = MlflowClient(cfg.tracking.uri)
    client.log_text(run_id, yaml.safe_dump(space, sort_keys=False), "search_space.yaml")
    client.log_text(run_id, redact(cfg.to_yaml()), "config.yaml")
    return run_id


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

    params = [c for c in table.columns if "." in c]  # the hyperparameters: "train.lr_g", ...
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
