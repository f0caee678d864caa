"""Build WebDataset tar shards + manifest.json from an image source, locally or into S3.

    python jobs/prepare_data.py digits --out data/digits-32
    python jobs/prepare_data.py lsun ~/lsun/bedroom_train_lmdb --out s3://my-bucket/lsun/bedroom-64/
    python jobs/prepare_data.py folder ~/photos --out data/photos-64 --encoding png
    python jobs/prepare_data.py folder ~/imagenette/train --labels subfolders --out data/imagenette-64
    python jobs/prepare_data.py cifar10 ~/cifar-10-batches-py --out data/cifar10-32 --resolution 32

Re-running the same command after an interruption keeps finished shards and builds the rest.
"""

import argparse

from dcgan_dist.cli import run_main
from dcgan_dist.data import shards, sources

HELP = {
    "digits": "scikit-learn's 1,797 handwritten digits (embedded, grayscale, labels)",
    "folder": "a directory tree of JPEG/PNG/WebP images (RGB)",
    "lsun": "an LSUN LMDB directory as distributed, e.g. bedroom_train_lmdb (RGB)",
    "cifar10": "CIFAR-10 python batches as distributed, the cifar-10-batches-py folder (RGB, labels)",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="examples:\n" + __doc__.split("\n", 1)[1].strip("\n"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)
    for name, helptext in HELP.items():
        s = sub.add_parser(name, help=helptext, description=helptext)
        if name != "digits":
            s.add_argument("path", help="where the source lies")
        if name == "cifar10":
            s.add_argument("--split", choices=["train", "test", "all"], default="train")
        if name == "folder":
            s.add_argument("--labels", choices=["none", "subfolders"], default="none",
                           help="subfolders: PATH/CLASS/... gives every image its class label (for feature-svm)")
        s.add_argument("--out", required=True, help="a local folder or s3://bucket/prefix/")
        default_res = 32 if name in ("digits", "cifar10") else 64
        s.add_argument("--resolution", type=int, default=default_res, help=f"side in pixels (default {default_res})")
        s.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
        s.add_argument("--encoding", choices=shards.ENCODINGS, default="png" if name == "digits" else "jpg",
                       help="jpg (small), png (lossless) or raw (uint8 arrays: no decode cost)")
        s.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
        s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = p.parse_args()
    if args.source == "digits":
        source = sources.Digits()
    elif args.source == "cifar10":
        source = sources.Cifar10(args.path, args.split)
    elif args.source == "folder":
        source = sources.Folder(args.path, args.labels)
    else:
        source = sources.SOURCES[args.source](args.path)
    m = shards.build_shards(source, args.out, resolution=args.resolution, encoding=args.encoding,
                            quality=args.quality, shard_size=args.shard_size, workers=args.workers)
    print(f"{m['num_images']} images in {m['num_shards']} shard(s), {m['total_bytes'] / 1e6:.1f} MB "
          f"({m['total_bytes'] / max(1, m['num_images']):.0f} bytes/image), {m['skipped']['count']} skipped -> {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
