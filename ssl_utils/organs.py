"""The label table of the abdominal cohorts: BTCV's 13 organ indices and the one name each goes by.

Every table, legend, datalist ``labels`` map and results file uses these names, so a Dice column
in ``results.json`` and a colour in a figure refer to the same organ by the same word. A datalist
with its own ``labels`` map (any label set, e.g. ``{"0": "background", "1": "lesion"}``) replaces
them: ``class_names`` reads either, and every table says "organ" only for BTCV's names.
"""

from __future__ import annotations

from typing import Mapping, Sequence

# BTCV label indices 1..13 (0 is background).
ORGANS: dict[int, str] = {
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "IVC",
    10: "portal/splenic veins",
    11: "pancreas",
    12: "right adrenal",
    13: "left adrenal",
}


def organ_names(num_classes: int = 14) -> list[str]:
    """Names of the foreground classes ``1..num_classes-1`` (BTCV names, ``class k`` beyond 13)."""
    return [ORGANS.get(k, f"class {k}") for k in range(1, num_classes)]


BTCV_CLASSES: tuple[str, ...] = ("background", *ORGANS.values())
"""BTCV's 14 classes, index 0 (background) to 13 (left adrenal)."""


def class_names(labels: Mapping[int, str] | None = None) -> tuple[str, ...]:
    """Every class name, index 0 (background) first: from a datalist's ``labels`` map
    (``{0: "background", 1: "lesion"}``, indices 0..K-1) or, without one, BTCV's 14 classes."""
    if not labels:
        return BTCV_CLASSES
    return tuple(str(labels[k]) for k in range(len(labels)))


def are_btcv_organs(names: Sequence[str]) -> bool:
    """Whether the foreground class names are (a prefix of) BTCV's organs."""
    return list(names) == list(ORGANS.values())[: len(names)]


def count_label(names: Sequence[str]) -> str:
    """"13 organs" for BTCV's foreground classes, "1 class" / "K classes" for any other label set."""
    n = len(names)
    if are_btcv_organs(names):
        return f"{n} organ{'s' if n != 1 else ''}"
    return f"{n} class{'es' if n != 1 else ''}"


def mean_label(names: Sequence[str]) -> str:
    """The row label of a mean over the foreground classes ``names``: "mean (13 organs)" for BTCV,
    "mean (1 class)" / "mean (K classes)" for any other label set."""
    return f"mean ({count_label(names)})"
