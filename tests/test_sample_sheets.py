"""`sagan-dist sample --interpolate z|class` and `--sheet`: interpolation endpoints are the direct
samples of the endpoint latents, class mixtures mix G's class embeddings and leave no hook behind,
sheets share z across rows, and the grids come out at the right size; bad options are named."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sagan_dist import cli
from sagan_dist.models.sagan import Generator, conditional_batchnorms
from sagan_dist.sample import (class_interpolation, class_mixture, class_sheet, generate, truncated_normal,
                               z_interpolation)

# The interpolation runs G on rows x steps images at once, the direct samples on a few: CPU conv
# and matmul kernels may block (and so sum) differently by batch size, so equal up to float32
# rounding of a few ulps through the net, not bitwise.
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def g() -> Generator:
    torch.manual_seed(0)
    return Generator(32, num_classes=10, z_dim=16, ch=8, attention=[16]).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sheets") / "run"
    res = subprocess.run([sys.executable, "-m", "sagan_dist.cli", "train", "demo", "model.g_channels=8",
                          "model.d_channels=8", "model.z_dim=16", "train.batch_size=8", "train.steps=1",
                          "tracking.enabled=false", f"train.run_dir={run_dir}"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir


def test_z_interpolation_ends_are_the_samples_of_its_endpoint_latents(g):
    rows, steps, classes = 3, 5, [1, 6]
    z, y = z_interpolation(g, rows, steps, classes, truncation=0.0, seed=11)
    images = generate(g, z, y).view(rows, steps, 3, 32, 32)
    gen = torch.Generator().manual_seed(11)  # documented: z_a, then z_b, are the seed's first draws
    za, zb = (truncated_normal((rows, 16), 0.0, gen, torch.device("cpu")) for _ in range(2))
    labels = torch.tensor([1, 6, 1])
    with torch.no_grad():
        torch.testing.assert_close(images[:, 0], g(za, labels), **TOL)
        torch.testing.assert_close(images[:, -1], g(zb, labels), **TOL)
    assert (images[:, 2] - images[:, 0]).abs().max() > 1e-3  # the middle is somewhere else
    assert y.view(rows, steps).unique(dim=1).flatten().tolist() == [1, 6, 1]  # one class per row


def test_class_interpolation_ends_are_the_samples_of_each_class(g):
    z, w = class_interpolation(g, rows=2, steps=4, a=3, b=8, truncation=0.5, seed=5)
    images = generate(g, z, w).view(2, 4, 3, 32, 32)
    z_rows = z.view(2, 4, 16)[:, 0]
    assert (z_rows.abs() <= 0.5).all() and torch.equal(z.view(2, 4, 16)[:, -1], z_rows)  # one z per row
    with torch.no_grad():
        torch.testing.assert_close(images[:, 0], g(z_rows, torch.tensor([3, 3])), **TOL)
        torch.testing.assert_close(images[:, -1], g(z_rows, torch.tensor([8, 8])), **TOL)
    assert (images[:, 1] - images[:, 0]).abs().max() > 1e-3


def test_class_mixture_mixes_the_embeddings_and_removes_its_hooks(g):
    t = torch.tensor([0.0, 0.25, 1.0])
    weights = torch.zeros(3, 10)
    weights[:, 2], weights[:, 7] = 1 - t, t
    bn = conditional_batchnorms(g)[0]
    with torch.no_grad():
        table = bn.gain.weight.double()  # the spectral-normed embedding
        with class_mixture(g, weights):
            mixed = bn.gain(torch.zeros(3, dtype=torch.long))  # the labels are ignored inside
        expected = (1 - t.double())[:, None] * table[2] + t.double()[:, None] * table[7]
        torch.testing.assert_close(mixed.double(), expected, atol=1e-6, rtol=1e-6)
        assert torch.equal(bn.gain(torch.tensor([2])), bn.gain.weight[2:3])  # hooks gone afterwards
    assert all(not e._forward_hooks for b in conditional_batchnorms(g) for e in (b.gain, b.bias))


def test_class_mixture_refuses_weights_of_the_wrong_shape(g):
    with pytest.raises(ValueError, match=r"\(batch, 10\)"):
        with class_mixture(g, torch.ones(2, 9) / 9):
            pass


def test_sheet_rows_share_their_z(g):
    z, y = class_sheet(g, [0, 4, 9], columns=5, truncation=0.0, seed=2)
    assert torch.equal(z.view(3, 5, 16)[0], z.view(3, 5, 16)[2])
    assert y.tolist() == [0] * 5 + [4] * 5 + [9] * 5


def _grid_size(rows: int, cols: int, resolution: int = 32) -> tuple[int, int]:
    return cols * (resolution + 2) + 2, rows * (resolution + 2) + 2  # make_grid: padding 2


@pytest.mark.parametrize("args,name,rows,cols", [
    (["--interpolate", "z", "--n", "3", "--steps", "6", "--classes", "2,5"], "interpolate-z.png", 3, 6),
    (["--interpolate", "class", "--from-class", "1", "--to-class", "7", "--n", "2"], "interpolate-class.png", 2, 8),
    (["--sheet", "--n", "4", "--classes", "0,3,9", "--truncation", "1.0"], "sheet.png", 3, 4),
    (["--sheet"], "sheet.png", 10, 8),
])
def test_grids_are_written_at_their_size(run_dir, tmp_path, args, name, rows, cols):
    assert cli.main(["sample", str(run_dir), "--out", str(tmp_path), *args]) == 0
    with Image.open(tmp_path / name) as im:
        assert im.format == "PNG" and im.size == _grid_size(rows, cols)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


@pytest.mark.parametrize("args,message", [
    (["--interpolate", "z", "--steps", "1"], "--steps 1"),
    (["--interpolate", "class", "--to-class", "3"], "needs --from-class"),
    (["--interpolate", "class", "--from-class", "0", "--to-class", "10"], "--to-class 10"),
    (["--interpolate", "class", "--from-class", "-1", "--to-class", "3"], "--from-class -1"),
    (["--interpolate", "z", "--from-class", "2"], "are for --interpolate class"),
    (["--interpolate", "class", "--from-class", "1", "--to-class", "2", "--classes", "3"], "--classes does not apply"),
    (["--sheet", "--classes", "1,12"], "--classes '1,12'"),
    (["--sheet", "--n", "0"], "--n 0"),
])
def test_bad_options_are_refused_by_name(run_dir, tmp_path, args, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", str(run_dir), "--out", str(tmp_path / "o"), *args])
    assert message in str(e.value)
    assert not (tmp_path / "o").exists()


def test_sheet_and_interpolate_are_exclusive(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", str(run_dir), "--out", str(tmp_path), "--sheet", "--interpolate", "z"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
