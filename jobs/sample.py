"""Sample a registered generator: an image grid, raw arrays, or a latent walk.

    python jobs/sample.py                                          # models:/dcgan-generator@champion -> samples.png
    python jobs/sample.py --model models:/dcgan-generator/3 -n 16 --seed 7 --out grid.png --npz samples.npz
    python jobs/sample.py --interpolate 10 -n 4 --out walk.png     # 4 rows of 10 steps between random points
"""

from dcgan_dist.cli import add_model_argument, config_parser, parse_config, run_main


def main() -> int:
    parser = config_parser(__doc__)
    add_model_argument(parser)
    parser.add_argument("-n", type=int, default=64, help="images, or rows with --interpolate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="latent seed: the same seed gives the same images")
    parser.add_argument("--out", default=None, help="PNG grid to write (default: samples.png unless --npz is given)")
    parser.add_argument("--npz", default=None, help="also (or only) write the images as an npz array, key 'images'")
    parser.add_argument("--interpolate", type=int, default=0, metavar="K",
                        help="a latent walk: each of the -n rows has K images between two random points")
    args = parser.parse_args()
    cfg = parse_config(args)
    from dcgan_dist.sampling import sample, write  # after parsing: --help stays fast

    images, version = sample(cfg.tracking.uri, args.model, args.n, args.seed, args.interpolate)
    out = args.out or (None if args.npz else "samples.png")
    write(images, out, args.npz, nrow=args.interpolate or 8)
    shape = "x".join(map(str, images.shape))
    written = ", ".join(filter(None, [out, args.npz]))
    print(f"{args.model} (version {version}): {shape} images, seed {args.seed} -> {written}")
    return 0


if __name__ == "__main__":
    run_main(main)
