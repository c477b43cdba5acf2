"""SelfAttention: the paper's function, key-axis softmax, gamma=0 identity, the fused kernel.

The reference is written independently of the layer, in float64 with einsum, from the formula
``o_i = sum_j softmax_j(f(x_i) . g(x_j)) h(x_j)`` (no 1/sqrt(d) scale) and ``y = x + gamma out(o)``,
using the module's own effective (spectral-normed) weights in eval mode, where they are fixed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from sagan_dist.models.attention import SelfAttention, _query_chunks

REPO_ROOT = Path(__file__).resolve().parents[1]
FUSED_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH_OP = "aten::_scaled_dot_product_attention_math"
CHANNELS = 16
MAPS = [(6, 10), (8, 8)]  # non-square catches an h/w mix-up in the token reshapes


# ------------------------------------------------------------------------------------ helpers
def make_layer(pool: bool, gamma: float = 0.7, seed: int = 0) -> SelfAttention:
    """An eval-mode layer (spectral norm then leaves its weights fixed) with non-zero biases."""
    torch.manual_seed(seed)
    layer = SelfAttention(CHANNELS, pool=pool).eval()
    with torch.no_grad():
        layer.gamma.fill_(gamma)
        for conv in (layer.query, layer.key, layer.value, layer.out):
            conv.bias.normal_(0.0, 0.3)  # the layer zero-inits them; exercise them in the check
    return layer


def conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 conv in float64 from the module's effective (spectral-normed) weight."""
    w = conv.weight.detach().double()[:, :, 0, 0]
    return torch.einsum("oc,bchw->bohw", w, x) + conv.bias.detach().double()[None, :, None, None]


def projections(layer: SelfAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """f(x), g(x), h(x) as (B, C', positions) in float64; keys/values max-pooled if pooling."""
    f, g, h = (conv1x1(x, c) for c in (layer.query, layer.key, layer.value))
    if layer.pool:
        g, h = F.max_pool2d(g, 2), F.max_pool2d(h, 2)
    return f.flatten(2), g.flatten(2), h.flatten(2)


def reference_o(layer: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The paper's o: for each query i, softmax over keys j of f(x_i).g(x_j), times h(x_j)."""
    f, g, h = projections(layer, x.double())
    s = torch.einsum("bci,bcj->bij", f, g)  # s[i, j] = f(x_i) . g(x_j), unscaled
    beta = torch.softmax(s, dim=2)  # over keys j
    o = torch.einsum("bij,bcj->bci", beta, h)
    return o.reshape(x.shape[0], -1, *x.shape[2:])


def wrong_axis_o(layer: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The copied bug ``bmm(h, softmax(f^T g, dim=-1))``: normalised over the output positions."""
    f, g, h = projections(layer, x.double())
    o = torch.bmm(h, torch.softmax(torch.bmm(f.transpose(1, 2), g), dim=-1))
    return o.reshape(x.shape[0], -1, *x.shape[2:])


def reference_y(layer: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    return x.double() + layer.gamma.item() * conv1x1(reference_o(layer, x), layer.out)


def op_names(step: Callable[[], object]) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {e.name for e in prof.events()}


# --------------------------------------------------------------------------------- the function
@pytest.mark.parametrize("pool", [False, True], ids=["full", "pooled"])
@pytest.mark.parametrize("hw", MAPS, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_matches_float64_reference_of_paper_formula(pool: bool, hw: tuple[int, int]) -> None:
    layer = make_layer(pool)
    x = 2.0 * torch.randn(2, CHANNELS, *hw)  # scaled up: peaky softmax, axis errors show
    with torch.no_grad():
        o, y = layer.attend(x), layer(x)
    torch.testing.assert_close(o.double(), reference_o(layer, x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.double(), reference_y(layer, x), rtol=1e-4, atol=1e-5)


def test_reference_check_rejects_the_wrong_softmax_axis() -> None:
    """The tolerance above is far tighter than the gap to the wrong-axis formula: it can fail."""
    layer = make_layer(pool=False)
    x = 2.0 * torch.randn(2, CHANNELS, 6, 10)
    with torch.no_grad():
        o = layer.attend(x).double()
    gap = (o - wrong_axis_o(layer, x)).abs().max().item()
    assert gap > 1e-2, f"wrong-axis formula only {gap:.2e} away: the reference test is blind"
    torch.testing.assert_close(o, reference_o(layer, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool", [False, True], ids=["full", "pooled"])
def test_weights_over_keys_sum_to_one(pool: bool) -> None:
    """With h(x) = c everywhere, o_i = c * sum_j beta_ij: that is c iff every row sums to 1.

    h is made constant by zeroing the value conv's weight (spectral norm maps 0 to 0: sigma is
    clamped away from 0) and giving it a random bias c.
    """
    layer = make_layer(pool)
    with torch.no_grad():
        layer.value.parametrizations.weight.original.zero_()
    c = layer.value.bias.detach()[None, :, None, None]
    x = 2.0 * torch.randn(2, CHANNELS, 6, 10)
    with torch.no_grad():
        o = layer.attend(x)
    torch.testing.assert_close(o, c.expand_as(o), rtol=1e-5, atol=1e-5)
    if not pool:  # the same check catches the wrong axis (its weights sum to 1 over outputs)
        wrong = wrong_axis_o(layer, x)
        assert (wrong - c.double()).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pool", [False, True], ids=["full", "pooled"])
def test_gamma_zero_is_exact_identity(pool: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = SelfAttention(CHANNELS, pool=pool).to(dtype)  # gamma starts at 0
    x = torch.randn(2, CHANNELS, 6, 10, dtype=dtype)
    assert layer.gamma.item() == 0.0
    assert torch.equal(layer(x), x)


# ------------------------------------------------------------------------------- fused kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pool", [False, True], ids=["full", "pooled"])
def test_fused_flash_kernel_runs_forward_and_backward(pool: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = SelfAttention(64, pool=pool).to(dtype).train()
    x = torch.randn(1, 64, 16, 16, dtype=dtype, requires_grad=True)
    names = op_names(lambda: layer(x).sum().backward())
    assert FUSED_OP in names and FUSED_OP + "_backward" in names, sorted(names)
    assert MATH_OP not in names


@pytest.mark.parametrize("pool", [False, True], ids=["full", "pooled"])
def test_query_chunks_on_several_threads_keep_result_and_fused_kernel(pool: bool) -> None:
    """At batch 1 on a multi-thread CPU the queries are split over SDPA's heads dimension."""
    layer = make_layer(pool)
    x = torch.randn(1, layer.query.in_channels, 8, 12, requires_grad=True)
    threads = torch.get_num_threads()  # 1 under this suite's conftest: chunking is off
    assert _query_chunks(1, 96, torch.device("cpu")) == 1
    reference = layer(x)
    reference.sum().backward()
    reference_grad, x.grad = x.grad.clone(), None
    torch.set_num_threads(4)
    try:
        assert _query_chunks(1, 96, torch.device("cpu")) == 4
        out = layer(x)
        names = op_names(lambda: layer(x).sum().backward())
        x.grad = None
        out.sum().backward()
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(out, reference, atol=1e-6)
    assert torch.allclose(x.grad, reference_grad, atol=1e-5)
    assert FUSED_OP in names and MATH_OP not in names


def test_profiler_check_would_see_the_math_fallback() -> None:
    """Control for the test above: unequal q/v head sizes (no padding) do show the math op."""
    q = k = torch.randn(1, 1, 64, 8)
    v = torch.randn(1, 1, 64, 32)
    names = op_names(lambda: F.scaled_dot_product_attention(q, k, v, scale=1.0))
    assert MATH_OP in names and FUSED_OP not in names


# ------------------------------------------------------------------------------------- memory
MEMORY_SIZE = 128  # N = 16384: one N x N fp32 matrix is 1 GiB
MEMORY_CHILD = f"""
import json, torch
from benchmarks.attention import measure_memory
from benchmarks.common import peak_rss_growth, start_peak_rss
ours = measure_memory("ours", False, {MEMORY_SIZE})["peak_growth"]
baseline = start_peak_rss()
matrix = torch.ones({MEMORY_SIZE ** 2}, {MEMORY_SIZE ** 2})  # control: one N x N, all pages touched
print(json.dumps({{"ours": ours, "control": peak_rss_growth(baseline)}}))
"""


def test_forward_backward_never_holds_an_n_by_n_matrix() -> None:
    """Peak RSS growth of forward+backward at 128x128, in a fresh process, vs a 1 GiB N x N.

    The control allocation in the same child shows the method does see an N x N matrix, so a
    regression to the math path (which keeps several of them) would fail here, not pass silently.
    Measured: ours ~55 MiB; the bound is a quarter of one matrix, ~5x headroom against noise.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    matrix_bytes = 4 * MEMORY_SIZE ** 4
    assert result["control"] >= 0.9 * matrix_bytes, result
    assert result["ours"] < matrix_bytes / 4, (
        f"fwd+bwd grew the peak RSS by {result['ours'] / 2 ** 20:.0f} MiB; "
        f"one N x N fp32 matrix is {matrix_bytes / 2 ** 20:.0f} MiB")
