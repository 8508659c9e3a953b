import pytest
import yaml

from distgan.config import Config, ConfigError, all_keys, describe, from_dict, load_config, to_dict, to_yaml


def test_defaults_are_the_digits_recipe():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.data.source == "digits" and cfg.model.image_size == 32 and cfg.model.channels == 1
    assert cfg.run.dir == "runs/default"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  steps: 7\n  batch_size: 32\noptim:\n  lr_g: 1.0e-3\n")
    cfg = load_config(str(path), {"train.steps": 9, "model.mlp_hidden": [8, 16]})
    assert cfg.train.steps == 9  # the override wins over the file
    assert cfg.train.batch_size == 32  # the file wins over the default
    assert cfg.optim.lr_g == 1e-3 and cfg.optim.lr_d == 2e-4
    assert cfg.model.mlp_hidden == [8, 16]
    assert cfg.run.dir == "runs/exp"  # named after the config file


def test_strings_from_the_command_line_are_coerced():
    cfg = load_config(None, {"train.steps": "12", "optim.lr_d": "3e-4", "log.progress": "false"})
    assert cfg.train.steps == 12 and cfg.optim.lr_d == 3e-4 and cfg.log.progress is False


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.step' \(did you mean 'train.steps'\?\)"):
        load_config(None, {"train.step": 3})
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr_gen: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optim.lr_gen' \(did you mean 'optim.lr_g'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(None, {"trian.steps": 3})
    with pytest.raises(ConfigError, match="unknown option --steps"):
        load_config(None, {"steps": 3})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("train.steps", "many", "int"), ("train.steps", 2.5, "int"), ("optim.lr_g", "fast", "float"),
     ("log.progress", "maybe", "bool"), ("train.batch_size", True, "int")],
)  # fmt: skip
def test_wrong_type_names_key_and_type(key, value, expected):
    with pytest.raises(ConfigError, match=rf"'{key}' expects {expected}, got {value!r}"):
        load_config(None, {key: value})


def test_choices_ranges_and_cross_field_rules():
    with pytest.raises(
        ConfigError, match="'data.source' must be one of digits, synthetic, shards, folder, ring8, grid25; got 'mnist'"
    ):
        load_config(None, {"data.source": "mnist"})
    with pytest.raises(ConfigError, match="'model.image_size' must be one of 32, 64, 128"):
        load_config(None, {"model.image_size": 48})
    with pytest.raises(ConfigError, match="'train.steps' must be >= 1"):
        load_config(None, {"train.steps": 0})
    with pytest.raises(ConfigError, match="'digits' has 1 channel but model.channels is 3"):
        load_config(None, {"model.channels": 3})


def test_point_sources_and_eval_metric_rules():
    from distgan.config import eval_metrics

    with pytest.raises(ConfigError, match="'ring8' holds 2-D points: it needs model.arch mlp"):
        load_config(None, {"data.source": "ring8"})
    with pytest.raises(ConfigError, match="data.hflip mirrors images"):
        load_config(None, {"data.source": "grid25", "model.arch": "mlp", "data.hflip": True})
    with pytest.raises(ConfigError, match=r"model.latent_codes 8 needs model.arch mlp .*got 'dcgan'"):
        load_config(None, {"model.latent_codes": 8})
    with pytest.raises(ConfigError, match=r"model.latent_codes 8 needs .*model.nz >= 2 .*nz 1\)"):
        load_config(None, {"data.source": "ring8", "model.arch": "mlp", "model.nz": 1, "model.latent_codes": 8})
    with pytest.raises(ConfigError, match=r"'eval.metrics': unknown \['fidd'\]"):
        load_config(None, {"eval.metrics": ["fidd"]})
    with pytest.raises(ConfigError, match="'modes' needs data.source ring8 or grid25"):
        load_config(None, {"eval.metrics": ["modes"]})
    with pytest.raises(ConfigError, match=r"augment.policy \['translation'\] transforms images; .*'ring8' holds 2-D"):
        load_config(None, {"data.source": "ring8", "model.arch": "mlp", "augment.policy": ["translation"]})
    with pytest.raises(ConfigError, match=r"\['digits'\] need images"):
        load_config(None, {"data.source": "ring8", "model.arch": "mlp", "eval.metrics": ["digits"]})
    with pytest.raises(ConfigError, match="'digits' scores grayscale digits"):
        load_config(None, {"data.source": "synthetic", "model.channels": 3, "eval.metrics": ["digits"]})
    assert eval_metrics(load_config(None)) == ["digits"]  # auto, for the digits
    assert eval_metrics(load_config(None, {"data.source": "grid25", "model.arch": "mlp"})) == ["modes"]
    assert eval_metrics(load_config(None, {"data.source": "synthetic"})) == []  # FID needs a weights file: opt in
    assert eval_metrics(load_config(None, {"eval.metrics": ["fid", "kid"]})) == ["fid", "kid"]


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(tmp_path / "list.yaml"))
    (tmp_path / "broken.yaml").write_text("train: {steps: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "broken.yaml"))


def test_written_config_round_trips(tmp_path):
    cfg = load_config(None, {"train.steps": 11, "model.arch": "mlp", "run.dir": str(tmp_path / "r")})
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    assert yaml.safe_load(path.read_text())["train"]["steps"] == 11


def test_every_key_is_documented():
    text = describe()
    for key in all_keys():
        line = next(line for line in text.splitlines() if line.strip().startswith(f"--{key}="))
        assert len(line.split(")", 1)[1].strip()) > 10, f"{key} has no documentation"


def test_shipped_configs_load():
    from conftest import ROOT

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(str(path))


def test_every_float_key_must_be_finite_and_within_its_meaning():
    from distgan.config import iter_fields

    floats = [key for key, f in iter_fields() if f.type == "float"]
    assert len(floats) >= 7  # lr_g, lr_d, beta1, beta2, mlp_dropout, the two G_ema keys, dist.timeout_s
    for key in floats:
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError, match=rf"config key '{key}' must be a finite number; got"):
                load_config(None, {key: bad})
    refused = {
        "optim.lr_g": (0.0, "> 0.0"),
        "optim.lr_d": (-1e-4, "> 0.0"),
        "optim.beta1": (1.5, "< 1.0"),
        "optim.beta2": (1.0, "< 1.0"),
        "model.mlp_dropout": (1.0, "< 1.0"),
        "train.ema_rampup": (-0.1, ">= 0.0"),
        "dist.timeout_s": (0.5, ">= 1.0"),
    }
    for key, (value, rule) in refused.items():
        with pytest.raises(ConfigError, match=rf"config key '{key}' must be {rule}; got {value}"):
            load_config(None, {key: value})
    assert load_config(None, {"optim.beta1": 0.0, "optim.beta2": 0.99}).optim.beta2 == 0.99  # the edges that are valid
