"""Evaluate a registered generator (SWD; FID and KID with Inception weights) against a dataset, tracked in MLflow.

    python jobs/evaluate.py --model models:/dcgan-generator@champion
    python jobs/evaluate.py --model models:/dcgan-generator/3 --set metrics.num_images=10000 \\
        --set metrics.inception_weights=/models/pt_inception-2015-12-05-6726825d.pth
"""

from dcgan_dist.cli import add_model_argument, config_parser, parse_config, run_main


def main() -> int:
    parser = config_parser(__doc__)
    add_model_argument(parser)
    parser.add_argument("--data", help="shards to compare with (default: the data.url the model was trained on)")
    args = parser.parse_args()
    cfg = parse_config(args)
    from dcgan_dist.evaluation import evaluate_registered  # after parsing: --help stays fast

    from dcgan_dist.config import DataConfig

    # --data, or data.url when the user set it (--set or --config): never ignored for the trained model's data
    data = args.data or (cfg.data.url if cfg.data.url != DataConfig.url else None)
    out = evaluate_registered(cfg, args.model, data)
    print(f"\n{args.model} (version {out.version}, step {out.step}) on {out.data_url}:")
    for name, value in out.values.items():
        print(f"  {name:<8} {value:.4f}")
    for name, protocol in out.protocols.items():
        print(f"  protocol {name}: {protocol.key}")
    print(f"  logged to MLflow run {out.run_id} and tagged on the model version")
    return 0


if __name__ == "__main__":
    run_main(main)
