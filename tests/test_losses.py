import pytest
import torch
from monai.losses import ContrastiveLoss

from ssl_utils import contrastive_loss


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_contrastive_matches_monai(batch, temperature):
    g = torch.Generator().manual_seed(batch * 100 + int(temperature * 100))
    a = torch.randn(batch, 257, dtype=torch.float64, generator=g)
    b = torch.randn(batch, 257, dtype=torch.float64, generator=g)
    ref = ContrastiveLoss(temperature=temperature)(a, b)
    ours = contrastive_loss(a, b, temperature)
    assert abs(ref.item() - ours.item()) < 1e-6
