"""FID / KID features: torch-fidelity's TF1-compatible Inception-v3, from a local weights file.

Published FIDs come from the TensorFlow 1 Inception graph of 2015-12-05. torch-fidelity's `inception-v3-compat`
extractor reproduces it, TF1's bilinear resize to 299x299 included (pytorch-fid resizes another way), and loads
the converted weights that pytorch-fid and torch-fidelity publish (pt_inception-2015-12-05-6726825d.pth,
weights-inception-2015-12-05-6726825d.pth: the names carry the sha256 prefix). We never download: the file is
fetched once, by hand, and named in `metrics.inception_weights` (a local path or s3:// URI); its sha256 is checked
on every load, and torch-fidelity is handed the checked bytes, never None (which would make it download).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # imported where the network is built: torch-fidelity imports torchvision (~1.5 s per process)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from dcgan_dist.data import s3
from dcgan_dist.errors import ConfigError, DcganError

log = logging.getLogger(__name__)

STANDARD_FILE = "pt_inception-2015-12-05-6726825d.pth"
STANDARD_SHA256_PREFIX = "6726825d"  # torch-hub convention: the file name carries its sha256 prefix
EXTRACTOR = "inception-v3-compat"  # torch-fidelity's name for its TF1-compatible Inception-v3
LAYER = "2048"  # its pool3 features, the ones FID and KID use
# In protocols and real-side cache keys: another torch-fidelity version re-measures rather than compares.
NAME = f"torch-fidelity-{importlib.metadata.version('torch-fidelity')}-{EXTRACTOR}"


class InceptionExtractor:
    """uint8 (N, C, H, W) images, C in (1, 3), any size -> float64 (N, 2048) features of `net`
    (torch-fidelity's extractor, which resizes to 299x299 itself). `name` and `sha256` identify it in protocols."""

    dim = 2048

    def __init__(self, net: FeatureExtractorInceptionV3, *, sha256: str, device="cpu", batch_size: int = 64):
        self.net = net.to(device).eval()
        self.name, self.sha256 = NAME, sha256
        self.device, self.batch_size = torch.device(device), batch_size

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: expected uint8 (N, C, H, W) images with C in (1, 3), "
                             f"got {tuple(images.shape)} {images.dtype}")
        out = np.empty((len(images), self.dim), dtype=np.float64)
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                # grayscale -> RGB (a no-op for 3 channels): torch-fidelity takes uint8 RGB only
                x = images[i:i + self.batch_size].expand(-1, 3, -1, -1).contiguous().to(self.device)
                out[i:i + len(x)] = self.net(x)[0].double().cpu().numpy()
        return out


def _network(state: dict[str, torch.Tensor] | None = None) -> FeatureExtractorInceptionV3:
    """torch-fidelity's network with `state` (read by us with weights_only=True) loaded into it. Its own loader
    unpickles with weights_only=False, so it never sees the user's file: it is handed an empty dict of ours."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unweighted(FeatureExtractorInceptionV3):
        """The network left at its random initialisation: its constructor's load_state_dict is skipped."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    net = _Unweighted(EXTRACTOR, [LAYER], feature_extractor_weights_path=empty)
    if state is not None:
        torch.nn.Module.load_state_dict(net, state)
    return net


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised state dict of the network: the keys a weights file must have, and tests' stand-in
    (He-initialised convolutions, so that its features do not vanish with depth as with PyTorch's default)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _network()
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        return net.state_dict()


def _fail(uri: str, problem: str) -> ConfigError:
    return ConfigError(f"metrics.inception_weights: {uri}: {problem}")


def _first_line(e: Exception, last: bool = False) -> str:
    """Error messages stay on one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
    return lines[-1] if last else lines[0]


def _read(uri: str) -> bytes:
    if s3.is_s3(uri):
        try:
            return s3.read_bytes(uri)
        except DcganError as e:
            raise _fail(uri, f"cannot read it ({e})") from e
    if not os.path.exists(uri):
        raise _fail(uri, f"does not exist; download {STANDARD_FILE} once, by hand, from the pytorch-fid "
                         "GitHub releases and point metrics.inception_weights at it")
    if not os.path.isfile(uri):
        raise _fail(uri, f"is not a file; point metrics.inception_weights at {STANDARD_FILE} itself")
    try:
        with open(uri, "rb") as f:
            return f.read()
    except OSError as e:
        raise _fail(uri, f"cannot read it ({e})") from e


def load_inception(uri: str, sha256: str = "", device="cpu", batch_size: int = 64) -> InceptionExtractor:
    """torch-fidelity's Inception-v3 with the weights at `uri` (local path or s3://), checksum-verified:
    against `sha256` (full hex) when given, else against the official file's hash prefix."""
    data = _read(uri)
    actual = hashlib.sha256(data).hexdigest()
    if sha256 and actual != sha256.strip().lower():
        raise _fail(uri, f"sha256 mismatch: expected {sha256}, got {actual}")
    if not sha256 and not actual.startswith(STANDARD_SHA256_PREFIX):
        raise _fail(uri, f"sha256 {actual} does not start with {STANDARD_SHA256_PREFIX}, so it is not the "
                         f"official {STANDARD_FILE}; set metrics.inception_sha256 to use another file")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a bad file
        raise _fail(uri, f"cannot be loaded as a PyTorch weights file ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _fail(uri, f"is not a state dict of tensors (got {type(state).__name__})")
    expected = random_inception_state().keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise _fail(uri, f"keys do not match torch-fidelity's Inception-v3: {len(missing)} missing "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    try:
        net = _network(state)
    except RuntimeError as e:  # shape mismatches
        raise _fail(uri, f"does not fit torch-fidelity's Inception-v3 ({_first_line(e, last=True)})") from e
    log.info("metrics: loaded %s from %s (sha256 %s)", NAME, uri, actual[:12])
    return InceptionExtractor(net, sha256=actual, device=device, batch_size=batch_size)
