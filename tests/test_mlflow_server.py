"""A real `mlflow server` started by cluster/start_mlflow.sh: outages during training, basic auth."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client

from conftest import REPO, tiny_overrides
from dcgan_dist import tracking
from dcgan_dist.config import load_config
from servers import MlflowServer
from dcgan_dist.errors import TrackingError

AUTH = {"MLFLOW_AUTH": "basic", "MLFLOW_AUTH_ADMIN_PASSWORD": "correct-horse-battery", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32}


def steps(client, run_id, key="loss_d"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def log_batch_requests(server: MlflowServer) -> int:
    return server.log.read_text().count("POST /api/2.0/mlflow/runs/log-batch")


def test_metrics_held_during_an_outage_are_delivered_when_the_server_returns(tmp_path, digits_dir, caplog):
    """...in one request for the whole backlog (MLflow's limit allowing), so a server that fell behind catches up."""
    server = MlflowServer(tmp_path / "server")
    try:
        cfg = load_config(overrides=tiny_overrides(tmp_path, digits_dir, **{"tracking.uri": server.url}))
        run_id, _ = tracking.start_run(cfg, "outage")
        logger = tracking.RunLogger(server.url, run_id, retry_s=0.5)
        logger.add(1, {"loss_d": 1.0})
        logger.flush()
        server.stop()  # killed like a crashed server
        with caplog.at_level(logging.WARNING, logger="dcgan_dist"):
            t0 = time.time()
            for step in range(2, 10):
                logger.add(step, {"loss_d": float(step), "loss_g": 1.0})
                logger.flush()
            logger.log_grid(9, __import__("torch").zeros(4, 1, 8, 8))
            assert time.time() - t0 < 5  # training does not wait for the server
            time.sleep(2)
            before = log_batch_requests(server)
            server.start()
            assert logger.close() == 0
        assert "unreachable" in caplog.text and "reachable again" in caplog.text
        client = MlflowClient(server.url)
        assert steps(client, run_id) == list(range(1, 10)) and steps(client, run_id, "loss_g") == list(range(2, 10))
        assert log_batch_requests(server) - before == 1  # 8 steps held, one request
        assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step_000009.png"]
    finally:
        server.stop()


def test_what_cannot_be_delivered_is_bounded_and_reported(caplog):
    from conftest import free_port

    gone = f"http://127.0.0.1:{free_port()}"  # a tracking server that died and never comes back: nothing listens
    logger = tracking.RunLogger(gone, "0" * 32, max_held=6, retry_s=0.2, close_timeout_s=2)
    with caplog.at_level(logging.WARNING, logger="dcgan_dist"):
        for step in range(1, 6):
            logger.add(step, {"loss_d": 1.0, "loss_g": 2.0})
            logger.flush()
        lost = logger.close()
    assert lost == 10  # every value counted: 4 dropped beyond the bound of 6, 6 held at the end
    assert "dropped" in caplog.text and "10 metric values" in caplog.text


def test_basic_auth_rejects_anonymous_clients_and_accepts_credentials(tmp_path, digits_dir, monkeypatch):
    """...on a server of two worker processes: MLflow's own MLFLOW_WORKERS reaches the server start_mlflow.sh runs."""
    import psutil

    server = MlflowServer(tmp_path / "server", env={**AUTH, "MLFLOW_WORKERS": "2"})
    try:
        commands = [p.cmdline() for p in psutil.Process(server.proc.pid).children(recursive=True)]
        assert any("uvicorn" in " ".join(c) and "--workers" in c and c[c.index("--workers") + 1] == "2"
                   for c in commands), commands
        cfg = load_config(overrides=tiny_overrides(tmp_path, digits_dir, **{"tracking.uri": server.url}))
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with pytest.raises(TrackingError, match="cannot reach MLflow .*401|not authenticated"):
            tracking.start_run(cfg, "anonymous")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", AUTH["MLFLOW_AUTH_ADMIN_PASSWORD"])
        run_id, _ = tracking.start_run(cfg, "with-credentials")
        logger = tracking.RunLogger(server.url, run_id)
        logger.add(1, {"loss_d": 0.5})
        assert logger.close() == 0
        assert steps(MlflowClient(server.url), run_id) == [1]
        params = MlflowClient(server.url).get_run(run_id).data.params
        assert AUTH["MLFLOW_AUTH_ADMIN_PASSWORD"] not in str(params)
    finally:
        server.stop()


def test_a_postgresql_store_holds_the_runs_as_start_mlflow_documents(tmp_path_factory, tmp_path, digits_dir):
    """start_mlflow.sh with MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://... (a real PostgreSQL: pgserver's
    bundled binaries on a local socket) and two server processes, as a head that outgrew sqlite runs it: a run's
    metrics are rows of PostgreSQL's tables, and no sqlite file appears."""
    from bench.tracking_load import postgres_store

    database, uri = postgres_store(tmp_path_factory.mktemp("pg"))
    server = MlflowServer(tmp_path / "server", env={"MLFLOW_BACKEND_STORE_URI": uri, "MLFLOW_WORKERS": "2"})
    try:
        cfg = load_config(overrides=tiny_overrides(tmp_path, digits_dir, **{"tracking.uri": server.url}))
        run_id, _ = tracking.start_run(cfg, "on-postgres")
        logger = tracking.RunLogger(server.url, run_id)
        for step in (1, 2, 3):
            logger.add(step, {"loss_d": 0.5})
        assert logger.close() == 0
        assert steps(MlflowClient(server.url), run_id) == [1, 2, 3]
        rows = database.psql(f"\\c mlflow\nSELECT step FROM metrics WHERE run_uuid = '{run_id}' ORDER BY step;\n")
        assert [int(x) for x in rows.split() if x.isdigit()] == [1, 2, 3], rows
        assert not list((tmp_path / "server").glob("*.db"))
    finally:
        server.stop()
        database.cleanup()


def write_login(path, user: str, password: str):
    path.write_text(f"[mlflow]\nmlflow_tracking_username = {user}\nmlflow_tracking_password = {password}\n")
    return path


def grant_trainer(url: str, credentials, admin_file) -> subprocess.CompletedProcess:
    """cluster/mlflow_access.py as ray_cluster.yaml runs it on the head, the admin password from its 0600 file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return subprocess.run([sys.executable, str(REPO / "cluster" / "mlflow_access.py"), "--uri", url,
                           "--trainer-credentials", str(credentials)], capture_output=True, text=True, timeout=120,
                          env={**env, "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(admin_file)})


def test_the_trainer_login_logs_and_registers_but_reaches_nothing_else(tmp_path, digits_dir, monkeypatch):
    """The nodes' login gets EDIT on its experiment and registered model only: a run logs, registers, moves the
    champion alias and writes the card; other experiments, deletion and user administration are refused."""
    from dcgan_dist import checkpoint
    from dcgan_dist.step import GANStep
    from dcgan_dist.trainer import prepare_inputs, register

    admin_file = tmp_path / "admin_password"  # made on the MLflow machine, never shipped to the nodes
    admin_file.write_text("the-admin-password-of-the-head\n")
    admin_file.chmod(0o600)
    server = MlflowServer(tmp_path / "server", env={**AUTH, "MLFLOW_AUTH_ADMIN_PASSWORD": "",
                                                    "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(admin_file)})
    trainer_password = "trainer-password-on-every-node"
    credentials = write_login(tmp_path / "credentials", "trainer", trainer_password)
    try:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "the-admin-password-of-the-head")
        MlflowClient(server.url).create_experiment("someone-else")
        for _ in range(2):  # the second run (every `ray up`) changes nothing
            r = grant_trainer(server.url, credentials, admin_file)
            assert r.returncode == 0 and "'trainer' has EDIT" in r.stdout, r.stderr
        assert trainer_password not in r.stdout + r.stderr

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", trainer_password)
        cfg = prepare_inputs(load_config(overrides=tiny_overrides(tmp_path, digits_dir, **{
            "tracking.uri": server.url})))
        step = GANStep.from_config(cfg)
        run_id, _ = tracking.start_run(cfg, "as-trainer")
        logger = tracking.RunLogger(server.url, run_id)
        logger.add(1, {"loss_d": 0.5})
        assert logger.close() == 0
        version, promoted = register(cfg, run_id, checkpoint.training_state(step, 1, [checkpoint.rng_state()], {}))
        tracking.end_run(cfg, run_id)
        client = MlflowClient(server.url)
        assert promoted and client.get_model_version_by_alias(cfg.tracking.model_name, "champion").version == version
        assert "Data" in client.get_model_version(cfg.tracking.model_name, version).description  # the card
        assert steps(client, run_id) == [1]

        refused = pytest.raises(MlflowException, match="Permission denied|PERMISSION_DENIED|403")
        with refused:
            client.get_experiment_by_name("someone-else")
        with refused:
            client.delete_experiment(client.get_experiment_by_name(cfg.tracking.experiment).experiment_id)
        with refused:
            client.delete_registered_model(cfg.tracking.model_name)
        with refused:
            get_app_client("basic-auth", tracking_uri=server.url).create_user("mallory", "mallory-password-123")
        with refused:
            get_app_client("basic-auth", tracking_uri=server.url).grant_user_permission(
                "trainer", "experiment", "0", "MANAGE")

        # The trainer's login was checked once and is remembered (MLFLOW_AUTH_CACHE_TTL_S, 60 s by default), yet a
        # password the admin changes stops working at once: the cache does not outlive what auth protects.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "the-admin-password-of-the-head")
        get_app_client("basic-auth", tracking_uri=server.url).update_user_password("trainer", "a-new-trainer-password")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
            client.get_run(run_id)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-new-trainer-password")
        assert client.get_run(run_id).info.run_id == run_id
    finally:
        server.stop()


def test_the_grant_refuses_a_bad_setup_in_one_line(tmp_path):
    admin_file = tmp_path / "admin_password"
    admin_file.write_text("the-admin-password-of-the-head")
    for login, needle in [(("admin", "admin-password-12"), "must not be the admin"),
                          (("trainer", "short"), "12 or more characters")]:
        r = grant_trainer("http://127.0.0.1:9", write_login(tmp_path / "c", *login), admin_file)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = grant_trainer("http://127.0.0.1:9", tmp_path / "missing", admin_file)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_start_mlflow_refuses_weak_auth_settings(tmp_path):
    with pytest.raises(RuntimeError, match="12 or more characters"):
        MlflowServer(tmp_path / "server", env={**AUTH, "MLFLOW_AUTH_ADMIN_PASSWORD": "short"})
    with pytest.raises(RuntimeError, match="12 or more characters"):  # missing: its own message, not `set -u`'s
        MlflowServer(tmp_path / "server", env={k: v for k, v in AUTH.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"})
    with pytest.raises(RuntimeError, match="MLFLOW_AUTH_CACHE_TTL_S must be a whole number of seconds, got '1m'"):
        MlflowServer(tmp_path / "server", env={**AUTH, "MLFLOW_AUTH_CACHE_TTL_S": "1m"})
    readable = tmp_path / "admin_password"
    readable.write_text("long-enough-password")
    readable.chmod(0o644)
    no_env = {**AUTH, "MLFLOW_AUTH_ADMIN_PASSWORD": ""}
    with pytest.raises(RuntimeError, match="readable by others"):
        MlflowServer(tmp_path / "server", env={**no_env, "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(readable)})
    with pytest.raises(RuntimeError, match="does not exist"):
        MlflowServer(tmp_path / "server", env={**no_env, "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(tmp_path / "none")})
    with pytest.raises(RuntimeError, match="SECRET_KEY is shorter than 32"):
        MlflowServer(tmp_path / "server", env={**AUTH, "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"})
