"""Check a Ray cluster YAML before `ray up`: Ray's own schema, plus the mistakes its schema lets through.

    python cluster/check_config.py ray_cluster.yaml
"""

from __future__ import annotations

import copy
import sys

import yaml


def check_cluster_config(config: dict) -> None:
    """Raise ValueError naming the node type for what Ray's schema does not check; then run Ray's validation."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    for name, node_type in config.get("available_node_types", {}).items():
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if lo > hi:
            raise ValueError(f"available_node_types.{name}: min_workers {lo} > max_workers {hi}")
    validate_config(prepare_config(copy.deepcopy(config)))


def main(argv: list[str]) -> int:
    for path in argv or ["ray_cluster.yaml"]:
        with open(path) as f:
            config = yaml.safe_load(f)
        try:
            check_cluster_config(config)
        except Exception as e:  # Ray raises ValueError, jsonschema.ValidationError, RuntimeError
            print(f"{path}: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
