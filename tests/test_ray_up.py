"""`ray up` for real: Ray's cluster launcher logs in over SSH to the bed's hosts (bed_ssh.py: a real OpenSSH server
on each, a home and a PID namespace of its own) with cluster/onprem.yaml, filled in as docs/own-machines.md says,
and runs its file mounts (rsync), setup commands and start commands. The test process is the laptop: `ray up`,
`ray dashboard` (the SSH tunnel), `ray job submit` through it with the token, `ray exec`, `ray down`.

    services   moto's S3 (the data, checkpoints, MLflow's artifacts); not a Ray node
    head       Ray's head and MLflow, both started by the YAML's head commands
    worker-1/2 the workers, set up by the head's autoscaler over SSH
    worker-3   listed in worker_ips but with no SSH server: unreachable at `ray up` time

Run only these: `.venv/bin/python -m pytest -q tests/test_ray_up.py`; the hosts' logs stay in
outputs/test-logs/ray-up.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

import bed_ssh
import netbed
from bed_cluster import BIN, REPO, expected_steps, keep_logs, overrides, start_s3, wait_for, write_secrets

pytestmark = pytest.mark.cluster

STEPS, LOG_EVERY, CKPT_EVERY = 8, 2, 4
LOGS = REPO / "outputs" / "test-logs" / "ray-up"
RUN = "ray-up"
# A Ray process, as found in a host's process list: the launcher's `ray stop` looks for the same.
RAY_PROCESS = ("raylet", "gcs_server", "ray::", "/ray/", "default_worker.py")
HEAD_LOST_S = 10  # how long a worker's raylet waits for a lost head before it leaves


class Laptop:
    """The user's machine: a home with the SSH key, the Ray token and the MLflow login, and the filled-in YAML."""

    def __init__(self, bed: netbed.Bed):
        self.home = bed.dir / "laptop"
        self.key = bed_ssh.make_key(self.home / ".ssh" / "id_ed25519")
        # The hosts get both by file mount, as from a user's laptop.
        write_secrets(self.home, secrets.token_hex(32), secrets.token_urlsafe(18))
        (self.home / "tmp").mkdir()
        self.yaml = self.home / "onprem.yaml"

    def fill_in(self, head: netbed.Host, workers: list[netbed.Host]) -> None:
        """cluster/onprem.yaml with every FILL_ME set, as docs/own-machines.md tells a user to."""
        spec = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
        spec["cluster_name"] = f"dcgan-{head.bed.prefix}"  # the launcher keeps state per name in the laptop's /tmp
        spec["provider"].update(head_ip=head.ip, worker_ips=[w.ip for w in workers])
        spec["auth"] = {"ssh_user": "root", "ssh_private_key": str(self.key)}
        text = yaml.safe_dump(spec, sort_keys=False).replace("s3://FILL_ME-bucket/mlflow", "s3://mlflow/artifacts")
        assert "FILL_ME" not in text, [line for line in text.splitlines() if "FILL_ME" in line]
        self.yaml.write_text(text)

    def env(self) -> dict:
        return {"HOME": str(self.home), "TMPDIR": str(self.home / "tmp"), "PATH": f"{BIN}:/usr/bin:/bin",
                "RAY_AUTH_MODE": "token", "LANG": "C.UTF-8",
                # docs/own-machines.md: Ray 2.60's autoscaler v2 counts the head in the one on-premises node
                # type's minimum, and so starts one machine fewer than worker_ips lists; the v1 autoscaler starts them all.
                "RAY_UP_enable_autoscaler_v2": "0"}

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """A `ray` command from the repository root, as docs/own-machines.md's user types it."""
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def exec_on_head(self, cmd: str) -> str:
        r = self.ray("exec", str(self.yaml), cmd, timeout=120)
        assert r.returncode == 0, f"ray exec {cmd}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
        return r.stdout


def ray_pids(host: netbed.Host) -> dict[int, str]:
    """The host's Ray processes (pid -> command line), found by network namespace."""
    found = {}
    for pid in host.pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(mark in cmd for mark in RAY_PROCESS):
            found[pid] = cmd
    return found


@pytest.fixture(scope="module")
def launched():
    netbed.require_capabilities()
    bed_ssh.require_ssh_tools()
    before = set(Path("/tmp").glob("ray_ssh_*"))  # the launcher's SSH control sockets go under /tmp, fixed
    with netbed.Bed(["services", "head", "worker-1", "worker-2", "worker-3"]) as bed:
        try:
            laptop = Laptop(bed)
            s3_url = start_s3(bed["services"])
            head, workers = bed["head"], [bed["worker-1"], bed["worker-2"], bed["worker-3"]]
            # What each machine's administrator set up: S3 settings (an on-premises store, keys in ~/.aws),
            # MLflow's Host-header allowance for this network (198.18/15 is not a private range it knows), and no
            # usage reports from MLflow or Ray (docs/tracking.md "Browse results"), and a raylet that leaves
            # HEAD_LOST_S after it lost the head rather than Ray's 60 s (docs/own-machines.md, "ray down").
            bashrc = {"AWS_ENDPOINT_URL_S3": s3_url, "AWS_DEFAULT_REGION": "us-east-1",
                      "MLFLOW_SERVER_ALLOWED_HOSTS": "'localhost:*,127.0.0.1:*,198.18.*'",
                      "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
                      "RAY_gcs_rpc_server_reconnect_timeout_s": str(HEAD_LOST_S)}
            for host in (head, *workers):
                bed_ssh.make_machine(host, laptop.key.with_suffix(".pub"), bashrc)
                (host.home / ".aws").mkdir()
                (host.home / ".aws" / "credentials").write_text(
                    "[default]\naws_access_key_id = bed\naws_secret_access_key = bed\n")
            for host in (head, *workers[:2]):  # worker-3 has no SSH server
                bed_ssh.start_sshd(host)
            laptop.fill_in(head, workers)
            started = time.monotonic()
            up = laptop.ray("up", str(laptop.yaml), "-y", timeout=600)
            assert up.returncode == 0, f"ray up:\n{up.stdout[-5000:]}{up.stderr[-3000:]}"
            print(f"ray up (head) took {time.monotonic() - started:.0f} s")
            yield laptop, bed, started
        finally:
            keep_logs(bed, LOGS)
            for folder in set(Path("/tmp").glob("ray_ssh_*")) - before:  # what this run's `ray up`/`down` left
                shutil.rmtree(folder, ignore_errors=True)


def test_ray_up_starts_a_cluster_whose_two_workers_train_a_job_submitted_through_the_tunnel(launched):
    laptop, bed, started = launched
    head, workers = bed["head"], [bed["worker-1"], bed["worker-2"]]

    def joined() -> bool:
        return all(ray_pids(w) and any("raylet" in c for c in ray_pids(w).values()) for w in workers)

    wait_for(joined, 300, "the head's autoscaler starting Ray on worker-1 and worker-2 over SSH", pause=2)
    print(f"ray up to 2 workers: {time.monotonic() - started:.0f} s")
    # What `ray up` copied and installed is each host's own: the tree in its home, the project in its venv.
    for host in (head, *workers):
        assert (host.home / "dcgan-dist" / "jobs" / "train.py").exists(), host.name
        for local_only in (".git", "outputs"):  # the test logs of earlier runs (gigabytes) stay on the laptop
            assert not (host.home / "dcgan-dist" / local_only).exists(), f"{host.name}: rsync_exclude ignored"
        assert list((host.home / "venv").glob("lib/python3*/site-packages/__editable__*dcgan_dist*")), host.name

    port = free_port()
    tunnel = subprocess.Popen([str(BIN / "ray"), "dashboard", str(laptop.yaml), "--port", str(port)], cwd=REPO,
                              env=laptop.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1), 60, "the ray dashboard tunnel")
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{port}", f"--working-dir={REPO}",
             "--", "python", "jobs/train.py", *[x for o in overrides(RUN, STEPS, LOG_EVERY, CKPT_EVERY)
                                                for x in ("--set", o)]],
            cwd=REPO, env=laptop.env(), capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, f"the job failed:\n{job.stdout[-6000:]}{job.stderr[-3000:]}"
    finally:
        tunnel.terminate()
        tunnel.wait(10)
    # Both ranks trained, one on each worker host (their own Ray logs say so).
    ranks = {w.name: {r for r in (0, 1) for log in (w.tmp / "ray").glob("session_2*/logs/worker-*.err")
                      if f"rank {r} of 2" in log.read_text(errors="replace")} for w in workers}
    assert sorted(r for found in ranks.values() for r in found) == [0, 1] and all(ranks.values()), ranks

    # MLflow, read on the head with `ray exec` as docs/own-machines.md says: the run finished, every step once, a version.
    check = ("import json, mlflow; c = mlflow.MlflowClient('http://127.0.0.1:5000'); "
             "e = c.get_experiment_by_name('dcgan'); "
             f"r = c.search_runs([e.experiment_id], \"tags.`dcgan.run_name` = '{RUN}'\")[0]; "
             "print(json.dumps({'status': r.info.status, "
             "'steps': sorted(m.step for m in c.get_metric_history(r.info.run_id, 'loss_d')), "
             "'versions': len(c.search_model_versions(f\"run_id = '{r.info.run_id}'\"))}))")
    out = laptop.exec_on_head(f"python -c {shlex.quote(check)}")
    seen = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))
    assert seen == {"status": "FINISHED", "steps": expected_steps(STEPS, LOG_EVERY, CKPT_EVERY), "versions": 1}, seen


def test_a_worker_unreachable_over_ssh_is_named_in_the_launchers_log_and_the_rest_came_up(launched):
    laptop, bed, _ = launched
    unreachable = bed["worker-3"]
    # The head's autoscaler launches the workers; its log is where `ray up` tells the user to look.
    log = laptop.exec_on_head("tail -n 400 /tmp/ray/session_latest/logs/monitor.*")
    refused = f"ssh: connect to host {unreachable.ip} port 22: Connection refused"
    assert refused in log and "SSH still not available" in log, f"no SSH failure naming {unreachable.ip}:\n{log[-3000:]}"
    assert not ray_pids(unreachable)
    assert ray_pids(bed["head"]) and ray_pids(bed["worker-1"]) and ray_pids(bed["worker-2"])


def autoscaler_lines_since(head: netbed.Host, since: datetime) -> tuple[int, list[str]]:
    """The head autoscaler's rounds that began after `since` (one status table per round, in monitor.log) and its
    log lines since then (monitor.out/.err: where it says it starts updating a node)."""
    # The newest session's folder: session_latest is a link to /tmp/ray/... as the head sees its own /tmp.
    logs = max((head.tmp / "ray").glob("session_2*")) / "logs"
    rounds = [datetime.fromisoformat(t) for t in
              re.findall(r"Autoscaler status: (\S+ \S+) =", (logs / "monitor.log").read_text(errors="replace"))]
    lines = [line for f in ("monitor.out", "monitor.err")
             for line in (logs / f).read_text(errors="replace").splitlines()
             if (m := re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+)", line))
             and datetime.fromisoformat(f"{m.group(1)}.{m.group(2)}") >= since]
    return sum(t >= since for t in rounds), lines


def test_a_second_ray_up_no_restart_changes_nothing_that_runs(launched):
    laptop, bed, _ = launched
    hosts = [bed["head"], bed["worker-1"], bed["worker-2"]]
    before = {h.name: set(ray_pids(h)) for h in hosts}
    mlflow_before = {p for p in bed["head"].pids() if b"mlflow" in Path(f"/proc/{p}/cmdline").read_bytes()}
    sent = datetime.now()
    again = laptop.ray("up", str(laptop.yaml), "-y", "--no-restart", timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Configuration already up to date" in again.stdout, again.stdout[-3000:]
    # The head's autoscaler reads the uploaded config at each round: two whole rounds after `ray up` returned, it
    # has decided whether the workers need a new setup (it would start an updater per worker; none may start).
    returned = datetime.now()
    wait_for(lambda: autoscaler_lines_since(bed["head"], returned)[0] >= 2, 60,
             "two autoscaler rounds after the second ray up", pause=1)
    updates = [line for line in autoscaler_lines_since(bed["head"], sent)[1] for w in hosts[1:]
               if f"updater thread for node {w.ip}." in line]  # (worker-3 has no SSH: it may be retried)
    assert not updates, updates
    after = {h.name: set(ray_pids(h)) for h in hosts}
    # Nothing that ran was stopped (Ray may have started short-lived workers since, so compare the old set).
    assert all(before[n] <= after[n] for n in before), {n: before[n] - after[n] for n in before}
    assert mlflow_before and mlflow_before <= set(bed["head"].pids())


def test_ray_down_leaves_no_ray_process_on_any_host(launched):
    laptop, bed, _ = launched
    down = laptop.ray("down", str(laptop.yaml), "-y", timeout=300)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    stopped = time.monotonic()
    assert not ray_pids(bed["head"]), ray_pids(bed["head"])
    # The local provider's `ray down` stops Ray on the head only. A worker's raylet leaves HEAD_LOST_S after it lost
    # the head, and cluster/stop_with_raylet.py (a worker start command) stops the rest of that node's Ray.
    for host in (bed["worker-1"], bed["worker-2"]):
        try:
            wait_for(lambda: not ray_pids(host), 120, f"Ray on {host.name} gone after ray down", pause=2)
        except AssertionError as e:
            raise AssertionError(f"{e}: {ray_pids(host)}") from None
    print(f"workers' Ray gone {time.monotonic() - stopped:.0f} s after ray down")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
