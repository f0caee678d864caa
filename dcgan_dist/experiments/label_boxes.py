"""Draw the boxes that `forget` learns from: a numbered sample sheet, then a boxes file (paper section 6.3.1).

Step 1 (no --box): a numbered sheet of G(z) for --num seeded latents, to pick samples from.
Step 2: `--box IDX:x0,y0,x1,y1` (repeatable; pixels of the generated image, x1/y1 exclusive) writes
{"seed": S, "num": N, "boxes": {"IDX": [[x0, y0, x1, y1], ...]}} and a preview with the boxes drawn.
`forget` regenerates the samples from seed and num, so the file is all it needs. The checks live here
(`check_box`, `read_boxes`) so that a hand-written file fails with the same messages as a bad --box.
"""

from __future__ import annotations

import json
from pathlib import Path

from dcgan_dist.errors import ConfigError
from dcgan_dist.experiments.common import numbered_grid
from dcgan_dist.models import generate, latents

NAME = "label-boxes"
HELP = "a numbered sample sheet; with --box IDX:x0,y0,x1,y1 the boxes file that `forget` reads"


def add_arguments(p) -> None:
    p.add_argument("--num", type=int, default=64, help="samples on the sheet (indices refer to it, with --seed)")
    p.add_argument("--box", action="append", default=[], metavar="IDX:x0,y0,x1,y1",
                   help="a box on sample IDX in image pixels, x1/y1 exclusive (repeatable)")
    p.add_argument("--write", help="where to write the boxes JSON (default: boxes.json in the output folder)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_index(what: str, index: int, num: int) -> int:
    if not 0 <= index < num:
        raise ConfigError(f"{what}: sample index {index} out of range 0..{num - 1}")
    return index


def check_box(what: str, box, resolution: int) -> list[int]:
    """[x0, y0, x1, y1] inside a resolution x resolution image, non-empty; errors name `what`."""
    if not isinstance(box, list) or len(box) != 4 or not all(_is_int(v) for v in box):
        raise ConfigError(f"{what}: a box must be 4 integers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= resolution and 0 <= y0 < y1 <= resolution):
        raise ConfigError(f"{what}: box {box} must satisfy 0 <= x0 < x1 <= {resolution} and 0 <= y0 < y1 <= "
                          f"{resolution} (pixels of the {resolution}x{resolution} image, x1/y1 exclusive)")
    return box


def parse_box(text: str, num: int, resolution: int) -> tuple[int, list[int]]:
    """'3:2,4,20,28' -> (3, [2, 4, 20, 28])."""
    what = f"--box {text}"
    try:
        index, coords = text.split(":")
        box = [int(v) for v in coords.split(",")]
        index = int(index)
    except ValueError:
        raise ConfigError(f"{what}: expected IDX:x0,y0,x1,y1, e.g. 3:2,4,20,28") from None
    return check_index(what, index, num), check_box(what, box, resolution)


def read_boxes(path: str, resolution: int) -> tuple[int, int, dict[int, list[list[int]]]]:
    """(seed, num, {index: boxes}) of a boxes file; anything malformed is a ConfigError naming the file."""
    what = f"--boxes {path}"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file (write one with `label-boxes --box ... --write`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict) or not {"seed", "num", "boxes"} <= data.keys():
        raise ConfigError(f'{what}: expected {{"seed": S, "num": N, "boxes": {{"IDX": [[x0, y0, x1, y1], ...]}}}}')
    seed, num, boxes = data["seed"], data["num"], data["boxes"]
    if not _is_int(seed) or not _is_int(num) or num < 1:
        raise ConfigError(f"{what}: seed and num must be integers, num >= 1 (got seed={seed!r}, num={num!r})")
    if not isinstance(boxes, dict):
        raise ConfigError(f'{what}: "boxes" must map sample indices to lists of boxes, got {type(boxes).__name__}')
    parsed = {}
    for key, value in boxes.items():
        try:
            index = int(key)
        except ValueError:
            raise ConfigError(f"{what}: box key {key!r} is not a sample index") from None
        if not isinstance(value, list) or not all(isinstance(box, list) for box in value):
            raise ConfigError(f"{what}: boxes of sample {key} must be a list of [x0, y0, x1, y1], got {value!r}")
        check_index(what, index, num)
        parsed[index] = [check_box(f"{what}, sample {key}", box, resolution) for box in value]
    return seed, num, parsed


def run(args, nets, out) -> str:
    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    resolution = nets.model.resolution
    boxes: dict[int, list[list[int]]] = {}
    for text in args.box:
        index, box = parse_box(text, args.num, resolution)
        boxes.setdefault(index, []).append(box)
    samples = generate(nets.g, latents(args.num, nets.model.nz, args.seed))
    out.picture("sheet.png", numbered_grid(samples, nrow=8))
    if not boxes:
        return out.finish(f"sample sheet of {args.num} (seed {args.seed}): {out.folder / 'sheet.png'}\n"
                          "box what to forget and run again with --box IDX:x0,y0,x1,y1 ... (same --seed and --num)")
    data = {"seed": args.seed, "num": args.num, "boxes": {str(i): b for i, b in sorted(boxes.items())}}
    path = out.json("boxes.json", data)
    if args.write:
        path = Path(args.write)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
    out.picture("boxes.png", numbered_grid(samples, nrow=8, boxes=boxes))
    count = sum(len(b) for b in boxes.values())
    return out.finish(f"{count} box(es) on {len(boxes)} sample(s) written to {path}\n"
                      f"  preview: {out.folder / 'boxes.png'}\n  next: forget --boxes {path}")
