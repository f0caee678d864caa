"""Build WebDataset tar shards + manifest.json from an image source.

    python jobs/prepare_data.py digits --out data/digits-32
    python jobs/prepare_data.py folder ~/photos --out data/photos-64 --resolution 64
"""

import argparse

from dcgan_dist.cli import run_main
from dcgan_dist.data import shards, sources


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="source", required=True)
    for name, helptext, res in (("digits", "scikit-learn's 1,797 handwritten digits (embedded, grayscale)", 32),
                                ("folder", "a directory tree of JPEG/PNG/WebP images (RGB)", 64)):
        s = sub.add_parser(name, help=helptext)
        if name == "folder":
            s.add_argument("path", help="root folder, searched recursively")
        s.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar + manifest.json")
        s.add_argument("--resolution", type=int, default=res, help=f"output side in pixels (default {res})")
        s.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
        s.add_argument("--encoding", choices=sorted(shards.ENCODINGS), default="png" if name == "digits" else "jpg")
        s.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    args = p.parse_args()
    if args.source == "digits":
        total, items = sources.digits(args.resolution)
        channels = 1
    else:
        total, items = sources.folder(args.path, args.resolution)
        channels = 3
    m = shards.build_shards(items, args.out, source=args.source, resolution=args.resolution, channels=channels,
                            encoding=args.encoding, quality=args.quality, shard_size=args.shard_size, total=total)
    print(f"{m['num_images']} images in {m['num_shards']} shard(s), {m['total_bytes'] / 1e6:.1f} MB, "
          f"{m['skipped']['count']} skipped -> {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
