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


# ---- values that once passed the checks and failed later (issue 17.6, 16.8) ----------------------
@pytest.mark.parametrize("key", ["train.lr_g", "train.lr_d"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1e-4"])
def test_non_finite_or_non_positive_learning_rates_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"'{key}' = .* allowed: a finite learning rate > 0"):
        load(["demo"], [f"{key}={value}"])


@pytest.mark.parametrize("key", ["train.lr_g", "train.lr_d"])
def test_finite_learning_rates_are_kept(key):
    assert load(["demo"], [f"{key}=1e-30"]).train[key.split(".")[1]] == pytest.approx(1e-30)
    assert load(["demo"], [f"{key}=1e6"]).train[key.split(".")[1]] == pytest.approx(1e6)


@pytest.mark.parametrize("extra, size", [
    ([], 16),  # demo: 32 px, G's default attention at 16x16
    (["model.resolution=128"], 32),
    (["model.g_attention=[8,16]"], 8),  # the smallest layer bounds the points of every layer
])
def test_attention_points_are_bounded_by_the_smallest_attention_map(extra, size):
    for points in (0, 1, size * size):
        assert load(["demo"], [*extra, f"train.attention_points={points}"]).train.attention_points == points
    with pytest.raises(ConfigError, match=rf"'train.attention_points' = {size * size + 1} .* 0 \(off\) \.\. "
                                          rf"{size * size} .*{size}x{size}"):
        load(["demo"], [*extra, f"train.attention_points={size * size + 1}"])


def test_attention_points_are_free_without_g_attention():
    # train.py draws no maps when G has no attention layer, so any count is harmless
    assert load(["demo"], ["model.g_attention=[]", "train.attention_points=100000"]).train.attention_points == 100000


def test_attention_points_bound_is_what_the_map_code_accepts():
    from sagan_dist.attention_maps import spread_points

    assert len(spread_points(16, 16, 256)) == 256
    with pytest.raises(ValueError):
        spread_points(16, 16, 257)


def test_number_of_classes_is_capped():
    from sagan_dist.config_checks import MAX_CLASSES

    for n in (1, MAX_CLASSES):
        assert load(["demo"], [f"data.num_classes={n}"]).data.num_classes == n
    for n in (0, MAX_CLASSES + 1, 1_000_000_000):
        with pytest.raises(ConfigError, match=rf"'data.num_classes' = {n} .* allowed: 1 \.\. {MAX_CLASSES}"):
            load(["demo"], [f"data.num_classes={n}"])


@pytest.mark.parametrize("override, key", [
    ("train.run_dir=${oc.env:SAGAN_TEST_NOPE}", "train.run_dir"),  # a string: never read by the checks
    ("train.steps=${oc.env:SAGAN_TEST_NOPE}", "train.steps"),
    ("tracking.uri=${train.nope}", "tracking.uri"),
])
def test_unresolvable_interpolations_fail_at_load_naming_the_key(override, key, monkeypatch):
    monkeypatch.delenv("SAGAN_TEST_NOPE", raising=False)
    with pytest.raises(ConfigError, match=f"config key '{key}'") as err:
        load(["demo"], [override])
    assert "\n" not in str(err.value)


def test_resolvable_interpolations_and_escaped_literals_still_load(monkeypatch, tmp_path):
    monkeypatch.setenv("SAGAN_TEST_STEPS", "7")
    cfg = load(["demo"], ["train.steps=${oc.env:SAGAN_TEST_STEPS}", f"train.run_dir={tmp_path}/${{train.steps}}",
                          "tracking.run_name=\\${oc.env:SAGAN_TEST_NOPE}"])
    assert cfg.train.steps == 7 and cfg.train.run_dir == f"{tmp_path}/7"
    assert cfg.tracking.run_name == "${oc.env:SAGAN_TEST_NOPE}"  # escaped: a literal, never resolved


def test_config_errors_stop_the_trainer_before_any_work(tmp_path):
    import subprocess
    import sys

    for override in ("train.lr_d=inf", "train.attention_points=100000", "data.num_classes=1000000000",
                     "train.steps=${oc.env:SAGAN_TEST_NOPE}"):
        res = subprocess.run([sys.executable, "-m", "sagan_dist.cli", "train", "demo", override,
                              f"train.run_dir={tmp_path / 'run'}", "tracking.enabled=false"],
                             capture_output=True, text=True, timeout=300)
        key = override.split("=")[0]
        assert res.returncode == 2 and repr(key) in res.stderr, (override, res.stderr[-2000:])
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
        assert not (tmp_path / "run").exists()


def test_config_modules_import_one_way():
    """config -> config_checks -> config_base; the shared names stay importable from config."""
    import ast
    import inspect

    from sagan_dist import config, config_base, config_checks

    def imports(module) -> set[str]:
        tree = ast.parse(inspect.getsource(module))
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "sagan_dist.config" not in imports(config_checks)
    assert imports(config_base) <= {"__future__"}
    assert config.ConfigError is config_base.ConfigError is config_checks.ConfigError
    assert config.RESOLUTIONS == config_base.RESOLUTIONS and config.feature_resolutions(32) == [4, 8, 16, 32]
