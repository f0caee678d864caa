"""Benchmarks that print numbers and ratios (speed targets live here, not in timed unit tests), run by
`jobs/benchmark.py`. They are not part of the library: they borrow the test suite's scaffolding from tests/
(loopback moto/MLflow servers, synthetic LSUN data, the network-namespace bed) instead of shipping it.

step.py: the training step vs pytorch/examples' (canonical.py); data.py: shards, streaming, JPEG decoding;
ray_overhead.py: Ray Train vs a plain loop; scaling.py: compute + allreduce -> the scaling model;
tracking_load.py: trials against one MLflow server with basic auth; soak.py: a long run watched for growth.
"""

import sys
from pathlib import Path

JOBS = Path(__file__).resolve().parent.parent
TESTS = JOBS.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))
