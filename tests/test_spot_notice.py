"""cluster/spot_notice.py against a metadata server of our own on loopback (tests/imds_server.py): no notice is no
drain; a notice becomes a preemption drain with its deadline. The drain of a live node, through ray_cluster.yaml's
own command line: tests/test_chaos.py's elastic scenario."""

from __future__ import annotations

import importlib.util
import threading
from datetime import datetime, timedelta, timezone

import pytest

from conftest import REPO
from imds_server import make_server


def load_spot_notice():
    """cluster/spot_notice.py as a module (it is a script, not part of the package); it reads DCGAN_IMDS_URL as it
    loads."""
    spec = importlib.util.spec_from_file_location("spot_notice", REPO / "cluster" / "spot_notice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def imds(monkeypatch, tmp_path):
    notice = tmp_path / "notice"
    server = make_server(0, notice, "10.0.1.17")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DCGAN_IMDS_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield load_spot_notice(), notice
    server.shutdown()


def test_a_spot_notice_becomes_a_preemption_drain_with_its_deadline(imds):
    spot_notice, notice = imds
    token = spot_notice.imds_token()
    assert spot_notice.seconds_left(token) is None  # no notice yet: 404
    now = datetime(2026, 12, 2, 6, 0, 0, tzinfo=timezone.utc)
    notice.write_text((now + timedelta(seconds=118)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert spot_notice.seconds_left(token, now) == 118
    assert spot_notice.seconds_left("stale", now) is None  # a refused token is no notice
    assert spot_notice.local_ipv4(token) == "10.0.1.17"  # the address its Ray node is found by
    assert spot_notice.drain_command(118, "ab12") == [
        "ray", "drain-node", "--node-id=ab12", "--reason=DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message=AWS spot interruption notice", "--deadline-remaining-seconds=118"]


def test_off_ec2_it_exits_at_once(monkeypatch, capsys):
    monkeypatch.setenv("DCGAN_IMDS_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert load_spot_notice().main() == 0
    assert "not a spot instance" in capsys.readouterr().out


def test_a_second_watcher_on_a_node_ends_the_first(imds, tmp_path):
    """A `ray up` that brings changed files runs the node's setup commands again, which start another watcher: the
    new one ends the old (which would drain the node a second time, with old code) and holds the node's lock."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "HOME": str(tmp_path)}  # with the fixture's DCGAN_IMDS_URL; no notice: the watchers poll
    lock = tmp_path / "spot_notice.lock"

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(REPO / "cluster" / "spot_notice.py")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def holder(proc: subprocess.Popen) -> bool:
        deadline = time.time() + 30
        while time.time() < deadline and not (lock.exists() and lock.read_text() == str(proc.pid)):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        return lock.exists() and lock.read_text() == str(proc.pid)

    first = start()
    second = None
    try:
        assert holder(first)
        second = start()
        assert holder(second)
        assert first.wait(10) == -15 and second.poll() is None  # SIGTERM ended the first; the second watches
        assert f"ending the watcher started before, pid {first.pid}" in second.stdout.readline()
    finally:
        for proc in (first, second):
            if proc:
                proc.kill()
                proc.wait()
