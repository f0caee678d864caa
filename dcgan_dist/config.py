"""The typed config tree: every key has a default and a one-line doc.

Users override with a YAML file and `--set a.b=value`; unknown keys, wrong types and
invalid values fail with a `ConfigError` that names the key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
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


def doc(text: str, default: Any, *checks: tuple) -> Any:
    """A dataclass field with its one-line doc (shown by `--help-config`) and the checks `validate` applies to it:
    (test, what a good value is) pairs, so a key's rule sits beside the key."""
    return field(default=default, metadata={"doc": text, "checks": checks})


POSITIVE = (lambda v: v > 0, "must be positive")
NOT_EMPTY = (bool, "must not be empty")
NAMES_A_BUCKET = (lambda v: not v.startswith("s3://") or bool(v[5:].split("/")[0]), "names no bucket")


def at_least(low: float, why: str = "") -> tuple:
    return lambda v: v >= low, f"must be >= {low}{why}"


def one_of(*options) -> tuple:
    return lambda v: v in options, f"must be one of {', '.join(map(str, options))}"


FRACTION = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
BELOW_ONE = (lambda v: 0 <= v < 1, "must be in [0, 1)")


def matches(pattern: re.Pattern, rule: str, empty_ok: bool = False) -> tuple:
    return lambda v: (empty_ok and not v) or bool(pattern.fullmatch(v)), rule


# Names end up in MLflow filter strings ('...') and in paths: letters, digits and . _ - only (experiments may
# also hold spaces and "/", as MLflow's own /Users/... names do).
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9/][A-Za-z0-9 ._/-]{0,254}")
NAME_RULE = "must start with a letter or digit and hold only letters, digits and . _ - (at most 128)"


@dataclass
class ModelConfig:
    preset: str = doc("architecture preset: 'examples' (pytorch/examples: ngf=ndf=64, 4x4) or 'paper' "
                      "(ngf=ndf=128, 5x5)", "examples", one_of(*PRESETS))
    resolution: int = doc("image side in pixels: 32, 64 or 128 (sets the network depth); must match the shards", 32,
                          one_of(*RESOLUTIONS))
    nz: int = doc("latent dimension", 100, POSITIVE)
    ngf: int = doc("generator base channels; 0 = the preset's", 0, POSITIVE)
    ndf: int = doc("discriminator base channels; 0 = the preset's", 0, POSITIVE)
    kernel: int = doc("kernel size of strided layers (4 or 5); 0 = the preset's", 0, one_of(4, 5))
    nc: int = doc("image channels (1 or 3); 0 = from the data manifest", 0, one_of(0, 1, 3))


@dataclass
class DataConfig:
    url: str = doc("shards: a local folder with manifest.json, s3://bucket/prefix/, or a brace pattern like "
                   "dir/shard-{000000..000009}.tar; the default (the embedded digits) is built on first use",
                   "data/digits-32",
                   NOT_EMPTY, NAMES_A_BUCKET)
    num_workers: int = doc("DataLoader worker processes per training rank (decode happens there)", 1, at_least(0))
    shuffle_buffer: int = doc("samples held in each stream's shuffle buffer", 1000, at_least(1))
    max_skip_fraction: float = doc("stop with an error when more than this fraction of samples is unreadable "
                                   "(the first 100 are always tolerated)", 0.05, FRACTION)
    max_bad_shards: int = doc("stop with an error after this many shards in a row without a usable image", 16,
                              at_least(1))
    max_sample_bytes: int = doc("largest tar member read; a bigger one ends its shard unread", 16 << 20, at_least(1024))
    verify_sha256: bool = doc("hash each shard as it streams and check it against the manifest", False)
    allow_changed: bool = doc("resume a run on other data than its checkpoint was trained on (shards added or "
                              "rebuilt): the streams restart from the step's seeded positions", False)
    max_stall_s: float = doc("stop with an error when no usable image came for this long (S3 down for good)", 60.0,
                             POSITIVE)
    streams: int = doc("0 = each rank draws shards at random; N = N seeded virtual streams, so the images of each "
                       "step are the same whatever the number of workers (elastic training; needs a manifest and "
                       ">= N shards; reads in a thread, so data.num_workers is unused)", 0, at_least(0))


@dataclass
class TrainConfig:
    steps: int = doc("total optimizer steps (each = one D update + one G update)", 500, POSITIVE)
    batch_size: int = doc("images per worker per step (elastic: the global batch is this x the most workers)", 64,
                          at_least(2, " (batch norm needs more than one sample)"))
    lr_g: float = doc("generator Adam learning rate", 2e-4, POSITIVE)
    lr_d: float = doc("discriminator Adam learning rate", 2e-4, POSITIVE)
    beta1: float = doc("Adam beta1 (the paper uses 0.5)", 0.5, BELOW_ONE)
    beta2: float = doc("Adam beta2", 0.999, BELOW_ONE)
    seed: int = doc("seed for weights, noise and data order", 0)
    log_every: int = doc("steps between metric reports (to MLflow at once)", 10, POSITIVE)
    checkpoint_every: int = doc("steps between checkpoints", 100, POSITIVE)
    checkpoint_upload: str = doc("async: Ray uploads each checkpoint while the ranks train on; sync: the step waits "
                                 "for it; auto: async with GPUs, sync on CPUs (measured: no gain where the upload "
                                 "shares the training's cores)", "auto", one_of("auto", "sync", "async"))
    stop_timeout_s: float = doc("on SIGTERM, how long the driver waits for the workers' last checkpoint", 60.0,
                                POSITIVE)
    lease_ttl_s: float = doc("the run-name lease in S3 lapses this long after its job died (renewed every third)",
                             60.0, at_least(3))
    sample_every: int = doc("steps between 8x8 sample grids (0 = only at the end)", 100, at_least(0))
    run_name: str = doc("run name; the same name resumes from its latest checkpoint ('' = new timestamped name)", "",
                        matches(RUN_NAME, NAME_RULE, empty_ok=True))
    sync_batchnorm: bool = doc("use SyncBatchNorm across ranks instead of per-rank batch statistics (GPU only: PyTorch "
                                "has no CPU SyncBatchNorm)", False)
    channels_last: bool = doc("NHWC memory layout for G, D and batches (1.3x faster convolutions on CPU)", True)
    precision: str = doc("auto (bf16 where the hardware computes it natively: CUDA Ampere+, CPUs with AMX or "
                         "AVX512-BF16; else fp32), fp32, bf16 (autocast) or fp16 (autocast + grad scaler); weights and "
                         "Adam stay fp32; the run's precision tag says what ran", "auto", one_of(*PRECISIONS))
    fused_adam: bool = doc("Adam's fused kernel (one kernel for all parameters instead of a loop)", False)
    compile: str = doc("torch.compile G and D for the training shapes: none, default, reduce-overhead (CUDA graphs on "
                       "GPU) or max-autotune; evaluation and grids run eagerly; a compile failure stops the run with "
                       "its error (no silent eager fallback)", "none", one_of(*COMPILE_MODES))
    eval_every: int = doc("steps between quality evaluations, each also a checkpoint (0 = never)", 100, at_least(0))
    ema_decay: float = doc("generator weight EMA decay, evaluated and exported when on (0 = off; 0.999 typical)", 0.0,
                           BELOW_ONE)
    check_replicas: bool = doc("at every checkpoint, every rank hashes G and reports it (g_digests): equal hashes "
                               "prove DDP kept the replicas identical (costs a hash of G per checkpoint)", False)
    key_log: str = doc("folder where every rank writes the sample keys of each step (checks data order; needs "
                       "data.streams; '' = off)", "")


@dataclass
class RayConfig:
    address: str = doc("Ray cluster: '' = start a local one, 'auto' = the one this job runs in, or ray://host:port", "")
    num_workers: str = doc("training workers (DDP ranks): N, or MIN-MAX to train elastically on what is there "
                           "(docs/training.md, elastic training)", "2")
    resize_check_s: float = doc("elastic: seconds between checks for room to grow the group back to MAX", 60.0,
                                POSITIVE)
    start_timeout_s: float = doc("how long a worker group may take to start before Ray Train tries again (elastic: "
                                 "with fewer workers, once a lost node is known dead: lower it, e.g. 20, so a group "
                                 "that lost a node without notice restarts smaller sooner)", 60.0, POSITIVE)
    use_gpu: bool = doc("one GPU per worker and NCCL; False = CPU with gloo", False)
    cpus_per_worker: float = doc("CPUs reserved per worker", 1.0, POSITIVE)
    storage_path: str = doc("where checkpoints go: a local folder, s3://bucket/prefix, or on a cluster without S3 "
                            "file:///folder/every/node/mounts; with ray.address set, a local folder is refused",
                            "ray_results", NOT_EMPTY, NAMES_A_BUCKET)
    max_failures: int = doc("worker-group restarts allowed before the run fails (-1 = unlimited)", 2, at_least(-1))
    keep_checkpoints: int = doc("checkpoints kept per run (oldest deleted first)", 3, at_least(1))
    ddp_bucket_mb: int = doc("DDP gradient bucket size in MB (smaller buckets overlap allreduce with backward "
                             "earlier)", 25, at_least(1))
    grad_compression: str = doc("DDP communication hook: none, bf16 or fp16 (gradients sent at half width)", "none",
                                one_of("none", "bf16", "fp16"))

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
    uri: str = doc("MLflow tracking URI (sqlite:///file.db, http://host:5000, ...); on a cluster "
                   "http://127.0.0.1:PORT means the driver's machine, and ranks on other nodes are sent its address",
                   "sqlite:///mlflow.db", NOT_EMPTY)
    experiment: str = doc("MLflow experiment name", "dcgan",
                          matches(EXPERIMENT_NAME, "must be a name of letters, digits, spaces and . _ / -"))
    model_name: str = doc("registered model name for the trained generator", "dcgan-generator",
                          matches(RUN_NAME, NAME_RULE))
    register: bool = doc("log and register the generator at the end of training", True)
    system_metrics: bool = doc("log each node's CPU, memory, disk, network and GPU use as MLflow system metrics "
                               "(system/<node address>/...; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, 10 s)", True)


@dataclass
class MetricsConfig:
    num_images: int = doc("generated images per evaluation; real images = the same or all the data has", 2048,
                          at_least(16))
    inception_weights: str = doc("FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth), path or s3://; '' = SWD only", "")
    inception_sha256: str = doc("expected sha256 of inception_weights ('' = the official file's hash prefix)", "")
    cache_dir: str = doc("where real-data statistics are cached, keyed by the data manifest", "~/.cache/dcgan-dist")
    batch_size: int = doc("images per forward pass when generating and extracting features", 256, POSITIVE)
    seed: int = doc("seed of the evaluation noise, patch positions and projections (fixed: comparable numbers)", 0)
    eval_cpus: float = doc("CPUs reserved for the task that scores each evaluation's checkpoint beside training "
                           "(Ray Train's checkpoint validation: the ranks do not wait for it); searches score in the "
                           "loop, since their schedulers need the number at the step", 1.0, POSITIVE)


@dataclass
class TuneConfig:
    metric: str = doc("quality metric to minimize: swd, fid or kid (also ranks checkpoints and decides champion)", "swd")
    space: str = doc("YAML file with the search space and the settings every trial shares", "jobs/tune_space.yaml")
    num_samples: int = doc("trials to run", 6, POSITIVE)
    max_concurrent: int = doc("trials running at once (each uses ray.num_workers workers)", 2, POSITIVE)
    scheduler: str = doc("asha (early stopping), pbt (population based training) or fifo (none)", "asha",
                         one_of("asha", "pbt", "fifo"))
    search: str = doc("optuna (TPE) or random; pbt always starts from random samples", "optuna",
                      one_of("optuna", "random"))
    grace_period: int = doc("ASHA: steps before a trial can be stopped", 100, POSITIVE)
    reduction_factor: int = doc("ASHA: keep the best 1/reduction_factor at each rung", 2, at_least(2))
    perturbation_interval: int = doc("PBT: steps between exploit/explore decisions", 100, POSITIVE)
    name: str = doc("search name (MLflow parent run, storage folder); '' = new timestamped name", "",
                    (lambda v: "/" not in v, "must not contain '/'"))


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
        near = difflib.get_close_matches(parts[0], sections, n=1) if len(parts) == 2 else []
        hint = f" (did you mean {near[0]}.{parts[1]}?)" if near else ""
        raise ConfigError(
            f"unknown config key {key!r}{hint}: keys look like 'section.name' with section one of "
            f"{', '.join(sections)}"
        )
    section = getattr(cfg, parts[0])
    fields = _section_fields(section)
    if parts[1] not in fields:
        near = difflib.get_close_matches(parts[1], fields, n=1)
        hint = f" (did you mean {parts[0]}.{near[0]}?)" if near else ""
        raise ConfigError(f"unknown config key {key!r}{hint}; known keys in {parts[0]}: {', '.join(fields)}")
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


# MLflow's and Ray's own settings, read where their docs say they are read: `ray job submit` sets RAY_ADDRESS for
# every job; MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME are MLflow's. A config file and --set still win.
ENVIRONMENT = {"MLFLOW_TRACKING_URI": "tracking.uri", "MLFLOW_EXPERIMENT_NAME": "tracking.experiment",
               "RAY_ADDRESS": "ray.address"}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                defaults: dict[str, Any] | None = None) -> Config:
    """Defaults (plus `defaults`, flat keys), then MLflow's and Ray's environment variables (`ENVIRONMENT`), then the
    YAML file, then `--set` overrides; then validation."""
    cfg = Config()
    for key, value in (defaults or {}).items():
        set_key(cfg, key, value)
    for variable, key in ENVIRONMENT.items():
        if os.environ.get(variable):
            set_key(cfg, key, os.environ[variable])
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


def _check_fields(cfg: Config) -> None:
    """Every key's own checks (declared beside it), and no inf or nan in any float key."""
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            key, value = f"{section.name}.{f.name}", getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float):
                _check(math.isfinite(value), key, f"must be a finite number, got {value}")
            for test, rule in f.metadata["checks"]:
                _check(test(value), key, f"{rule}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Fill preset-derived values, then check every key and the rules between keys, so what gets logged is what
    ran."""
    m, d, t, r, tc = cfg.model, cfg.data, cfg.train, cfg.ray, cfg.tune
    preset = PRESETS.get(m.preset, {})  # an unknown one is named by model.preset's own check
    for name in ("ngf", "ndf", "kernel"):
        if getattr(m, name) == 0:
            setattr(m, name, preset.get(name, 0))
    _check_fields(cfg)
    _check(not t.sync_batchnorm or r.use_gpu, "train.sync_batchnorm",
           "needs ray.use_gpu=true (PyTorch's SyncBatchNorm runs on GPUs only; CPU ranks keep per-rank statistics)")
    low, high = r.worker_range
    _check(1 <= low <= high, "ray.num_workers", f"must be N or MIN-MAX with 1 <= MIN <= MAX, got {r.num_workers!r}")
    _check(not t.key_log or d.streams > 0, "train.key_log", "needs data.streams > 0 (the random draw has no order)")
    from dcgan_dist.metrics.registry import METRICS  # here, not at the top: `--help` stays fast

    _check(tc.metric in METRICS, "tune.metric", f"must be one of {', '.join(METRICS)}, got {tc.metric!r}")
    _check(not METRICS[tc.metric].uses_features or bool(cfg.metrics.inception_weights), "tune.metric",
           f"{tc.metric} needs metrics.inception_weights (a local or s3:// Inception weights file)")
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


GENERATE = "python -m dcgan_dist.config > docs/configuration.md"


def _markdown_value(value: Any) -> str:
    """A default as the YAML a user would write for it (`true`, `''`, `0.0002`), in backticks."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value or "''"
    else:
        text = repr(value)
    return f"`{text}`"


def markdown_reference() -> str:
    """Every section and key with its default and doc, as Markdown: docs/configuration.md, one table per section.
    Written by `python -m dcgan_dist.config > docs/configuration.md`; tests/test_config.py fails when it is stale."""
    sections = [s.name for s in dataclasses.fields(Config)]
    lines = [
        "# Configuration reference",
        "",
        f"> Generated by `{GENERATE}` from `dcgan_dist/config.py`: do not edit by hand.",
        "",
        "Every key has a default; `python jobs/train.py --help-config` prints them all with their docs.",
        "Override with a YAML file (`--config my.yaml`, sections " + ", ".join(f"`{s}:`" for s in sections) + ")",
        "and/or `--set section.key=value` (repeatable; values are read as YAML, so `1e-4` and `true` work).",
        "Unknown keys and wrong types fail before anything starts, naming the key.",
    ]
    for section in dataclasses.fields(Config):
        defaults = section.default_factory()
        lines += ["", f"## {section.name}", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(defaults):
            meaning = f.metadata.get("doc", "").replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | {_markdown_value(getattr(defaults, f.name))} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_reference(), end="")
