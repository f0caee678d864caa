"""The typed config tree: every key has a default and a one-line doc.

Users override with a YAML file and `--set a.b=value`; unknown keys, wrong types and
invalid values fail with a `ConfigError` that names the key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dcgan_dist.errors import ConfigError

PRESETS = {
    # pytorch/examples dcgan: 64 channels, 4x4 kernels.
    "examples": {"ngf": 64, "ndf": 64, "kernel": 4},
    # The paper's Theano code: 128 base channels (1024 at 4x4 for 64x64), 5x5 kernels.
    "paper": {"ngf": 128, "ndf": 128, "kernel": 5},
}
RESOLUTIONS = (32, 64, 128)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


WORKERS = re.compile(r"\d+(-\d+)?")  # ray.num_workers: N or MIN-MAX


def doc(text: str, default: Any) -> Any:
    """A dataclass field with its one-line doc attached (shown by `--help-config`)."""
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    preset: str = doc("architecture preset: 'examples' (pytorch/examples) or 'paper' (ngf=ndf=128, 5x5)", "examples")
    resolution: int = doc("image side in pixels: 32, 64 or 128 (sets the network depth)", 32)
    nz: int = doc("latent dimension", 100)
    ngf: int = doc("generator base channels; 0 = the preset's", 0)
    ndf: int = doc("discriminator base channels; 0 = the preset's", 0)
    kernel: int = doc("kernel size of strided layers (4 or 5); 0 = the preset's", 0)
    nc: int = doc("image channels (1 or 3); 0 = from the data manifest", 0)


@dataclass
class DataConfig:
    url: str = doc("shards: a local folder with manifest.json, or a brace pattern like dir/shard-{000000..000009}.tar", "data/digits-32")
    num_workers: int = doc("DataLoader worker processes per training rank (decode happens there)", 1)
    shuffle_buffer: int = doc("samples held in each stream's shuffle buffer", 1000)
    max_skip_fraction: float = doc("stop with an error when more than this fraction of samples is unreadable "
                                   "(the first 100 are always tolerated)", 0.05)
    max_bad_shards: int = doc("stop with an error after this many shards in a row without a usable image", 16)
    max_sample_bytes: int = doc("largest tar member read; a bigger one ends its shard unread", 16 << 20)
    verify_sha256: bool = doc("hash each shard as it streams and check it against the manifest", False)
    max_stall_s: float = doc("stop with an error when no usable image came for this long (S3 down for good)", 60.0)
    streams: int = doc("0 = each rank draws shards at random; N = N seeded virtual streams, so the images of each "
                       "step are the same whatever the number of workers (elastic training; needs >= N shards)", 0)


@dataclass
class TrainConfig:
    steps: int = doc("total optimizer steps (each = one D update + one G update)", 500)
    batch_size: int = doc("images per worker per step (elastic: the global batch is this x the most workers)", 64)
    lr_g: float = doc("generator Adam learning rate", 2e-4)
    lr_d: float = doc("discriminator Adam learning rate", 2e-4)
    beta1: float = doc("Adam beta1 (the paper uses 0.5)", 0.5)
    beta2: float = doc("Adam beta2", 0.999)
    seed: int = doc("seed for weights, noise and data order", 0)
    log_every: int = doc("steps between metric reports", 10)
    checkpoint_every: int = doc("steps between checkpoints (metrics reach MLflow with each checkpoint)", 100)
    stop_timeout_s: float = doc("on SIGTERM, how long the driver waits for the workers' last checkpoint", 60.0)
    lease_ttl_s: float = doc("the run-name lease in S3 lapses this long after its job died (renewed every third)",
                             60.0)
    sample_every: int = doc("steps between 8x8 sample grids (0 = only at the end)", 100)
    run_name: str = doc("run name; the same name resumes from its latest checkpoint ('' = new timestamped name)", "")
    sync_batchnorm: bool = doc("use SyncBatchNorm across ranks instead of per-rank batch statistics (GPU only)", False)
    channels_last: bool = doc("NHWC memory layout for G, D and batches (1.3x faster convolutions on CPU)", True)
    precision: str = doc("auto (bf16 where the hardware has it natively, else fp32), fp32, bf16 (autocast) or fp16 "
                         "(autocast + grad scaler); weights and Adam stay fp32", "auto")
    fused_adam: bool = doc("Adam's fused kernel (one kernel for all parameters instead of a loop)", False)
    compile: str = doc("torch.compile G and D: none, default, or reduce-overhead (CUDA graphs on GPU); "
                       "falls back to eager where compilation fails", "none")
    eval_every: int = doc("steps between quality evaluations, each also a checkpoint (0 = never)", 100)
    ema_decay: float = doc("generator weight EMA decay, evaluated and exported when on (0 = off; 0.999 typical)", 0.0)
    check_replicas: bool = doc("at every checkpoint, every rank hashes G and reports it (g_digests): equal hashes "
                               "prove DDP kept the replicas identical", False)
    key_log: str = doc("folder where every rank writes the sample keys of each step (checks data order; needs "
                       "data.streams; '' = off)", "")


@dataclass
class RayConfig:
    address: str = doc("Ray cluster: '' = start a local one, 'auto' = the one this job runs in, or ray://host:port", "")
    num_workers: str = doc("training workers (DDP ranks): N, or MIN-MAX to train elastically on what is there", "2")
    resize_check_s: float = doc("elastic: seconds between checks for room to grow the group back to MAX", 60.0)
    start_timeout_s: float = doc("how long a worker group may take to start before Ray Train tries again (elastic: "
                                 "with fewer workers, once a lost node is known dead)", 60.0)
    use_gpu: bool = doc("one GPU per worker and NCCL; False = CPU with gloo", False)
    cpus_per_worker: float = doc("CPUs reserved per worker", 1.0)
    storage_path: str = doc("where checkpoints go: a local folder, s3://bucket/prefix, or on a cluster without S3 "
                            "file:///folder/every/node/mounts", "ray_results")
    max_failures: int = doc("worker-group restarts allowed before the run fails (-1 = unlimited)", 2)
    keep_checkpoints: int = doc("checkpoints kept per run (oldest deleted first)", 3)
    ddp_bucket_mb: int = doc("DDP gradient bucket size in MB (smaller buckets overlap allreduce with backward earlier)", 25)
    grad_compression: str = doc("DDP communication hook: none, bf16 or fp16 (gradients sent at half width)", "none")

    @property
    def worker_range(self) -> tuple[int, int]:
        """(MIN, MAX) of ray.num_workers (N is N-N); (0, 0) when malformed, which validate() refuses by name."""
        if not WORKERS.fullmatch(self.num_workers):
            return 0, 0
        low, _, high = self.num_workers.partition("-")
        return int(low), int(high or low)

    @property
    def max_workers(self) -> int:
        return self.worker_range[1]


@dataclass
class TrackingConfig:
    uri: str = doc("MLflow tracking URI (sqlite:///file.db, http://host:5000, ...)", "sqlite:///mlflow.db")
    experiment: str = doc("MLflow experiment name", "dcgan")
    model_name: str = doc("registered model name for the trained generator", "dcgan-generator")
    register: bool = doc("log and register the generator at the end of training", True)


@dataclass
class MetricsConfig:
    num_images: int = doc("generated images per evaluation; real images = the same or all the data has", 2048)
    inception_weights: str = doc("FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth), path or s3://; '' = SWD only", "")
    inception_sha256: str = doc("expected sha256 of inception_weights ('' = the official file's hash prefix)", "")
    cache_dir: str = doc("where real-data statistics are cached, keyed by the data manifest", "~/.cache/dcgan-dist")
    batch_size: int = doc("images per forward pass when generating and extracting features", 256)
    seed: int = doc("seed of the evaluation noise, patch positions and projections (fixed: comparable numbers)", 0)


@dataclass
class TuneConfig:
    metric: str = doc("quality metric to minimize: swd, fid or kid (also ranks checkpoints and decides champion)", "swd")
    space: str = doc("YAML file with the search space and the settings every trial shares", "jobs/tune_space.yaml")
    num_samples: int = doc("trials to run", 6)
    max_concurrent: int = doc("trials running at once (each uses ray.num_workers workers)", 2)
    scheduler: str = doc("asha (early stopping), pbt (population based training) or fifo (none)", "asha")
    search: str = doc("optuna (TPE) or random; pbt always starts from random samples", "optuna")
    grace_period: int = doc("ASHA: steps before a trial can be stopped", 100)
    reduction_factor: int = doc("ASHA: keep the best 1/reduction_factor at each rung", 2)
    perturbation_interval: int = doc("PBT: steps between exploit/explore decisions", 100)
    name: str = doc("search name (MLflow parent run, storage folder); '' = new timestamped name", "")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all ranks: train.batch_size x the most workers, at any group size."""
        return self.train.batch_size * self.ray.max_workers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`{"train.steps": 1000, ...}`: the form logged as MLflow params."""
        return {f"{s}.{k}": v for s, sub in self.to_dict().items() for k, v in sub.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _convert(key: str, value: Any, typ: Any) -> Any:
    """Coerce a YAML or `--set` value to the field's type, or fail naming the key."""
    if isinstance(typ, str):  # postponed annotations
        typ = {"int": int, "float": float, "str": str, "bool": bool}[typ]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {typ}")


def _section_fields(section: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section)}


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set `section.name` from a raw value, checking the key and type."""
    parts = key.split(".")
    sections = _section_fields(cfg)
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(
            f"unknown config key {key!r}: keys look like 'section.name' with section one of "
            f"{', '.join(sections)}"
        )
    section = getattr(cfg, parts[0])
    fields = _section_fields(section)
    if parts[1] not in fields:
        raise ConfigError(f"unknown config key {key!r}; known keys in {parts[0]}: {', '.join(fields)}")
    setattr(section, parts[1], _convert(key, value, fields[parts[1]].type))


def _apply_mapping(cfg: Config, data: dict, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model:, train:, ...), got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            set_key(cfg, str(section), values)  # fails with the key's name
        for name, value in values.items():
            set_key(cfg, f"{section}.{name}", value)


def parse_override(text: str) -> tuple[str, Any]:
    """`train.steps=200` -> ("train.steps", 200); the value is read as YAML (so 1e-4, true work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.steps=200")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content, or a ConfigError saying which file (`what` names its role) is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                defaults: dict[str, Any] | None = None) -> Config:
    """Defaults (plus `defaults`, flat keys), then the YAML file, then `--set` overrides; then validation."""
    cfg = Config()
    for key, value in (defaults or {}).items():
        set_key(cfg, key, value)
    if path:
        _apply_mapping(cfg, read_yaml(path, "config file"), str(path))
    for text in overrides:
        set_key(cfg, *parse_override(text))
    return validate(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (as shipped to Ray workers)."""
    cfg = Config()
    _apply_mapping(cfg, data, "config")
    return validate(cfg)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# Names end up in MLflow filter strings ('...') and in paths: letters, digits and . _ - only (experiments may
# also hold spaces and "/", as MLflow's own /Users/... names do).
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9/][A-Za-z0-9 ._/-]{0,254}")


def _check_finite(cfg: Config) -> None:
    """No inf or nan anywhere: every float key of every section."""
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float):
                _check(math.isfinite(value), f"{section.name}.{f.name}", f"must be a finite number, got {value}")


def validate(cfg: Config) -> Config:
    """Check ranges and fill preset-derived values, so what gets logged is what ran."""
    m, d, t, r = cfg.model, cfg.data, cfg.train, cfg.ray
    _check_finite(cfg)
    _check(m.preset in PRESETS, "model.preset", f"must be one of {', '.join(PRESETS)}, got {m.preset!r}")
    _check(m.resolution in RESOLUTIONS, "model.resolution", f"must be one of {RESOLUTIONS}, got {m.resolution}")
    for name in ("ngf", "ndf", "kernel"):
        if getattr(m, name) == 0:
            setattr(m, name, PRESETS[m.preset][name])
        _check(getattr(m, name) > 0, f"model.{name}", f"must be positive, got {getattr(m, name)}")
    _check(m.kernel in (4, 5), "model.kernel", f"must be 4 or 5, got {m.kernel}")
    _check(m.nz > 0, "model.nz", f"must be positive, got {m.nz}")
    _check(m.nc in (0, 1, 3), "model.nc", f"must be 1, 3 or 0 (from the data), got {m.nc}")
    _check(bool(d.url), "data.url", "must name a shard folder, brace pattern or s3:// prefix")
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1, got {d.shuffle_buffer}")
    _check(0 <= d.max_skip_fraction <= 1, "data.max_skip_fraction", f"must be in [0, 1], got {d.max_skip_fraction}")
    _check(d.max_bad_shards >= 1, "data.max_bad_shards", f"must be >= 1, got {d.max_bad_shards}")
    _check(d.max_stall_s > 0, "data.max_stall_s", f"must be positive, got {d.max_stall_s}")
    _check(d.max_sample_bytes >= 1024, "data.max_sample_bytes", f"must be >= 1024, got {d.max_sample_bytes}")
    for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
        _check(getattr(t, name) > 0, f"train.{name}", f"must be positive, got {getattr(t, name)}")
    _check(t.batch_size >= 2, "train.batch_size", "must be >= 2 (batch norm needs more than one sample)")
    _check(t.sample_every >= 0, "train.sample_every", f"must be >= 0, got {t.sample_every}")
    for name in ("lr_g", "lr_d"):
        _check(getattr(t, name) > 0, f"train.{name}", f"must be positive, got {getattr(t, name)}")
    for name in ("beta1", "beta2"):
        _check(0 <= getattr(t, name) < 1, f"train.{name}", f"must be in [0, 1), got {getattr(t, name)}")
    _check(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    _check(t.stop_timeout_s > 0, "train.stop_timeout_s", f"must be positive, got {t.stop_timeout_s}")
    _check(t.lease_ttl_s >= 3, "train.lease_ttl_s", f"must be >= 3, got {t.lease_ttl_s}")
    _check(0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    _check(not t.run_name or RUN_NAME.fullmatch(t.run_name), "train.run_name",
           f"must start with a letter or digit and hold only letters, digits and . _ - (at most 128), got {t.run_name!r}")
    _check(bool(EXPERIMENT_NAME.fullmatch(cfg.tracking.experiment)), "tracking.experiment",
           f"must be a name of letters, digits, spaces and . _ / -, got {cfg.tracking.experiment!r}")
    _check(bool(RUN_NAME.fullmatch(cfg.tracking.model_name)), "tracking.model_name",
           f"must start with a letter or digit and hold only letters, digits and . _ -, got {cfg.tracking.model_name!r}")
    for key, url in (("data.url", d.url), ("ray.storage_path", r.storage_path)):
        _check(not url.startswith("s3://") or bool(url[5:].split("/")[0]), key, f"names no bucket: {url!r}")
    _check(t.compile in COMPILE_MODES, "train.compile", f"must be one of {', '.join(COMPILE_MODES)}, got {t.compile!r}")
    _check(t.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    _check(not t.sync_batchnorm or r.use_gpu, "train.sync_batchnorm",
           "needs ray.use_gpu=true (PyTorch's SyncBatchNorm runs on GPUs only; CPU ranks keep per-rank statistics)")
    low, high = r.worker_range
    _check(1 <= low <= high, "ray.num_workers",
           f"must be N or MIN-MAX with 1 <= MIN <= MAX, got {r.num_workers!r}")
    _check(r.resize_check_s > 0, "ray.resize_check_s", f"must be positive, got {r.resize_check_s}")
    _check(r.start_timeout_s > 0, "ray.start_timeout_s", f"must be positive, got {r.start_timeout_s}")
    _check(d.streams >= 0, "data.streams", f"must be >= 0, got {d.streams}")
    _check(not t.key_log or d.streams > 0, "train.key_log", "needs data.streams > 0 (the random draw has no order)")
    _check(r.ddp_bucket_mb >= 1, "ray.ddp_bucket_mb", f"must be >= 1, got {r.ddp_bucket_mb}")
    _check(r.grad_compression in ("none", "bf16", "fp16"), "ray.grad_compression",
           f"must be none, bf16 or fp16, got {r.grad_compression!r}")
    _check(r.cpus_per_worker > 0, "ray.cpus_per_worker", f"must be positive, got {r.cpus_per_worker}")
    _check(r.max_failures >= -1, "ray.max_failures", f"must be >= -1, got {r.max_failures}")
    _check(r.keep_checkpoints >= 1, "ray.keep_checkpoints", f"must be >= 1, got {r.keep_checkpoints}")
    _check(bool(r.storage_path), "ray.storage_path", "must not be empty")
    _check(bool(cfg.tracking.uri), "tracking.uri", "must not be empty")
    _check(bool(cfg.tracking.model_name), "tracking.model_name", "must not be empty")
    mc, tc = cfg.metrics, cfg.tune
    _check(mc.num_images >= 16, "metrics.num_images", f"must be >= 16, got {mc.num_images}")
    _check(mc.batch_size >= 1, "metrics.batch_size", f"must be positive, got {mc.batch_size}")
    from dcgan_dist.metrics.registry import METRICS  # here, not at the top: `--help` stays fast

    _check(tc.metric in METRICS, "tune.metric", f"must be one of {', '.join(METRICS)}, got {tc.metric!r}")
    _check(not METRICS[tc.metric].uses_features or bool(mc.inception_weights), "tune.metric",
           f"{tc.metric} needs metrics.inception_weights (a local or s3:// Inception weights file)")
    _check(tc.scheduler in ("asha", "pbt", "fifo"), "tune.scheduler", f"must be asha, pbt or fifo, got {tc.scheduler!r}")
    _check(tc.search in ("optuna", "random"), "tune.search", f"must be optuna or random, got {tc.search!r}")
    for name in ("num_samples", "max_concurrent", "grace_period", "perturbation_interval"):
        _check(getattr(tc, name) > 0, f"tune.{name}", f"must be positive, got {getattr(tc, name)}")
    _check(tc.reduction_factor >= 2, "tune.reduction_factor", f"must be >= 2, got {tc.reduction_factor}")
    _check("/" not in tc.name, "tune.name", f"must not contain '/', got {tc.name!r}")
    return cfg


def describe() -> str:
    """Every key with its default and doc: the configuration reference (`--help-config`)."""
    lines = []
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(section.default_factory()):
            default = getattr(section.default_factory(), f.name)
            lines.append(f"  {section.name}.{f.name} = {default!r}\n      {f.metadata.get('doc', '')}")
    return "\n".join(lines)
