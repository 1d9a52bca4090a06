"""Where fine-tuning's data comes from (a datalist, or the embedded cohort) and the epoch order."""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from ..datasets import mix_seed

def resolve_ft_data(
    cfg: Mapping[str, Any],
    data_root: str | None,
    json_path: str | None,
    cohort_root: str = "data/synthetic",
    n_train: int | None = None,
) -> tuple[str, str]:
    """``(data_root, json_path)`` for fine-tuning.

    - ``data_root`` given: ``json_path`` is required (e.g. ``json_files/btcv/dataset_0_init_6.json``);
    - both empty: the embedded cohort (generated under ``cohort_root`` on first use, reused after),
      with the datalist of ``n_train`` training volumes (default: the largest of
      ``cfg["synth_train_sizes"]``);
    - only ``json_path``: its entries resolve against the JSON file's folder.
    """
    if data_root:
        if not json_path:
            raise ValueError(
                f"data_root={data_root!r} is given but json_path is empty; pass the datalist, "
                "e.g. json_files/btcv/dataset_0_init_6.json"
            )
        return str(data_root), str(json_path)
    if json_path:
        return os.path.dirname(os.path.abspath(str(json_path))), str(json_path)
    from ..synthetic import make_cohort_from_config

    sizes = [int(s) for s in cfg["synth_train_sizes"]]
    n = int(n_train) if n_train else max(sizes)
    info = make_cohort_from_config(cfg, cohort_root, progress=False)
    table = {int(k): v for k, v in info["btcv_json"].items()}
    if n not in table:
        raise ValueError(
            f"the embedded cohort has datalists for {sorted(table)} training volumes, not {n}; "
            "choose one of those or change synth_train_sizes"
        )
    return info["btcv_root"], table[n]


class EpochSampler(torch.utils.data.Sampler):
    """A shuffled order of ``n`` items that is a pure function of ``(seed, epoch)``, optionally
    starting ``start`` items in (to resume in the middle of an epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.start = int(n), int(seed), 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(mix_seed(self.seed, self.epoch, 0x5A4D))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(self.n - self.start, 0)
