"""Generator/Discriminator shapes and sizes, spectral norm everywhere, fp32 power iteration."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sagan_dist.models.attention import SelfAttention
from sagan_dist.models.layers import SpectralNorm, sigma_of, sn_conv
from sagan_dist.models.sagan import D_WIDTHS, G_WIDTHS, Discriminator, Generator, default_attention

NC, Z, CH = 10, 32, 16


def _attention_params(c):
    return 2 * (c * c // 8 + c // 8) + (c * c // 2 + c // 2) + (c // 2 * c + c) + 1


def _expected_g(res):
    w = [CH * m for m in G_WIDTHS[res]]
    n = Z * 16 * w[0] + 16 * w[0]
    size = 4
    for cin, cout in zip(w[:-1], w[1:]):
        size *= 2
        n += 2 * NC * cin + cin * cout * 9 + cout + 2 * NC * cout + cout * cout * 9 + cout + cin * cout + cout
        n += _attention_params(cout) if size in default_attention(res) else 0
    return n + 2 * w[-1] + w[-1] * 3 * 9 + 3


def _expected_d(res):
    w = [CH * m for m in D_WIDTHS[res]]
    n, cin, size, attended = 0, 3, res, False
    for i, cout in enumerate(w):
        down = i < len(w) - 1
        n += cin * cout * 9 + cout + cout * cout * 9 + cout + (cin * cout + cout if (cin != cout or down) else 0)
        size = size // 2 if down else size
        if size in default_attention(res) and not attended:
            n, attended = n + _attention_params(cout), True
        cin = cout
    return n + w[-1] + 1 + NC * w[-1]


@pytest.mark.parametrize("res", [32, 64, 128, 256])
def test_shapes_and_parameter_counts(res):
    g, d = Generator(res, NC, Z, CH), Discriminator(res, NC, CH)
    z, y = torch.randn(2, Z), torch.tensor([0, NC - 1])
    x = g(z, y)
    assert x.shape == (2, 3, res, res) and x.abs().max() <= 1
    assert d(x, y).shape == (2,)
    assert sum(p.numel() for p in g.parameters()) == _expected_g(res)
    assert sum(p.numel() for p in d.parameters()) == _expected_d(res)


@pytest.mark.parametrize("res", [32, 128, 256])
def test_default_attention_placement(res):
    g, d = Generator(res, NC, Z, CH), Discriminator(res, NC, CH)
    expected = {32: [16], 128: [32], 256: [64]}[res]
    for net in (g, d):
        assert [m.resolution for m in net.modules() if isinstance(m, SelfAttention)] == expected


def test_attention_can_be_disabled_and_placed():
    g = Generator(64, NC, Z, CH, attention=[])
    assert not any(isinstance(m, SelfAttention) for m in g.modules())
    d = Discriminator(64, NC, CH, attention=[16, 32])
    assert sorted(m.resolution for m in d.modules() if isinstance(m, SelfAttention)) == [16, 32]


def test_spectral_norm_on_every_conv_linear_and_embedding():
    for net in (Generator(64, NC, Z, CH), Discriminator(64, NC, CH)):
        layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
        assert layers
        for m in layers:
            assert parametrize.is_parametrized(m, "weight")
            assert isinstance(m.parametrizations.weight[0], SpectralNorm)


def test_trained_spectral_norm_converges_to_unit_sigma():
    conv = sn_conv(8, 16).train()
    for _ in range(30):
        conv(torch.randn(1, 8, 4, 4))
    assert sigma_of(conv) == pytest.approx(1.0, abs=1e-3)


def test_zero_weight_gives_finite_output_not_nan():
    conv = sn_conv(4, 4)
    with torch.no_grad():
        conv.parametrizations.weight.original.zero_()
    assert torch.isfinite(conv(torch.randn(1, 4, 4, 4))).all()


def test_power_iteration_runs_in_fp32_on_a_bf16_module():
    # DeepSpeed bf16 casts whole modules; u/v and sigma must still be computed in fp32.
    conv = sn_conv(8, 8).to(torch.bfloat16).train()
    out = conv(torch.randn(1, 8, 4, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_power_iteration_under_autocast():
    conv = sn_conv(8, 8).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(torch.randn(1, 8, 4, 4))
    assert torch.isfinite(out).all()
    assert conv.parametrizations.weight[0]._u.dtype == torch.float32


def test_eval_mode_does_not_advance_power_iteration():
    conv = sn_conv(8, 8).eval()
    u = conv.parametrizations.weight[0]._u.clone()
    conv(torch.randn(1, 8, 4, 4))
    assert torch.equal(u, conv.parametrizations.weight[0]._u)
