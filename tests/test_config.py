"""Config errors fail before any work starts, with one message naming the key and what is allowed."""
import pytest

from sagan_dist.config import ConfigError, load


def test_demo_config_loads_with_its_values():
    cfg = load(["demo"])
    assert cfg.model.resolution == 32 and cfg.data.source == "digits"
    assert list(cfg.train.betas) == [0.0, 0.9]


def test_overrides_are_typed_and_merged_last():
    cfg = load(["demo"], ["train.steps=7", "train.lr_d=0.001"])
    assert cfg.train.steps == 7 and cfg.train.lr_d == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("model.resolution=48", "model.resolution", "32 | 64 | 128 | 256 | 512"),
        ("model.g_attention=[8,64]", "model.g_attention", "resolutions of this model"),
        ("model.d_attention=[3]", "model.d_attention", "resolutions of this model"),
        ("train.lr_g=-0.0001", "train.lr_g", "> 0"),
        ("train.precision=fp8", "train.precision", "fp32 | bf16 | fp16"),
        ("engine=horovod", "engine", "ddp | deepspeed"),
        ("model.checkpoint_from=48", "model.checkpoint_from", "0 (off)"),
        ("train.betas=[0.0,1.5]", "train.betas", "[0, 1)"),
    ],
)
def test_impossible_values_name_key_and_allowed_values(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        load(["demo"], [override])
    assert repr(key) in str(err.value) and allowed in str(err.value)


def test_batch_size_must_divide_over_world_size():
    load(["demo"], ["train.batch_size=64"], world_size=4)
    with pytest.raises(ConfigError, match="world size x train.accumulation = 3 x 1"):
        load(["demo"], ["train.batch_size=64"], world_size=3)


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match="train.stepz"):
        load(["demo"], ["train.stepz=5"])


def test_wrong_type_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match="train.steps"):
        load(["demo"], ["train.steps=many"])


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nosuch.yaml"):
        load(["nosuch.yaml"])


def test_unknown_key_in_yaml_is_rejected(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  resolutoin: 64\n")
    with pytest.raises(ConfigError, match="resolutoin"):
        load([tmp_path / "bad.yaml"])


def test_loaded_config_is_read_only():
    cfg = load(["demo"])
    with pytest.raises(Exception):
        cfg.train.steps = 3
