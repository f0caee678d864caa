"""A multi-host test bed on one Linux machine: each host is a network namespace.

    root namespace ("the laptop", 198.18.N.1 on bridge <prefix>-br)
        |-- veth <prefix>-v0 <-> eth0 in namespace <prefix>-<host0>   198.18.N.11
        |-- veth <prefix>-v1 <-> eth0 in namespace <prefix>-<host1>   198.18.N.12
        ...

Hosts share the filesystem and the process table with everything else, but each has its own network
stack (addresses, loopback, ports), its own HOME/TMPDIR and a short Ray temp dir. Faults are real:
SIGKILL of every process of a namespace, a link set down, a slow or lossy link (tbf, and a delaying relay
because this kernel has no netem).

Addresses come only from 198.18.0.0/15 (RFC 2544 benchmarking); IPv6 is off on every bed link (lo keeps ::1).
Hosts get no default route, so they reach the bed and their own loopback and nothing else (Ray then warns
that it cannot find its IP "via external connectivity"; --node-ip-address makes that harmless). Bridging
needs no ip_forward; net.bridge.bridge-nf-call-iptables=1 would only matter if iptables rules existed.
Needs root (CAP_NET_ADMIN), `ip` and `tc`: require_capabilities() says which is missing.

    with Bed(["head", "worker-1"]) as bed:
        bed["head"].spawn([sys.executable, "-m", "http.server", "--bind", bed["head"].ip, "8000"])
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BASE = Path("/tmp")                    # short: Ray's socket paths must stay under ~107 characters
ETC = Path("/etc/netns")               # `ip netns exec NS` mounts ETC/NS/<file> over /etc/<file>: per-host /etc files
NAME = re.compile(r"^(nb[0-9a-f]{4})-")  # every namespace and link of a bed starts with its prefix
HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run an `ip`/`tc` command in the root namespace; raise with its stderr when it fails."""
    p = subprocess.run(args, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.strip()}")
    return p


def require_capabilities() -> None:
    """Fail loudly (never skip) when this machine cannot build a bed: root, ip/tc, netns, veth, bridge, tap,
    tbf, clsact + mirred."""
    def fail(reason: str):
        raise RuntimeError(f"multi-host tests need root and CAP_NET_ADMIN: {reason}")

    if os.geteuid() != 0:
        fail("not running as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            fail(f"`{tool}` (iproute2) is not installed")
    ns = f"nbcap{os.getpid()}"
    try:
        sh("ip", "netns", "add", ns)
    except RuntimeError as e:
        fail(str(e))
    try:  # everything inside the throwaway namespace, so the root namespace is never touched
        sh("ip", "-n", ns, "link", "add", "b0", "type", "bridge")
        sh("ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        sh("ip", "netns", "exec", ns, "ip", "tuntap", "add", "dev", "t0", "mode", "tap")
        sh("tc", "-n", ns, "qdisc", "add", "dev", "v0", "root", "tbf", "rate", "1mbit", "burst", "1600",
           "latency", "100ms")
        sh("tc", "-n", ns, "qdisc", "add", "dev", "v1", "clsact")
        sh("tc", "-n", ns, "filter", "add", "dev", "v1", "ingress", "protocol", "all", "u32", "match", "u32", "0",
           "0", "action", "mirred", "egress", "redirect", "dev", "t0")
    except RuntimeError as e:
        fail(str(e))
    finally:
        sh("ip", "netns", "del", ns, check=False)


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): with the pid it names a process even if pids recycle."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _ns_pids(ns: str) -> list[int]:
    """Every live process whose network namespace is `ns` (zombies are not listed)."""
    out = sh("ip", "netns", "pids", ns, check=False).stdout
    return [int(x) for x in out.split()]


def sigkill_until_gone(list_pids, timeout: float, pause: float = 0.05) -> list[int]:
    """SIGKILL whatever `list_pids()` finds until it finds nothing (processes may fork while we kill) or
    `timeout` passes; returns the survivors."""
    deadline = time.monotonic() + timeout
    while (pids := list_pids()) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(pause)
    return list_pids()


def _kill_ns(ns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process of a namespace until none is left."""
    if survivors := sigkill_until_gone(lambda: _ns_pids(ns), timeout):
        raise RuntimeError(f"processes {survivors} of namespace {ns} survived SIGKILL for {timeout:.0f} s")


def _destroy(prefix: str) -> None:
    """Remove every trace of the bed `prefix`: its processes, namespaces, links and directory."""
    for ns in sh("ip", "netns", "list").stdout.split("\n"):
        ns = ns.split(" ")[0]
        if ns.startswith(prefix + "-"):
            _kill_ns(ns)
            sh("ip", "netns", "del", ns, check=False)
    for link in _links():
        if link.startswith(prefix + "-"):
            sh("ip", "link", "del", link, check=False)
    for etc in ETC.glob(prefix + "-*"):
        shutil.rmtree(etc, ignore_errors=True)
    shutil.rmtree(BASE / prefix, ignore_errors=True)


def _links() -> list[str]:
    out = sh("ip", "-o", "link", "show").stdout
    return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]


def _owner_alive(prefix: str) -> bool:
    try:
        pid, started = (BASE / prefix / "owner").read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid)) == started


def sweep() -> list[str]:
    """Destroy beds left behind by runs whose owning process is gone (killed tests, crashed CI); return them."""
    seen = {m.group(1) for n in sh("ip", "netns", "list").stdout.split("\n") + _links() if (m := NAME.match(n))}
    seen |= {p.name for p in BASE.glob("nb????") if re.fullmatch(r"nb[0-9a-f]{4}", p.name)}
    seen |= {m.group(1) for p in ETC.glob("nb????-*") if (m := NAME.match(p.name))}
    stale = sorted(p for p in seen if not _owner_alive(p))
    for prefix in stale:
        _destroy(prefix)
    for ns in sh("ip", "netns", "list").stdout.split():  # an interrupted require_capabilities()
        if (m := re.fullmatch(r"nbcap(\d+)", ns)) and not Path(f"/proc/{m.group(1)}").exists():
            sh("ip", "netns", "del", ns, check=False)
    return stale


class Host:
    """One machine of the bed: a network namespace with one link (veth) to the bridge."""

    def __init__(self, bed: Bed, name: str, index: int, ip: str):
        self.bed, self.name, self.ip = bed, name, ip
        self.ns = f"{bed.prefix}-{name}"      # namespace name (not a link: no 15-character limit)
        self.link = f"{bed.prefix}-v{index}"  # our end of the veth, in the root namespace; theirs is eth0
        self.dir = BASE / bed.prefix / name
        # Ray's temp folder where Ray looks by default under the host's TMPDIR, so that Ray's commands on the host
        # (`ray drain-node` from spot_notice.py) find its node as on a real one; short enough for Ray's socket paths.
        self.home, self.tmp = self.dir / "home", self.dir / "tmp"
        self.ray_tmp = self.tmp / "ray"
        self.procs: list[subprocess.Popen] = []
        self.taps = (f"{bed.prefix}-a{index}", f"{bed.prefix}-b{index}")  # used only while shaped
        self.relay: subprocess.Popen | None = None

    def __repr__(self):
        return f"Host({self.name!r}, {self.ip})"

    def env(self, extra: dict | None = None) -> dict:
        """The caller's environment with this host's HOME/TMPDIR, minus proxies (hosts reach only the bed)."""
        env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
        env.update(HOME=str(self.home), TMPDIR=str(self.tmp))
        env.update(extra or {})
        return env

    def set_etc(self, name: str, text: str) -> None:
        """This host's own /etc/<name> (its passwd, say), seen by every command started on it from now on."""
        (ETC / self.ns).mkdir(parents=True, exist_ok=True)
        (ETC / self.ns / name).write_text(text)

    def _argv(self, cmd) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *(["sh", "-c", cmd] if isinstance(cmd, str) else cmd)]

    def run(self, cmd, env: dict | None = None, timeout: float = 60, check: bool = False,
            **kw) -> subprocess.CompletedProcess:
        """Run a command to completion on this host (a string goes through sh -c); output is captured."""
        return subprocess.run(self._argv(cmd), env=self.env(env), timeout=timeout, check=check,
                              capture_output=True, text=True, cwd=kw.pop("cwd", self.home), **kw)

    def spawn(self, cmd, env: dict | None = None, log: str | Path | None = None, **kw) -> subprocess.Popen:
        """Start a long-lived service on this host, in its own session, output to a log under the host dir."""
        log = self.dir / (log or f"spawn-{len(self.procs)}.log")  # an absolute `log` stays as it is
        with open(log, "ab") as f:
            proc = subprocess.Popen(self._argv(cmd), env=self.env(env), stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=kw.pop("cwd", self.home), **kw)
        proc.log = log
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10) -> int:
        """Stop one spawned service politely (SIGTERM to its process group, SIGKILL after `timeout`)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                continue
        return proc.wait()

    def pids(self) -> list[int]:
        """Every live process on this host, found by network namespace (never by name)."""
        return _ns_pids(self.ns)

    def kill(self, timeout: float = 10) -> None:
        """Power the host off: SIGKILL every process in its namespace until none is left. The link stays up."""
        _kill_ns(self.ns, timeout)
        for proc in self.procs:  # reap what we spawned so no zombies linger
            proc.wait(timeout)
        self.procs.clear()

    def cut(self) -> None:
        """Partition the host from everything (laptop and other hosts): our veth end goes down, so the
        host's eth0 loses carrier but keeps its address and routes; open connections stall, new ones time out."""
        sh("ip", "link", "set", self.link, "down")

    def restore(self) -> None:
        """Heal a cut()."""
        sh("ip", "link", "set", self.link, "up")

    def shape(self, delay_ms: float = 0, loss_pct: float = 0, rate_mbit: float = 0) -> None:
        """Degrade the host's link in BOTH directions; each value applies each way, so a round trip through
        this link grows by 2 * delay_ms. Rate: tbf on the egress of both veth ends. Delay and loss: this
        kernel has no netem (CONFIG_NET_SCH_NETEM unset), so the link is rerouted through a small relay
        process (see `relay`): our veth end leaves the bridge, tc mirred sends its frames to tap <prefix>-a<i>,
        the relay holds each frame for delay_ms (or drops it) and writes it to tap <prefix>-b<i>, a bridge
        port, and the same way back."""
        self.unshape()
        if rate_mbit:
            burst = max(1600, int(rate_mbit * 1e6 / 8 / 100))  # 10 ms worth of bytes
            for tc, dev in ((["tc"], self.link), (["tc", "-n", self.ns], "eth0")):
                sh(*tc, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst),
                   "latency", "200ms")
        if delay_ms or loss_pct:
            self._start_relay(delay_ms, loss_pct)

    def _start_relay(self, delay_ms: float, loss_pct: float) -> None:
        a, b = self.taps
        for tap in (a, b):
            sh("ip", "tuntap", "add", "dev", tap, "mode", "tap")
            Path(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6").write_text("1")
        self.relay = subprocess.Popen([sys.executable, __file__, "relay", a, b, str(delay_ms), str(loss_pct),
                                       str(self.dir)], stdout=subprocess.PIPE, text=True)
        if self.relay.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the link relay for {self.name} did not start")
        sh("ip", "link", "set", a, "up")
        sh("ip", "link", "set", b, "master", self.bed.bridge, "up")
        for src, dst in ((a, self.link), (self.link, a)):  # a <-> our veth end, bypassing the bridge
            sh("tc", "qdisc", "add", "dev", src, "clsact")
            sh("tc", "filter", "add", "dev", src, "ingress", "protocol", "all", "u32", "match", "u32", "0", "0",
               "action", "mirred", "egress", "redirect", "dev", dst)
        sh("ip", "link", "set", self.link, "nomaster")

    def unshape(self) -> None:
        """Remove any shaping: the veth end rejoins the bridge, the relay and its taps go, tbf goes."""
        sh("ip", "link", "set", self.link, "master", self.bed.bridge)
        sh("tc", "qdisc", "del", "dev", self.link, "clsact", check=False)
        if self.relay:
            self.relay.kill()
            self.relay.wait()
            self.relay = None
        for tap in self.taps:
            if Path(f"/sys/class/net/{tap}").exists():
                sh("ip", "link", "del", tap)
        sh("tc", "qdisc", "del", "dev", self.link, "root", check=False)
        sh("tc", "-n", self.ns, "qdisc", "del", "dev", "eth0", "root", check=False)


class Bed:
    """N hosts on a private bridge. Use as a context manager; close() always removes everything."""

    def __init__(self, hosts=("services", "head", "worker-1", "worker-2")):
        bad = [h for h in hosts if not HOST_NAME.match(h)]
        if bad or len(set(hosts)) != len(hosts) or not 0 < len(hosts) <= 200:
            raise ValueError(f"host names must be unique, lowercase [a-z0-9-], 1..200 of them: {list(hosts)}")
        self.names = list(hosts)
        self.prefix = "nb" + secrets.token_hex(2)  # 6 chars: "<prefix>-v199" still fits in 15
        self.bridge = f"{self.prefix}-br"
        self.dir = BASE / self.prefix
        self.hosts: dict[str, Host] = {}
        self.laptop_ip = None
        self.owner = None

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self):
        return iter(self.hosts.values())

    def __enter__(self) -> Bed:
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def start(self) -> Bed:
        """Sweep stale beds, pick a free 198.18.N.0/24, build bridge, namespaces and links."""
        self.owner = os.getpid()
        atexit.register(self.close)
        # Sweeping, subnet choice and creation are serialized across beds by a lock on BASE itself: a lock file
        # would be left behind in /tmp.
        lock = os.open(BASE, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            sweep()
            while self.dir.exists():  # a prefix clash with a live bed: draw again
                self.prefix = "nb" + secrets.token_hex(2)
                self.bridge, self.dir = f"{self.prefix}-br", BASE / self.prefix
            self.dir.mkdir()
            (self.dir / "owner").write_text(f"{self.owner} {_start_time(self.owner)}\n")
            net = self._free_subnet()
            try:
                self._build(net)
            except BaseException:
                self.close()
                raise
        finally:
            os.close(lock)  # and with it the lock
        return self

    def _free_subnet(self) -> str:
        """The first 198.18.N (N < 256) that no address in the root namespace uses: parallel beds each get one."""
        used = set(re.findall(r"inet 198\.18\.(\d+)\.", sh("ip", "-4", "-o", "addr", "show").stdout))
        free = next((n for n in range(256) if str(n) not in used), None)
        if free is None:
            raise RuntimeError("no free /24 left in 198.18.0.0/16")
        return f"198.18.{free}"

    def _build(self, net: str) -> None:
        self.laptop_ip = f"{net}.1"
        # A fixed MAC: a bridge otherwise takes its lowest port's, and shape() adds and removes ports.
        sh("ip", "link", "add", self.bridge, "address", f"02:00:c6:12:{int(net.split('.')[2]):02x}:01",
           "type", "bridge")
        Path(f"/proc/sys/net/ipv6/conf/{self.bridge}/disable_ipv6").write_text("1")  # no fe80:: chatter
        sh("ip", "addr", "add", f"{self.laptop_ip}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i, name in enumerate(self.names):
            host = self.hosts[name] = Host(self, name, i, f"{net}.{11 + i}")
            for d in (host.home, host.tmp, host.ray_tmp):
                d.mkdir(parents=True)
            sh("ip", "netns", "add", host.ns)
            # Links born from now on in the namespace have no IPv6 (lo, created with it, keeps ::1).
            sh("ip", "netns", "exec", host.ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")
            sh("ip", "link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            Path(f"/proc/sys/net/ipv6/conf/{host.link}/disable_ipv6").write_text("1")
            sh("ip", "link", "set", host.link, "master", self.bridge, "up")
            sh("ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            sh("ip", "-n", host.ns, "link", "set", "eth0", "up")
            sh("ip", "-n", host.ns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Kill every process of every host, delete namespaces, links and the bed's directory. Idempotent;
        only the process that started the bed tears it down (a forked child exiting must not)."""
        if self.owner != os.getpid():
            return
        self.owner = None
        for host in self.hosts.values():
            if host.relay:
                host.relay.kill()
                host.relay.wait()
        _destroy(self.prefix)
        for host in self.hosts.values():
            for proc in host.procs:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass


def relay(tap_host: str, tap_bridge: str, delay_ms: str, loss_pct: str, _bed_dir: str) -> None:
    """The delaying, lossy wire of a shaped host: frames read from one tap are written to the other after
    delay_ms, unless dropped with probability loss_pct. Exits when its parent (the bed's owner) goes away or
    the taps are deleted. `_bed_dir` is there so that `pgrep -f <bed dir>` finds it."""
    import fcntl as _f
    import heapq
    import random
    import select
    import struct

    def attach(name: str) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        _f.ioctl(fd, 0x400454CA, struct.pack("16sH22x", name.encode(), 0x0002 | 0x1000))  # TUNSETIFF: TAP|NO_PI
        return fd

    host, bridge = attach(tap_host), attach(tap_bridge)
    peer = {host: bridge, bridge: host}
    delay, loss, parent = float(delay_ms) / 1000, float(loss_pct) / 100, os.getppid()
    queue: list = []  # (due time, sequence, destination fd, frame)
    seq = 0
    print("ready", flush=True)
    while os.getppid() == parent:
        timeout = min(1.0, max(0.0, queue[0][0] - time.monotonic())) if queue else 1.0
        for fd in select.select([host, bridge], [], [], timeout)[0]:
            while True:
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if random.random() >= loss:
                    seq += 1
                    heapq.heappush(queue, (time.monotonic() + delay, seq, peer[fd], frame))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, fd, frame = heapq.heappop(queue)
            try:
                os.write(fd, frame)
            except OSError:
                pass


if __name__ == "__main__" and sys.argv[1:2] == ["relay"]:
    try:
        relay(*sys.argv[2:])
    except OSError:  # a tap vanished: the bed is gone
        pass
