"""Datasets: the deterministic stage cached once, the random stage seeded per item.

``SeededCacheDataset`` is MONAI's ``CacheDataset`` whose random transforms are re-seeded for
every item from ``(seed, epoch, index)``. Two consequences:

- validation views are fixed (same seed, same epoch every time), so the validation loss is
  comparable from epoch to epoch;
- training randomness is a pure function of the epoch, whatever the number of loader workers,
  so a run resumed after epoch k sees exactly the crops an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from monai.data import CacheDataset

from .transforms import finetune_transforms, pretrain_transforms


def plain_tensor(x: Any) -> Any:
    """A plain ``torch.Tensor`` view of a MONAI ``MetaTensor`` (no per-operation metadata tracking
    through the network: the loops do not need it, and on CPU it costs more than the small ops)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def mix_seed(*parts: int) -> int:
    """A 31-bit seed from several integers (stable across processes and Python versions)."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
    return int(ss.generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)


class SeededCacheDataset(CacheDataset):
    """``CacheDataset`` whose random stage is seeded per item from ``(seed, epoch, index)``."""

    def __init__(self, data: Sequence, transform, seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("progress", False)
        super().__init__(data=data, transform=transform, **kwargs)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index):
        # public Dataset API only: an integer index runs the random stage, seeded here first
        # (a slice or a sequence of indices returns a Subset, whose items come back through here)
        if isinstance(index, (int, np.integer)):
            self.transform.set_random_state(seed=mix_seed(self.seed, self.epoch, int(index) % len(self)))
        return super().__getitem__(index)


def pretrain_datasets(cfg: Mapping[str, Any], train_entries: Sequence[dict], val_entries: Sequence[dict],
                      cache_workers: int | None = None, progress: bool = True) -> tuple[SeededCacheDataset, SeededCacheDataset]:
    """Training and validation datasets for pre-training (validation views fixed by ``val_seed``)."""
    kw = dict(cache_rate=cfg["cache_rate"], num_workers=cache_workers, progress=progress)
    train = SeededCacheDataset(train_entries, pretrain_transforms(cfg), seed=cfg["seed"], **kw)
    return train, SeededCacheDataset(val_entries, pretrain_transforms(cfg), seed=cfg["val_seed"], **kw)


def finetune_datasets(cfg: Mapping[str, Any], train_entries: Sequence[dict], val_entries: Sequence[dict],
                      cache_workers: int | None = None, progress: bool = True) -> tuple[SeededCacheDataset, CacheDataset]:
    """Training (random crops, seeded per item) and validation (whole volumes) datasets."""
    kw = dict(cache_rate=cfg["cache_rate"], num_workers=cache_workers, progress=progress)
    train = SeededCacheDataset(train_entries, finetune_transforms(cfg, train=True), seed=cfg["seed"], **kw)
    return train, CacheDataset(val_entries, finetune_transforms(cfg, train=False), **kw)
