"""Where fine-tuning's data comes from (a datalist, or the embedded cohort), its classes, the
nested training subsets a comparison uses, and the epoch order."""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from ..datasets import mix_seed

BTCV_OUT_CHANNELS = 14  # the config's default out_channels: BTCV's background + 13 organs


def config_for_classes(cfg: Any, json_path: str) -> tuple[Any, tuple[str, ...]]:
    """``(cfg, class names)`` for a labeled datalist: the classes (index 0 = background) come from
    its ``labels`` map when it has one (BTCV's 14 classes otherwise), and ``out_channels`` (UNETR's
    output channels, the loss, Dice) is set to their number.

    An ``out_channels`` set explicitly to another value than the datalist's number of classes is
    an error naming both; without a ``labels`` map ``cfg["out_channels"]`` is kept (classes beyond
    BTCV's 13 organs are called ``class k``).
    """
    from ..data import DatalistError, datalist_label_names
    from ..organs import class_names, organ_names

    labels = datalist_label_names(json_path)
    if labels is None:
        n = int(cfg["out_channels"])
        return cfg, ("background", *organ_names(n))
    names = class_names(labels)
    current = int(cfg["out_channels"])
    if current != len(names) and current != BTCV_OUT_CHANNELS:
        raise DatalistError(
            f"datalist {json_path}: its labels map has {len(names)} classes ({', '.join(names)}) but out_channels "
            f"is set to {current}; remove the out_channels override (the datalist decides) or fix the labels map"
        )
    return (cfg.replace(out_channels=len(names)) if current != len(names) else cfg), names


def default_train_sizes(n_available: int) -> list[int]:
    """Training-set sizes to compare on a datalist with ``n_available`` training volumes: the
    reference's 6 / 12 / 24 where they fit, and all of them (``[6, 12, 24]`` for 24; ``[6, 10]``
    for 10; ``[3]`` for 3)."""
    n = int(n_available)
    return [s for s in (6, 12, 24) if s < n] + [n]


def nested_datalist(json_path: str, data_root: str | None, n: int, folder: str) -> str:
    """A datalist of the first ``n`` training entries of ``json_path`` (same validation list and
    ``labels`` map, paths made absolute against ``data_root``), written to
    ``folder/datalist_n{n}.json``; returns its path. Subsets of one datalist are nested: the
    ``n = 6`` volumes are among the ``n = 12``. Raises ``DatalistError`` when the datalist holds
    fewer than ``n`` training entries."""
    from ..data import DatalistError, load_datalist, read_datalist_json
    from ..io import write_json

    content = read_datalist_json(json_path)
    train = load_datalist(json_path, data_root, "training", require_label=True)
    val = load_datalist(json_path, data_root, "validation", require_label=True)
    if not 1 <= int(n) <= len(train):
        raise DatalistError(
            f"datalist {json_path}: training-set size {n} asked for, but the datalist holds {len(train)} training "
            f"entries; choose train_sizes in 1..{len(train)}"
        )
    out = {k: v for k, v in content.items() if k not in ("training", "validation", "numTraining")}
    out.update({"subset_of": os.path.abspath(json_path), "training": train[: int(n)], "validation": val})
    path = os.path.join(folder, f"datalist_n{int(n)}.json")
    os.makedirs(folder, exist_ok=True)
    write_json(path, out, what="datalist")
    return path


def comparison_datalists(cfg: Mapping[str, Any], data_root: str | None, json_path: str | None,
                         json_template: str | None, train_sizes, folder: str) -> tuple[list[int], dict[int, str | None], bool]:
    """The training-set sizes of a comparison and the datalist of each: ``(sizes, {size: datalist},
    nested)``.

    - ``json_path`` (a labeled datalist of your own, no ``json_template``): size N trains on its
      first N training entries, written to ``folder/datalist_n{N}.json`` (``nested`` is True; the
      subsets hold absolute paths, so they take no ``data_root``); default sizes
      ``default_train_sizes`` of its training count;
    - ``data_root`` and ``json_template``: one datalist per size (default 6 / 12 / 24);
    - neither: the embedded cohort (``None`` per size, resolved by ``resolve_ft_data``; default
      ``cfg["synth_train_sizes"]``).

    Every size is checked and every subset written before any training starts."""
    if data_root and not (json_template or json_path):
        raise ValueError(f"data_root={data_root!r} is given but neither json_path (a labeled datalist, e.g. the "
                         "dataset.json of python -m ssl_utils.prepare) nor json_template (one datalist per size, e.g. "
                         "json_files/btcv/dataset_0_init_{n}.json)")
    nested = bool(json_path) and not json_template
    if train_sizes:
        sizes = [int(n) for n in train_sizes]
    elif nested:
        sizes = default_train_sizes(count_training(str(json_path), data_root))
    else:
        sizes = [int(n) for n in ((6, 12, 24) if json_template else cfg["synth_train_sizes"])]
    if not sizes:
        raise ValueError("train_sizes is empty; give at least one training-set size")
    datalists: dict[int, str | None] = {}
    for n in sizes:
        if nested:
            datalists[n] = nested_datalist(str(json_path), data_root, n, folder)
        else:
            datalists[n] = json_template.format(n=n) if json_template else None
    return sizes, datalists, nested


def count_training(json_path: str, data_root: str | None) -> int:
    """The number of training entries of a labeled datalist (structure only, no file opened)."""
    from ..data import load_datalist

    return len(load_datalist(json_path, data_root, "training", require_label=True))

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
