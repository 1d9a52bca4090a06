import pytest
import torch
from monai.losses import ContrastiveLoss

from ssl_utils import contrastive_loss


# batch 8 at temperatures 0.05 and 0.5 (values and gradients): test_speedups.py
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_contrastive_matches_monai_on_small_batches(batch, temperature):
    g = torch.Generator().manual_seed(batch * 100 + int(temperature * 100))
    a = torch.randn(batch, 257, dtype=torch.float64, generator=g)
    b = torch.randn(batch, 257, dtype=torch.float64, generator=g)
    ref = ContrastiveLoss(temperature=temperature)(a, b)
    ours = contrastive_loss(a, b, temperature)
    assert abs(ref.item() - ours.item()) < 1e-6


def test_contrastive_finite_at_small_temperature_where_monai_overflows():
    """The reference's README temperature, 0.005: MONAI's loss exponentiates cosine similarities
    / 0.005 (e^200) and overflows in float32; ours works on logits and stays finite and exact."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 300, generator=g)
    a = base + 0.1 * torch.randn(4, 300, generator=g)  # similar crops: a hard, informative case
    b = a + 0.02 * torch.randn(4, 300, generator=g)  # the second view of each crop
    monai32 = ContrastiveLoss(temperature=0.005)(a, b)
    assert not torch.isfinite(monai32)
    reference = ContrastiveLoss(temperature=0.005)(a.double(), b.double())  # float64 does not overflow
    assert torch.isfinite(reference) and reference.item() > 0.01
    a.requires_grad_(True)
    ours = contrastive_loss(a, b, temperature=0.005)
    assert ours.dtype == torch.float32 and torch.isfinite(ours)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-4)
    ours.backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
