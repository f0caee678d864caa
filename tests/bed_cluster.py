"""A real Ray cluster on the bed's hosts, started the way `ray up ray_cluster.yaml` starts one:

    services   moto's S3 server, and `cluster/start_mlflow.sh` with basic auth and its artifacts in that S3
    head       the exact `head_start_ray_commands` of ray_cluster.yaml (token auth on); the two tunnels of
               docs/cluster.md "Running on a cluster": its loopback dashboard for the laptop, and its `127.0.0.1:5000`,
               which leads to the MLflow server on `services`
    worker-N   the exact `worker_start_ray_commands`

What `ray up` provides is provided the same way: the token in `~/.ray/auth_token` and the MLflow login in
`~/.mlflow/credentials` of every host (the file_mounts), S3 keys in the nodes' environment (an instance profile),
the head's address. The test process is the laptop: it submits with `ray job submit` through the tunnel, with
`RAY_AUTH_MODE=token` and the token, and reads MLflow and S3 as a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from netbed import Bed, Host

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
S3_PORT, MLFLOW_PORT, DASHBOARD_PORT, IMDS_PORT = 9000, 5000, 8265, 8169
DIGITS = "s3://data/digits-32/"  # the training data both bed suites use, made by start_s3()
UPLOAD_EXCLUDES = [".git", ".venv", "data", "mlflow.db", "mlruns", "mlartifacts", "ray_results", "outputs"]
MLFLOW_USER = "trainer"
# Every bed host has the machine's one hostname, which resolves to loopback: Gloo would advertise 127.0.0.1 to the
# other ranks. A real node's hostname resolves to its own address; here the node is told its interface instead.
NODE_ENV = {"PATH": f"{BIN}:{os.environ['PATH']}", "GLOO_SOCKET_IFNAME": "eth0"}


def start_commands(kind: str, host: Host, head_ip: str) -> list[str]:
    """`{kind}_start_ray_commands` of ray_cluster.yaml, as the launcher would run them on `host`."""
    spec, commands = yaml.safe_load((REPO / "ray_cluster.yaml").read_text()), []
    # The launcher runs each command in its own shell, after exporting the node type's resources.
    prefix = ""
    if kind == "head" and (resources := spec["available_node_types"][spec["head_node_type"]].get("resources")):
        prefix = f"export RAY_OVERRIDE_RESOURCES='{json.dumps(resources)}'; "
    for cmd in spec[f"{kind}_start_ray_commands"]:
        if cmd.strip() == "ray stop" or "stop_with_raylet" in cmd:
            continue  # finds Ray by process name; the bed's hosts share one process table, so it would stop them all
        if "mlflow" in cmd:  # its admin password, start_mlflow.sh, mlflow_access.py: done by start_mlflow()
            continue  # the bed's MLflow lives on `services` (reached through the head's 127.0.0.1:5000)
        # What the launcher substitutes: the head's address, the node's own (auto-detected on EC2; the bed's hosts
        # have no default route to detect it by), paths. No autoscaler: the test starts and kills the hosts.
        cmd = cmd.replace("$RAY_HEAD_IP", head_ip).replace("--autoscaling-config=~/ray_bootstrap_config.yaml", "")
        cmd = cmd.replace("ray start", f"ray start --node-ip-address={host.ip} --temp-dir={host.ray_tmp} "
                                       "--disable-usage-stats", 1)
        commands.append(prefix + cmd)
    assert commands, f"ray_cluster.yaml has no {kind}_start_ray_commands"
    return commands


def spot_notice_command() -> str:
    """The spot node type's command of ray_cluster.yaml that starts cluster/spot_notice.py, as the launcher would run
    it on a bed host (the checkout is ~/dcgan-dist there)."""
    types = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())["available_node_types"].values()
    commands = {c for t in types for c in t.get("worker_setup_commands", []) if "spot_notice.py" in c}
    assert len(commands) == 1, f"ray_cluster.yaml's spot node types start spot_notice.py by {sorted(commands)}"
    return commands.pop().replace("~/dcgan-dist", str(REPO))


def write_secrets(home: Path, token: str, mlflow_password: str) -> None:
    """docs/cluster.md "Running on a cluster", step 1: the Ray token and the MLflow client login in `home`, mode 600."""
    for path, text in ((".ray/auth_token", token), (".mlflow/credentials", f"[mlflow]\nmlflow_tracking_username = "
                       f"{MLFLOW_USER}\nmlflow_tracking_password = {mlflow_password}\n")):
        (home / path).parent.mkdir(parents=True, exist_ok=True)
        (home / path).write_text(text)
        (home / path).chmod(0o600)


def start_s3(host: Host) -> str:
    """moto's S3 server on `host` with the buckets data, ckpt and mlflow, and the digits as shards in s3://data/
    (built from the laptop, docs/data.md "Bring your own data"); returns its URL."""
    url = f"http://{host.ip}:{S3_PORT}"
    host.spawn([str(BIN / "moto_server"), "-H", "0.0.0.0", "-p", str(S3_PORT)], log="moto.log")
    wait_for(lambda: urllib.request.urlopen(f"{url}/moto-api/", timeout=1), 30, f"moto on {host.name}")
    import boto3

    from dcgan_dist.data import shards, sources

    for bucket in ("data", "ckpt", "mlflow"):
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
    with s3_endpoint(url):
        shards.build_shards(sources.Digits(), DIGITS, resolution=32, encoding="png", shard_size=500, workers=2,
                            progress=False)
    return url


@contextlib.contextmanager
def s3_endpoint(url: str):
    """The laptop's S3 calls (ours, through dcgan_dist.data.s3) go to `url` while inside."""
    from dcgan_dist.data import s3

    saved = os.environ.get("AWS_ENDPOINT_URL_S3")
    os.environ["AWS_ENDPOINT_URL_S3"] = url
    s3._clients.clear()
    try:
        yield
    finally:
        os.environ.pop("AWS_ENDPOINT_URL_S3") if saved is None else os.environ.__setitem__("AWS_ENDPOINT_URL_S3", saved)
        s3._clients.clear()


def overrides(run_name: str, steps: int, log_every: int, ckpt_every: int, **extra) -> list[str]:
    """docs/cluster.md step 4's command, tiny: 2 workers on the 2 worker hosts (2 CPUs each), data and checkpoints in
    S3, `tracking.uri=http://127.0.0.1:5000` exactly as docs/cluster.md says."""
    values = {
        "ray.address": "auto", "ray.num_workers": 2, "ray.cpus_per_worker": 2,
        "data.url": DIGITS, "model.resolution": 32, "data.num_workers": 0, "data.shuffle_buffer": 200,
        "ray.storage_path": "s3://ckpt/runs", "train.run_name": run_name, "train.steps": steps,
        "tracking.uri": "http://127.0.0.1:5000",
        "model.ngf": 8, "model.ndf": 8, "train.batch_size": 16, "train.log_every": log_every,
        "train.checkpoint_every": ckpt_every, "train.sample_every": 8, "train.eval_every": 0,
        "metrics.num_images": 64,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def expected_steps(steps: int, log_every: int, ckpt_every: int) -> list[int]:
    """The steps a run logs `loss_d` at: every log step and every checkpoint step."""
    return [s for s in range(1, steps + 1) if s % log_every == 0 or s % ckpt_every == 0]


def keep_logs(bed: Bed, dest: Path) -> None:
    """Copy the hosts' logs (moto, MLflow, sshd, Ray's) out of the bed, which is deleted, for whoever reads a failure."""
    shutil.rmtree(dest, ignore_errors=True)
    for log in bed.dir.rglob("*"):
        if log.suffix in (".log", ".out", ".err") and log.is_file() and "runtime_resources" not in log.parts:
            (dest / log.relative_to(bed.dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, dest / log.relative_to(bed.dir))


def wait_for(check, timeout: float, what: str, pause: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if result := check():
                return result
        time.sleep(pause)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


class BedCluster:
    def __init__(self, bed: Bed):
        self.bed = bed
        self.services, self.head = bed["services"], bed["head"]
        self.workers = [h for h in bed if h.name.startswith("worker")]
        self.token = secrets.token_hex(32)
        self.mlflow_password = secrets.token_urlsafe(18)        # the trainer login every node holds
        self.mlflow_admin_password = secrets.token_urlsafe(18)  # only on `services`, in a 0600 file
        self.s3_url = f"http://{self.services.ip}:{S3_PORT}"
        self.mlflow_url = f"http://{self.services.ip}:{MLFLOW_PORT}"  # as the laptop reaches it (a tunnel, really)
        self.dashboard = f"http://{self.head.ip}:{DASHBOARD_PORT}"   # the laptop's end of `ray dashboard`
        self.mlflow_proc = None
        for host in bed:
            if host.name != "outsider":  # a host on the network but not in the cluster holds no secret
                self._provision(host)

    def _provision(self, host: Host) -> None:
        """The file_mounts of ray_cluster.yaml: the Ray token and the MLflow client login, in the host's HOME."""
        write_secrets(host.home, self.token, self.mlflow_password)

    # --- services -------------------------------------------------------------------------------------------
    def start_services(self) -> None:
        start_s3(self.services)
        self.start_mlflow()

    def start_mlflow(self) -> None:
        """start_mlflow.sh with the admin password from its 0600 file, then cluster/mlflow_access.py: the nodes'
        login gets EDIT on the experiment and model, as ray_cluster.yaml's head commands do."""
        admin_file = self.services.dir / "mlflow_admin_password"
        admin_file.write_text(self.mlflow_admin_password)
        admin_file.chmod(0o600)
        env = {"MLFLOW_STATE_DIR": str(self.services.dir / "mlflow"), "MLFLOW_HOST": self.services.ip,
               "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(admin_file),
               "MLFLOW_PORT": str(MLFLOW_PORT), "MLFLOW_AUTH": "basic", "MLFLOW_EXE": str(BIN / "mlflow"),
               "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/artifacts",
               "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{S3_PORT}",
               "MLFLOW_SERVER_ALLOWED_HOSTS": "127.0.0.1:*,198.18.*"}  # the bed's range is not a private one
        self.mlflow_proc = self.services.spawn(["bash", str(REPO / "cluster" / "start_mlflow.sh")], env=env,
                                               log="mlflow.log")
        wait_for(lambda: urllib.request.urlopen(f"{self.mlflow_url}/health", timeout=1), 60, "MLflow on services")
        r = self.services.run([sys.executable, str(REPO / "cluster" / "mlflow_access.py"), "--uri", self.mlflow_url],
                              env={"MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(admin_file)}, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]

    def kill_mlflow(self) -> None:
        """SIGKILL the MLflow server and its workers, as a crash would (the moto server on the same host lives on)."""
        os.killpg(self.mlflow_proc.pid, 9)
        self.mlflow_proc.wait(10)

    # --- Ray --------------------------------------------------------------------------------------------------
    def start_head(self) -> None:
        self._run_all(self.head, start_commands("head", self.head, self.head.ip))
        forward = [sys.executable, str(REPO / "tests" / "tcp_forward.py")]
        self.head.spawn([*forward, f"{self.head.ip}:{DASHBOARD_PORT}", f"127.0.0.1:{DASHBOARD_PORT}"],
                        log="tunnel-dashboard.log")
        self.head.spawn([*forward, f"127.0.0.1:{MLFLOW_PORT}", f"{self.services.ip}:{MLFLOW_PORT}"],
                        log="tunnel-mlflow-loopback.log")
        self.head.spawn([*forward, f"{self.head.ip}:{MLFLOW_PORT}", f"{self.services.ip}:{MLFLOW_PORT}"],
                        log="tunnel-mlflow.log")
        wait_for(lambda: self.api("/api/version"), 60, "the head's dashboard through the tunnel")

    def start_worker(self, host: Host) -> None:
        self._run_all(host, start_commands("worker", host, self.head.ip))

    def start_spot_notice(self, host: Host) -> Path:
        """What a spot node runs: its metadata service (ours, tests/imds_server.py, on the host's loopback, the host's
        address as its local-ipv4) and spot_notice.py by the spot node type's own command. Returns the file whose
        presence is AWS's notice."""
        notice = host.dir / "spot-notice"
        imds = host.spawn([sys.executable, str(REPO / "tests" / "imds_server.py"), str(IMDS_PORT), str(notice),
                           host.ip], log="imds.log")
        wait_for(lambda: "listening" in imds.log.read_text(), 30, f"{host.name}: the metadata service")
        r = host.run(spot_notice_command(), env={**NODE_ENV, "DCGAN_IMDS_URL": f"http://127.0.0.1:{IMDS_PORT}"})
        assert r.returncode == 0, r.stdout + r.stderr
        return notice

    @staticmethod
    def _run_all(host: Host, commands: list[str]) -> None:
        for cmd in commands:
            r = host.run(cmd, timeout=120, env=NODE_ENV)
            assert r.returncode == 0, f"{host.name}: {cmd}\n{r.stdout[-3000:]}{r.stderr[-3000:]}"

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"{self.dashboard}{path}", method=method,
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.load(r)

    def stop_running_jobs(self) -> list[str]:
        """Stop every job still running (a scenario that failed before its job ended would starve the next ones)."""
        running = [j["submission_id"] for j in self.api("/api/jobs/")
                   if j["status"] in ("PENDING", "RUNNING") and j.get("submission_id")]
        for job in running:
            self.api(f"/api/jobs/{job}/stop", method="POST")
        return running

    def alive_workers(self) -> list[str]:
        """Node IPs of the live worker nodes, as the head's state API sees them."""
        nodes = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return sorted(n["node_ip"] for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"])

    def wait_for_workers(self, n: int, timeout: float = 90) -> None:
        wait_for(lambda: len(self.alive_workers()) >= n, timeout, f"{n} live worker nodes")

    # --- the laptop -------------------------------------------------------------------------------------------
    def client_env(self) -> dict:
        """The laptop's shell for `ray job submit` (docs/cluster.md step 3): token auth with the cluster's token."""
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def submit(self, overrides: list[str], wait: bool = True):
        """`ray job submit` of jobs/train.py as docs/cluster.md step 4 writes it; returns the CompletedProcess, or the
        Popen with `wait=False` (its output goes to a log file, `proc.log`)."""
        runtime_env = {"excludes": UPLOAD_EXCLUDES,
                       "env_vars": {"AWS_ENDPOINT_URL_S3": self.s3_url, "AWS_DEFAULT_REGION": "us-east-1"}}
        cmd = [str(BIN / "ray"), "job", "submit", f"--address={self.dashboard}", f"--working-dir={REPO}",
               f"--runtime-env-json={json.dumps(runtime_env)}", "--", "python", "jobs/train.py",
               *[x for o in overrides for x in ("--set", o)]]
        if wait:
            return subprocess.run(cmd, env=self.client_env(), capture_output=True, text=True, timeout=600)
        log = self.bed.dir / f"submit-{time.monotonic_ns()}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=self.client_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
        proc.log = log
        return proc

    @contextlib.contextmanager
    def mlflow_login(self):
        """The laptop's MLflow login, only while the test reads MLflow (never in the environment hosts start with)."""
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        os.environ.update(MLFLOW_TRACKING_USERNAME=MLFLOW_USER, MLFLOW_TRACKING_PASSWORD=self.mlflow_password)
        try:
            yield
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    def train_worker_pids(self, host: Host, rank: int) -> list[int]:
        """The Ray Train worker process of `rank` on `host`, found by its own log line in the host's Ray logs."""
        logs = Path(host.ray_tmp).glob("session_latest/logs/worker-*.err")  # our logging goes to stderr
        pids = {int(p.stem.rsplit("-", 1)[-1]) for p in logs if f"rank {rank} of " in p.read_text(errors="replace")}
        return sorted(pids & set(host.pids()))
