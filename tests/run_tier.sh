#!/usr/bin/env bash
# One tier of `make test`: pytest with its --durations table, then its wall time. The tier runs in a scratch TMPDIR
# of its own, removed afterwards (Ray's session folders, pytest's tmp_path, DataLoader's); the session itself fails
# if it left a process running or anything in /tmp (tests/leftovers.py).
# Usage: tests/run_tier.sh PYTHON "NAME" PYTEST_ARGS...
set -u
python=$1 name=$2
shift 2
scratch=$(mktemp -d /tmp/dcgan-test.XXXXXX)
t0=$(date +%s)
TMPDIR=$scratch "$python" -m pytest -q tests --durations=15 "$@"
rc=$?
echo "$name wall time: $(( $(date +%s) - t0 )) s"
rm -rf "$scratch"
exit $rc
