"""Typed run configuration and the three presets.

A ``Config`` is five groups of settings (``model``, ``run``, ``pretrain``, ``finetune``,
``cohort``), each a frozen dataclass whose fields are the settings' flat names (``roi``,
``ssl_lr``, ``ft_iterations``, ...). Every default is written once, in the dataclass fields below
(they are the public reference tutorial's values, i.e. the ``"paper"`` preset); the other presets
are short lists of overrides. Construction validates every value, so no configuration, however it
was made (a preset, flat overrides, a dict read back from a checkpoint), reaches a training loop
unchecked, and a frozen config cannot be changed afterwards: ``cfg.replace(**flat)`` returns a new,
validated one.

``get_config(preset, **flat_overrides)`` is the entry point the notebooks, papermill, the DDP
flags and the README use; an unknown setting is an error that lists the valid ones. A config reads
like a mapping of flat names (``cfg["roi"]``, ``dict(cfg)``) and like a tree
(``cfg.model.roi``); ``cfg.to_dict()`` is its JSON form (tuples as lists).

- ``"paper"``: the reference's exact recipe (ViT-B/16 at 96^3, GPU sized);
- ``"demo"``: the same pipeline shrunk to run both notebooks on a laptop CPU in minutes;
- ``"smoke"``: tiny, for the test-suite (CPU seconds).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Iterator, Union

Pair = tuple[float, float]
Triple = tuple[float, float, float]


class ConfigError(ValueError, KeyError):
    """A setting is unknown or has an invalid value; the message names it and what is allowed."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class _Group:
    """Base of the setting groups: every field is coerced and checked on construction."""

    def __post_init__(self) -> None:
        _validate_group(self)


@dataclass(frozen=True)
class ModelConfig(_Group):
    """ViT (shared by ViTAutoEnc and UNETR's encoder) and UNETR's convolutional parts.
    UNETR fixes 12 layers and patch 16, so a ViT meant for transfer must keep them."""

    roi: int = 96  # cubic crop edge, voxels; a multiple of patch_size
    patch_size: int = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    proj_type: str = "conv"
    dropout_rate: float = 0.0
    deconv_chns: int = 16  # ViTAutoEnc decoder channels
    out_channels: int = 14  # UNETR classes, background included
    feature_size: int = 16
    norm_name: str = "instance"
    res_block: bool = True


@dataclass(frozen=True)
class RunConfig(_Group):
    """How a run executes: precision, layout, seeds, loaders. None of these change the recipe."""

    sdpa: bool = True  # MONAI's scaled_dot_product_attention path in every ViT block
    amp: Union[str, bool] = "auto"  # "auto" (bf16 where supported, else fp16 on CUDA, else off) | "bf16" | "fp16" | "off"
    # pre-training's own precision: "same" (= amp) or one of amp's values. The demo pre-trains in fp32:
    # under bf16 autocast its reconstruction L1 stalled at 0.80x the constant baseline, 0.52x in fp32
    # (results/ssl_sweep/sweep.md, h96_t1_e60_bf16 vs h96_t1_e60)
    ssl_amp: Union[str, bool] = "same"
    # parts of the network that run in fp32 under autocast (ssl_utils.speedups.keep_fp32_parts), any of
    # FP32_PART_NAMES. ViTAutoEnc's first reconstruction layer: oneDNN's bf16 input gradient of that transposed
    # convolution (kernel 4, 16 channels) is wrong on CPU, and pre-training stalled (results/precision/sweep.md)
    fp32_parts: tuple[str, ...] = ("head_deconv1",)
    recompute_gelu: bool = True  # recompute each ViT block's GELU in backward instead of storing it
    channels_last: Union[str, bool] = "auto"  # UNETR in channels-last 3D: "auto" (on for CPU) | True | False
    compile: bool = False  # torch.compile the model (pays on GPU for long runs)
    seed: int = 123
    deterministic: bool = False
    num_workers: int = 0
    cache_rate: float = 1.0
    # pre-training's cache of the deterministic stage: "memory" (each rank holds its shard) or "disk"
    # (one file per volume under cache_dir, reused by later runs and every rank; ssl_utils.cache)
    cache: str = "memory"
    cache_dir: str = ""


@dataclass(frozen=True)
class PretrainConfig(_Group):
    """Self-supervised pre-training: the TCIA-Covid19 data recipe and its optimisation."""

    ssl_spacing: Triple = (2.0, 2.0, 2.0)  # mm
    ssl_a_min: float = -57.0  # HU window
    ssl_a_max: float = 164.0
    ssl_num_samples: int = 2  # random crops per volume
    inpaint_holes: int = 6
    inpaint_size: tuple[int, int] = (5, 32)  # hole edge range, voxels (min, max)
    outpaint_holes: int = 6
    outpaint_size: tuple[int, int] = (20, 64)
    shuffle_prob: float = 0.8
    shuffle_holes: int = 10
    shuffle_size: int = 8
    ssl_batch_size: int = 4  # volumes per step (x ssl_num_samples crops)
    ssl_lr: float = 1e-4
    ssl_weight_decay: float = 0.0
    temperature: float = 0.05
    ssl_epochs: int = 500
    ssl_val_every: int = 2
    warmup_epochs: int = 0
    cosine: bool = False
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    val_seed: int = 12345  # fixes the validation views
    # Downstream signal while pre-training: every probe_every epochs (0 = off) a linear probe on a
    # copy of the frozen encoder is fitted on probe_fit_volumes labeled volumes for
    # probe_monitor_iterations iterations (fixed seed) and scored on the next probe_score_volumes
    # of the labeled datalist's "training" list (never its "validation" list: that one reports).
    probe_every: int = 0
    probe_fit_volumes: int = 2
    probe_score_volumes: int = 2
    probe_monitor_iterations: int = 40
    # which checkpoint is best_model.pt: "val_recon" (lowest validation L1, the reference) or
    # "probe" (highest probe Dice; needs probe_every > 0)
    select_by: str = "val_recon"
    # the pretext task: "views" (the reference: two corrupted views of a crop, ViTAutoEnc, L1 + contrastive,
    # r + c * r) or "mae" (masked autoencoder: MONAI's MaskedAutoEncoderViT sees a random subset of the crop's
    # patches and reconstructs the others; the loss is on the masked patches only). Both pre-train the same
    # encoder shape (UNETR's ViT), so either transfers.
    pretext: str = "views"
    mae_mask_ratio: float = 0.75  # fraction of the patches hidden from the encoder
    mae_decoder_hidden: int = 384  # the MAE decoder (discarded after pre-training)
    mae_decoder_mlp: int = 1536
    mae_decoder_layers: int = 4
    mae_decoder_heads: int = 12
    # the MAE's reconstruction target: each masked patch normalised to zero mean and unit variance (He et al. 2022:
    # better representations; the network must predict the patch's structure, not its brightness) or the raw
    # windowed intensities
    mae_norm_target: bool = True
    mae_loss: str = "mse"  # "mse" (He et al.) or "l1" on the masked patches


@dataclass(frozen=True)
class FinetuneConfig(_Group):
    """UNETR fine-tuning (the BTCV recipe) and the linear probe."""

    ft_spacing: Triple = (1.5, 1.5, 2.0)
    ft_a_min: float = -175.0
    ft_a_max: float = 250.0
    ft_num_samples: int = 4
    ft_pos: int = 1
    ft_neg: int = 1
    ft_flip_prob: float = 0.1
    ft_rot_prob: float = 0.1
    ft_shift_offset: float = 0.1
    ft_shift_prob: float = 0.5
    ft_batch_size: int = 1  # volumes per step (x ft_num_samples crops)
    ft_lr: float = 1e-4
    ft_weight_decay: float = 1e-5
    ft_iterations: int = 30000
    ft_eval_every: int = 100
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    encoder_lr_mult: float = 1.0  # learning-rate multiplier for the pre-trained ViT encoder
    freeze_encoder_iters: int = 0  # iterations with the encoder frozen at the start
    probe_lr: float = 3e-3
    probe_iterations: int = 300
    # where training crops are centred: "posneg" (the reference: RandCropByPosNegLabeld, ft_pos : ft_neg
    # foreground : background, so mostly the largest organ) or "classes" (RandCropByLabelClassesd: every class,
    # background included, equally often, so small organs are sampled as often as the liver)
    ft_crop: str = "posneg"
    # the labeled split fine-tuning evaluates on: "validation" (the reported numbers) or "tuning" (the split
    # every recipe choice is made on; a datalist then needs a "tuning" list)
    ft_eval_split: str = "validation"
    ft_cosine: bool = False  # cosine decay of the learning rate to 0 over ft_iterations (after the frozen warm-up)
    # a run's final Dice: the mean of its last ft_final_evals evaluations (1 = the last one), not one noisy point
    ft_final_evals: int = 1


@dataclass(frozen=True)
class CohortConfig(_Group):
    """The embedded synthetic CT cohort (used when no data_root is given)."""

    synth_unlabeled: int = 600 + 171
    synth_unlabeled_val: int = 171
    synth_labeled_train: int = 24
    synth_labeled_val: int = 6
    # labeled subjects of the tuning split (between training and validation; 0 = none): every fine-tuning
    # choice is made on it, the validation split only reports
    synth_labeled_tune: int = 0
    # labeled subjects of the positive-control split (after validation; 0 = none): a UNETR trained with labels on them
    # gives the study's `control` encoder, so they are disjoint from training, tuning and validation
    synth_labeled_control: int = 0
    synth_train_sizes: tuple[int, ...] = (6, 12, 24)
    synth_shape: tuple[int, int] = (512, 512)  # in-plane voxels
    synth_spacing: Triple = (0.75, 0.75, 2.5)  # mm (in-plane nominal, slice)
    synth_seed: int = 0
    # what the unlabeled (pre-training) volumes show: "chest" (non-contrast chest CT like TCIA-Covid19,
    # some with COVID-like opacities: the reference's out-of-domain set-up) or "abdomen" (the labeled
    # cohort's abdominal anatomy: in-domain pre-training, for comparison)
    synth_unlabeled_kind: str = "chest"


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "run": RunConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "cohort": CohortConfig,
}
# flat setting name -> group name (the names are unique across groups)
_GROUP_OF: dict[str, str] = {f.name: g for g, cls in GROUPS.items() for f in fields(cls)}

# Settings that must agree between a checkpoint and a run that resumes from it or loads it.
ARCH_KEYS = ("roi", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads", "proj_type")

_POSITIVE = {
    "roi", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads", "deconv_chns", "out_channels",
    "feature_size", "ssl_num_samples", "ssl_batch_size", "ssl_lr", "temperature", "ssl_epochs", "ssl_val_every",
    "ft_num_samples", "ft_batch_size", "ft_lr", "ft_iterations", "ft_eval_every", "sw_batch_size", "probe_lr",
    "probe_iterations", "encoder_lr_mult", "ft_final_evals", "probe_fit_volumes", "probe_score_volumes", "probe_monitor_iterations",
    "mae_decoder_hidden", "mae_decoder_mlp", "mae_decoder_layers", "mae_decoder_heads", "synth_shape", "synth_spacing", "ssl_spacing", "ft_spacing",
    "inpaint_size", "outpaint_size", "shuffle_size", "synth_train_sizes",
}
_NON_NEGATIVE = {
    "dropout_rate", "num_workers", "ssl_weight_decay", "warmup_epochs", "grad_clip", "ft_weight_decay",
    "freeze_encoder_iters", "inpaint_holes", "outpaint_holes", "shuffle_holes", "ft_pos", "ft_neg",
    "synth_unlabeled", "synth_unlabeled_val", "synth_labeled_train", "synth_labeled_val", "synth_labeled_tune", "seed", "val_seed",
    "synth_labeled_control",
    "synth_seed", "probe_every",
}
# the values fp32_parts may hold (ssl_utils.speedups.FP32_PARTS, the same names; a test keeps them equal)
FP32_PART_NAMES = ("layernorm", "attention", "mlp", "head_deconv1", "head_deconv2")
_ITEM_CHOICES: dict[str, tuple] = {"fp32_parts": FP32_PART_NAMES}
_FRACTIONS = {"dropout_rate", "cache_rate", "shuffle_prob", "ft_flip_prob", "ft_rot_prob", "ft_shift_prob"}
_CHOICES: dict[str, tuple] = {
    "amp": ("auto", "bf16", "fp16", "off", True, False),
    "ssl_amp": ("same", "auto", "bf16", "fp16", "off", True, False),
    "channels_last": ("auto", True, False),
    "proj_type": ("conv", "perceptron"),
    "synth_unlabeled_kind": ("chest", "abdomen"),
    "select_by": ("val_recon", "probe"),
    "ft_crop": ("posneg", "classes"),
    "ft_eval_split": ("validation", "tuning"),
    "pretext": ("views", "mae"),
    "mae_loss": ("mse", "l1"),
    "cache": ("memory", "disk"),
}


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """``value`` as the type ``hint`` names (lists from JSON become tuples, ints become floats);
    raises ``ConfigError`` naming the setting when it cannot be."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return value  # checked against _CHOICES
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"setting {name!r}: expected a sequence, got {value!r}")
        n = None if (len(args) == 2 and args[1] is Ellipsis) else len(args)
        if n is not None and len(value) != n:
            raise ConfigError(f"setting {name!r}: expected {n} values, got {len(value)} ({value!r})")
        item = args[0]
        return tuple(_coerce(name, item, v) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"setting {name!r}: expected True or False, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
            raise ConfigError(f"setting {name!r}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"setting {name!r}: expected a number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"setting {name!r}: expected a string, got {value!r}")
    return value


def _check_value(name: str, value: Any) -> None:
    values = value if isinstance(value, tuple) else (value,)
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"setting {name!r} = {value!r}; expected one of {list(_CHOICES[name])}")
    bad = [v for v in values if v not in _ITEM_CHOICES[name]] if name in _ITEM_CHOICES else []
    if bad:
        raise ConfigError(f"setting {name!r} = {value!r}: unknown {bad}; expected some of {list(_ITEM_CHOICES[name])}")
    if name in _POSITIVE and any(v <= 0 for v in values):
        raise ConfigError(f"setting {name!r} = {value!r} must be greater than 0")
    if name in _NON_NEGATIVE and any(v < 0 for v in values):
        raise ConfigError(f"setting {name!r} = {value!r} must be 0 or more")
    if name in _FRACTIONS and not all(0.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"setting {name!r} = {value!r} must lie in [0, 1]")


def _validate_group(group: Any) -> None:
    """Coerce and check every field of a group dataclass (called from ``__post_init__``)."""
    hints = typing.get_type_hints(type(group))
    for f in fields(group):
        value = _coerce(f.name, hints[f.name], getattr(group, f.name))
        _check_value(f.name, value)
        object.__setattr__(group, f.name, value)


@dataclass(frozen=True)
class Config(Mapping):
    """One run's settings: five validated groups. Reads as a mapping of flat names too."""

    preset: str = "custom"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    cohort: CohortConfig = dataclasses.field(default_factory=CohortConfig)

    def __post_init__(self) -> None:
        m, p = self.model, self.pretrain
        if m.roi % m.patch_size:
            raise ConfigError(f"roi={m.roi} must be a multiple of patch_size={m.patch_size}")
        if m.hidden_size % m.num_heads:
            raise ConfigError(f"hidden_size={m.hidden_size} must be divisible by num_heads={m.num_heads}")
        for name in ("inpaint_size", "outpaint_size"):
            lo, hi = getattr(p, name)
            if lo > hi:
                raise ConfigError(f"setting {name!r} = {(lo, hi)!r}: the minimum is larger than the maximum")
        if not 0.0 < p.mae_mask_ratio < 1.0:
            raise ConfigError(f"setting 'mae_mask_ratio' = {p.mae_mask_ratio!r} must lie strictly between 0 and 1")
        if p.mae_decoder_hidden % p.mae_decoder_heads:
            raise ConfigError(f"mae_decoder_hidden={p.mae_decoder_hidden} must be divisible by "
                              f"mae_decoder_heads={p.mae_decoder_heads}")
        if p.pretext == "mae" and (m.hidden_size % 6 or p.mae_decoder_hidden % 6):
            raise ConfigError(
                f"pretext='mae' uses fixed 3D sin-cos position embeddings, which need hidden_size "
                f"({m.hidden_size}) and mae_decoder_hidden ({p.mae_decoder_hidden}) to be multiples of 6")
        if p.select_by == "probe" and p.probe_every == 0:
            raise ConfigError("select_by='probe' needs the probe monitor: set probe_every to a number of epochs (> 0)")
        if self.run.cache == "disk" and not self.run.cache_dir:
            raise ConfigError("cache='disk' needs cache_dir: the folder for the cached volumes (a local SSD or a shared file system)")
        if p.ssl_a_min >= p.ssl_a_max or self.finetune.ft_a_min >= self.finetune.ft_a_max:
            raise ConfigError("the HU window needs a_min < a_max (ssl_a_min/ssl_a_max, ft_a_min/ft_a_max)")

    # ---- flat access ----
    def __getitem__(self, name: str) -> Any:
        if name == "preset":
            return self.preset
        try:
            return getattr(getattr(self, _GROUP_OF[name]), name)
        except KeyError:
            raise KeyError(_unknown_message([name])) from None

    def __iter__(self) -> Iterator[str]:
        return iter(("preset", *_GROUP_OF))

    def __len__(self) -> int:
        return 1 + len(_GROUP_OF)

    def replace(self, **flat: Any) -> "Config":
        """A new config with the flat settings ``flat`` changed (``None`` values ignored), validated."""
        return from_flat({**dict(self), **{k: v for k, v in flat.items() if v is not None}}, _check=flat)

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{name: value}`` in JSON form (tuples as lists); ``from_flat`` reads it back."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.items()}


def _unknown_message(names) -> str:
    return f"unknown setting(s) {sorted(names)}; valid settings are {sorted(['preset', *_GROUP_OF])}"


def from_flat(flat: Mapping[str, Any], _check: Mapping[str, Any] | None = None) -> Config:
    """A validated ``Config`` from flat names (e.g. a checkpoint's ``"config"``); settings it
    does not name keep their defaults. Raises ``ConfigError`` on unknown names or bad values."""
    unknown = [k for k in (_check if _check is not None else flat) if k != "preset" and k not in _GROUP_OF]
    if unknown:
        raise ConfigError(_unknown_message(unknown))
    parts: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    for key, value in flat.items():
        if key in _GROUP_OF:
            parts[_GROUP_OF[key]][key] = value
    return Config(preset=str(flat.get("preset", "custom")), **{g: GROUPS[g](**kw) for g, kw in parts.items()})


# The presets: the paper preset is the defaults; the others state only what they change.
_PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    # The reference tutorial's exact settings.
    "paper": {},
    # CPU minutes: a small ViT (still 12 layers / patch 16, so it transfers into UNETR),
    # 48^3 crops at coarser spacing, a small cohort.
    "demo": {
        "roi": 48,
        "ssl_spacing": (4.0, 4.0, 4.0),
        "inpaint_size": (3, 16),
        "outpaint_size": (10, 32),
        "shuffle_size": 4,
        # Pre-training recipe chosen on the unlabeled validation volumes only (results/ssl_sweep/sweep.md:
        # best validation L1 of view 1 / the L1 of predicting each crop's mean, on the same fixed views):
        # - temperature 1.0: at the reference's 0.05 the contrastive term's gradient swamps the L1 one and
        #   the L1 stays at the level of predicting 0 (0.82-0.84x the constant: hidden 96 / 192 / 384,
        #   30 or 60 epochs, temperature 0.2 too); at 1.0, 0.52x in 60 epochs;
        # - hidden 96 (43x bottleneck): wider tokens did not help at 0.05 (hidden 192 / 384: 0.81 / 0.84x)
        #   and little at 1.0 (hidden 192: 0.49x against 0.52x, for 1.5x the time, and a larger UNETR);
        # - 60 epochs at Adam 1e-3 (2-epoch warm-up, cosine): about 1.5 minutes here;
        # - fp32 (amp="off"), pre-training and fine-tuning: on a CPU, the faster of the precisions that learn.
        #   With the precision policy (fp32_parts) bf16 learns as fp32 does (pre-training 0.52x the constant,
        #   both: results/precision/sweep.md; fine-tuning 40.0 vs 40.3% tuning Dice:
        #   results/precision/finetune/sweep.md), but at these sizes it runs slower on a bf16 CPU: a
        #   pre-training step 355 against 134 ms, a fine-tuning step 363 against 339 ms
        #   (benchmarks/results/cpu_demo_size*.md). On a GPU, set amp="auto".
        "hidden_size": 96,
        "mlp_dim": 192,
        "num_heads": 4,
        "temperature": 1.0,
        "ssl_lr": 1e-3,
        "ssl_epochs": 60,
        "warmup_epochs": 2,
        "cosine": True,
        "amp": "off",
        # the probe monitor: a downstream score every 10 epochs (2 labeled volumes to fit, 2 to score:
        # the labeled training list, never the validation list). 150 iterations, measured on those
        # volumes with this recipe's 60-epoch encoder against an untrained one: 40 iterations 4.4 vs 1.2%
        # mean Dice (5.6 s), 150: 5.8 vs 3.0% (12.5 s), 300: 7.3 vs 3.3% (24 s). (Measured with the reference's
        # crops, before the fine-tuning recipe below moved to class-balanced crops, which the probe shares; the
        # demo run of 2026-12-04 with them: 4.1 vs 3.6% at 150 iterations.)
        "probe_every": 10,
        "probe_monitor_iterations": 150,
        "ft_spacing": (4.0, 4.0, 4.0),
        # Fine-tuning recipe chosen on the labeled cohort's tuning split (4 volumes; random initialisation, 8 training
        # volumes, seed 0; the validation split was not looked at): results/ft_sweep/sweep.md. Final Dice there = mean
        # of the last 3 evaluations:
        # - class-balanced crop centres (RandCropByLabelClassesd): 40.3% against 33.4% for the reference's
        #   positive/negative crops at 800 iterations (48^3, feature 8, lr 2e-3); the pancreas and spleen learned
        #   only with them;
        # - 48^3 crops: 64^3 took 2x the time per iteration and was no better per iteration (27.8-30.2% at 600);
        # - UNETR feature 8: 33.4% against 12.6% for feature 4 (the demo before; liver and stomach only);
        # - lr 4e-3 (constant): 45.6% against 40.3% for 2e-3 at 800 iterations; a cosine decay to 0 over 600
        #   iterations hurt (33.9%: the rate falls before the organs are learned);
        # - 600 iterations: the demo's budget (8 organs above 50% on the tuning split at iteration 600 at this rate);
        #   the study (ssl_utils.study.STUDY_OVERRIDES) runs longer.
        # 2 crops per iteration: a 2-crop batch costs about what 1 crop does on a CPU.
        "feature_size": 8,
        "ft_num_samples": 2,
        "ft_crop": "classes",
        "ft_lr": 4e-3,
        "ft_iterations": 600,
        "ft_eval_every": 50,
        "ft_final_evals": 3,
        # the encoder's schedule, judged on both arms (mean of the random and the pre-trained arm on the tuning split,
        # 600 iterations; results/ft_sweep/sweep.md, enc_*): one learning rate, no frozen warm-up 39.3%; encoder at
        # 0.25x the rate 39.2%; encoder frozen for 50 iterations 36.9%. So the reference's plain full fine-tuning.
        "freeze_encoder_iters": 0,
        "synth_unlabeled": 32,
        "synth_unlabeled_val": 6,
        "synth_labeled_train": 8,
        "synth_labeled_tune": 4,
        "synth_labeled_val": 10,
        "synth_labeled_control": 8,  # the study's positive control (a UNETR trained with labels on 8 other volumes)
        # the masked autoencoder's decoder (pretext="mae"): as wide as the encoder's tokens, 2 blocks (He et al.: a light
        # decoder); the mask ratio and the rest of its recipe: results/pretext_sweep/sweep.md
        "mae_decoder_hidden": 96,
        "mae_decoder_mlp": 192,
        "mae_decoder_layers": 2,
        "mae_decoder_heads": 4,
        "synth_train_sizes": (1, 2, 8),
        "synth_shape": (128, 128),
        "synth_spacing": (3.0, 3.0, 5.0),
    },
    # CPU seconds, for tests.
    "smoke": {
        "roi": 32,
        "hidden_size": 48,  # a multiple of 6 too: the MAE's 3D sin-cos position embedding needs it
        "mlp_dim": 64,
        "mae_decoder_hidden": 24,
        "mae_decoder_mlp": 48,
        "mae_decoder_layers": 1,
        "mae_decoder_heads": 2,
        "num_heads": 2,
        "ssl_spacing": (6.0, 6.0, 6.0),
        "inpaint_holes": 3,
        "inpaint_size": (2, 8),
        "outpaint_holes": 3,
        "outpaint_size": (8, 20),
        "shuffle_holes": 4,
        "shuffle_size": 4,
        "ssl_batch_size": 2,
        "ssl_lr": 1e-3,
        "ssl_epochs": 2,
        "ssl_val_every": 1,
        "probe_fit_volumes": 1,  # the probe monitor, when a test turns it on (probe_every)
        "probe_score_volumes": 2,
        "probe_monitor_iterations": 4,
        "ft_spacing": (6.0, 6.0, 6.0),
        "feature_size": 4,
        "ft_num_samples": 1,
        "ft_lr": 1e-3,
        "ft_iterations": 4,
        "ft_eval_every": 2,
        "sw_batch_size": 2,
        "synth_unlabeled": 6,
        "synth_unlabeled_val": 2,
        "synth_labeled_train": 3,
        "synth_labeled_tune": 1,
        "synth_labeled_val": 2,
        "synth_labeled_control": 2,
        "synth_train_sizes": (1, 3),
        "synth_shape": (64, 64),
        "synth_spacing": (6.0, 6.0, 8.0),
    },
}

PRESETS: dict[str, Config] = {name: from_flat({"preset": name, **o}) for name, o in _PRESET_OVERRIDES.items()}


def get_config(preset: str | Mapping[str, Any] = "demo", **overrides: Any) -> Config:
    """``PRESETS[preset]`` with the flat ``overrides`` applied, validated.

    ``preset`` may also be a ``Config`` or a flat mapping (e.g. a saved config), which is then
    validated the same way. ``None`` values in ``overrides`` are ignored, so callers can pass
    optional arguments through. Raises ``ConfigError`` (a ``KeyError`` and ``ValueError``) naming
    an unknown preset, an unknown setting (with the valid ones) or an invalid value.
    """
    if isinstance(preset, Config):
        base = preset
    elif isinstance(preset, Mapping):
        base = from_flat(preset)
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ConfigError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return base.replace(**overrides) if overrides else base


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], keys) -> list[str]:
    """Human-readable list of the settings in ``keys`` that differ between two configs. A setting the
    saved config does not name is not compared: the checkpoint or record predates it (a new setting's
    default keeps the behaviour from before it existed)."""
    out = []
    for k in keys:
        if k not in saved:
            continue
        a, b = saved.get(k), current.get(k)
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a = list(a) if a is not None else a
            b = list(b) if b is not None else b
        if a != b:
            out.append(f"{k}: checkpoint {a!r}, this run {b!r}")
    return out
