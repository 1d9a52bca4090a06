"""Losses: the contrastive (NT-Xent) loss in O(B^2) memory, and the reference's total SSL loss."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import gather_with_grad, rank, world_size


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float = 0.05,
    gather: bool = False,
) -> torch.Tensor:
    """NT-Xent contrastive loss between two views (SimCLR, Chen et al. 2020).

    Same value as ``monai.losses.ContrastiveLoss(temperature)(a, b)``, computed as
    normalise -> similarity matrix / temperature -> mask self-similarity -> cross-entropy on the
    logits. Memory is O(B^2) (MONAI's builds a ``[2B, 2B, D]`` tensor) and it is stable at any
    temperature (MONAI's exponentiates first and overflows at 0.005).

    Shape:
        a, b: ``[B, D]`` (or ``[B, ...]``, flattened), row ``i`` of ``a`` and of ``b`` are two views
        of the same sample. Returns a scalar, the mean over the ``2B`` anchors.

    With ``gather=True`` inside a process group, the negatives are the views of every rank (a
    differentiable all-gather); each rank's loss averages over its own anchors, so the mean over
    ranks (what DDP's gradient averaging optimises) equals the loss of one process on the
    global batch.

    Example::

        >>> a, b = torch.randn(4, 128), torch.randn(4, 128)
        >>> loss = contrastive_loss(a, b, temperature=0.05)
    """
    if a.shape != b.shape:
        raise ValueError(f"the two views must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 2:
        raise ValueError(f"expected [B, D] inputs, got shape {tuple(a.shape)}")
    batch = a.shape[0]
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    za = F.normalize(a.reshape(batch, -1).to(dtype), dim=1, eps=1e-8)
    zb = F.normalize(b.reshape(batch, -1).to(dtype), dim=1, eps=1e-8)
    if gather and world_size() > 1:
        r, w = rank(), world_size()
        ka, kb = gather_with_grad(za), gather_with_grad(zb)
    else:
        r, w = 0, 1
        ka, kb = za, zb
    anchors = torch.cat([za, zb], dim=0)  # [2B, D]
    keys = torch.cat([ka, kb], dim=0)  # [2BW, D]
    logits = anchors @ keys.T / temperature  # [2B, 2BW]
    n_global = batch * w
    local = torch.arange(batch, device=a.device) + r * batch  # this rank's rows in the global batch
    self_idx = torch.cat([local, local + n_global])
    pos_idx = torch.cat([local + n_global, local])
    rows = torch.arange(2 * batch, device=a.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_idx)


def ssl_loss(
    recon_1: torch.Tensor,
    recon_2: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 0.05,
    gather: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's pre-training loss: ``r + c * r``.

    ``r`` is the L1 distance between view 1's reconstruction and the clean crop; ``c`` the
    contrastive loss between the two views' flattened reconstructions. ``r + c * r = r (1 + c)``:
    the contrastive term is weighted by the reconstruction error, so it cannot dominate on its own
    (two reconstructions can agree perfectly and still be wrong), and its weight fades as the
    reconstructions become good; the gradient is ``(1 + c) grad r + r grad c``.

    Shape: ``recon_1``, ``recon_2``, ``target``: ``[B, 1, X, Y, Z]``. Returns (total, r, c), scalars.

    With ``gather=True`` inside a process group the contrastive negatives come from every rank, and
    ``total`` is this rank's share of the global-batch loss: its mean over ranks (value and
    gradient, as DDP averages them) is the loss of one process on all ranks' crops. ``r`` and ``c``
    stay this rank's own.
    """
    r = F.l1_loss(recon_1.float(), target.float())
    c = contrastive_loss(recon_1.flatten(1), recon_2.flatten(1), temperature=temperature, gather=gather)
    if gather and world_size() > 1:
        # One process on the global batch optimises R + C * R, with R and C the means of the ranks'
        # r and c. Each rank returns r + c * R + C * r - C * R (R, C detached): its mean over ranks
        # is R + C * R and so is its gradient, once DDP averages (a product of rank-local r and c,
        # r + c * r, would average to another objective).
        means = torch.stack([r.detach(), c.detach()])
        dist.all_reduce(means)
        r_all, c_all = means / world_size()
        return r + c * r_all + c_all * r - c_all * r_all, r, c
    return r + c * r, r, c
