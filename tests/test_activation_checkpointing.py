"""Checkpointed and plain forward/backward agree: gradients, BN running stats, spectral-norm state.

Tolerance: 1e-5 relative on gradients (float32 recomputation in a different op order); buffers
must be bit-identical, because the recomputation must not update them a second time.
"""
import copy

import torch

from sagan_dist.activation_checkpointing import apply_activation_checkpointing
from sagan_dist.models.layers import GBlock
from sagan_dist.models.sagan import Discriminator, Generator


def _run(g, d, z, y):
    g.train(), d.train()
    out = d(g(z, y), y).square().mean()
    out.backward()
    return out.detach()


def _pair(include_blocks):
    torch.manual_seed(0)
    g, d = Generator(32, 10, 16, 16, attention=[16, 32]), Discriminator(32, 10, 16, attention=[16])
    g2, d2 = copy.deepcopy(g), copy.deepcopy(d)
    wrapped = (apply_activation_checkpointing(g2, 16, include_blocks)
               + apply_activation_checkpointing(d2, 16, include_blocks))
    return (g, d), (g2, d2), wrapped


def _compare(include_blocks):
    (g, d), (g2, d2), wrapped = _pair(include_blocks)
    assert wrapped
    z, y = torch.randn(4, 16), torch.tensor([0, 1, 2, 3])
    for _ in range(2):  # twice: the second step starts from buffers the first one updated
        for m in (g, d, g2, d2):
            m.zero_grad()
        assert torch.allclose(_run(g, d, z, y), _run(g2, d2, z, y), rtol=1e-6)
        for (n, p), (_, p2) in zip(list(g.named_parameters()) + list(d.named_parameters()),
                                   list(g2.named_parameters()) + list(d2.named_parameters())):
            assert torch.allclose(p.grad, p2.grad, rtol=1e-5, atol=1e-7), n
        for (n, b), (_, b2) in zip(list(g.named_buffers()) + list(d.named_buffers()),
                                   list(g2.named_buffers()) + list(d2.named_buffers())):
            assert torch.equal(b, b2), n  # BN running stats, num_batches_tracked, SN u/v
    return wrapped


def test_attention_checkpointing_matches_plain():
    wrapped = _compare(include_blocks=False)
    assert all("blocks" in name for name in wrapped) and len(wrapped) == 3


def test_residual_block_checkpointing_matches_plain():
    wrapped = _compare(include_blocks=True)
    assert len(wrapped) > 3


def test_state_dict_keys_unchanged_by_checkpointing():
    (g, _), (g2, _), _ = _pair(True)
    assert list(g.state_dict()) == list(g2.state_dict())


def test_checkpointing_recomputes_in_backward():
    # Evidence that the wrapped forward really is recomputed: count calls of one attention block.
    (_, _), (g2, d2), _ = _pair(False)
    att = [m for m in g2.modules() if type(m).__name__ == "SelfAttention"][0]
    calls = []
    att.query.register_forward_hook(lambda *a: calls.append(1))
    _run(g2, d2, torch.randn(2, 16), torch.tensor([0, 1]))
    assert len(calls) == 2


def _gblock_pair():
    torch.manual_seed(0)
    plain = GBlock(16, 8, num_classes=10, resolution=16, init="normal").train()
    pieces = copy.deepcopy(plain)
    apply_activation_checkpointing(pieces, 16, include_residual_blocks=True)
    return plain, pieces


def test_generator_block_in_pieces_matches_plain_block():
    # Same process, same kernels, same op order: only the recomputation differs, so results and
    # gradients agree to float32 rounding (1e-6 relative), and buffers bit for bit.
    plain, pieces = _gblock_pair()
    x, y = torch.randn(4, 16, 8, 8), torch.tensor([0, 3, 5, 9])
    grads = []
    for block in (plain, pieces):
        xi = x.clone().requires_grad_()
        out = block(xi, y)
        out.square().mean().backward()
        grads.append((out.detach(), xi.grad, {n: p.grad for n, p in block.named_parameters()}))
    (out, gx, gp), (out2, gx2, gp2) = grads
    assert torch.allclose(out, out2, rtol=1e-6, atol=1e-7)
    assert torch.allclose(gx, gx2, rtol=1e-6, atol=1e-8)
    for n in gp:
        assert torch.allclose(gp[n], gp2[n], rtol=1e-5, atol=1e-7), n
    for (n, b), (_, b2) in zip(plain.named_buffers(), pieces.named_buffers()):
        assert torch.equal(b, b2), n


def test_generator_block_pieces_are_each_recomputed_once_and_bn_advances_once():
    _, pieces = _gblock_pair()
    calls = {name: 0 for name in ("conv1", "conv2", "shortcut")}
    for name in calls:
        # Pre-hooks: checkpoint stops a recomputation as soon as the last saved tensor is back,
        # before the last module of a piece returns, so its forward hook would not fire.
        getattr(pieces, name).register_forward_pre_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    before = pieces.bn1.bn.running_mean.clone()
    pieces(torch.randn(2, 16, 8, 8), torch.tensor([1, 2])).sum().backward()
    assert calls == {"conv1": 2, "conv2": 2, "shortcut": 2}  # forward + one recomputation each
    for bn in (pieces.bn1.bn, pieces.bn2.bn):
        assert int(bn.num_batches_tracked) == 1
    # momentum 0.1, one update: running = 0.9 * 0 + 0.1 * batch mean, not a second step on top.
    assert not torch.equal(before, pieces.bn1.bn.running_mean)


def test_eval_and_no_grad_calls_are_not_checkpointed():
    _, pieces = _gblock_pair()
    calls = []
    pieces.conv1.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        pieces(torch.randn(2, 16, 8, 8), torch.tensor([1, 2]))
    pieces.eval()
    pieces(torch.randn(2, 16, 8, 8), torch.tensor([1, 2])).sum().backward()
    assert len(calls) == 2  # one call each, no recomputation
