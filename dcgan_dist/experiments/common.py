"""What every experiment shares: labeled real images, numbered sample sheets, and its output folder + MLflow run."""

from __future__ import annotations

import json
import logging
from itertools import islice
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from dcgan_dist import tracking  # noqa: E402
from dcgan_dist.config import Config  # noqa: E402
from dcgan_dist.data.loader import decode_sample, resolve_shards, shard_samples  # noqa: E402
from dcgan_dist.errors import ConfigError, DataError  # noqa: E402
from dcgan_dist.grids import save_grid  # noqa: E402
from dcgan_dist.networks import Networks  # noqa: E402

log = logging.getLogger(__name__)


def parse_indices(text: str, what: str, limit: int) -> list[int]:
    """'3,7,12' -> [3, 7, 12]; a bad entry or one out of range is a ConfigError naming `what`."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what}: no indices given")
    bad = [v for v in values if not 0 <= v < limit]
    if bad:
        raise ConfigError(f"{what}: index {bad[0]} out of range 0..{limit - 1}")
    return values


def read_labeled(url: str, n: int, *, channels: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n real images (uint8 N x C x R x R) with their class labels (`cls`), in shard order.

    Shards built from labeled sources (digits, cifar10, a folder of class subfolders) carry `cls`.
    A broken shard is logged and skipped (shard_samples: webdataset's tar stages, one shard at a time).
    """
    images, labels = [], []
    samples = (sample for shard in resolve_shards(url).urls for sample in shard_samples(shard))
    for sample in islice(samples, n):
        if "cls" not in sample:
            raise DataError(f"{url}: sample {sample['__key__']} in {sample['__url__']} has no class label (cls); "
                            "build the shards from a labeled source (digits, cifar10, folder --labels subfolders)")
        images.append(decode_sample(sample, channels, resolution))
        labels.append(int(sample["cls"]))
    if not images:
        raise DataError(f"{url}: no readable labeled images")
    return torch.stack(images), torch.tensor(labels)


def numbered_grid(images: torch.Tensor, nrow: int, scale: int = 2, boxes: dict[int, list] | None = None):
    """A PIL grid of images in [-1, 1], each tile labeled with its index (and `boxes` {index: [[x0,y0,x1,y1]]}
    drawn in image pixels): the sheet users pick samples from by number."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    tiles = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    pad, label = 2, 10
    cols, rows = nrow, -(-n // nrow)
    sheet = Image.new("RGB", (cols * (w * scale + pad), rows * (h * scale + pad + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        tile = Image.fromarray(tiles[i].permute(1, 2, 0).squeeze(-1).numpy()).convert("RGB")
        x, y = (i % cols) * (w * scale + pad), (i // cols) * (h * scale + pad + label)
        sheet.paste(tile.resize((w * scale, h * scale), Image.NEAREST), (x, y + label))
        draw.text((x + 1, y - 1), str(i), fill="black")
        for x0, y0, x1, y1 in (boxes or {}).get(i, []):
            draw.rectangle([x + x0 * scale, y + label + y0 * scale, x + x1 * scale - 1, y + label + y1 * scale - 1],
                           outline="red")
    return sheet


class ExperimentRun:
    """An experiment's outputs: files in `folder`, mirrored to an MLflow run tagged with the model version."""

    def __init__(self, cfg: Config, nets: Networks, name: str, folder: str | Path, params: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cfg, self.client = cfg, MlflowClient(cfg.tracking.uri)
        self.run_id = tracking.create_run(cfg, f"{name}-{nets.name}-v{nets.version}",
                                          {"dcgan.experiment": name, "dcgan.evaluates": nets.uri,
                                           "dcgan.model_step": str(nets.step)}, params)

    def _log(self, path: Path) -> Path:
        self.client.log_artifact(self.run_id, str(path))
        return path

    def images(self, filename: str, images: torch.Tensor, nrow: int) -> Path:
        """A grid of images in [-1, 1], row-major, `nrow` per row."""
        path = self.folder / filename
        save_grid(images, path, nrow=nrow)
        return self._log(path)

    def picture(self, filename: str, image) -> Path:
        """A PIL image (e.g. a `numbered_grid`) or a list of them (an animated GIF, 80 ms a frame)."""
        path = self.folder / filename
        if isinstance(image, list):
            image[0].save(path, save_all=True, append_images=image[1:], duration=80, loop=0)
        else:
            image.save(path)
        return self._log(path)

    def figure(self, filename: str, fig) -> Path:
        import matplotlib.pyplot as plt

        path = self.folder / filename
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return self._log(path)

    def file(self, filename: str, data: bytes | str) -> Path:
        path = self.folder / filename
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return self._log(path)

    def json(self, filename: str, obj) -> Path:
        return self.file(filename, json.dumps(obj, indent=2, sort_keys=True))

    def metrics(self, values: dict[str, float]) -> None:
        tracking.log_values(self.cfg, self.run_id, values, step=0)

    def finish(self, summary: str) -> str:
        self.file("summary.txt", summary.rstrip() + "\n")
        self.client.set_terminated(self.run_id)
        return summary

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")

    def discard(self) -> None:
        """Bad input, nothing measured: delete the run, and the output folder if nothing is in it."""
        self.fail()
        self.client.delete_run(self.run_id)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()
