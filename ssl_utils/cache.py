"""Where the deterministic stage's output waits between epochs: in memory, or on disk.

A volume goes through the deterministic stage of its chain (load, resample, window, crop, pad)
once; every epoch then runs only the random stage on the result
(``ssl_utils.datasets.SeededCacheDataset`` holds one of these stores).

- ``MemoryStore``: the results in this process's memory (its whole shard, resampled, in float32).
- ``DiskStore``: MONAI's ``PersistentDataset``, one file per volume under ``cache_dir``. A
  process's memory no longer grows with the cohort, and a second run, a resumed run and every rank
  of a multi-node job reuse what the first run computed.

The key of a cached volume is its files' identity (absolute path, size, modification time) and
the settings the chain depends on (``ssl_utils.transforms.pretrain_cache_settings``): an edited
file or another spacing gives a new key, so a cache is never served stale, and a cache folder can
be shared by runs of any configuration. Only volumes whose content passed the checks are written.

What ``DiskStore`` changes in ``PersistentDataset._cachecheck`` (checked with MONAI 1.6.1):

- a write goes to a temporary file in ``cache_dir`` itself, renamed into place (atomic on that
  file system). MONAI writes in the system's temporary folder and moves the file, which is a copy
  when ``cache_dir`` is on another file system (a cluster's shared one): another rank, or a run
  killed meanwhile, could leave or read a half-written file;
- a cached file that cannot be read is recomputed and rewritten instead of raising;
- items are stored slim (``slim``): ``torch.load(weights_only=True)`` refuses the NumPy arrays of a
  NIfTI header kept in a MetaTensor's metadata, and MONAI then silently recomputes the item on
  every access.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from copy import deepcopy
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor, PersistentDataset
from monai.transforms import Compose


class CacheWriteError(OSError):
    """The disk cache cannot be written (full, read-only, gone): a problem of ``cache_dir``, not of
    the data."""


def slim(item: Mapping[str, Any]) -> dict[str, Any]:
    """``item`` with every MetaTensor reduced to its voxels (contiguous), affine and file name, and
    NumPy arrays as tensors: what ``torch.load(weights_only=True)`` reads back, and all that the
    random stage, the loops and the figures use."""
    out: dict[str, Any] = {}
    for key, value in item.items():
        if isinstance(value, MetaTensor):
            name = str(value.meta.get("filename_or_obj", ""))
            out[key] = MetaTensor(value.as_tensor().contiguous(), affine=value.affine, meta={"filename_or_obj": name})
        elif isinstance(value, np.ndarray):
            out[key] = torch.as_tensor(value)
        else:
            out[key] = value
    return out


class FileIdentityKey:
    """``PersistentDataset``'s ``hash_func``: the sha256 of an item's files' identity (absolute
    path, size, modification time in ns) and the chain's ``settings``."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = json.dumps(dict(settings), sort_keys=True)

    def __call__(self, item: Mapping[str, Any]) -> bytes:
        files = []
        for key in sorted(item):
            value = item[key]
            if isinstance(value, str) and os.path.isfile(value):
                st = os.stat(value)
                files.append([key, os.path.abspath(value), st.st_size, st.st_mtime_ns])
            else:
                files.append([key, repr(value)])
        return hashlib.sha256(json.dumps([files, self.settings]).encode()).hexdigest().encode()


class MemoryStore:
    """The deterministic outputs in memory: the first ``keep`` items are kept once filled, the
    others are recomputed whenever they are asked for. Items are handed out as copies (the random
    stage may write into what it is given)."""

    def __init__(self, data: Sequence[Mapping[str, Any]], transform: Compose, keep: int) -> None:
        self.data, self.transform, self.keep = data, transform, keep
        self.items: list[Any] = [None] * len(data)

    def __len__(self) -> int:
        return len(self.data)

    def _compute(self, i: int) -> dict[str, Any]:
        return slim(self.transform(dict(self.data[i]), threading=True))

    def fill(self, i: int) -> bool:
        """Compute item ``i`` (and keep it when it is one of the first ``keep``); False: not reused."""
        item = self._compute(i)
        if i < self.keep:
            self.items[i] = item
        return False

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        return deepcopy(item) if item is not None else self._compute(i)


class DiskStore(PersistentDataset):
    """MONAI's ``PersistentDataset`` over the deterministic stage, keyed by ``FileIdentityKey``,
    with the write made atomic on the cache's own file system (see the module's docstring).
    ``store[i]`` is item ``i``'s deterministic output, read from ``cache_dir`` or computed and
    written there."""

    def __init__(self, data: Sequence[Mapping[str, Any]], transform: Compose, cache_dir: str | os.PathLike,
                 settings: Mapping[str, Any]) -> None:
        super().__init__(data=data, transform=transform, cache_dir=cache_dir, hash_func=FileIdentityKey(settings))

    def path(self, item: Mapping[str, Any]) -> Path:
        """The cache file of ``item``."""
        return self.cache_dir / f"{self.hash_func(item).decode()}.pt"

    def fill(self, i: int) -> bool:
        """Make sure item ``i`` is cached; True when it already was (it is then not read)."""
        if self.path(self.data[i]).is_file():
            return True
        self._cachecheck(self.data[i])
        return False

    def _cachecheck(self, item_transformed):
        path = self.path(item_transformed)
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except Exception as exc:  # torn or foreign file: recomputed below
                warnings.warn(f"cached volume {path} cannot be read ({type(exc).__name__}); recomputing it")
        item = slim(self._pre_transform(deepcopy(item_transformed)))
        temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            torch.save(item, temporary)
            os.replace(temporary, path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise CacheWriteError(f"cannot write the disk cache {self.cache_dir}: {exc}") from exc
        return item
