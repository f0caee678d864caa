#!/usr/bin/env bash
# What the multi-host tests need from the OS, installed when missing (Debian/Ubuntu package names): ip and tc for
# the hosts and links, OpenSSH's server and client and rsync for `ray up` over SSH (tests/test_ray_up.py).
set -euo pipefail
need=()
{ command -v ip && command -v tc; } > /dev/null || need+=(iproute2)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
{ command -v ssh && command -v ssh-keygen; } > /dev/null || need+=(openssh-client)
command -v rsync > /dev/null || need+=(rsync)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
  echo "the multi-host tests need these packages: ${need[*]} (install them as root)" >&2
  exit 1
fi
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
