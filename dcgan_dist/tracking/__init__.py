"""MLflow, one module per job:

    uris.py        tracking URIs made absolute, credentials redacted
    store.py       a new sqlite store's tables created by one job at a time
    runs.py        the experiment, creating runs (the one way), finding a training run by name, tags, end
    run_logger.py  rank 0's background sender: metrics, sample grids, tags, outages and a lost rank 0 survived
    registry.py    the generator as a registered model version (generator_model.py, a pyfunc), tagged with its scores
    model_card.py  the version's description: data, settings, training, scores, sample grid
    search.py      a search's parent run, its trials' outcomes, the summary

The names are re-exported here, so callers write `tracking.start_run(...)`.
"""

from dcgan_dist.tracking.model_card import write_card
from dcgan_dist.tracking.registry import CHAMPION, load_generator, log_generator, tag_scores
from dcgan_dist.tracking.run_logger import Held, RunLogger, deliver_held, read_held, write_held
from dcgan_dist.tracking.runs import (RUN_NAME_TAG, SystemWatch, create_run, end_run, experiment_id, find_run,
                                      log_dataset, log_values, start_run, tag_run)
from dcgan_dist.tracking.search import SEARCH_TAG, close_trial_runs, log_search_summary, start_search_run
from dcgan_dist.tracking.store import ready_store
from dcgan_dist.tracking.uris import artifact_location, as_seen_from, redact, resolve_uri, where_to_browse

__all__ = ["CHAMPION", "Held", "RUN_NAME_TAG", "SEARCH_TAG", "RunLogger", "SystemWatch", "artifact_location",
           "as_seen_from", "close_trial_runs", "create_run", "deliver_held", "end_run", "experiment_id", "find_run",
           "load_generator", "log_dataset", "log_generator", "log_search_summary", "log_values", "read_held",
           "ready_store", "redact", "resolve_uri", "start_run", "start_search_run", "tag_run", "tag_scores",
           "write_card", "write_held"]
