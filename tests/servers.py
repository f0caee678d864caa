"""Loopback servers for tests and benchmarks: moto's standalone S3 server (needs the `dev` extra) and
an MLflow tracking server started through `cluster/start_mlflow.sh`, the launcher users run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(proc: subprocess.Popen, url: str, timeout: float, what: str, log: Path | None = None) -> None:
    """Poll `url` until it answers; fail early (with the log's tail) if the process exits."""
    tail = lambda: f": {log.read_text()[-2000:]}" if log else ""  # noqa: E731
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}{tail()}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not start serving {url} in {timeout:.0f} s{tail()}")


class MotoServer:
    """`moto_server` on 127.0.0.1: a real HTTP S3 endpoint whose state lives in memory."""

    def __init__(self, port: int | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env or {}
        self.proc = None
        self.start()

    def start(self) -> None:
        exe = Path(sys.executable).parent / "moto_server"
        if not exe.exists():
            raise RuntimeError("moto_server not found: install the dev extra (pip install -e '.[dev]')")
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     env={**os.environ, **self.env}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until_serving(self.proc, f"{self.url}/moto-api/", 30, "moto_server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def client_env(endpoint: str) -> dict:
    """What a user's shell would hold: an endpoint override and (fake) credentials from the environment."""
    return {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


REPO = Path(__file__).resolve().parents[1]  # the checkout: cluster/start_mlflow.sh


class MlflowServer:
    """`cluster/start_mlflow.sh` on 127.0.0.1 with its state in `state_dir`; stop() kills, start() brings it back."""

    def __init__(self, state_dir: str | Path, port: int | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = Path(state_dir)
        self.env = {**os.environ, "MLFLOW_STATE_DIR": str(self.state_dir), "MLFLOW_PORT": str(self.port),
                    "MLFLOW_EXE": str(Path(sys.executable).parent / "mlflow"), **(env or {})}
        self.proc = None
        self.log = self.state_dir / "server.log"
        self.start()

    def start(self, timeout: float = 120) -> None:  # its imports alone take 20-40 s on 2 busy cores
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(["bash", str(REPO / "cluster" / "start_mlflow.sh")], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_serving(self.proc, f"{self.url}/health", timeout, "mlflow server", self.log)

    def stop(self) -> None:
        """Kill the server and its workers (the whole process group), as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)
