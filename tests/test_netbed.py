"""The multi-host bed itself: real sockets between namespaces, real partitions, delayed and lossy links (tbf, and a
relay where the kernel has no netem), real SIGKILL."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

import netbed

pytestmark = pytest.mark.cluster  # starts its own hosts: the multi-host budget

PORT = 7007  # ports are per namespace: nothing else listens inside a fresh host

ECHO_SERVER = r"""
import socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer((sys.argv[1], int(sys.argv[2])), Echo).serve_forever()
"""

ECHO_CLIENT = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4])) as s:
    s.sendall(sys.argv[3].encode())
    print(s.recv(1024).decode(), end="")
"""


def echo(ip: str, port: int, msg: bytes = b"hi", timeout: float = 2.0) -> bytes:
    """One echo round trip from the root namespace (the laptop)."""
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.sendall(msg)
        return s.recv(1024)


def echo_from(host: netbed.Host, ip: str, port: int, msg: str = "hi",
              timeout: float = 2.0) -> subprocess.CompletedProcess:
    return host.run([sys.executable, "-c", ECHO_CLIENT, ip, str(port), msg, str(timeout)], timeout=timeout + 10)


def checked(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """A failed command as an OSError, so that wait_for retries it."""
    if p.returncode:
        raise OSError(p.stderr.strip().splitlines()[-1])
    return p


def wait_for(fn, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def rtt(ip: str, port: int, n: int = 3) -> float:
    """The best of n echo round trips on one established connection."""
    with socket.create_connection((ip, port), timeout=10) as s:
        best = float("inf")
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(b"x")
            assert s.recv(16) == b"x"
            best = min(best, time.perf_counter() - t)
    return best


@pytest.fixture(scope="module")
def bed():
    try:
        netbed.require_capabilities()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    with netbed.Bed(["a", "b"]) as bed:
        bed["a"].spawn([sys.executable, "-c", ECHO_SERVER, bed["a"].ip, str(PORT)], log="echo.log")
        wait_for(lambda: echo(bed["a"].ip, PORT))
        yield bed


def test_hosts_have_only_bed_and_loopback_addresses(bed):
    for host in bed:
        assert host.ip.startswith("198.18.")
        addrs = [line.split()[3] for line in host.run(["ip", "-o", "addr"], check=True).stdout.splitlines()]
        assert sorted(addrs) == sorted(["127.0.0.1/8", "::1/128", f"{host.ip}/24"])
        assert host.run(["ip", "route"], check=True).stdout.split()[0] == f"{bed.laptop_ip.rsplit('.', 1)[0]}.0/24"
        assert host.run("echo $HOME $TMPDIR").stdout.split() == [str(host.home), str(host.tmp)]


def test_echo_from_laptop_and_from_another_host(bed):
    a, b = bed["a"], bed["b"]
    assert echo(a.ip, PORT, b"laptop") == b"laptop"
    p = echo_from(b, a.ip, PORT, "from-b")
    assert (p.returncode, p.stdout) == (0, "from-b"), p.stderr


def test_each_host_has_its_own_loopback(bed):
    a = bed["a"]
    laptop = socket.socket()  # hold 127.0.0.1:P in the root namespace...
    laptop.bind(("127.0.0.1", 0))
    laptop.listen()
    port = laptop.getsockname()[1]
    server = a.spawn([sys.executable, "-c", ECHO_SERVER, "127.0.0.1", str(port)], log="echo-lo.log")
    try:  # ...while a's own 127.0.0.1:P is a different socket
        assert wait_for(lambda: checked(echo_from(a, "127.0.0.1", port, "inside-a"))).stdout == "inside-a"
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            laptop.settimeout(2)
            conn, _ = laptop.accept()  # the laptop's connection landed on the laptop's socket
            conn.close()
    finally:
        laptop.close()
        a.stop(server)


def test_cut_partitions_and_restore_heals(bed):
    a, b = bed["a"], bed["b"]
    a.cut()
    try:
        p = echo_from(b, a.ip, PORT, timeout=1)
        assert p.returncode != 0 and ("timed out" in p.stderr or "unreachable" in p.stderr), p.stderr
        with pytest.raises(OSError):
            echo(a.ip, PORT, timeout=1)
    finally:
        a.restore()
    assert wait_for(lambda: echo(a.ip, PORT, b"back")) == b"back"
    p = echo_from(b, a.ip, PORT, "back-b")
    assert (p.returncode, p.stdout) == (0, "back-b"), p.stderr


def test_shape_delay_and_unshape(bed):
    a = bed["a"]
    assert rtt(a.ip, PORT) < 0.15  # unshaped: far below the shaped 0.4 s even on a loaded 2-core machine
    a.shape(delay_ms=200)
    try:
        slow = rtt(a.ip, PORT, n=2)
        p = echo_from(bed["b"], a.ip, PORT, "slow-b")  # host to host crosses the slow link too
    finally:
        a.unshape()
    assert slow >= 0.39  # 200 ms each way
    assert (p.returncode, p.stdout) == (0, "slow-b"), p.stderr
    assert rtt(a.ip, PORT) < 0.15
    assert echo_from(bed["b"], a.ip, PORT, "fast-b").stdout == "fast-b"


def test_shape_loss(bed):
    a = bed["a"]
    a.shape(loss_pct=100)
    try:
        with pytest.raises(OSError):
            echo(a.ip, PORT, timeout=1)
    finally:
        a.unshape()
    assert wait_for(lambda: echo(a.ip, PORT, b"kept")) == b"kept"


def test_shape_rate(bed):
    a = bed["a"]
    a.shape(rate_mbit=8)  # tbf at 1 MB/s on both veth ends
    try:
        qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", a.link], capture_output=True, text=True).stdout
        assert "tbf" in qdiscs, qdiscs
        payload = b"x" * 300_000
        with socket.create_connection((a.ip, PORT), timeout=10) as s:
            t = time.perf_counter()
            s.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(s.recv(65536))
            took = time.perf_counter() - t
    finally:
        a.unshape()
    assert took >= 0.25, took  # 300 kB at 1 MB/s (some burst allowed)


def test_kill_leaves_no_process(bed):
    b = bed["b"]
    b.spawn("sleep 300 & sleep 300 & wait")
    b.run("setsid sleep 300 >/dev/null 2>&1 < /dev/null &", check=True)  # a daemon, reparented away from us
    deadline = time.monotonic() + 10
    while len(b.pids()) < 4 and time.monotonic() < deadline:  # sh, two sleeps, the daemon
        time.sleep(0.05)
    assert len(b.pids()) >= 4, b.pids()
    b.kill()
    assert b.pids() == []


def ours(prefix: str) -> list[str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line for line in (netns + links).splitlines() if prefix in line]


def test_close_removes_everything_and_start_sweeps_dead_beds():
    # A bed whose owner died without cleaning up (os._exit skips atexit).
    stale = subprocess.run(
        [sys.executable, "-c", "import netbed, os; b = netbed.Bed(['x']).start(); "
         "b['x'].spawn(['sleep', '300']); print(b.prefix, flush=True); os._exit(0)"],
        capture_output=True, text=True, check=True, cwd=netbed.Path(__file__).parent, timeout=30).stdout.strip()
    assert ours(stale) and (netbed.BASE / stale).exists()
    bed = netbed.Bed(["y", "z"]).start()
    assert ours(stale) == [] and not (netbed.BASE / stale).exists()
    bed["y"].spawn(["sleep", "300"])
    assert ours(bed.prefix)
    bed.close()
    assert ours(bed.prefix) == [] and not bed.dir.exists()
