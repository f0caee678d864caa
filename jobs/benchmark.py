"""Benchmarks: print a table, optionally write the rows as JSON.

    python jobs/benchmark.py step                 # our GAN step vs pytorch/examples', 32x32 and 64x64
    python jobs/benchmark.py step --json out.json --batches 64 128 512
    python jobs/benchmark.py step --variant bf16=train.precision=bf16 --variant fused=train.fused_adam=true
    python jobs/benchmark.py ray-overhead         # Ray Train (1 worker) vs a plain loop, and startup time
    python jobs/benchmark.py data                 # shard build, streaming (local, S3), JPEG decode (CPU, nvJPEG)
    python jobs/benchmark.py scaling              # compute + allreduce per step, predicted efficiency, 1-64 GPUs
    python jobs/benchmark.py scaling --hosts      # the allreduce between two bed hosts on 1 and 4 Gbit/s links (root)
    python jobs/benchmark.py eval-overhead        # training steps/s: evaluation off, in the loop, beside; checkpoints
    python jobs/benchmark.py gpu --device cpu     # the first-GPU-run script, checked without a GPU
    python jobs/benchmark.py tracking-load        # 1-64 trials logging to one MLflow server with basic auth
    python jobs/benchmark.py soak                 # 45 minutes on 300,000 images from S3: does anything grow?

On a GPU machine `make bench-gpu` runs `gpu`: preflight, step table, training, decode, resume, NCCL (10 minutes).
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="examples:\n" + __doc__.split("\n", 1)[1].strip("\n"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step", help="training step images/s: canonical pytorch/examples vs ours")
    s.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    s.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    s.add_argument("--preset", default="examples", choices=["examples", "paper"])
    s.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="also time our step with these config overrides, e.g. bf16=train.precision=bf16 (repeatable)")
    s.add_argument("--json", help="write the rows to this file")
    dp = sub.add_parser("data", help="shard build and streaming throughput, local and loopback S3 (needs the dev "
                        "extra), and JPEG decode rates: PIL, torchvision on CPU, nvJPEG on a GPU")
    dp.add_argument("--images", type=int, default=2000, help="images in the generated LSUN-format LMDB")
    dp.add_argument("--resolution", type=int, default=64)
    dp.add_argument("--encodings", nargs="+", default=["jpg", "raw"])
    dp.add_argument("--workdir", help="keep the generated LMDB and shards here (reused when present)")
    dp.add_argument("--json", help="write the rows to this file")
    rp = sub.add_parser("ray-overhead", help="python jobs/train.py (Ray Train, 1 worker) vs a plain loop; startup time")
    rp.add_argument("--steps", type=int, default=300)
    rp.add_argument("--batch", type=int, default=64)
    rp.add_argument("--resolution", type=int, default=32)
    rp.add_argument("--log-every", type=int, default=25, help="training's images/s window")
    rp.add_argument("--workdir", help="keep the run's MLflow store and checkpoints here (default: a temporary folder)")
    rp.add_argument("--json", help="write the rows to this file")
    ep = sub.add_parser("eval-overhead", help="training steps/s with evaluation off, scored in the loop, and scored "
                        "beside training (Ray Train's checkpoint validation); and with frequent checkpoints")
    ep.add_argument("--steps", type=int, default=300)
    ep.add_argument("--eval-every", type=int, default=50)
    ep.add_argument("--num-images", type=int, default=2048, help="generated images per evaluation")
    ep.add_argument("--checkpoint-every", type=int, default=10, help="the checkpoints row's interval (no evaluation)")
    ep.add_argument("--workdir", help="keep the runs' MLflow store and checkpoints here (default: a temporary folder)")
    ep.add_argument("--json", help="write the rows to this file")
    gp = sub.add_parser("gpu", help="the first GPU run in one go (make bench-gpu): preflight, step table, training "
                        "from local shards and loopback S3, decode vs step, a resume, NCCL on one GPU")
    gp.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: check the script without a GPU")
    gp.add_argument("--images", type=int, default=4000)
    gp.add_argument("--steps", type=int, default=300)
    gp.add_argument("--json", help="write the result to this file")
    sp = sub.add_parser("scaling", help="compute and allreduce time per step, and the predicted scaling table")
    sp.add_argument("--resolution", type=int, default=64)
    sp.add_argument("--preset", default="examples", choices=["examples", "paper"])
    sp.add_argument("--batch", type=int, default=128, help="per-GPU batch of the modelled runs")
    sp.add_argument("--gpu-tflops", type=float, default=100.0,
                    help="without a GPU: the assumed achieved TFLOP/s of one GPU on our step")
    sp.add_argument("--hosts", action="store_true",
                    help="instead: the allreduce between two network-namespace hosts on links shaped to 1 and 4 "
                         "Gbit/s, measured vs the ring model (needs root; uses tests/netbed.py)")
    sp.add_argument("--json", help="write the result to this file")
    tp = sub.add_parser("tracking-load", help="simulated trials logging like rank 0 to one MLflow server with basic "
                        "auth on loopback: requests/s, points/s, server CPU, latency, backlog, all arrived")
    tp.add_argument("--trials", type=int, nargs="+", default=[1, 8, 32, 64])
    tp.add_argument("--seconds", type=float, default=60, help="how long the trials log, per row")
    tp.add_argument("--log-every-s", type=float, default=2.0, help="seconds between a trial's metric batches")
    tp.add_argument("--grid-every", type=int, default=10, help="a sample grid every this many batches")
    tp.add_argument("--cache-ttls", type=int, nargs="+", default=[0, 60],
                    help="the server's MLFLOW_AUTH_CACHE_TTL_S values to compare (0: the password hash every request)")
    tp.add_argument("--stores", nargs="+", default=["sqlite"], choices=["sqlite", "postgres"],
                    help="the server's store: its sqlite file, or a PostgreSQL on a local socket (pgserver)")
    tp.add_argument("--workers", type=int, default=1, help="MLflow server processes (MLFLOW_WORKERS)")
    tp.add_argument("--workdir", help="where the servers' state goes (default: a temporary folder)")
    tp.add_argument("--json", help="write the rows to this file")
    kp = sub.add_parser("soak", help="a long run from a loopback S3 of LSUN-scale shards with MLflow (basic auth, S3 "
                        "artifacts), every process's memory, files and threads sampled: growth per hour")
    kp.add_argument("--images", type=int, default=300_000, help="images in the synthetic LSUN-format LMDB (64x64)")
    kp.add_argument("--minutes", type=float, default=45)
    kp.add_argument("--sample-s", type=float, default=30, help="seconds between samples")
    kp.add_argument("--warmup-min", type=float, default=5,
                    help="minutes of training (from when both workers are up) left out of the growth figures")
    kp.add_argument("--out", default="outputs/soak", help="where soak.json, soak.png and train.log go")
    kp.add_argument("--workdir", help="keep the LMDB, the servers' state and Ray's temp folder here")
    kp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a training setting over the soak's own (repeatable)")
    args = p.parse_args()
    from bench import data, eval_overhead, gpu, ray_overhead, scaling, soak, step, tracking_load

    if args.what == "step":
        variants = {}
        for v in args.variant:
            name, _, overrides = v.partition("=")
            variants[name] = [o for o in overrides.split(",") if o]
        rows = step.bench_step(args.resolutions, args.batches, args.preset, steps=args.steps, repeats=args.repeats,
                                device=args.device, variants=variants)
    elif args.what == "scaling" and args.hosts:
        rows = scaling.measure_between_hosts(scaling.gradient_bytes(args.resolution, args.preset))
    elif args.what == "scaling":
        result = scaling.bench_scaling(args.resolution, args.preset, args.batch, args.gpu_tflops)
        print(json.dumps(result["measured"], indent=2))
        print(f"model: {json.dumps({k: v for k, v in result['model'].items() if k != 'rows'})}")
        rows = result["model"]["rows"]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        print_table(rows)
        return 0
    elif args.what == "gpu":
        result = gpu.bench_gpu(args.device, args.images, args.steps)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        print(json.dumps(result["preflight"]))
        print_table(gpu.summary_rows(result))
        return 1 if result["errors"] else 0
    elif args.what == "eval-overhead":
        rows = eval_overhead.bench_eval_overhead(args.steps, args.eval_every, args.num_images,
                                                 checkpoint_every=args.checkpoint_every, workdir=args.workdir)
    elif args.what == "soak":
        result = soak.bench_soak(args.images, args.minutes, args.sample_s, args.warmup_min, args.out, args.workdir,
                                 tuple(args.overrides))
        print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "settings")}, indent=2))
        return 0 if result["exit_code"] == 143 and not result["ended_early"] else 1
    elif args.what == "tracking-load":
        rows = tracking_load.bench_tracking_load(args.trials, args.seconds, args.log_every_s, args.grid_every,
                                                 args.cache_ttls, args.workdir, args.stores, args.workers)
    elif args.what == "ray-overhead":
        rows = ray_overhead.bench_ray_overhead(args.steps, args.batch, args.resolution, args.log_every,
                                               args.workdir)
    else:
        result = data.bench_data(args.images, args.resolution, args.encodings, args.workdir)
        print_table(result["stream"])
        print()
        print_table(result["decode"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    run_main(main)
