"""A stand-in for EC2's instance metadata service (IMDSv2), as far as cluster/spot_notice.py reads it: a PUT for a
session token, then reads that carry it. The spot interruption notice is there while `notice_file` exists: it holds
the notice's time (AWS's format, 2026-12-07T13:30:00Z); without it the notice path answers 404, as on a spot
instance AWS is not reclaiming. Used in-process by tests/test_spot_notice.py and as a service on a bed host
(`python tests/imds_server.py PORT NOTICE_FILE LOCAL_IPV4`, on the host's own loopback) by the elastic scenario.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOKEN = "imds-session-token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"


def make_server(port: int, notice_file: Path, local_ipv4: str) -> ThreadingHTTPServer:
    """An IMDSv2 server on 127.0.0.1:`port` (0: any free port) that serves the notice in `notice_file` and the
    instance's private address `local_ipv4`."""

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):
            if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return self._send(400, "")
            self._send(200, TOKEN)

        def do_GET(self):
            if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                return self._send(401, "")
            if self.path == NOTICE_PATH and notice_file.exists():
                return self._send(200, json.dumps({"action": "terminate", "time": notice_file.read_text().strip()}))
            if self.path == "/latest/meta-data/local-ipv4":
                return self._send(200, local_ipv4)
            self._send(404, "")

        def _send(self, code: int, body: str) -> None:
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


if __name__ == "__main__":
    server = make_server(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
    print("listening", flush=True)  # bound: a client's connection waits in the backlog from now on
    server.serve_forever()
