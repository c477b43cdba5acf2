"""Attention maps: K query rows of each layer are the layer's own softmax over keys, they are
probability distributions, the metrics mean what they say, and `sagan-dist attention` writes a
sheet per layer and a weights-only maps.pt, or refuses bad options with a message naming them."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sagan_dist import cli
from sagan_dist.attention_maps import (LayerMaps, attention_summary, expected_distance, layer_maps,
                                       mean_entropy, spread_points)
from sagan_dist.attention_sheet import tile_size
from sagan_dist.models.attention import SelfAttention
from sagan_dist.models.sagan import Generator

TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.log_every=1", "train.checkpoint_every=1", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def pooled_run(tmp_path_factory) -> Path:
    """A 1-step demo run with pooled keys and two attention layers in G (8x8 and 16x16)."""
    run_dir = tmp_path_factory.mktemp("attn") / "run"
    res = subprocess.run([sys.executable, "-m", "sagan_dist.cli", "train", "demo", *TINY, "train.steps=1",
                          "model.attention_pool=true", "model.g_attention=[8,16]", f"train.run_dir={run_dir}"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir


def _float64_rows(layer: SelfAttention, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Reference: the full query/key maps in float64 from the layer's convs, softmax of K rows."""
    conv = lambda m: F.conv2d(x.double(), m.weight.double(), m.bias.double())  # noqa: E731
    q, k = conv(layer.query), conv(layer.key)
    if layer.pool:
        k = F.max_pool2d(k, 2)
    logits = torch.einsum("bck,bcn->bkn", q.flatten(2)[:, :, flat], k.flatten(2))
    return logits.softmax(-1)


@pytest.mark.parametrize("pool", [False, True])
def test_query_rows_equal_a_float64_softmax_of_the_layers_own_convs(pool):
    torch.manual_seed(0)
    layer = SelfAttention(32, pool=pool).eval()
    x = torch.randn(2, 32, 8, 8) * 3  # logits of several units: a peaked, not a flat softmax
    flat = torch.tensor([0, 9, 36, 63])
    rows = layer.attention_rows(x, flat)
    assert rows.shape == (2, 4, 4, 4) if pool else (2, 4, 8, 8)
    # float32 convs and exp against float64: relative error ~1e-7 per weight.
    torch.testing.assert_close(rows.flatten(2).double(), _float64_rows(layer, x, flat), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pool", [False, True])
def test_query_rows_are_the_weights_attend_uses(pool):
    """sum_j p_j v_j from our rows equals SelfAttention.attend at those queries (the fused kernel sums
    in another order, hence a tolerance, not equality)."""
    torch.manual_seed(1)
    layer = SelfAttention(32, pool=pool).eval()
    x = torch.randn(2, 32, 8, 8)
    flat = torch.tensor([3, 27, 50])
    with torch.no_grad():
        v = layer.value(x)
        v = F.max_pool2d(v, 2) if pool else v
        ours = torch.einsum("bkn,bcn->bck", layer.attention_rows(x, flat).flatten(2), v.flatten(2))
        theirs = layer.attend(x).flatten(2)[:, :, flat]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_generator_maps_are_probability_distributions():
    torch.manual_seed(2)
    g = Generator(32, num_classes=10, z_dim=16, ch=8, attention=[8, 16], pool=True).eval()
    z, y = torch.randn(3, 16), torch.tensor([0, 4, 9])
    maps, images = layer_maps(g, lambda: g(z, y), points=5)
    assert images.shape == (3, 3, 32, 32)
    assert sorted(lm.map_size for lm in maps.values()) == [(8, 8), (16, 16)]
    for lm in maps.values():
        h, w = lm.map_size
        assert lm.maps.shape == (3, 5, h // 2, w // 2) and lm.stride == 2
        assert (lm.maps >= 0).all()
        torch.testing.assert_close(lm.maps.sum(dim=(2, 3)), torch.ones(3, 5))  # float32 sums of 64 terms
        assert ((lm.points >= 0) & (lm.points < torch.tensor([h, w]))).all()


@pytest.mark.parametrize("h,w,k", [(16, 16, 1), (16, 16, 4), (16, 16, 7), (8, 8, 64), (4, 16, 20), (32, 32, 10)])
def test_spread_points_are_distinct_positions_inside_the_map(h, w, k):
    pts = spread_points(h, w, k)
    assert pts.shape == (k, 2)
    assert len({tuple(p) for p in pts.tolist()}) == k
    assert ((pts >= 0) & (pts < torch.tensor([h, w]))).all()


def test_spread_points_refuses_counts_the_map_cannot_hold():
    for k in (0, -1, 65):
        with pytest.raises(ValueError, match=rf"^{k} query points .*--points, train.attention_points"):
            spread_points(8, 8, k)


def test_metrics_of_known_maps():
    points = torch.tensor([[3, 5]])
    at_query = torch.zeros(1, 1, 8, 8)
    at_query[0, 0, 3, 5] = 1
    lm = LayerMaps(at_query, points, (8, 8))
    assert expected_distance(lm) == 0 and mean_entropy(lm) == 0
    uniform = LayerMaps(torch.full((1, 1, 4, 4), 1 / 16), points, (8, 8))  # pooled: 4x4 keys
    assert mean_entropy(uniform) == pytest.approx(math.log(16))
    pooled_cell = torch.zeros(1, 1, 4, 4)
    pooled_cell[0, 0, 0, 0] = 1  # covers pixels rows 0-1, cols 0-1: centre (0.5, 0.5)
    assert expected_distance(LayerMaps(pooled_cell, points, (8, 8))) == pytest.approx(math.hypot(2.5, 4.5))


def test_attention_summary_writes_a_sheet_per_layer_and_leaves_g_as_it_was(tmp_path):
    torch.manual_seed(3)
    g = Generator(32, num_classes=10, z_dim=16, ch=8, attention=[8, 16]).train()
    stats = {k: v.clone() for k, v in g.state_dict().items()}
    z, y = torch.randn(20, 16), torch.arange(10).repeat_interleave(2)
    paths, metrics = attention_summary(g, z, y, points=3, out_dir=tmp_path, step=7, images=4)
    assert set(paths) == {"blocks.1", "blocks.3"}
    for name, path in paths.items():
        assert path == tmp_path / name / "step-00000007.png"
        with Image.open(path) as im:
            assert im.height > 4 * tile_size(32) and im.width > 4 * tile_size(32)  # 4 rows, 1 + 3 columns
        assert 0 < metrics[f"attention/{name}/distance"] < 16 * math.sqrt(2)
        assert 0 < metrics[f"attention/{name}/entropy"] <= math.log(16 * 16) + 1e-6
    assert g.training  # mode restored; eval mode meant no BatchNorm statistics were updated
    assert all(torch.equal(v, g.state_dict()[k]) for k, v in stats.items())


def test_attention_command_writes_sheets_and_a_weights_only_maps_file(pooled_run, tmp_path, capsys):
    assert cli.main(["attention", str(pooled_run), "--out", str(tmp_path), "--n", "3", "--points", "5",
                     "--classes", "2,7", "--seed", "4"]) == 0
    data = torch.load(tmp_path / "maps.pt", weights_only=True)
    assert data["labels"].tolist() == [2, 2, 7]
    assert set(data["maps"]) == {"blocks.1", "blocks.3"} and data["net"] == "G"
    for name, maps in data["maps"].items():
        h, w = data["map_size"][name]
        assert maps.shape == (3, 5, h // 2, w // 2)  # the pooled key grid, as stored
        torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(3, 5))
        assert data["points"][name].shape == (5, 2)
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.format == "PNG" and im.width >= 6 * tile_size(32)
    assert "attention/blocks.3/entropy" in capsys.readouterr().out


def test_attention_of_d_on_the_runs_real_images(pooled_run, tmp_path):
    assert cli.main(["attention", str(pooled_run), "--out", str(tmp_path), "--net", "D", "--data",
                     "--n", "2", "--at", "0.5,0.5;0.1,0.9"]) == 0
    data = torch.load(tmp_path / "maps.pt", weights_only=True)
    assert data["net"] == "D" and list(data["maps"]) == ["blocks.1"]  # D's 16x16 layer
    assert data["points"]["blocks.1"].tolist() == [[8, 8], [1, 14]]
    assert data["labels"].shape == (2,) and ((data["labels"] >= 0) & (data["labels"] < 10)).all()
    assert (tmp_path / "blocks.1.png").is_file()


@pytest.mark.parametrize("args,message", [
    (["--points", "0"], "--points 0"),
    (["--points", "65"], "65 query points per layer (--points, train.attention_points): must be in 1..64"),
    (["--n", "0"], "--n 0"),
    (["--classes", "3,10"], "--classes '3,10'"),
    (["--net", "D"], "add --data"),
    (["--net", "D", "--data", "/nonexistent/x-{0..3}.tar"], "none of its 4 shards exists"),
    (["--data"], "--data is for --net D"),
    (["--at", "0.5"], "--at '0.5'"),
    (["--at", "0.5,1.0"], "--at '0.5,1.0'"),
])
def test_bad_options_are_refused_by_name(pooled_run, tmp_path, args, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["attention", str(pooled_run), "--out", str(tmp_path / "o"), *args])
    assert message in str(e.value)
    assert not (tmp_path / "o" / "maps.pt").exists()


def test_missing_checkpoint_is_named(tmp_path, capsys):
    assert cli.main(["attention", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "nope does not exist" in capsys.readouterr().err


def test_attention_command_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["attention", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: sagan-dist attention" in out and "--points" in out


@pytest.mark.slow
def test_attention_of_d_from_a_deepspeed_snapshot(tmp_path):
    """DeepSpeed keeps D's module weights in its model-states file; they are read weights-only."""
    run_dir = tmp_path / "ds"
    res = subprocess.run([sys.executable, "-m", "sagan_dist.cli", "train", "demo", "engine=deepspeed", *TINY,
                          "train.steps=1", f"train.run_dir={run_dir}"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert cli.main(["attention", str(run_dir), "--out", str(tmp_path / "o"), "--net", "D", "--data",
                     "--n", "2", "--points", "2"]) == 0
    maps = torch.load(tmp_path / "o" / "maps.pt", weights_only=True)["maps"]["blocks.1"]
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 2))


def test_a_model_without_attention_is_refused_with_the_keys_named():
    g = Generator(32, num_classes=10, z_dim=16, ch=8, attention=[]).eval()
    with pytest.raises(ValueError, match=r"model\.\*_attention=\[\]"):
        layer_maps(g, lambda: g(torch.randn(1, 16), torch.tensor([0])), points=2)


def test_sheet_marks_each_query_in_its_colour_and_lights_up_where_it_looks():
    """A one-hot map on a far key: that key's block is the colour map's brightest end blended over
    the image, the rest is dark; each query's mark sits at its pixel in its own colour."""
    from sagan_dist.attention_sheet import ALPHA_MAX, INFERNO, PAD, POINT_COLOURS, render_sheet, tile_size

    image = torch.full((1, 3, 32, 32), 100, dtype=torch.uint8)
    maps = torch.zeros(1, 2, 8, 8)
    maps[0, 0, 6, 1] = 1  # query 0 at (1, 1) looks at the key (6, 1)
    maps[0, 1] = 1 / 64  # query 1 looks everywhere alike
    points = torch.tensor([[1, 1], [4, 6]])
    sheet = render_sheet(image, maps, points, (8, 8), "t")
    size, top = tile_size(32), 14 + 3  # header, colour bar
    cell = size // 8
    pixel = lambda tile, r, c: sheet.getpixel((PAD + tile * (size + PAD) + int((c + 0.5) * cell),  # noqa: E731
                                               top + int((r + 0.5) * cell)))
    assert pixel(0, 1, 1) == POINT_COLOURS[0] and pixel(0, 4, 6) == POINT_COLOURS[1]
    bright = tuple(round((1 - ALPHA_MAX) * 100 + ALPHA_MAX * float(v)) for v in INFERNO[-1])
    assert pixel(1, 6, 1) == bright
    assert sum(pixel(1, 3, 5)) < sum(bright) / 3  # a key with no weight stays dark
    assert pixel(1, 1, 1) == POINT_COLOURS[0]  # the query is marked on its map too
    assert pixel(2, 0, 0) == bright  # a flat map is its own maximum everywhere (its corner says 1.0x)
