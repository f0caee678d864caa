"""Start and stop a real `ray start --head` cluster on loopback, touching no other Ray on the machine.

`ray stop` would end every Ray process of this user, so the cluster runs under one
`ray start --block` process in its own session, and teardown signals that process group only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from conftest import free_port
from netbed import sigkill_until_gone

BIN = Path(sys.executable).parent


def ports() -> list[str]:
    """Free ports for what Ray would otherwise bind at fixed defaults (the agent's 52365, the client server's
    10001), so this cluster can run beside the session's shared one."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"]


class LocalRayCluster:
    def __init__(self, num_cpus: int = 2, extra_args: tuple[str, ...] = (), env: dict | None = None,
                 gcs_port: int | None = None, ready_headers: dict | None = None):
        self.bin = BIN
        self.ready_headers = ready_headers or {}
        self.gcs_port, self.dashboard_port = gcs_port or free_port(), free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="/tmp/rt")  # short: Ray's socket paths have a length limit
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
             f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             f"--temp-dir={self.temp_dir}", *ports(), *extra_args],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True,
        )
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.address = f"127.0.0.1:{self.gcs_port}"
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited early:\n{self.proc.stdout.read()}")
            try:
                request = urllib.request.Request(f"{self.dashboard}/api/version", headers=self.ready_headers)
                with urllib.request.urlopen(request, timeout=2) as r:
                    json.load(r)
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"Ray dashboard at {self.dashboard} not ready after {timeout}s")

    def submit(self, entrypoint: list[str], working_dir: Path, runtime_env: dict | None = None, timeout: float = 900):
        """`ray job submit` exactly as a user runs it; returns the CompletedProcess."""
        cmd = [str(BIN / "ray"), "job", "submit", f"--address={self.dashboard}", f"--working-dir={working_dir}"]
        if runtime_env:
            cmd.append(f"--runtime-env-json={json.dumps(runtime_env)}")
        return subprocess.run([*cmd, "--", *entrypoint], env=self.env, capture_output=True, text=True, timeout=timeout)

    def leftovers(self) -> list[int]:
        """Processes of this cluster: all carry its unique temp dir on their command line."""
        out = subprocess.run(["pgrep", "-f", self.temp_dir], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        try:  # `ray start --block` shuts its node down on SIGTERM; a test does not wait long for that
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sigkill_until_gone(self.leftovers, 20, pause=0.5)  # some Ray processes start their own session

