"""cluster/spot_notice.py against a metadata server of our own on loopback (IMDSv2: a PUT for a token, then
reads that carry it): no notice is no drain; a notice becomes a preemption drain with its deadline."""

from __future__ import annotations

import importlib.util
import json
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import REPO


@pytest.fixture()
def imds(monkeypatch):
    state = {"notice": None, "tokens": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):
            assert self.path == "/latest/api/token" and self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
            state["tokens"] += 1
            self._send(200, "tok-1")

        def do_GET(self):
            if self.headers.get("X-aws-ec2-metadata-token") != "tok-1":
                return self._send(401, "")
            if self.path == "/latest/meta-data/spot/instance-action" and state["notice"]:
                return self._send(200, json.dumps({"action": "terminate", "time": state["notice"]}))
            self._send(404, "")

        def _send(self, code, body):
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DCGAN_IMDS_URL", f"http://127.0.0.1:{server.server_address[1]}")
    spec = importlib.util.spec_from_file_location("spot_notice", REPO / "cluster" / "spot_notice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module, state
    server.shutdown()


def test_a_spot_notice_becomes_a_preemption_drain_with_its_deadline(imds):
    spot_notice, state = imds
    token = spot_notice.imds_token()
    assert spot_notice.seconds_left(token) is None  # no notice yet: 404
    now = datetime(2026, 12, 2, 6, 0, 0, tzinfo=timezone.utc)
    state["notice"] = (now + timedelta(seconds=118)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert spot_notice.seconds_left(token, now) == 118
    assert spot_notice.seconds_left("stale", now) is None  # a refused token is no notice
    assert spot_notice.drain_command(118) == [
        "ray", "drain-node", "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=AWS spot interruption notice",
        "--deadline-remaining-seconds=118"]


def test_off_ec2_it_exits_at_once(monkeypatch, capsys):
    monkeypatch.setenv("DCGAN_IMDS_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    spec = importlib.util.spec_from_file_location("spot_notice", REPO / "cluster" / "spot_notice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main() == 0
    assert "not a spot instance" in capsys.readouterr().out
