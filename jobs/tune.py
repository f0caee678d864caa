"""Search DCGAN hyperparameters with Ray Tune (ASHA + Optuna, or PBT) on a quality metric, tracked in MLflow.

    python jobs/tune.py                                     # 6 trials on the embedded digits, ~10 min on 2 cores
    python jobs/tune.py --set tune.scheduler=pbt --set tune.num_samples=4
    python jobs/tune.py --set tune.space=my_space.yaml --set data.url=s3://bucket/bedrooms-64/ --set model.resolution=64
"""

from pathlib import Path

from dcgan_dist.cli import config_parser, parse_config, run_main
from dcgan_dist.config import TuneConfig, load_config


def main() -> int:
    args = config_parser(__doc__).parse_args()
    first = parse_config(args)
    space_path = first.tune.space
    if space_path == TuneConfig.space and not Path(space_path).is_file():  # run from another folder
        space_path = str(Path(__file__).with_name("tune_space.yaml"))
    from dcgan_dist.tracking import experiment_id, where_to_browse
    from dcgan_dist.tune import load_space, search  # after parsing: --help stays fast

    space = load_space(space_path)
    cfg = load_config(args.config, args.overrides, defaults=space.fixed)
    out = search(cfg, space)
    metric = cfg.tune.metric
    print(f"\nsearch {out.name!r}: {len(out.trials)} trials")
    for row in sorted(out.trials, key=lambda r: (r[metric] != r[metric], r[metric])):
        params = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if "." in k)
        print(f"  {row['trial']:<32} {row['status']:<9} {metric} {row[metric]:8.3f}  steps {row['steps']:>5}  {params}")
    print(f"best: {out.best_trial} at step {out.best_step}, {metric} {out.best_value:.4f}")
    if out.model_version:
        name = cfg.tracking.model_name
        verdict = "now @champion" if out.champion else "did not beat @champion"
        print(f"  registered:   models:/{name}/{out.model_version} ({verdict})")
    print(f"  browse:       {where_to_browse(cfg.tracking.uri, experiment_id(cfg), out.parent_run_id)}  (run {out.name!r})")
    return 0


if __name__ == "__main__":
    run_main(main)
