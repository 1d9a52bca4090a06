"""The label table of the abdominal cohorts: BTCV's 13 organ indices and the one name each goes by.

Every table, legend, datalist ``labels`` map and results file uses these names, so a Dice column
in ``results.json`` and a colour in a figure refer to the same organ by the same word.
"""

from __future__ import annotations

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
