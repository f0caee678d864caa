"""tracking-load: how many trials one MLflow server with basic auth keeps up with.

Each simulated trial is what a trial's rank 0 sends: a RunLogger (the real one, with its background sender) that
queues a batch of the real per-step metric set every `log_every_s` and an 8x8 sample grid every `grid_every` log
steps. The trials run as threads in a few client processes, against one server started by
cluster/start_mlflow.sh on loopback with basic auth, logged in as the trainer (not the admin, so every request
also pays its permission check). Per (auth cache, trials) it reports the server's requests/s and metric points/s
(from its access log), its CPU seconds per request and cores busy, the send latency percentiles, the backlog the
senders hold at the end of the window, and whether every point arrived after it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench import JOBS

METRIC_KEYS = ("loss_d", "loss_g", "d_real", "d_fake", "data_skipped", "data_retries", "allreduce_ms",
               "allreduce_mb", "images_per_s", "num_workers", "lr_g", "lr_d")  # rank 0's set at a log step
THREADS_PER_PROCESS = 16


def _trials(uri: str, run_ids: list[str], seconds: float, log_every_s: float, grid_every: int, start, out) -> None:
    """One client process: a RunLogger per run, each logging on its own schedule; sends back per-send latencies,
    the backlog at the end of the window and the steps each logged."""
    import torch

    from dcgan_dist.tracking import RunLogger

    latencies: list[float] = []

    class TimedLogger(RunLogger):
        def _send_metrics(self, batch):
            t = time.perf_counter()
            super()._send_metrics(batch)
            latencies.append(time.perf_counter() - t)

    loggers = [TimedLogger(uri, run_id, close_timeout_s=600) for run_id in run_ids]
    grid = torch.rand(64, 3, 32, 32) * 2 - 1
    steps = [0] * len(loggers)
    start.wait()  # every process imported and ready: the window starts now for all
    end = time.time() + seconds

    def trial(i: int) -> None:
        time.sleep(log_every_s * i / len(loggers))  # spread the trials' phases, as independent trials are
        while time.time() < end:
            steps[i] += 1
            loggers[i].add(steps[i], {k: float(steps[i]) for k in METRIC_KEYS})
            loggers[i].flush()
            if steps[i] % grid_every == 0:
                loggers[i].log_grid(steps[i], grid)
            time.sleep(log_every_s)

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(len(loggers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    backlog = sum(len(lg.held().metrics) for lg in loggers)
    drained = time.time()
    undelivered = sum(lg.close() for lg in loggers)
    out.put({"latencies": latencies, "backlog": backlog, "drain_s": time.time() - drained,
             "undelivered": undelivered, "steps": dict(zip(run_ids, steps))})


def _server_cpu_s(pid: int) -> float:
    import psutil

    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    return sum(sum(p.cpu_times()[:4]) for p in procs if p.is_running())


def _requests(log: Path) -> int:
    return sum(1 for line in log.read_text(errors="replace").splitlines() if re.search(r'" \d{3}', line))


def measure(server, uri: str, trials: int, seconds: float, log_every_s: float, grid_every: int) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dcgan").experiment_id
    run_ids = [client.create_run(exp, run_name=f"load-{trials}-{i}").info.run_id for i in range(trials)]
    groups = [run_ids[i:i + THREADS_PER_PROCESS] for i in range(0, trials, THREADS_PER_PROCESS)]
    ctx = mp.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(len(groups) + 1)
    procs = [ctx.Process(target=_trials, args=(uri, g, seconds, log_every_s, grid_every, start, out)) for g in groups]
    for p in procs:
        p.start()
    start.wait(timeout=600)
    requests0, cpu0, t0 = _requests(server.log), _server_cpu_s(server.proc.pid), time.time()
    parts = [out.get(timeout=seconds + 900) for _ in procs]
    for p in procs:
        p.join()
    # the window plus the drain: what the server did to answer everything the trials sent
    wall, requests, cpu = time.time() - t0, _requests(server.log) - requests0, _server_cpu_s(server.proc.pid) - cpu0
    latencies = np.array([x for part in parts for x in part["latencies"]]) * 1000
    logged = {run: n for part in parts for run, n in part["steps"].items()}
    arrived = all(len(client.get_metric_history(run, "loss_d")) == n for run, n in logged.items())
    points = sum(logged.values()) * len(METRIC_KEYS)
    return {"trials": trials, "offered_batches_per_s": round(trials / log_every_s, 1),
            "requests_per_s": round(requests / wall, 1), "points_per_s": round(points / wall, 1),
            "server_cpu_ms_per_request": round(1000 * cpu / max(requests, 1), 1),
            "server_cores_busy": round(cpu / wall, 2),
            "send_p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
            "send_p99_ms": round(float(np.percentile(latencies, 99)), 1) if len(latencies) else None,
            "backlog_at_end": sum(p["backlog"] for p in parts),
            "drain_s": round(max(p["drain_s"] for p in parts), 1),
            "all_arrived": arrived and not any(p["undelivered"] for p in parts)}


def auth_server(folder: Path, env: dict | None = None):
    """cluster/start_mlflow.sh with basic auth, its state in `folder`, and the trainer login granted by
    cluster/mlflow_access.py as on a cluster's head; passwords made here for this run only. Returns the server and
    the environment a trainer process logs in with (MLflow's MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    from servers import MlflowServer

    folder.mkdir(parents=True, exist_ok=True)
    admin_file, login = folder / "admin_password", folder / "trainer_login"
    admin_file.write_text(secrets.token_urlsafe(18))
    admin_file.chmod(0o600)
    trainer_password = secrets.token_urlsafe(18)
    login.write_text(f"[mlflow]\nmlflow_tracking_username = trainer\nmlflow_tracking_password = {trainer_password}\n")
    login.chmod(0o600)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    admin = {**clean, "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(admin_file)}
    server = MlflowServer(folder / "state", env={**admin, "MLFLOW_AUTH": "basic", **(env or {})})
    grant = subprocess.run([sys.executable, str(JOBS.parent / "cluster" / "mlflow_access.py"), "--uri", server.url,
                            "--trainer-credentials", str(login)], capture_output=True, text=True, timeout=300, env=admin)
    if grant.returncode:
        server.stop()
        raise SystemExit(f"mlflow_access.py failed: {grant.stderr[-2000:]}")
    return server, {"MLFLOW_TRACKING_USERNAME": "trainer", "MLFLOW_TRACKING_PASSWORD": trainer_password}


def postgres_store(folder: Path):
    """A PostgreSQL server on a unix socket in `folder` (pgserver's bundled binaries: nothing to install on the
    machine) with an empty `mlflow` database. Returns the server and the store URI start_mlflow.sh takes."""
    import pgserver

    folder.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(folder), cleanup_mode="stop")
    server.psql("CREATE DATABASE mlflow;")
    return server, f"postgresql+psycopg2://postgres:@/mlflow?host={folder}"


def bench_tracking_load(trials=(1, 8, 32, 64), seconds: float = 60, log_every_s: float = 2.0, grid_every: int = 10,
                        cache_ttls=(0, 60), workdir: str | None = None, stores=("sqlite",), workers: int = 1
                        ) -> list[dict]:
    """One server per (store, cache ttl), `workers` MLflow server processes (MLFLOW_WORKERS) each."""
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for store in stores:
            for ttl in cache_ttls:
                folder = Path(tmp) / f"{store}-ttl{ttl}"
                env = {"MLFLOW_AUTH_CACHE_TTL_S": str(ttl), "MLFLOW_WORKERS": str(workers)}
                database = None
                if store == "postgres":
                    database, env["MLFLOW_BACKEND_STORE_URI"] = postgres_store(folder / "pg")
                server, login = auth_server(folder, env)
                try:
                    os.environ.update(login)
                    for n in trials:
                        row = {"store": store, "workers": workers, "auth_cache_ttl_s": ttl,
                               **measure(server, server.url, n, seconds, log_every_s, grid_every)}
                        print(row, flush=True)
                        rows.append(row)
                finally:
                    for k in login:
                        os.environ.pop(k, None)
                    server.stop()
                    if database:
                        database.cleanup()
    return rows
