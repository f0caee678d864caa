"""The bed's hosts as machines for `ray up` over SSH: each runs a real OpenSSH server and has what an on-premises
machine has before the launcher first logs in (docs/own-machines.md): Python with Ray and the
project's dependencies, S3 settings, and the laptop's public key in root's authorized_keys.

The hosts share one filesystem and one process table. What makes them separate machines to the launcher:
    home       root's home is the host's own folder (its own /etc/passwd, netbed.Host.set_etc), so what `ray up`
               copies and installs there (~/dcgan-dist, ~/.ray/auth_token, ~/ray_bootstrap_key.pem) is its alone
    processes  sshd runs in a PID namespace of its own: `ray stop` (a start command) sees that host's processes only
    name       its own /etc/hosts maps the machine's hostname to the host's address, as DNS would: Ray and Gloo
               find the node's address by that name (the bed's hosts have no route out to detect it by)
    /tmp       its own (a bind mount in sshd's mount namespace): Ray's worker nodes put their session in the
               head's temp folder path, /tmp/ray, which on a shared /tmp would be one folder for three nodes
    Python     ~/venv, layered on the test's virtual environment by one .pth line (5 GB of torch is not copied
               per host) but with its own site-packages, `pip` and `ray`, so `pip install -e ~/dcgan-dist` (the
               setup command) installs on that host alone. The hosts reach no package index: pip is told so and
               builds in that environment (setuptools comes from the layer below).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from netbed import Host

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
SSHD = Path("/usr/sbin/sshd")
PIP_CONF = "[global]\nno-index = true\n\n[install]\n# pip's inverted switch: false = build without isolation\nno-build-isolation = false\n"


def require_ssh_tools() -> None:
    """Fail loudly (never skip) without OpenSSH and rsync: `make test` installs them (tests/install_bed_tools.sh)."""
    missing = [t for t in ("ssh", "ssh-keygen", "rsync") if shutil.which(t) is None] + ([] if SSHD.exists() else ["sshd"])
    if missing:
        raise RuntimeError(f"the ray-up tests need OpenSSH and rsync; missing: {', '.join(missing)} "
                           "(Debian: apt-get install openssh-server openssh-client rsync)")


def make_key(path: Path) -> Path:
    """An ed25519 key pair made for this test (path, path.pub)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dcgan-dist bed", "-f", str(path)],
                   check=True)
    return path


def make_machine(host: Host, public_key: Path, bashrc: dict[str, str]) -> None:
    """Give `host` a home, a name, a Python environment and the laptop's key, as an administrator would have."""
    passwd = [":".join([*line.split(":")[:5], str(host.home), *line.split(":")[6:]]) if line.startswith("root:")
              else line for line in Path("/etc/passwd").read_text().splitlines()]
    host.set_etc("passwd", "\n".join(passwd) + "\n")
    host.set_etc("hosts", f"127.0.0.1 localhost\n{host.ip} {socket.gethostname()}\n")
    ssh = host.home / ".ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "authorized_keys").write_text(public_key.read_text())
    _python(host)
    lines = [f"export PATH={host.home}/venv/bin:$PATH"]
    lines += [f"export {k}={v}" for k, v in bashrc.items()]
    (host.home / ".bashrc").write_text("\n".join(lines) + "\n")
    (host.home / ".config" / "pip").mkdir(parents=True)
    (host.home / ".config" / "pip" / "pip.conf").write_text(PIP_CONF)


def _python(host: Host) -> None:
    venv = host.home / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # venv's own setuptools is older than pyproject.toml's license field allows: the layer below has a new one.
    for old in ("setuptools", "pkg_resources", "_distutils_hack", "distutils-precedence.pth"):
        for p in site.glob(old + "*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    (site / "machine-image.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for tool in ("ray", "mlflow"):  # the layer's console scripts, on this environment's interpreter
        script = (BIN / tool).read_text().split("\n", 1)[1]
        (venv / "bin" / tool).write_text(f"#!{venv}/bin/python\n{script}")
        (venv / "bin" / tool).chmod(0o755)


def start_sshd(host: Host) -> None:
    """OpenSSH's server on the host's address, key logins only, in a PID namespace of the host's own."""
    conf = host.dir / "sshd"
    conf.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(conf / "host_key")], check=True)
    (conf / "sshd_config").write_text("\n".join([
        f"ListenAddress {host.ip}", f"HostKey {conf}/host_key", "PidFile none", "UsePAM no",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "AuthorizedKeysFile .ssh/authorized_keys", "MaxStartups 100", "MaxSessions 100", ""]))
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation directory (systemd makes it on a real host)
    # The host's own /tmp, with what must stay in sight at its path inside it: the bed's folder (homes, logs), and
    # the checkout and Python the hosts run, when they live under /tmp (a CI clone, a worktree).
    keep = {Path("/tmp", p.relative_to("/tmp").parts[0]) for p in (host.bed.dir, REPO, Path(sys.prefix).resolve(),
                                                                   Path(sys.base_prefix).resolve())
            if p.is_relative_to("/tmp")}
    binds = []
    for folder in sorted(keep):
        (host.tmp / folder.name).mkdir()
        binds.append(f"mount --bind {folder} {host.tmp / folder.name}")
    private_tmp = " && ".join([*binds, f"mount --rbind {host.tmp} /tmp"])
    # PID 1 of the namespace reaps what it adopts, as init does: a daemon whose parent died (Ray's agents, when the
    # raylet leaves) sees its parent go only once that parent is reaped.
    init = "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:])\nwhile os.wait()[0] != p.pid: pass"
    host.spawn(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c",
                f"{private_tmp} && exec {sys.executable} -c '{init}' {SSHD} -D -e -f {conf / 'sshd_config'}"],
               log="sshd.log")
    deadline = time.time() + 20
    while "Server listening" not in (host.dir / "sshd.log").read_text():
        if time.time() > deadline:
            raise RuntimeError(f"sshd on {host.name} did not start: {(host.dir / 'sshd.log').read_text()}")
        time.sleep(0.1)
