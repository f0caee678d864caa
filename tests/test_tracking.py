import getpass
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from dcgan_dist.config import load_config
from dcgan_dist.tracking import as_seen_from, redact, resolve_uri, start_run


def test_redact_strips_credentials_only():
    assert redact("http://alice:s3cret@mlflow.internal:5000") == "http://***@mlflow.internal:5000"
    assert redact("sqlite:////data/mlflow.db") == "sqlite:////data/mlflow.db"
    assert redact("s3://bucket/prefix/") == "s3://bucket/prefix/"


def test_credentials_never_reach_params_or_config_artifact(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = load_config(overrides=[f"tracking.uri={uri}", "data.url=https://user:hunter2@example.com/shards"])
    run_id, resumed = start_run(cfg, "secrets")
    assert not resumed
    client = MlflowClient(uri)
    params = client.get_run(run_id).data.params
    assert params["data.url"] == "https://***@example.com/shards"
    local = client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    assert "hunter2" not in open(local).read()
    assert start_run(cfg, "secrets") == (run_id, True)  # same name: the same run again
    # MLflow's standard context tags, as mlflow.start_run would set them (create_run sets none by itself)
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] and tags["dcgan.run_name"] == "secrets"


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_jobs_opening_the_same_new_sqlite_store_at_once_all_find_its_tables(tmp_path):
    """Four processes, as four jobs started together on the default sqlite:///mlflow.db: without the lock in
    ready_store, MLflow's table creation races and all but one fail with "table ... already exists"."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    code = ("import sys; from mlflow import MlflowClient; from dcgan_dist.tracking import ready_store; "
            "ready_store(sys.argv[1]); print(MlflowClient(sys.argv[1]).create_experiment(sys.argv[2]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, f"job-{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in outs), [err[-800:] for _, err, rc in outs if rc]
    assert {e.name for e in MlflowClient(uri).search_experiments()} >= {f"job-{i}" for i in range(4)}


def test_a_loopback_tracking_server_is_the_drivers_machine_seen_from_other_nodes():
    driver, other = "10.0.0.4", "10.0.1.7"
    assert as_seen_from("http://127.0.0.1:5000", driver, other) == "http://10.0.0.4:5000"
    assert as_seen_from("https://u:p@localhost:5000/x", driver, other) == "https://u:p@10.0.0.4:5000/x"
    assert as_seen_from("http://127.0.0.1:5000", driver, driver) == "http://127.0.0.1:5000"  # same node: as given
    for uri in ("http://mlflow.internal:5000", "http://10.0.0.9:5000", "sqlite:////data/m.db"):
        assert as_seen_from(uri, driver, other) == uri


def test_a_sqlite_store_keeps_its_artifacts_beside_the_database(tmp_path, monkeypatch):
    """Not in ./mlruns of whatever folder the first run started in (MLflow's default)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'm.db'}"
    (tmp_path / "store").mkdir()
    cfg = load_config(overrides=[f"tracking.uri={uri}"])
    run_id, _ = start_run(cfg, "where")
    assert (tmp_path / "store" / "mlartifacts").is_dir()
    assert any((tmp_path / "store" / "mlartifacts").rglob("config.yaml"))
    assert not (tmp_path / "mlruns").exists()


def test_registering_the_same_step_of_a_run_twice_returns_the_same_version(tmp_path):
    from dcgan_dist.models import build_generator
    from dcgan_dist.tracking import log_generator

    cfg = load_config(overrides=[f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "model.ngf=8", "model.nc=1"])
    run_id, _ = start_run(cfg, "twice")
    g = build_generator(cfg.model)
    first = log_generator(cfg, run_id, g, 12)
    assert log_generator(cfg, run_id, g, 12) == first  # a re-run of a finished run registers nothing new
    assert log_generator(cfg, run_id, g, 16) != first
    assert len(MlflowClient(cfg.tracking.uri).search_model_versions("name='dcgan-generator'")) == 2


def test_the_registered_generator_answers_as_a_pyfunc(tmp_path):
    """What a user of `mlflow.pyfunc.load_model(models:/...)` relies on: a batch of one, a DataFrame of latent
    rows, an RGB 64x64 model; a wrong latent size is refused by the signature, naming the shapes."""
    import mlflow
    import numpy as np
    import pandas as pd
    import pytest
    from mlflow.exceptions import MlflowException

    from dcgan_dist.models import build_generator
    from dcgan_dist.tracking import log_generator

    cfg = load_config(overrides=[f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "model.ngf=8", "model.nc=3",
                                 "model.resolution=64"])
    run_id, _ = start_run(cfg, "served")
    version = log_generator(cfg, run_id, build_generator(cfg.model), 1)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model(f"models:/dcgan-generator/{version}")
    z = np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32)
    one = model.predict(z[:1])
    assert one.shape == (1, 3, 64, 64) and one.dtype == np.float32 and -1 <= one.min() <= one.max() <= 1
    rows = model.predict(pd.DataFrame(z))
    assert np.asarray(rows).shape == (3, 3, 64, 64)
    np.testing.assert_allclose(np.asarray(rows)[0], one[0], rtol=1e-4, atol=1e-5)  # eval mode: per-sample output
    with pytest.raises(MlflowException, match=r"\(-1, 100\)"):
        model.predict(z[:, :50])


def test_held_metrics_and_tags_travel_in_a_checkpoint_and_are_delivered_once(tmp_path):
    """A rank 0 that dies holding metrics and tags (its server down or slow, its group torn down to resize) leaves
    them in the checkpoint; whoever reads that checkpoint later sends them, skipping what the run already has."""
    import ray.train

    from conftest import free_port
    from dcgan_dist import tracking

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = load_config(overrides=[f"tracking.uri={uri}"])
    run_id, _ = start_run(cfg, "held")
    MlflowClient(uri).log_metric(run_id, "loss_d", 0.9, step=2)  # delivered before the server went away
    logger = tracking.RunLogger(f"http://127.0.0.1:{free_port()}", run_id, retry_s=0.1, close_timeout_s=0.5)
    for step in (2, 4):
        logger.add(step, {"loss_d": step / 10, "loss_g": 1.0})
    logger.flush()
    logger.set_tags({"dcgan.resize.step_00000005": "2 -> 1 workers"})
    logger.add(6, {"loss_d": 0.6, "loss_g": 1.0})
    (tmp_path / "ckpt").mkdir()
    tracking.write_held(logger.held(), str(tmp_path / "ckpt"))
    assert logger.close() == 6  # the server never came back: undelivered, and said so

    held = tracking.read_held(ray.train.Checkpoint.from_directory(str(tmp_path / "ckpt")))
    assert [(m.key, m.step) for m in held.metrics] == [("loss_d", 2), ("loss_g", 2), ("loss_d", 4), ("loss_g", 4),
                                                       ("loss_d", 6), ("loss_g", 6)]
    assert held.tags == {"dcgan.resize.step_00000005": "2 -> 1 workers"}
    assert tracking.deliver_held(uri, run_id, held) == 5  # 4 values (step 2 was already there) and the tag
    assert tracking.deliver_held(uri, run_id, held) == 0  # and nothing twice
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss_d")] == [2, 4, 6]
    assert MlflowClient(uri).get_run(run_id).data.tags["dcgan.resize.step_00000005"] == "2 -> 1 workers"

    # A successor queues what it took over; once its sender delivered a tag, no checkpoint carries it again.
    successor = tracking.RunLogger(uri, run_id, close_timeout_s=30)
    successor.take_over(tracking.Held([], {"dcgan.resume.skipped.step_00000007": "checkpoint_6: truncated"}))
    assert successor.close() == 0 and successor.held() == tracking.Held([], {})
    assert MlflowClient(uri).get_run(run_id).data.tags["dcgan.resume.skipped.step_00000007"] == "checkpoint_6: truncated"


def test_a_grid_reaches_the_run_once_across_restarts_and_an_item_the_server_refuses_is_dropped(tmp_path):
    """A restarted rank 0 redoing a step does not upload its grid again (by file or in the image view); a grid
    whose upload always fails and a tag the store refuses are dropped after a few tries with a count, and the
    metrics queued behind them still arrive."""
    import torch

    from dcgan_dist import tracking
    from dcgan_dist.tracking import run_logger

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = load_config(overrides=[f"tracking.uri={uri}"])
    run_id, _ = start_run(cfg, "grids")
    images = torch.rand(64, 1, 32, 32) * 2 - 1
    for _ in range(2):  # the first rank 0, then its successor redoing step 4
        logger = tracking.RunLogger(uri, run_id, retry_s=0.05, skip_logged=True)
        logger.log_grid(4, images)
        assert logger.close() == 0
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step_000004.png"]
    shown = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert len(shown) == 1, shown

    # A grid whose upload always fails (here the store's image folder is a file, so every write of it fails,
    # root or not) and a tag the store refuses (an invalid name), while the server answers everything else.
    run_id, _ = start_run(cfg, "refused")
    folder = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").write_text("not a folder")
    logger = tracking.RunLogger(uri, run_id, retry_s=0.05)
    logger.log_grid(8, images)
    logger.set_tags({"not a valid name!": "x"})
    logger.add(2, {"loss_d": 0.5})
    logger.flush()
    assert logger.close() == 0
    assert logger.dropped_items == 2 and run_logger.ITEM_TRIES > 1
    assert [m.step for m in client.get_metric_history(run_id, "loss_d")] == [2]  # not held back by them
    assert "not a valid name!" not in client.get_run(run_id).data.tags
