"""UNETR fine-tuning on labeled CT, its evaluation, and the random-init vs pre-trained comparison.

One module per job:

- ``inputs``: where the data comes from (a datalist or the embedded cohort), its classes (the
  datalist's ``labels`` map, BTCV's 13 organs without one), nested training subsets, the epoch order;
- ``metrics``: Dice per case and organ (the exclusion convention is written down there);
- ``inference``: sliding-window logits, label maps, validation Dice;
- ``loop``: ``finetune``, the training loop (one ``ssl_utils.engine.train_step`` per iteration);
- ``compare``: ``compare_init``, both arms paired by seed for every training-set size;
- ``reload``: ``load_finetune_run``, a finished run read back from its folder (no training);
- ``report``: the Markdown tables (the reference's table, per organ, paired differences).
"""

from ..organs import BTCV_CLASSES, ORGANS, class_names, organ_names
from .compare import CompareResult, compare_init, compare_run_dir, run_summary
from .inference import evaluate, predict_labels, predict_logits
from .inputs import EpochSampler, comparison_datalists, config_for_classes, default_train_sizes, nested_datalist, resolve_ft_data
from .loop import BEST_NAME, FT_RESUME_KEYS, LAST_NAME, FinetuneResult, build_finetune_model, check_head, finetune
from .metrics import dice_per_case, dice_with_background, summarize_dice
from .reload import load_finetune_run
from .report import (
    ARM_LABELS,
    ARMS,
    comparison_report_markdown,
    paired_summary,
    paired_table_markdown,
    per_organ_table_markdown,
    results_table_markdown,
)

ORGAN_NAMES: tuple[str, ...] = tuple(ORGANS.values())
