"""Helpers for self-supervised pre-training of a 3D ViT (MONAI ``ViTAutoEnc``) on unlabeled CT and
its transfer into UNETR. The notebooks and the multi-GPU script only wire these together.

Sections: ``config`` (presets), ``data`` (datalists, pre-flight checks), ``synthetic`` (the
embedded CT cohort), ``transforms``, ``datasets``, ``models`` (and weight transfer), ``losses``,
``checkpoint``, ``pretrain`` (training loop), ``finetune``, ``plots``.
"""

from .config import ARCH_KEYS, PRESETS, get_config
from .data import DatalistError, load_checked_datalist, load_datalist, preflight, preflight_datalist
from .losses import contrastive_loss, ssl_loss
from .models import (
    TransferReport,
    WeightTransferError,
    build_unetr,
    build_vitautoenc,
    load_pretrained_vit,
    set_sdpa,
    strip_prefixes,
    unwrap_model,
)
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .transforms import finetune_transforms, pretrain_transforms

try:  # the embedded cohort generator
    from .synthetic import ORGANS, generate_subject, make_cohort_from_config, make_synthetic_dataset
except ImportError:  # pragma: no cover - during development only
    pass
