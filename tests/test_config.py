import re
from pathlib import Path

import pytest

from dcgan_dist.config import GENERATE, describe, from_dict, load_config, markdown_reference
from dcgan_dist.errors import ConfigError

REQUIRED = """model.resolution model.nz model.ngf model.ndf model.preset data.url train.steps train.batch_size
train.lr_g train.lr_d train.beta1 train.seed train.checkpoint_every train.sample_every ray.address
ray.num_workers ray.use_gpu ray.storage_path ray.max_failures tracking.uri tracking.experiment
tracking.model_name""".split()
ROOT = Path(__file__).resolve().parent.parent


def test_required_keys_exist_with_defaults():
    flat = load_config().flat()
    assert set(REQUIRED) <= set(flat)
    assert flat["train.lr_g"] == 2e-4 and flat["train.beta1"] == 0.5
    assert flat["tracking.model_name"] == "dcgan-generator"
    assert flat["tracking.uri"] == "sqlite:///mlflow.db"
    text = describe()
    assert all(k in text for k in REQUIRED)


def test_overrides_are_typed():
    cfg = load_config(overrides=["train.steps=200", "train.lr_d=1e-4", "ray.use_gpu=true", "model.resolution=64"])
    assert cfg.train.steps == 200 and cfg.train.lr_d == 1e-4 and cfg.ray.use_gpu is True
    assert cfg.model.resolution == 64


def test_presets_fill_unset_channels():
    assert (load_config().model.ngf, load_config().model.kernel) == (64, 4)
    paper = load_config(overrides=["model.preset=paper"]).model
    assert (paper.ngf, paper.ndf, paper.kernel) == (128, 128, 5)
    assert load_config(overrides=["model.preset=paper", "model.ngf=32"]).model.ngf == 32


def test_yaml_file_and_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 77\n  batch_size: 8\nmodel:\n  resolution: 64\n")
    cfg = load_config(f, ["train.steps=78"])
    assert cfg.train.steps == 78 and cfg.train.batch_size == 8 and cfg.model.resolution == 64
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.stepz=5", "train.stepz"),
        ("trian.steps=5", "trian.steps"),
        ("train.steps=abc", "train.steps"),
        ("train.lr_g=fast", "train.lr_g"),
        ("ray.use_gpu=maybe", "ray.use_gpu"),
        ("model.resolution=48", "model.resolution"),
        ("model.preset=huge", "model.preset"),
        ("train.beta1=1.5", "train.beta1"),
        ("train.batch_size=1", "train.batch_size"),
        ("train.steps", "KEY=VALUE"),
        ("train.lr_g=inf", "train.lr_g: must be a finite number"),
        ("train.ema_decay=nan", "train.ema_decay: must be a finite number"),
        ("train.run_name=..", "train.run_name"),
        ("train.run_name=it's", "train.run_name"),
        ("tracking.experiment=", "tracking.experiment"),
        ("tracking.model_name=a'b", "tracking.model_name"),
        ("data.url=s3://", "data.url: names no bucket"),
        ("ray.storage_path=s3:///x", "ray.storage_path: names no bucket"),
        ("data.max_skip_fraction=1.5", "data.max_skip_fraction"),
        ("data.max_bad_shards=0", "data.max_bad_shards"),
    ],
)
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(overrides=[override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(unknown)


def test_the_configuration_reference_is_generated_and_current():
    """docs/configuration.md is markdown_reference()'s output, byte for byte: a new or changed key fails here
    until the file is generated again."""
    reference = markdown_reference()
    assert all(f"`{k}`" in reference for k in load_config().flat())
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == reference, f"docs/configuration.md is stale: run `{GENERATE}`"


def test_docs_links_resolve():
    """Every relative link in README.md and docs/*.md names a file that exists (anchors are not checked)."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links in code blocks are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#", 1)[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing files: {broken}"


def test_metric_and_search_settings_are_checked():
    with pytest.raises(ConfigError, match="tune.metric: fid needs metrics.inception_weights"):
        load_config(overrides=["tune.metric=fid"])
    with pytest.raises(ConfigError, match="tune.scheduler"):
        load_config(overrides=["tune.scheduler=hyperband"])
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(overrides=["train.ema_decay=1.0"])
    assert load_config(overrides=["tune.metric=kid", "metrics.inception_weights=w.pth"]).tune.metric == "kid"


def test_num_workers_is_a_count_or_an_elastic_range():
    fixed, elastic = load_config(overrides=["ray.num_workers=4"]).ray, load_config(overrides=["ray.num_workers=2-8"]).ray
    assert fixed.worker_range == (4, 4) and elastic.worker_range == (2, 8) and elastic.max_workers == 8
    for bad in ("0", "3-1", "two", "2-", "1.5"):
        with pytest.raises(ConfigError, match="ray.num_workers: must be N or MIN-MAX"):
            load_config(overrides=[f"ray.num_workers={bad}"])
    with pytest.raises(ConfigError, match="train.key_log: needs data.streams > 0"):
        load_config(overrides=["train.key_log=/tmp/keys"])


def test_mlflow_and_ray_environment_variables_are_honoured_and_set_wins(monkeypatch, tmp_path, digits_dir):
    """MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME (MLflow's), RAY_ADDRESS (set by `ray job submit` for every job):
    read as their docs say; --set still wins. A job with RAY_ADDRESS is on a cluster: a folder on this machine as
    checkpoint storage is refused there as it is with ray.address."""
    from dcgan_dist.errors import ConfigError
    from dcgan_dist.trainer import prepare_inputs

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert load_config().tracking.uri == "sqlite:///mlflow.db" and load_config().ray.address == ""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "bedrooms")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    cfg = load_config()
    assert (cfg.tracking.uri, cfg.tracking.experiment, cfg.ray.address) == (
        "http://127.0.0.1:5999", "bedrooms", "http://127.0.0.1:8265")
    cfg = load_config(overrides=["tracking.uri=sqlite:///other.db", "tracking.experiment=dcgan", "ray.address="])
    assert (cfg.tracking.uri, cfg.tracking.experiment, cfg.ray.address) == ("sqlite:///other.db", "dcgan", "")
    with pytest.raises(ConfigError, match=r"ray.storage_path .* is a folder on this machine, but ray.address "
                                          r"'http://127.0.0.1:8265' \(or RAY_ADDRESS"):
        prepare_inputs(load_config(overrides=[f"ray.storage_path={tmp_path}", f"data.url={digits_dir}"]))
