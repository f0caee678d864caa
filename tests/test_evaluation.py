"""Evaluation outside training and the champion rule, against real shards and a real sqlite MLflow store."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from conftest import tiny_overrides
from dcgan_dist import champion, evaluation, tracking
from dcgan_dist.config import load_config
from dcgan_dist.data import shards, sources
from dcgan_dist.data.loader import read_sample, resolve_shards
from dcgan_dist.metrics.evaluator import Evaluator, Protocol
from dcgan_dist.trainer import prepare_inputs


class BankGenerator(nn.Module):
    """z -> one of a fixed set of real images, with its contrast scaled: a generator of known quality.

    scale 1 reproduces real images (SWD near 0); smaller scales are dimmer and measurably worse.
    """

    def __init__(self, images: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.register_buffer("bank", images.float() / 127.5 - 1)
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        idx = (z[:, 0].abs() * 1e4).long() % self.bank.shape[0]
        return (self.bank.index_select(0, idx) + 1) * self.scale - 1


class StandinExtractor:
    """A small random network in the Inception's place: uint8 (N, C, 32, 32) images -> (N, 16) features."""

    name, sha256 = "standin", "5" * 64

    def __init__(self):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def __call__(self, images: torch.Tensor):
        with torch.no_grad():
            return self.net(images.float().expand(-1, 3, -1, -1) / 127.5 - 1).double().numpy()


def standin_extractor() -> StandinExtractor:
    return StandinExtractor()


@pytest.fixture
def cfg(tmp_path, digits_dir):
    return prepare_inputs(load_config(overrides=tiny_overrides(tmp_path, digits_dir)))


def test_real_side_is_cached_per_manifest_and_rebuilt_when_the_data_changes(cfg, tmp_path, digits_dir):
    shard_set = resolve_shards(str(digits_dir))
    first = Evaluator(cfg.metrics, shard_set, channels=1, resolution=32, extractor=standin_extractor())
    assert first.cache_hits == [] and len(first.real_images) == 128 and first.real_features.shape == (128, 16)
    again = Evaluator(cfg.metrics, shard_set, channels=1, resolution=32, extractor=standin_extractor())
    assert again.cache_hits == ["images", "standin-555555555555"]
    assert torch.equal(again.real_images, first.real_images)
    assert (again.real_features == first.real_features).all()

    # Same images, different sharding -> a different manifest -> a different cache entry.
    other = tmp_path / "digits-other"
    shards.build_shards(sources.Digits(), str(other), resolution=32, encoding="png", shard_size=300, progress=False)
    changed = Evaluator(cfg.metrics, resolve_shards(str(other)), channels=1, resolution=32)
    assert changed.cache_hits == []
    assert resolve_shards(str(other)).fingerprint != shard_set.fingerprint


def test_scores_carry_their_protocol_and_rank_generators_by_quality(cfg, digits_dir):
    ev = Evaluator(cfg.metrics, resolve_shards(str(digits_dir)), channels=1, resolution=32,
                   extractor=standin_extractor())
    bank = read_sample(resolve_shards(str(digits_dir)), 128, channels=1, resolution=32)
    good, _ = evaluation.score_generator(cfg, BankGenerator(bank), ev)
    bad, protocols = evaluation.score_generator(cfg, BankGenerator(bank, scale=0.5), ev)
    for name in ("swd", "fid", "kid"):
        assert good[name] < bad[name], name
    p = protocols["fid"]
    assert p == Protocol("fid", 128, 128, 32, resolve_shards(str(digits_dir)).fingerprint, "standin:" + "5" * 64, 0)
    assert Protocol.from_key(p.key) == p and protocols["swd"].extractor == ""
    # The same generator through the same protocol gives the same number (fixed noise, seeds).
    assert evaluation.score_generator(cfg, BankGenerator(bank), ev)[0]["swd"] == pytest.approx(good["swd"])


def register(cfg, gen, name: str, evaluator=None) -> str:
    run_id, _ = tracking.start_run(cfg, name)
    values, protocols = evaluation.score_generator(cfg, gen, evaluator) if evaluator else ({}, {})
    version = tracking.log_generator(cfg, run_id, gen, 1, values, {k: p.key for k, p in protocols.items()})
    tracking.end_run(cfg, run_id)
    return version


def test_a_worse_generator_never_takes_champion_from_a_better_one(cfg, digits_dir):
    client = MlflowClient(cfg.tracking.uri)
    ev = evaluation.make_evaluator(cfg)
    bank = read_sample(resolve_shards(str(digits_dir)), 128, channels=1, resolution=32)
    good, bad = BankGenerator(bank), BankGenerator(bank, scale=0.5)

    measure = evaluation.measurer(cfg, ev)
    def holder():
        return str(client.get_model_version_by_alias(cfg.tracking.model_name, "champion").version)

    v1 = register(cfg, bad, "bad-1", ev)
    assert champion.promote_if_better(cfg, v1, measure) and holder() == v1  # the first takes it
    v2 = register(cfg, good, "good-1", ev)
    assert champion.promote_if_better(cfg, v2, measure) and holder() == v2  # better: it moves
    v3 = register(cfg, bad, "bad-2", ev)
    assert not champion.promote_if_better(cfg, v3, measure) and holder() == v2  # worse: it stays
    v4 = register(cfg, good, "unscored")
    assert not champion.promote_if_better(cfg, v4, measure) and holder() == v2  # no number: it stays

    # A candidate measured with another protocol: the champion is re-measured with that protocol first.
    cfg64 = dataclasses.replace(cfg, metrics=dataclasses.replace(cfg.metrics, num_images=64))
    ev64 = evaluation.make_evaluator(cfg64)
    v5 = register(cfg64, bad, "bad-64", ev64)
    assert not champion.promote_if_better(cfg64, v5, evaluation.measurer(cfg64, ev64)) and holder() == v2
    tags = client.get_model_version(cfg.tracking.model_name, v2).tags
    assert Protocol.from_key(tags["protocol.swd"]).num_fake == 64  # re-measured and re-tagged
    assert float(tags["metric.swd"]) < float(client.get_model_version(cfg.tracking.model_name, v5).tags["metric.swd"])


def test_evaluate_job_scores_a_registered_version_and_logs_the_protocol(cfg, digits_dir):
    bank = read_sample(resolve_shards(str(digits_dir)), 128, channels=1, resolution=32)
    run_id, _ = tracking.start_run(cfg, "to-evaluate")
    version = tracking.log_generator(cfg, run_id, BankGenerator(bank, scale=0.8), 7)
    out = evaluation.evaluate_registered(cfg, f"models:/{cfg.tracking.model_name}/{version}")
    assert out.version == version and out.step == "7" and out.values["swd"] > 0
    client = MlflowClient(cfg.tracking.uri)
    tags = client.get_model_version(cfg.tracking.model_name, version).tags
    assert float(tags["metric.swd"]) == pytest.approx(out.values["swd"])
    assert Protocol.from_key(tags["protocol.swd"]).num_fake == 128
    run = client.get_run(out.run_id)
    assert run.data.metrics["swd"] == pytest.approx(out.values["swd"])
    assert Protocol.from_key(run.data.params["protocol.swd"]).data == resolve_shards(str(digits_dir)).fingerprint
    with pytest.raises(Exception, match="models:/nope@champion"):
        evaluation.evaluate_registered(cfg, "models:/nope@champion")


def test_two_promotions_at_once_take_turns_and_the_better_wins(cfg, digits_dir):
    """v2 and v3 both beat the champion v1; v3 beats v2. v2's promotion starts first and re-measures v1 slowly (a
    champion scored under another protocol); v3's starts while it does. Unlocked, v3 would take the alias and
    v2, finishing last, would overwrite it; under the promotion lock the second compares against the first's
    result, so v3 ends as champion whichever order they run in."""
    import threading
    import time

    client = MlflowClient(cfg.tracking.uri)
    bank = read_sample(resolve_shards(str(digits_dir)), 128, channels=1, resolution=32)
    v1 = register(cfg, BankGenerator(bank, scale=0.3), "worst", evaluation.make_evaluator(cfg))
    assert champion.promote_if_better(cfg, v1)
    cfg64 = dataclasses.replace(cfg, metrics=dataclasses.replace(cfg.metrics, num_images=64))
    ev64 = evaluation.make_evaluator(cfg64)
    v2 = register(cfg64, BankGenerator(bank, scale=0.6), "middle", ev64)
    v3 = register(cfg64, BankGenerator(bank), "best", ev64)

    def slow(seconds):
        def measure(version):
            time.sleep(seconds)  # re-measuring the champion: FID on real data takes a while
            return evaluation.measurer(cfg64, ev64)(version)
        return measure

    results = {}
    first = threading.Thread(target=lambda: results.update(v2=champion.promote_if_better(cfg64, v2, slow(2.0))))
    second = threading.Thread(target=lambda: results.update(v3=champion.promote_if_better(cfg64, v3, slow(0.1))))
    first.start()
    time.sleep(0.5)
    second.start()
    first.join(60)
    second.join(60)
    assert results == {"v2": True, "v3": True}  # each beat what it found
    assert str(client.get_model_version_by_alias(cfg.tracking.model_name, "champion").version) == v3


class RegistryReadsFail:
    """An HTTP proxy in front of a real MLflow server that answers 503 to every read of a registered model (what a
    timeout, a 5xx behind a load balancer or a locked database look like to the client) and passes the rest."""

    FAILS = ("/registered-models/get", "/registered-models/alias")

    def __init__(self, upstream: str):
        import http.server
        import threading
        import urllib.error
        import urllib.request

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "GET" and any(p in self.path for p in proxy.FAILS):
                    proxy.failed += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                request = urllib.request.Request(upstream + self.path, data=body or None, method=self.command,
                                                 headers={k: v for k, v in self.headers.items() if k != "Host"})
                try:
                    with urllib.request.urlopen(request, timeout=30) as r:
                        status, data, kind = r.status, r.read(), r.headers.get("Content-Type", "")
                except urllib.error.HTTPError as e:
                    status, data, kind = e.code, e.read(), e.headers.get("Content-Type", "")
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _relay

            def log_message(self, *args):
                pass

        self.failed = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_a_champion_that_cannot_be_read_is_not_replaced(tmp_path, monkeypatch):
    """@champion is v1 (swd 5); v2 is worse (swd 9). While reads of the registry fail, promoting v2 must fail with a
    clear message and leave the alias alone (a failed read was taken as "no champion" and the alias went to v2)."""
    from servers import MlflowServer

    from dcgan_dist.errors import TrackingError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = MlflowServer(tmp_path / "mlflow")
    proxy = RegistryReadsFail(server.url)
    try:
        direct = MlflowClient(server.url)
        name, protocol = "dcgan-generator", '{"metric": "swd"}'
        direct.create_registered_model(name)
        for version, swd in (("1", 5.0), ("2", 9.0)):
            direct.create_model_version(name, f"s3://models/generator-{version}")  # only named, never read
            direct.set_model_version_tag(name, version, "metric.swd", str(swd))
            direct.set_model_version_tag(name, version, "protocol.swd", protocol)
        direct.set_registered_model_alias(name, "champion", "1")
        cfg = load_config(overrides=[f"tracking.uri={proxy.url}", f"ray.storage_path={tmp_path / 'ray'}"])
        with pytest.raises(TrackingError, match=r"could not read @champion of 'dcgan-generator' .*; version 2 stays "
                                                r"registered without the alias; to promote it later"):
            champion.promote_if_better(cfg, "2")
        assert proxy.failed >= 1
        assert direct.get_model_version_by_alias(name, "champion").version == "1"
    finally:
        proxy.close()
        server.stop()


def test_the_validation_task_reaches_trains_controller_without_torch_mlflow_or_the_metrics():
    """Ray Train's controller unpickles the run's validation config only to hand its function on to the task; what
    that unpickling imports, every start pays on the head node (1.2 CPU-s here while the function was named from
    dcgan_dist.evaluation). Pickled as Ray pickles it, read back in a fresh process as the controller reads it."""
    import ray.cloudpickle

    from conftest import imported_by
    from dcgan_dist import trainer

    config = trainer.validation_config(load_config(overrides=["train.eval_every=4"]), "a-run", "127.0.0.1")
    assert config.fn.__module__ == "dcgan_dist.validation_task"  # pickled by that name
    code = "import sys, pickle, ray.train; pickle.loads(sys.stdin.buffer.read())"
    assert imported_by(code, ["torch", "mlflow", "dcgan_dist.evaluation", "dcgan_dist.metrics"],
                       stdin=ray.cloudpickle.dumps(config)) == []
