"""Train a DCGAN with Ray Train (DDP) on WebDataset shards, tracked in MLflow.

    python jobs/train.py                                   # local Ray, 2 CPU workers, embedded digits
    python jobs/train.py --set train.steps=5000 --set data.url=data/bedrooms-64 --set model.resolution=64
    ray job submit --working-dir . -- python jobs/train.py --set ray.address=auto ...
"""

from dcgan_dist.cli import config_parser, parse_config, run_main


def main() -> int:
    args = config_parser(__doc__).parse_args()
    cfg = parse_config(args)
    from dcgan_dist.tracking import experiment_id, where_to_browse
    from dcgan_dist.trainer import train  # after parsing: --help stays fast

    out = train(cfg)
    print(f"\nrun {out.run_name!r} finished at step {out.step}; last checkpoint: {out.checkpoint_path}")
    print(f"  resume or extend:  python jobs/train.py --set train.run_name={out.run_name} --set train.steps=N")
    print(f"  browse the run:    {where_to_browse(cfg.tracking.uri, experiment_id(cfg), out.run_id)}")
    if out.model_version:
        name = cfg.tracking.model_name
        scored = f", {cfg.tune.metric} {out.best_scores[cfg.tune.metric]:.2f}" if out.best_scores else ""
        verdict = "now @champion" if out.champion else "@champion stays on a better version"
        print(f"  generator:         models:/{name}/{out.model_version} from step {out.best_step}{scored} ({verdict})")
    return 0


if __name__ == "__main__":
    run_main(main)
