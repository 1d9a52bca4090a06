"""Datasets: the deterministic stage cached once, the random stage seeded per item.

``SeededCacheDataset`` caches the deterministic stage of a MONAI chain (in memory, or on disk:
``ssl_utils.cache``) and re-seeds the random stage for every item from ``(seed, epoch, index)``.
Two consequences:

- validation views are fixed (same seed, same epoch every time), so the validation loss is
  comparable from epoch to epoch;
- training randomness is a pure function of the epoch, whatever the number of loader workers or
  the cache, so a run resumed after epoch k sees exactly the crops an uninterrupted run would.

``pretrain_data`` builds pre-training's datasets on each rank so that every volume of the
datalist is read once, by one rank: headers checked before anything is read (split across
ranks), each rank's shard read once into its cache with the content checked on that read.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from monai.data import CacheDataset
from monai.transforms import Compose, RandomizableTrait, Transform
from torch.utils.data import Dataset, Subset

from .cache import CacheWriteError, DiskStore, MemoryStore
from .data import ContentError, DatalistError, check_datalist, describe_error
from .distributed import rank, run_on_all, shard, world_size
from .transforms import finetune_transforms, pretrain_cache_settings, pretrain_transforms


def plain_tensor(x: Any) -> Any:
    """A plain ``torch.Tensor`` view of a MONAI ``MetaTensor`` (no per-operation metadata tracking
    through the network: the loops do not need it, and on CPU it costs more than the small ops)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def mix_seed(*parts: int) -> int:
    """A 31-bit seed from several integers (stable across processes and Python versions)."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
    return int(ss.generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)


class SeededCacheDataset(Dataset):
    """A chain's deterministic stage cached once per item, its random stage seeded per item from
    ``(seed, epoch, index)``; the items are those MONAI's ``CacheDataset`` gives with that seeding.

    ``cache_dir``: cache on disk there (``ssl_utils.cache.DiskStore``; ``cache_settings``, what the
    deterministic stage depends on, is part of each file's key); otherwise in memory, the first
    ``cache_rate`` of the items (the others are recomputed when used). ``fill=True`` caches every
    item now, in ``num_workers`` threads (default: ``torch.get_num_threads()``), and raises one
    ``DatalistError`` listing every item that cannot be used; ``fill=False`` leaves that to
    ``fill()``, which returns the problems instead.
    """

    def __init__(self, data: Sequence, transform, seed: int = 0, cache_rate: float = 1.0, num_workers: int | None = None,
                 progress: bool = False, cache_dir: str | os.PathLike | None = None,
                 cache_settings: Mapping[str, Any] | None = None, fill: bool = True) -> None:
        self.data = list(data)
        self.transform = transform if isinstance(transform, Compose) else Compose(transform)
        self.first_random = self.transform.get_index_of_first(
            lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
        deterministic = Compose(self.transform.transforms[: self.first_random])
        self.store = (DiskStore(self.data, deterministic, cache_dir, cache_settings or {}) if cache_dir
                      else MemoryStore(self.data, deterministic, keep=int(len(self.data) * cache_rate)))
        self.indices = list(range(len(self.data)))
        self.seed, self.epoch = int(seed), 0
        if fill:
            problems, _ = self.fill(num_workers, progress)
            if problems:
                lines = "\n".join(f"  item {i}: " + "; ".join(f"{f} {self.data[i].get(f)}: {w}" for f, w in p)
                                  for i, p in sorted(problems.items()))
                raise DatalistError(f"{len(problems)} of {len(self.data)} items cannot be used:\n{lines}")

    def fill(self, num_workers: int | None = None, progress: bool = False,
             desc: str = "caching") -> tuple[dict[int, list[tuple[str, str]]], int]:
        """Cache every item's deterministic stage (each file read once); return ``(problems,
        reused)``. ``problems[i]``: ``(field, what is wrong)`` for each item that cannot be used
        (nothing is cached for it); ``reused``: items found already in the disk cache. A disk cache
        that cannot be written raises ``CacheWriteError``."""
        from tqdm.auto import tqdm

        def one(i: int) -> tuple[bool, list[tuple[str, str]] | None]:
            try:
                return self.store.fill(i), None
            except Exception as exc:  # MONAI's Compose wraps what a transform raised: look at the cause
                cause = exc
                while cause.__cause__ is not None and not isinstance(cause, (ContentError, CacheWriteError)):
                    cause = cause.__cause__
                if isinstance(cause, CacheWriteError):
                    raise cause from None
                if isinstance(cause, ContentError):
                    return False, cause.problems
                # another transform failing on this volume: named, not a stack trace
                return False, [(next(iter(self.data[i]), "image"), f"the deterministic transforms failed ({describe_error(exc)})")]

        problems: dict[int, list[tuple[str, str]]] = {}
        reused = 0
        with ThreadPoolExecutor(max(1, num_workers or torch.get_num_threads())) as pool:
            results = pool.map(one, range(len(self.data)))
            for i, (hit, found) in enumerate(tqdm(results, total=len(self.data), desc=desc, leave=False, disable=not progress)):
                reused += hit
                if found:
                    problems[i] = found
        return problems, reused

    def select(self, indices: Sequence[int]) -> None:
        """Serve these cached items, in this order (repeats allowed), as items ``0..len-1``."""
        self.indices = list(indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        # as MONAI's datasets: a slice or a sequence of indices returns a Subset
        if isinstance(index, slice):
            return Subset(self, range(*index.indices(len(self))))
        if isinstance(index, Sequence):
            return Subset(self, index)
        index = int(index) % len(self)
        item = self.store[self.indices[index]]
        if self.first_random is None:
            return item
        self.transform.set_random_state(seed=mix_seed(self.seed, self.epoch, index))
        return self.transform(item, start=self.first_random)


def _cache_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Where pre-training caches: ``cache_dir`` with ``cache="disk"``, else memory."""
    disk = cfg["cache"] == "disk"
    return {"cache_dir": cfg["cache_dir"] if disk else None, "cache_settings": pretrain_cache_settings(cfg)}


def pretrain_datasets(cfg: Mapping[str, Any], train_entries: Sequence[dict], val_entries: Sequence[dict],
                      cache_workers: int | None = None, progress: bool = True) -> tuple[SeededCacheDataset, SeededCacheDataset]:
    """Training and validation datasets for pre-training (validation views fixed by ``val_seed``),
    cached as ``cfg["cache"]`` says, each volume's content checked on the read that caches it."""
    kw = dict(cache_rate=cfg["cache_rate"], num_workers=cache_workers, progress=progress, **_cache_kwargs(cfg))
    train = SeededCacheDataset(train_entries, pretrain_transforms(cfg, checked=True), seed=cfg["seed"], **kw)
    return train, SeededCacheDataset(val_entries, pretrain_transforms(cfg, checked=True), seed=cfg["val_seed"], **kw)


class PretrainData(NamedTuple):
    train: SeededCacheDataset  # this rank's
    val: SeededCacheDataset
    n_train: int  # usable entries of the whole datalist
    n_val: int


def pretrain_data(cfg: Mapping[str, Any], json_path: str, data_root: str | None, skip_bad: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print) -> PretrainData:
    """This rank's pre-training datasets; every volume of the datalist is read once, by one rank.

    1. Headers: every entry's header is checked, each rank checking its share
       (``check_datalist(..., split_across_ranks=True)``); problems stop every rank with one
       ``DatalistError`` listing all of them (``skip_bad``: those entries are dropped and listed).
    2. Content: each rank reads its shard of each split once, through the deterministic stage into
       its cache (``cfg["cache"]``: memory, or disk under ``cfg["cache_dir"]``), checking the voxels
       on that read (``LoadCheckedd``); the problems of every rank are gathered and reported the same
       way, on every rank, before any training step. Volumes found in the disk cache are not read.
    3. With ``skip_bad``, a training volume dropped in step 2 is replaced on its rank by repeats of
       its other volumes, so every rank still runs the same number of steps.
    The cache fill runs in ``torch.get_num_threads()`` threads per rank.
    """
    t0 = time.perf_counter()
    checked = check_datalist(json_path, data_root, ("training", "validation"), window=(cfg["ssl_a_min"], cfg["ssl_a_max"]),
                             check_values=False, progress=progress, split_across_ranks=True)
    checked.report(skip_bad, log)
    header_s = time.perf_counter() - t0
    r, w = rank(), world_size()
    shards = {"training": shard(checked.usable("training"), r, w, cfg["seed"], pad=True),
              "validation": shard(checked.usable("validation"), r, w, cfg["seed"], pad=False)}
    seeds = {"training": cfg["seed"] if w == 1 else mix_seed(cfg["seed"], r),  # else item i of every shard would get the same crops
             "validation": cfg["val_seed"]}
    datasets: dict[str, SeededCacheDataset] = {}

    def fill_mine() -> tuple[dict[tuple[str, int], list[str]], int, int, float]:
        t = time.perf_counter()
        found, reused = {}, 0
        for key, items in shards.items():
            datasets[key] = SeededCacheDataset([e for _, e in items], pretrain_transforms(cfg, checked=True), seed=seeds[key],
                                               cache_rate=cfg["cache_rate"], fill=False, **_cache_kwargs(cfg))
            problems, hits = datasets[key].fill(None, progress, f"caching {key} ({len(items)} volumes)")
            reused += hits
            for j, p in problems.items():
                i = items[j][0]
                found[(key, i)] = [f"{f} {checked.shown(key, i, f)}: {what}" for f, what in p]
        return found, reused, sum(len(items) for items in shards.values()), time.perf_counter() - t

    per_rank = run_on_all(fill_mine)
    found = {where: p for rank_found, *_ in per_rank for where, p in rank_found.items()}
    checked.report(skip_bad, log, found)
    if found:  # skip_bad: drop them here, pad the training shards to one length again
        keep = {key: [j for j, (i, _) in enumerate(items) if (key, i) not in found] for key, items in shards.items()}
        datasets["validation"].select(keep["validation"])
        lengths = run_on_all(lambda: len(keep["training"]))
        if min(lengths) == 0:
            raise DatalistError(f"datalist {json_path}: with the unusable volumes skipped, rank {lengths.index(0)} has no "
                                "training volume left; fix or remove them, or run on fewer ranks")
        train = keep["training"]
        datasets["training"].select([train[k % len(train)] for k in range(max(lengths))])
    reused = sum(x[1] for x in per_rank)
    where = f"disk cache {cfg['cache_dir']}" if cfg["cache"] == "disk" else "memory"
    log(f"data ready: {len(checked.usable('training'))} training / {len(checked.usable('validation'))} validation volumes; "
        f"headers checked in {header_s:.1f} s on {w} rank(s); {sum(x[2] for x in per_rank) - reused} volume reads into "
        f"{where}" + (f", {reused} reused from it" if cfg["cache"] == "disk" else "")
        + f", {max(x[3] for x in per_rank):.1f} s (slowest rank)")
    return PretrainData(datasets["training"], datasets["validation"], len(checked.usable("training")),
                        len(checked.usable("validation")))


def finetune_datasets(cfg: Mapping[str, Any], train_entries: Sequence[dict], val_entries: Sequence[dict],
                      cache_workers: int | None = None, progress: bool = True) -> tuple[SeededCacheDataset, CacheDataset]:
    """Training (random crops, seeded per item) and validation (whole volumes) datasets."""
    kw = dict(cache_rate=cfg["cache_rate"], num_workers=cache_workers, progress=progress)
    train = SeededCacheDataset(train_entries, finetune_transforms(cfg, train=True), seed=cfg["seed"], **kw)
    return train, CacheDataset(val_entries, finetune_transforms(cfg, train=False), **kw)
