"""Benchmarks: print a table, optionally write the rows as JSON.

    python jobs/benchmark.py step                 # our GAN step vs pytorch/examples', 32x32 and 64x64
    python jobs/benchmark.py step --json out.json --batches 64 128 512
"""

import argparse
import json

from dcgan_dist.cli import run_main


def print_table(rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(r.get(c, '')):>18}" for c in cols))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step", help="training step images/s: canonical pytorch/examples vs ours")
    s.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    s.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    s.add_argument("--preset", default="examples", choices=["examples", "paper"])
    s.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    from dcgan_dist.bench import bench_step

    rows = bench_step(args.resolutions, args.batches, args.preset, steps=args.steps, repeats=args.repeats,
                      device=args.device)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    run_main(main)
