"""Feature extractors for FID / KID: a wrapper for any torch network, and the FID Inception-v3.

FID numbers are only comparable with published ones when the features come from the exact
network of the TensorFlow FID code. pytorch-fid ported it to PyTorch as torchvision's
Inception3 with patched blocks and its own weights file (pt_inception-2015-12-05-6726825d.pth);
`fid_inception_v3` rebuilds that architecture so the official file loads with strict keys.
We never download weights: the file is fetched once, by hand, and named in
`metrics.inception_weights` (a local path or s3:// URI); its sha256 is checked on every load.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from dcgan_dist.data import s3
from dcgan_dist.errors import ConfigError, DcganError

log = logging.getLogger(__name__)

STANDARD_FILE = "pt_inception-2015-12-05-6726825d.pth"
STANDARD_SHA256_PREFIX = "6726825d"  # torch-hub convention: the file name carries its sha256 prefix


class TorchExtractor:
    """uint8 images -> float64 features through `net`, which maps [-1, 1] RGB images of
    input_size x input_size to (N, dim). `name` and `sha256` identify the network in protocols."""

    def __init__(self, net: nn.Module, *, name: str, sha256: str, dim: int, input_size: int,
                 device="cpu", batch_size: int = 64):
        self.net = net.to(device).eval()
        self.name, self.sha256, self.dim = name, sha256, dim
        self.input_size, self.device, self.batch_size = input_size, torch.device(device), batch_size

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: expected uint8 (N, C, H, W) images with C in (1, 3), "
                             f"got {tuple(images.shape)} {images.dtype}")
        size = (self.input_size, self.input_size)
        out = np.empty((len(images), self.dim), dtype=np.float64)
        self.net.eval()
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                x = images[i:i + self.batch_size].to(self.device).float()
                x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB; a no-op for 3 channels
                if x.shape[-2:] != size:
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                feats = self.net(x / 127.5 - 1.0).reshape(len(x), -1)
                if feats.shape[1] != self.dim:
                    raise ValueError(f"{self.name}: network returned {feats.shape[1]} features, expected {self.dim}")
                out[i:i + len(x)] = feats.double().cpu().numpy()
        return out


# --- the FID Inception-v3 (pytorch-fid's port of the TensorFlow graph) ---

class FIDInceptionA(InceptionA):
    """TensorFlow's average pool ignores the zero padding (count_include_pad=False)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(InceptionC):
    """As FIDInceptionA: average pool without the padded zeros."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class FIDInceptionE(InceptionE):
    """Mixed_7b pools by average without padded zeros; Mixed_7c (max_pool=True) by max, as the
    TensorFlow graph does (likely a slip there, but the FID features depend on it)."""

    def __init__(self, in_channels: int, *, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionV3(Inception3):
    """Inception3 with the FID blocks; forward returns the 2048-d pool3 features (no fc).
    The fc layer (1008 classes) stays so that the official state dict loads with strict keys."""

    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) in [-1, 1] -> (N, 2048)."""
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(self.avgpool(x), 1)


def fid_inception_v3() -> nn.Module:
    """The FID Inception-v3 architecture, randomly initialised (load the official weights into it)."""
    return FIDInceptionV3()


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


def load_inception(uri: str, sha256: str = "", device="cpu", batch_size: int = 64) -> TorchExtractor:
    """The FID Inception-v3 with the weights at `uri` (local path or s3://), checksum-verified:
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
    net = fid_inception_v3()
    try:
        # strict=False only to count the mismatches; any mismatch is then an error, as strict=True.
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise _fail(uri, f"does not fit the FID Inception-v3 ({_first_line(e, last=True)})") from e
    if result.missing_keys or result.unexpected_keys:
        raise _fail(uri, f"keys do not match the FID Inception-v3: {len(result.missing_keys)} missing "
                         f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
                         f"(e.g. {result.unexpected_keys[:2]})")
    log.info("metrics: loaded FID Inception-v3 from %s (sha256 %s)", uri, actual[:12])
    return TorchExtractor(net, name="inception-v3-fid", sha256=actual, dim=2048, input_size=299,
                          device=device, batch_size=batch_size)
