"""Compute settings (sagan_dist/acceleration.py): auto resolution, state-dict keys, and compiled or
channels_last steps that agree with the plain eager step.

Tolerances. Neither lever changes the maths, only the order of fp32 operations: channels_last
changes the layout the oneDNN convolutions read and write (and so their summation order), and
inductor fuses elementwise ops and reorders reductions (BatchNorm statistics, spectral norm's dot
products). Each op then differs by a few ulps, but a batch-4 BatchNorm divides by small per-channel
deviations and amplifies them: on the tiny nets below, two steps of either lever differ from eager
by up to ~1.2e-3 of a gradient tensor's largest entry (measured: G's last conv2 weight, second
step). Gradients, losses and BatchNorm statistics are therefore compared at 5e-3 of each tensor's
scale, with an absolute floor of 1e-6 for gradients that are pure rounding noise (conv biases in
front of BatchNorm have a true gradient of 0). That still catches a real error: a repeated
BatchNorm update moves the running statistics by a whole momentum step (10% of the way to the
batch statistics), and a skipped or repeated power iteration changes sigma, hence every gradient
of that layer, by far more. Parameters are not compared entry by entry: Adam's first update is
lr x sign(gradient), which moves the conv biases in front of BatchNorm by +-lr at random (their
gradient is noise) without changing anything downstream (BatchNorm removes a per-channel
constant). The second step's losses and gradients, computed at the updated weights, show that the
Adam steps agree where it matters; BatchNorm batch counters must be equal (each lever must advance
them exactly as often as eager mode).
"""
import copy

import pytest
import torch
import torch._dynamo
from omegaconf import OmegaConf

from sagan_dist.acceleration import (compile_model, configure_backends, prepare_models,
                                     resolve_auto, to_channels_last)
from sagan_dist.activation_checkpointing import apply_activation_checkpointing
from sagan_dist.models.sagan import Discriminator, Generator

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
RTOL = 5e-3  # of each tensor's largest entry; see the module docstring


def _nets(checkpoint: bool = True):
    torch.manual_seed(0)
    g = Generator(32, 10, 16, 16, attention=[16], init="normal")
    d = Discriminator(32, 10, 16, attention=[16], init="normal")
    if checkpoint:  # the recompute path must survive the levers too
        apply_activation_checkpointing(g, 16, True)
        apply_activation_checkpointing(d, 16, True)
    return g, d


def _step(g, d, opt_g, opt_d, batch):
    """A hinge D step then a G step, as the trainer runs them; returns the losses."""
    x, z, y = batch
    g.train(), d.train()
    opt_d.zero_grad()
    with torch.no_grad():
        fake = g(z, y)
    logits = d(torch.cat([x, fake]), torch.cat([y, y]))
    loss_d = torch.relu(1 - logits[:4]).mean() + torch.relu(1 + logits[4:]).mean()
    loss_d.backward()
    grads_d = [p.grad.clone() for p in d.parameters()]
    opt_d.step()
    opt_g.zero_grad()
    d.requires_grad_(False)
    loss_g = -d(g(z, y), y).mean()
    loss_g.backward()
    d.requires_grad_(True)
    grads_g = [p.grad.clone() for p in g.parameters()]
    opt_g.step()
    return torch.stack([loss_d.detach(), loss_g.detach()]), grads_d + grads_g


def _batch():
    gen = torch.Generator().manual_seed(1)
    return (torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1, torch.randn(4, 16, generator=gen),
            torch.tensor([0, 3, 5, 9]))


def _adam(net):
    return torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.0, 0.9))


def _assert_close(a, b, rtol, atol=1e-6, what=""):
    """Agreement relative to the tensor's own scale (its largest entry), plus an absolute floor
    for gradients that are rounding noise (conv biases in front of BatchNorm have a true gradient
    of 0)."""
    err = (a.float() - b.float()).abs().max()
    assert err <= rtol * a.abs().max() + atol, (what, float(err), float(a.abs().max()))


def _assert_same_buffers(a, b, rtol):
    for (n, p), (_, q) in zip(a.named_buffers(), b.named_buffers()):
        if n.endswith("num_batches_tracked"):
            assert torch.equal(p, q), n  # BatchNorm advanced exactly as often
        else:
            _assert_close(p, q, rtol, 1e-5, n)


def test_auto_means_on_for_cuda_and_off_on_cpu():
    assert resolve_auto(None, CUDA) and not resolve_auto(None, CPU)
    assert resolve_auto(True, CPU) and not resolve_auto(False, CUDA)


def test_backends_untouched_on_cpu():
    before = torch.backends.cudnn.benchmark
    configure_backends(CPU)
    assert torch.backends.cudnn.benchmark == before


def test_state_dict_keys_and_module_identity_unchanged():
    g, d = _nets()
    keys = [list(n.state_dict()) for n in (g, d)]
    cfg = OmegaConf.create({"model": {"channels_last": True}, "train": {"compile": True}})
    g2, d2 = prepare_models(g, d, cfg, CPU)
    assert g2 is g and d2 is d  # in place: engine.raw, the EMA copy and hooks keep working
    assert [list(n.state_dict()) for n in (g, d)] == keys
    conv = g.blocks[0].conv1.parametrizations.weight.original
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_step_matches_eager():
    g, d = _nets()
    g2, d2 = copy.deepcopy(g), copy.deepcopy(d)
    to_channels_last(g2), to_channels_last(d2)
    opts, opts2, batch = (_adam(g), _adam(d)), (_adam(g2), _adam(d2)), _batch()
    for i in range(2):
        loss, grads = _step(g, d, *opts, batch)
        loss2, grads2 = _step(g2, d2, *opts2, batch)
        assert torch.allclose(loss, loss2, rtol=RTOL)
        for j, (a, b) in enumerate(zip(grads, grads2)):
            _assert_close(a, b, RTOL, what=(i, j))
    _assert_same_buffers(g, g2, RTOL)
    _assert_same_buffers(d, d2, RTOL)


@pytest.mark.slow  # inductor's C++ compilation: minutes on a loaded 2-core CPU
@pytest.mark.parametrize("checkpoint", [False, True])
def test_compiled_steps_match_eager(checkpoint):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g, d = _nets(checkpoint)
    gc, dc = copy.deepcopy(g), copy.deepcopy(d)
    compile_model(gc), compile_model(dc)
    opts, opts_c = (_adam(g), _adam(d)), (_adam(gc), _adam(dc))
    batch = _batch()
    for i in range(2):
        loss, grads = _step(g, d, *opts, batch)
        loss_c, grads_c = _step(gc, dc, *opts_c, batch)
        assert torch.allclose(loss, loss_c, rtol=RTOL), (i, loss, loss_c)
        for j, (a, b) in enumerate(zip(grads, grads_c)):
            _assert_close(a, b, RTOL, what=(i, j))
        if i == 0:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # G: under no_grad (D's step) and with grad; D: 2 x batch with grad, 1 x batch with frozen
    # parameters; no graph breaks, and the second step compiles nothing new. Checkpointed blocks
    # are inside the graphs too (they used to run eagerly: 14 graphs after one step, 20 after two).
    assert graphs == 4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert not torch._dynamo.utils.counters["graph_break"]
    _assert_same_buffers(g, gc, RTOL)
    _assert_same_buffers(d, dc, RTOL)


@pytest.mark.slow  # inductor's C++ compilation: minutes on a loaded 2-core CPU
def test_compiled_checkpointed_generator_at_the_256px_structure_matches_eager():
    """configs/imagenet256.yaml's G (attention at 64x64 with pooled keys; checkpoint_from=64 with
    residual blocks, so every block at >= 64x64 maps is recomputed in pieces) at width 2: compiled,
    the checkpointed pieces are inside one graph, and a G step's loss, gradients and buffers agree
    with eager (RTOL, see the module docstring); each BatchNorm advanced exactly once. A fixed
    random projection of the image stands in for D (the 32 px test above covers D's blocks)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    g = Generator(256, 10, 16, 2, attention=[64], pool=True, init="normal")
    wrapped = apply_activation_checkpointing(g, 64, True)
    modules = dict(g.named_modules())
    assert sorted(type(modules[n]).__name__ for n in wrapped) == ["GBlock"] * 3 + ["SelfAttention"], wrapped
    gc = compile_model(copy.deepcopy(g))
    gen = torch.Generator().manual_seed(1)
    z, y = torch.randn(4, 16, generator=gen), torch.tensor([0, 3, 5, 9])
    critic = torch.randn(4, 3, 256, 256, generator=gen)
    losses = []
    for net in (g, gc):
        net.train()
        loss = (net(z, y) * critic).mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=RTOL), losses
    for (n, p), (_, q) in zip(g.named_parameters(), gc.named_parameters()):
        _assert_close(p.grad, q.grad, RTOL, what=n)
    _assert_same_buffers(g, gc, RTOL)
    assert all(int(b) == 1 for n, b in gc.named_buffers() if n.endswith("num_batches_tracked"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
