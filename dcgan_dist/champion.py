"""The registry rule: the `champion` alias moves only to a generator that beats the current one.

"Beats" means a lower `tune.metric` measured with the same protocol (sample counts, extractor,
data, resolution, seed). When the champion's recorded number was taken with another protocol,
the champion is measured again now, with this one, before the comparison; a new version with
no number never takes the alias from a champion that has one.
"""

from __future__ import annotations

import logging
from typing import Callable

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from dcgan_dist.config import Config
from dcgan_dist.errors import TrackingError
from dcgan_dist.lease import RunLease
from dcgan_dist.tracking import CHAMPION, tag_scores

log = logging.getLogger(__name__)
PROMOTION_WAIT_S = 600  # another promotion may be re-measuring the champion (FID on a GPU: minutes)

# measure(version) -> (scores, {metric: protocol key}) under the candidate's protocol
Measure = Callable[[str], tuple[dict[str, float], dict[str, str]]]


def recorded(mv, metric: str) -> tuple[float | None, str | None]:
    """(value, protocol key) of `metric` as tagged on a model version, or (None, None)."""
    value = mv.tags.get(f"metric.{metric}")
    return (float(value) if value is not None else None), mv.tags.get(f"protocol.{metric}")


def promote_if_better(cfg: Config, version: str, measure: Measure | None = None) -> bool:
    """Give `version` the champion alias if there is none, or if it measures better. Returns True if it has it.

    MLflow has no compare-and-set on aliases, so the read, the comparison and the write happen under a lock: the
    lease of lease.py, named after the model, in `ray.storage_path` (an S3 compare-and-set, or an flock). Two jobs
    promoting at once take turns, and the second compares against whatever the first left. Jobs promoting the same
    model must share `ray.storage_path` for this to hold."""
    with RunLease(cfg.ray.storage_path, f"registry-{cfg.tracking.model_name}", wait_s=PROMOTION_WAIT_S,
                  label=f"a promotion of {cfg.tracking.model_name!r} is under way",
                  hint=f"still held after {PROMOTION_WAIT_S} s; if its holder died, it lapses by itself") as lock:
        return _promote_if_better(cfg, version, measure, lock)


def _promote_if_better(cfg: Config, version: str, measure: Measure | None, lock: RunLease) -> bool:
    client, name, metric = MlflowClient(cfg.tracking.uri), cfg.tracking.model_name, cfg.tune.metric
    later = (f"version {version} stays registered without the alias; to promote it later, run the same training "
             "command again once MLflow answers (the same step is not registered twice)")
    try:  # a failed read is not "no champion": that would hand the alias to any version, better or not
        candidate = client.get_model_version(name, version)
        current = client.get_registered_model(name).aliases.get(CHAMPION)
        champ = client.get_model_version(name, current) if current is not None else None
    except (MlflowException, RestException, OSError) as e:
        raise TrackingError(f"could not read @{CHAMPION} of {name!r} ({str(e).splitlines()[0][:200]}); {later}") \
            from None
    value, protocol = recorded(candidate, metric)

    def move_alias() -> None:
        if not lock.still_held():  # fencing: a lock that lapsed (a stalled re-measure) may have a new holder
            raise TrackingError(f"the promotion lock of {name!r} lapsed before @{CHAMPION} could move; {later}")
        client.set_registered_model_alias(name, CHAMPION, version)

    if champ is None:
        move_alias()
        log.info("%s version %s is the first: alias @%s set", name, version, CHAMPION)
        return True
    if str(champ.version) == str(version):
        return True
    if value is None:
        log.info("%s version %s has no %s: @%s stays on version %s", name, version, metric, CHAMPION, champ.version)
        return False
    champ_value, champ_protocol = recorded(champ, metric)
    if champ_protocol != protocol:
        if measure is None:
            log.info("@%s (version %s) has no %s under this protocol and cannot be measured: it stays",
                     CHAMPION, champ.version, metric)
            return False
        scores, protocols = measure(str(champ.version))
        if protocols.get(metric) != protocol:
            raise RuntimeError(f"re-measuring version {champ.version} used another protocol than version {version}")
        tag_scores(cfg, str(champ.version), scores, protocols)
        champ_value = scores[metric]
    if value < champ_value:
        move_alias()
        log.info("%s version %s: %s %.4f beats @%s version %s (%.4f): alias moved",
                 name, version, metric, value, CHAMPION, champ.version, champ_value)
        return True
    log.info("%s version %s: %s %.4f does not beat @%s version %s (%.4f): alias stays",
             name, version, metric, value, CHAMPION, champ.version, champ_value)
    return False
