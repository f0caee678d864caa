"""The DCGAN paper's experiments on a registered generator/discriminator; figures and numbers go to a folder and MLflow.

    python jobs/experiments.py latent-walk       --model models:/dcgan-generator@champion
    python jobs/experiments.py vector-arithmetic --model models:/dcgan-generator@champion          # sample sheet
    python jobs/experiments.py vector-arithmetic --model ... --a 3,7,12 --b 4,9,20 --c 1,5,6     # the sum
    python jobs/experiments.py feature-svm       --model ... --labels-per-class 10
    python jobs/experiments.py guided-backprop   --model ... --layer 2
    python jobs/experiments.py label-boxes       --model ... --box 3:2,4,20,28 --box 5:0,0,16,16
    python jobs/experiments.py forget            --model ... --boxes boxes.json
    python jobs/experiments.py nearest-neighbors --model ...
"""

import importlib

from dcgan_dist.cli import add_model_argument, config_parser, parse_config, run_main
from dcgan_dist.errors import DcganError

MODULES = ["latent_walk", "vector_arithmetic", "feature_svm", "guided_backprop", "label_boxes", "forget",
           "nearest_neighbors"]


def main() -> int:
    parser = config_parser(__doc__)
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="NAME")
    modules = {}
    for name in MODULES:
        module = importlib.import_module(f"dcgan_dist.experiments.{name}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        add_model_argument(p)
        p.add_argument("--out", help="output folder (default outputs/experiments/NAME-vVERSION)")
        p.add_argument("--seed", type=int, default=0, help="seed for every random draw (same seed, same figures)")
        p.add_argument("--set", dest="more_overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key, e.g. --set tracking.uri=http://127.0.0.1:5000 (repeatable)")
        module.add_arguments(p)
        modules[module.NAME] = module
    args = parser.parse_args()
    args.overrides += args.more_overrides  # --set is accepted before and after NAME
    cfg = parse_config(args)
    from dcgan_dist.experiments.common import ExperimentRun
    from dcgan_dist.networks import load_networks

    nets = load_networks(cfg.tracking.uri, args.model)
    module = modules[args.experiment]
    folder = args.out or f"outputs/experiments/{module.NAME}-v{nets.version}"
    params = {k: v for k, v in vars(args).items() if k not in ("overrides", "more_overrides", "help_config", "config")
              and v is not None}
    out = ExperimentRun(cfg, nets, module.NAME, folder, {**params, "model_version": nets.uri})
    try:
        summary = module.run(args, nets, out)
    except DcganError:  # a bad argument or input: leave no run behind
        out.discard()
        raise
    except BaseException:
        out.fail()
        raise
    print(f"\n{module.NAME} on {nets.uri} (step {nets.step}):\n{summary.rstrip()}")
    print(f"  outputs: {folder}  (MLflow run {out.run_id})")
    return 0


if __name__ == "__main__":
    run_main(main)
