"""Helpers for self-supervised pre-training of a 3D ViT (MONAI ``ViTAutoEnc``) on unlabeled CT and
its transfer into UNETR. The notebooks and the multi-GPU script only wire these together.

Sections: ``config`` (typed settings, presets), ``engine`` (the one training step, divergence
check, run state), ``distributed`` (ranks, collectives, shards), ``io`` (atomic writes),
``data`` (datalists, pre-flight checks), ``synthetic`` (the embedded CT cohort), ``organs``,
``transforms``, ``datasets``, ``models`` (plain builders, weight transfer), ``speedups`` (patches
of MONAI internals, version-guarded), ``losses``, ``checkpoint``, ``pretrain``, ``finetune/``,
``probe``, ``stats``, ``study``, ``plots``, ``progress`` (text progress bars on request),
``notebooks`` (executed notebooks fit for a static page).
"""

from . import progress  # first: SSL_UTILS_PROGRESS=text takes effect before any module imports tqdm.auto

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ARCH_KEYS, PRESETS, Config, ConfigError, get_config
from .data import DatalistError, load_checked_datalist, load_datalist, preflight, preflight_datalist
from .engine import RunState, TrainingDiverged, check_finite, train_step
from .losses import contrastive_loss, ssl_loss
from .models import (
    TransferReport,
    WeightTransferError,
    build_unetr,
    build_vitautoenc,
    load_pretrained_vit,
    strip_prefixes,
    unwrap_model,
)
from .organs import ORGANS
from .speedups import apply_speedups, set_sdpa
from .synthetic import generate_subject, make_cohort_from_config, make_synthetic_dataset
from .transforms import finetune_transforms, pretrain_transforms
