"""Hinge and non-saturating losses on known logits."""
import math

import pytest
import torch

from sagan_dist.losses import d_hinge, d_nonsat, g_hinge, g_nonsat, get_losses


def test_hinge_on_known_inputs():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert d_hinge(real, fake).item() == pytest.approx(5 / 6 + 1)
    assert g_hinge(fake).item() == pytest.approx(1 / 3)


def test_nonsaturating_on_known_inputs():
    real, fake = torch.tensor([0.0]), torch.tensor([0.0])
    assert d_nonsat(real, fake).item() == pytest.approx(2 * math.log(2))
    assert g_nonsat(torch.tensor([math.log(3.0)])).item() == pytest.approx(math.log(4 / 3))


def test_losses_by_name_and_unknown_name():
    assert get_losses("hinge") == (d_hinge, g_hinge)
    with pytest.raises(ValueError, match="hinge | nonsat"):
        get_losses("wasserstein")
