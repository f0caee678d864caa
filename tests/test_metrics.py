"""Quality metrics on real images (scikit-learn's handwritten digits), checked against closed forms,
plain NumPy references and the behaviour each metric exists for. No Ray, no MLflow, no downloads."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
import torch_fidelity
from sklearn.datasets import load_digits
from torch import nn
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torchvision.io import write_png
from torchvision.transforms.functional import gaussian_blur

from conftest import imported_by
from dcgan_dist.config import MetricsConfig
from dcgan_dist.errors import ConfigError
from dcgan_dist.metrics import fid
from dcgan_dist.metrics.evaluator import Evaluator
from dcgan_dist.metrics.inception import STANDARD_SHA256_PREFIX, load_inception, random_inception_state
from dcgan_dist.metrics.registry import METRICS
from dcgan_dist.metrics.swd import laplacian_pyramid, swd

# --- data: real digits, 1-channel 32x32 and tinted 3-channel 64x64 ---

@functools.cache
def _digits(size: int, rgb: bool) -> torch.Tensor:
    x = torch.from_numpy(load_digits().images).float()[:, None] * (255.0 / 16.0)  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if rgb:  # a random colour per image, so the channels differ
        x = x * (0.3 + 0.7 * torch.rand(len(x), 3, 1, 1, generator=torch.Generator().manual_seed(0)))
    return x.round().clamp(0, 255).to(torch.uint8)


SETS = {"gray32": (32, False, 500), "rgb64": (64, True, 200)}  # size, rgb, images per half
FAST = {"patches_per_image": 32, "dir_repeats": 1}  # for the many comparisons; the defaults are PGGAN's


def _halves(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    size, rgb, n = SETS[kind]
    x = _digits(size, rgb)
    return x[:n], x[n:2 * n]


def _noise(x: torch.Tensor, s: float) -> torch.Tensor:
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return (x.float() + s * z).round().clamp(0, 255).to(torch.uint8)


def _shift(x: torch.Tensor, s: float) -> torch.Tensor:
    return (x.float() + s).clamp(0, 255).to(torch.uint8)


def _blur(x: torch.Tensor, s: float) -> torch.Tensor:
    return gaussian_blur(x.float(), kernel_size=2 * int(3 * s) + 1, sigma=s).round().clamp(0, 255).to(torch.uint8)


@functools.cache
def _swd_halves(kind: str) -> float:
    return swd(*_halves(kind), **FAST)["swd"]


# --- SWD ---

def test_laplacian_pyramid_matches_pggan_reference():
    """PGGAN's numpy/scipy pyramid (mirror-mode convolution, cv2.pyrDown / pyrUp)."""
    g = np.float32([1, 4, 6, 4, 1])
    g = (g[:, None] * g[None, :] / 256.0)[None, None]

    def down(m):
        return scipy.ndimage.convolve(m, g, mode="mirror")[:, :, ::2, ::2]

    def up(m):
        res = np.zeros(m.shape[:2] + (m.shape[2] * 2, m.shape[3] * 2), m.dtype)
        res[:, :, ::2, ::2] = m
        return scipy.ndimage.convolve(res, g * 4.0, mode="mirror")

    x = np.random.RandomState(0).randint(0, 256, (2, 3, 32, 32)).astype(np.float32)
    ref = [x.copy()]
    for _ in range(2):
        ref.append(down(ref[-1]))
        ref[-2] -= up(ref[-1])
    ours = laplacian_pyramid(torch.from_numpy(x), 3)
    assert [tuple(o.shape) for o in ours] == [r.shape for r in ref] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    for o, r in zip(ours, ref):
        np.testing.assert_allclose(o.numpy(), r, atol=1e-3)


def test_swd_keys_self_distance_and_determinism():
    a, b = _halves("gray32")
    same, halves = swd(a, a), swd(a, b)
    assert set(same) == {"swd", "swd_32", "swd_16"}
    assert same["swd"] == pytest.approx((same["swd_32"] + same["swd_16"]) / 2)
    # Only the random patch positions differ between the two sides: far below two halves of the data.
    assert 0 <= same["swd"] < 0.4 * halves["swd"]
    assert swd(a, b, seed=0, **FAST) == swd(a, b, seed=0, **FAST)
    assert swd(a, b, seed=1, **FAST)["swd"] != swd(a, b, seed=0, **FAST)["swd"]
    rgb = swd(*_halves("rgb64"))
    assert set(rgb) == {"swd", "swd_64", "swd_32", "swd_16"} and all(np.isfinite(v) and v > 0 for v in rgb.values())


@pytest.mark.parametrize("kind", list(SETS))
@pytest.mark.parametrize("perturb, levels", [(_noise, (4, 8, 16)), (_shift, (16, 32, 64)), (_blur, (1, 2, 4))],
                         ids=["noise", "shift", "blur"])
def test_swd_grows_with_perturbation(kind, perturb, levels):
    a, b = _halves(kind)
    scale = SETS[kind][0] / 32  # blur in units of the 32x32 image
    strengths = [s * scale if perturb is _blur else s for s in levels]
    values = [_swd_halves(kind)] + [swd(a, perturb(b, s), **FAST)["swd"] for s in strengths]
    assert all(lo < hi for lo, hi in itertools.pairwise(values)), values


def test_swd_sees_a_global_brightness_shift():
    """The deviation from PGGAN: both sets use the real set's statistics. A pure offset leaves the
    band-pass level unchanged (Laplacian residuals ignore it) but shows at the coarsest level,
    where PGGAN's per-set normalization would hide it."""
    a = (_halves("gray32")[0].float() * 0.75).to(torch.uint8)  # max 191: +32 does not clip
    same, shifted = swd(a, a, **FAST), swd(a, a + 32, **FAST)
    assert shifted["swd_32"] == pytest.approx(same["swd_32"], rel=1e-3)
    assert shifted["swd_16"] > 10 * same["swd_16"]


def test_swd_unequal_counts_and_bad_input():
    a, b = _halves("gray32")
    out = swd(a, b[:123], **FAST)
    assert set(out) == {"swd", "swd_32", "swd_16"} and all(np.isfinite(v) and v > 0 for v in out.values())
    assert swd(a[:123], b, **FAST) != out and swd(a, b[:123], **FAST) == out
    with pytest.raises(ValueError, match="uint8"):
        swd(a.float(), b)
    with pytest.raises(ValueError, match="differ"):
        swd(a, _halves("rgb64")[1])
    with pytest.raises(ValueError, match="H == W"):
        swd(a[..., :16], b[..., :16, :])


# --- Frechet distance ---

def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_reference(mu1, s1, mu2, s2) -> float:
    """Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix: eigenvalues suffice."""
    r = _sqrtm_psd(s1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _random_cov(rng, d: int) -> np.ndarray:
    a = rng.randn(d, d)
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms():
    rng = np.random.RandomState(0)
    mu1, mu2 = rng.randn(5), rng.randn(5)
    d1, d2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert fid.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-9)
    s1, s2 = _random_cov(rng, 20), _random_cov(rng, 20)
    assert fid.frechet_distance(mu1[:1].repeat(20), s1, mu2[:1].repeat(20), s2) == pytest.approx(
        _frechet_reference(mu1[:1].repeat(20), s1, mu2[:1].repeat(20), s2), rel=1e-8)
    assert fid.frechet_distance(mu1, np.diag(d1), mu1, np.diag(d1)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_singular_and_complex():
    # Zero covariances: singular product -> the eps fallback, not an error; distance = |mu1 - mu2|^2.
    assert fid.frechet_distance(np.zeros(3), np.zeros((3, 3)), np.ones(3), np.zeros((3, 3))) == pytest.approx(3, abs=1e-4)
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_stats_from_samples_approach_closed_form():
    rng = np.random.RandomState(1)
    mu1, mu2 = np.zeros(4), np.array([1.0, -0.5, 0.0, 2.0])
    s1, s2 = _random_cov(rng, 4), _random_cov(rng, 4)
    x = rng.multivariate_normal(mu1, s1, size=40000)
    y = rng.multivariate_normal(mu2, s2, size=40000)
    m, s = fid.feature_stats(x)
    assert m.dtype == s.dtype == np.float64 and s.shape == (4, 4)
    np.testing.assert_allclose(s, np.cov(x, rowvar=False))
    exact = _frechet_reference(mu1, s1, mu2, s2)
    assert fid.frechet_distance(*fid.feature_stats(x), *fid.feature_stats(y)) == pytest.approx(exact, rel=0.03)


# --- FID through a stand-in feature network ---

def _standin_features(images: torch.Tensor) -> np.ndarray:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.Tanh(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        return net(images.float().expand(-1, 3, -1, -1) / 127.5 - 1).double().numpy()


def test_fid_with_standin_features_matches_numpy_reference():
    a, b = _halves("gray32")
    fa, fb, fn = _standin_features(a), _standin_features(b), _standin_features(_noise(b, 24))
    got = fid.frechet_distance(*fid.feature_stats(fa), *fid.feature_stats(fb))
    ref = _frechet_reference(np.mean(fa, 0), np.cov(fa, rowvar=False), np.mean(fb, 0), np.cov(fb, rowvar=False))
    assert got == pytest.approx(ref, rel=1e-6)
    noisy = fid.frechet_distance(*fid.feature_stats(fa), *fid.feature_stats(fn))
    assert noisy > 5 * got > 0


# --- KID ---

def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    off = ~np.eye(m, dtype=bool)
    return kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean()


def test_kid_matches_unbiased_mmd_and_separates_distributions():
    rng = np.random.RandomState(0)
    x, y = rng.randn(400, 16), rng.randn(400, 16)
    # Subsets as large as the sets are permutations of them: KID is the full-sample MMD^2.
    assert fid.kid(x, y + 0.3, num_subsets=3) == pytest.approx(_mmd2_unbiased(y + 0.3, x), rel=1e-9)
    same = fid.kid(x, y, num_subsets=20, max_subset_size=200)
    shifted = fid.kid(x, y + 0.5, num_subsets=20, max_subset_size=200)
    assert abs(same) < 0.02 * shifted and shifted > 0.1


def test_kid_seeded_and_both_paths_agree(monkeypatch):
    rng = np.random.RandomState(1)
    x, y = rng.randn(300, 8), rng.randn(250, 8) * 1.2
    a = fid.kid(x, y, num_subsets=10, max_subset_size=100, seed=3)
    assert a == fid.kid(x, y, num_subsets=10, max_subset_size=100, seed=3)
    assert a != fid.kid(x, y, num_subsets=10, max_subset_size=100, seed=4)
    monkeypatch.setattr(fid, "GRAM_LIMIT", 0)  # stylegan2-ada's per-subset loop
    assert fid.kid(x, y, num_subsets=10, max_subset_size=100, seed=3) == pytest.approx(a, rel=1e-9)


# --- torch-fidelity's Inception from a weights file ---

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 at a seeded random initialisation, saved like the official file (not its weights)."""
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(random_inception_state(seed=0), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_inception_features_gray_as_rgb_and_batches(weights):
    path, sha = weights
    ext = load_inception(str(path), sha, batch_size=2)
    assert ext.sha256 == sha and ext.dim == 2048
    gray = _halves("gray32")[0][:2]
    feats = ext(gray)
    assert feats.dtype == np.float64 and feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert feats.std() > 0.1 and not np.allclose(feats[0], feats[1])  # features that neither vanish nor coincide
    ext.batch_size = 1  # grayscale is its RGB copy, in batches of any size
    np.testing.assert_allclose(ext(gray.repeat(1, 3, 1, 1)), feats, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        ext(gray.float())


def test_fid_and_kid_agree_with_torch_fidelity_on_the_same_images(weights, tmp_path):
    """Our numbers (this extractor, our formulas) against torch-fidelity's whole pipeline, fed PNG folders of the
    same grayscale images (its own PIL loading makes them RGB). KID subsets as large as the sets are the full-sample
    estimate, so the two programs' different subset draws do not matter."""
    path, sha = weights
    n = 6  # the time goes to 4 x 6 Inception passes at 299x299 and to functions of 2048 x 2048 matrices
    a, b = _halves("gray32")
    real, fake = a[:n], 255 - b[:n]  # digits against inverted digits
    for name, images in (("real", real), ("fake", fake)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            write_png(image, str(tmp_path / name / f"{i:03d}.png"))
    ext = load_inception(str(path), sha, batch_size=n)
    fr, ff = ext(real), ext(fake)
    ours = {**METRICS["fid"].compute(fr, ff, 0), **METRICS["kid"].compute(fr, ff, 0)}
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "real"), input2=str(tmp_path / "fake"), fid=True, kid=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(path),
        kid_subset_size=n, batch_size=n, cuda=False, cache=False, save_cpu_ram=True, verbose=False)
    print(f"fid ours {ours['fid']!r} torch-fidelity {theirs['frechet_inception_distance']!r}; "
          f"kid ours {ours['kid']!r} torch-fidelity {theirs['kernel_inception_distance_mean']!r}")
    assert ours["fid"] > 10 and ours["kid"] > 0.01
    # The same features: torch-fidelity's own formula on ours gives its number.
    stats = [fid_features_to_statistics(torch.from_numpy(f).float()) for f in (fr, ff)]
    assert fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"] == pytest.approx(
        theirs["frechet_inception_distance"], rel=1e-9)
    # n < 2048 makes both covariances singular, where our (pytorch-fid's) formula adds 1e-6 to their diagonals
    # and torch-fidelity's does not: 2e-4 apart here; KID's kernels are float32 there, float64 here.
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)


def test_protocol_names_torch_fidelity(weights, tmp_path):
    """A new extractor is a new protocol: champions measured with the pytorch-fid port are re-measured."""
    path, sha = weights
    mc = MetricsConfig(inception_weights=str(path), inception_sha256=sha, cache_dir=str(tmp_path))
    ev = Evaluator(mc, SimpleNamespace(fingerprint="d" * 64), channels=1, resolution=32, load_real=False)
    ev.real_images = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    p = ev.protocol("fid", 4)
    assert p.extractor == f"torch-fidelity-{torch_fidelity.__version__}-inception-v3-compat:{sha}"
    assert p.key != dataclasses.replace(p, extractor=f"inception-v3-fid:{sha}").key  # the port's protocol
    assert ev.protocol("swd", 4).extractor == ""


def test_load_inception_rejects_wrong_files(weights, tmp_path):
    path, sha = weights
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match="metrics.inception_weights") as e:
        load_inception(str(missing))
    assert str(missing) in str(e.value) and "does not exist" in str(e.value)
    with pytest.raises(ConfigError, match="is not a file"):
        load_inception(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        load_inception(str(path), "ab" * 32)
    assert "ab" * 32 in str(e.value) and sha in str(e.value)
    with pytest.raises(ConfigError, match=STANDARD_SHA256_PREFIX):  # not the official file
        load_inception(str(path))

    def saved(name: str, data: bytes) -> tuple[str, str]:
        p = tmp_path / name
        p.write_bytes(data)
        return str(p), hashlib.sha256(data).hexdigest()

    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_inception(*saved("garbage.pth", b"not a checkpoint at all"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="not a state dict"):
        load_inception(*saved("list2.pth", (tmp_path / "list.pth").read_bytes()))
    torch.save({"fc.weight": torch.zeros(1008, 2048), "extra": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match=r"\d{3} missing .* 1 unexpected") as e:
        load_inception(*saved("partial2.pth", (tmp_path / "partial.pth").read_bytes()))
    assert "\n" not in str(e.value)
    torch.save({**torch.load(path, weights_only=True), "fc.weight": torch.zeros(10, 2048)}, tmp_path / "shape.pth")
    with pytest.raises(ConfigError, match="does not fit torch-fidelity's Inception-v3 .*fc.weight") as e:
        load_inception(*saved("shape2.pth", (tmp_path / "shape.pth").read_bytes()))
    assert "\n" not in str(e.value)


def test_metric_modules_import_no_ray_or_mlflow():
    code = "import dcgan_dist.metrics.swd, dcgan_dist.metrics.fid, dcgan_dist.metrics.inception"
    assert imported_by(code, ["ray", "mlflow"]) == []
