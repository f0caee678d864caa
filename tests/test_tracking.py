from mlflow import MlflowClient

from dcgan_dist.config import load_config
from dcgan_dist.tracking import redact, resolve_uri, start_run


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


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
