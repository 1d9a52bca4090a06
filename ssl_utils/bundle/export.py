"""Export: a checkpoint of this project in, a checked MONAI bundle folder out.

``read_checkpoint`` loads a checkpoint and checks it is of the asked kind and carries its run's
config; ``export_bundle`` writes ``configs/inference.json``, ``configs/metadata.json``,
``models/model.pt`` and ``docs/README.md`` next to the output, checks that the network the config
builds loads the weights strictly, and only then moves the folder into place (replacing a bundle
it wrote before, never other files). An encoder checkpoint of the two-view pretext gives a
ViTAutoEnc bundle; one of the masked-autoencoder pretext (``pretext="mae"``) gives its encoder alone,
in UNETR's ViT key names (``ssl_utils.models.encoder_state``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import torch

from ..checkpoint import CheckpointError, load_checkpoint
from ..config import ConfigError, get_config
from ..mae import is_mae_state
from ..models import check_unetr_encoder, encoder_state, strip_prefixes
from .configs import encoder_inference_config, mae_encoder_inference_config, segmenter_inference_config
from .layout import BUNDLE_DIRS, BUNDLE_FILES, DEFAULT_NAMES, EXPORTER, KINDS
from .metadata import encoder_metadata, mae_encoder_metadata, segmenter_metadata
from .readme import encoder_readme, mae_encoder_readme, segmenter_readme

def _checkpoint_kind(state: Mapping[str, Any]) -> str | None:
    """"encoder" for a ViTAutoEnc state dict (decoder ``conv3d_transpose*``) or a
    MaskedAutoEncoderViT one (``mask_tokens``, ``decoder_pred``), "segmenter" for a UNETR one (output
    layer ``out.conv.conv.weight``), else None."""
    if "out.conv.conv.weight" in state:
        return "segmenter"
    if any(k.startswith("conv3d_transpose") for k in state) or is_mae_state(state):
        return "encoder"
    return None


_WHAT = {
    "encoder": "a pre-training checkpoint (ViTAutoEnc or MaskedAutoEncoderViT, written by ssl_utils.pretrain)",
    "segmenter": "a fine-tuning checkpoint (UNETR, written by ssl_utils.finetune)",
}


def read_checkpoint(kind: str, checkpoint: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """Load ``checkpoint`` and check it is one of ``kind``; returns ``(checkpoint dict, state dict
    without DDP / compile prefixes, validated Config)``. Raises ``CheckpointError`` naming the file
    and what is wrong (missing, unreadable, of the other kind, without ``"config"``)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {list(KINDS)}")
    path = os.fspath(checkpoint)
    ckpt = load_checkpoint(path)  # CheckpointError: file not found / not a checkpoint / unsafe
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        found = sorted(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(
            f"checkpoint {path}: not a training checkpoint of this project (expected a dict with 'state_dict' and "
            f"'config', found {found}); export {_WHAT[kind]}"
        )
    state = strip_prefixes(ckpt["state_dict"])
    found_kind = _checkpoint_kind(state)
    if found_kind != kind:
        if found_kind is None:
            detail = (f"its state dict is not ViTAutoEnc's, MaskedAutoEncoderViT's or UNETR's "
                      f"(keys start {sorted(state)[:4]})")
        else:
            key = ("out.conv.conv.weight" if found_kind == "segmenter" else
                   "mask_tokens" if is_mae_state(state) else "conv3d_transpose*")
            detail = f"it is {_WHAT[found_kind]} (its state dict has {key})"
        hint = f"; export it with --kind {found_kind}" if found_kind else ""
        raise CheckpointError(f"checkpoint {path}: --kind {kind} needs {_WHAT[kind]}, but {detail}{hint}")
    if not isinstance(ckpt.get("config"), Mapping) or not ckpt["config"]:
        raise CheckpointError(
            f"checkpoint {path}: no 'config' entry (the run's settings), so the network's architecture and "
            f"preprocessing are unknown; export a best_model.pt / last_model.pt written by "
            f"{'ssl_utils.pretrain' if kind == 'encoder' else 'ssl_utils.finetune'}"
        )
    try:
        cfg = get_config(dict(ckpt["config"]))
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: its 'config' is not valid: {exc}") from None
    if kind == "encoder":
        _check_pretext(path, state, cfg)
    if kind == "segmenter":
        n_out = int(state["out.conv.conv.weight"].shape[0])
        if n_out != int(cfg["out_channels"]):
            raise CheckpointError(f"checkpoint {path}: its output layer has {n_out} classes, its config says "
                                  f"out_channels={cfg['out_channels']}")
        names = ckpt.get("class_names")
        if names and len(names) != n_out:
            raise CheckpointError(f"checkpoint {path}: {len(names)} class names {list(names)} for {n_out} output channels")
    return dict(ckpt), state, cfg


def _check_pretext(path: str, state: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """An encoder checkpoint's network and its config's ``pretext`` must agree; a masked
    autoencoder's encoder must be one UNETR can hold (its bundle is UNETR's ViT)."""
    mae = is_mae_state(state)
    if mae != (cfg["pretext"] == "mae"):
        network = "MaskedAutoEncoderViT's (mask_tokens, decoder_pred)" if mae else "ViTAutoEnc's (conv3d_transpose*)"
        raise CheckpointError(f"checkpoint {path}: its state dict is {network}, but its config says "
                              f"pretext={cfg['pretext']!r}")
    if mae:
        try:
            check_unetr_encoder(cfg)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {path}: its masked autoencoder's encoder does not fit UNETR's ViT, "
                                  f"which its bundle is: {exc}") from None


def _whole(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return state


def _unetr_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A masked autoencoder's encoder in UNETR's ViT keys; the class / mask tokens and the decoder stay behind."""
    return encoder_state(state)[0]


def _bundle_parts(kind: str, cfg: Mapping[str, Any]):
    """What a bundle of ``kind`` from a run with ``cfg`` is made of: the writers of
    ``inference.json``, ``metadata.json`` and ``docs/README.md``, and the state dict's map to
    ``models/model.pt``; the segmenter's, the two-view encoder's, or the masked autoencoder's."""
    if kind == "segmenter":
        return segmenter_inference_config, segmenter_metadata, segmenter_readme, _whole
    if cfg["pretext"] == "mae":
        return mae_encoder_inference_config, mae_encoder_metadata, mae_encoder_readme, _unetr_vit
    return encoder_inference_config, encoder_metadata, encoder_readme, _whole


def files_under(folder: str) -> list[str]:
    """Every file and link under ``folder``, as paths relative to it (``/``-separated)."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def is_exported_bundle(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a bundle written by this module and nothing else."""
    folder = os.fspath(folder)
    try:
        with open(os.path.join(folder, "configs", "metadata.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    ours = isinstance(meta, dict) and isinstance(meta.get("exported_by"), dict) \
        and meta["exported_by"].get("exporter") == EXPORTER
    return ours and set(files_under(folder)) <= set(BUNDLE_FILES)


def _check_out(out: str) -> None:
    """Refuse an output that is a file, or a non-empty folder that is not a bundle of ours."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"output {out} exists and is not a folder: refusing to overwrite it; choose another --out")
    if os.path.isdir(out) and os.path.islink(out):
        raise ValueError(f"output {out} is a symbolic link: refusing to replace it; give the real folder")
    if not os.path.isdir(out):
        return
    files = files_under(out)
    if files and not is_exported_bundle(out):
        foreign = [f for f in files if f not in BUNDLE_FILES] or files
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"output folder {out} already holds files that are not a bundle exported by {EXPORTER} ({shown}): "
            "refusing to overwrite them; choose a new or empty --out, or move those files away"
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=4, allow_nan=False)
        f.write("\n")


def _check_bundle(folder: str) -> None:
    """The written config builds ``network_def`` and it loads ``models/model.pt`` strictly."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(folder, "configs", "inference.json"))
    parser.read_meta(os.path.join(folder, "configs", "metadata.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(os.path.join(folder, "models", "model.pt"), map_location="cpu", weights_only=True),
                        strict=True)


def export_bundle(
    kind: str,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    authors: str = "ssl_utils users",
    copyright: str = "Copyright (c) the authors of the training run",
) -> str:
    """Write a MONAI bundle of ``checkpoint`` into the folder ``out`` and return its path.

    ``kind``: ``"encoder"`` (a pre-training checkpoint: ViTAutoEnc, or MaskedAutoEncoderViT, of
    which only the encoder is written, as UNETR's ViT) or ``"segmenter"`` (a fine-tuning
    checkpoint: UNETR). The bundle holds ``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt`` and ``docs/README.md`` (see the module
    docstring). ``out`` may be new, empty, or a bundle this function wrote before (it is
    replaced); anything else is refused. The bundle is written next to ``out`` first and checked
    (``network_def`` loads ``models/model.pt`` strictly), then moved into place.

    Raises ``CheckpointError`` for a missing or unreadable checkpoint, one of the other kind, or one
    without ``"config"``, and ``ValueError`` for an unknown kind or an output folder holding other files.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {list(KINDS)}")
    path = os.fspath(checkpoint)
    out = os.path.abspath(os.fspath(out))
    _check_out(out)  # before reading a large checkpoint
    ckpt, state, cfg = read_checkpoint(kind, path)
    name = name or DEFAULT_NAMES[kind]
    write_inference, write_metadata, write_readme, weights = _bundle_parts(kind, cfg)
    inference = write_inference(cfg, out)
    meta = write_metadata(ckpt, cfg, path, name, version, authors, copyright)
    readme = write_readme(meta, cfg, out)
    state = weights(state)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.export-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a bundle folder is an ordinary one
        for d in BUNDLE_DIRS:
            os.makedirs(os.path.join(tmp, d))
        torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, "models", "model.pt"))
        _write_json(os.path.join(tmp, "configs", "inference.json"), inference)
        _write_json(os.path.join(tmp, "configs", "metadata.json"), meta)
        with open(os.path.join(tmp, "docs", "README.md"), "w", encoding="utf-8") as f:
            f.write(readme)
        try:
            _check_bundle(tmp)
        except Exception as exc:  # a config that does not rebuild the checkpoint's network
            raise CheckpointError(f"checkpoint {path}: the exported network does not load its weights: {exc}") from exc
        _check_out(out)  # again: nothing may have appeared meanwhile
        old = None
        if os.path.isdir(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "bundle"))
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out
