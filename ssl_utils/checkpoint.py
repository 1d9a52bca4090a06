"""Checkpoints: atomic writes (``ssl_utils.io``), safe reads, RNG state capture and restore.

A pre-training checkpoint is a dict with ``"state_dict"`` (unwrapped model weights, no
``module.`` / ``_orig_mod.`` prefix), ``"optimizer"``, ``"epoch"`` (the last completed epoch),
and ``"scheduler"``, ``"scaler"``, ``"rng"``, ``"config"``, ``"history"``, ``"best_val_loss"``.
The reference's fine-tuning code (keep the keys ``unetr.vit`` has) loads it as it is.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import zipfile
from typing import Any

import numpy as np
import torch

from .io import WriteError, atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read. The message names the file and the reason."""


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> str:
    """Write ``obj`` with ``torch.save`` atomically (``ssl_utils.io.atomic_write``).

    A crash, a kill or a failed write (no space, no permission) leaves any previous file at
    ``path`` intact; temp files left by killed writers are removed on the next save. Raises
    ``CheckpointError`` naming the path and the reason (e.g. "No space left on device").
    """
    try:
        return atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")
    except WriteError as exc:
        raise CheckpointError(str(exc)) from exc.__cause__


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Read a checkpoint with ``torch.load(..., weights_only=True)``.

    A file that would need to run code to load (an arbitrary pickle) is refused, and its code
    does not run. Raises ``CheckpointError`` naming the file: missing, not a checkpoint, or unsafe.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "weights_only" in msg:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg) or re.search(r"(Unsupported operand \d+)", msg)
            detail = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint {path}: refused, it is not a plain weights file: loading it would run code or needs "
                f"pickle features that safe loading (torch.load weights_only=True) does not allow{detail}. "
                "Only tensors, numbers, strings and containers are accepted; if you trust its origin, "
                "re-save it as a plain state dict."
            ) from None
        raise CheckpointError(f"checkpoint {path}: not a PyTorch checkpoint ({msg.splitlines()[0]})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, IndexError, KeyError, TypeError) as exc:  # a text or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"checkpoint {path}: not a readable PyTorch checkpoint ({first})") from None


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint's weights (``"state_dict"``, or the file itself when it is a plain
    state dict): names, dtypes, shapes and values in name order. Two files with the same weights
    have the same digest whatever else they hold (history, timings) and whenever they were written,
    so a pre-training run repeated on another machine can be recognised as the same encoder."""
    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {os.fspath(path)}: no weights to digest (expected a state dict)")
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any] | None) -> None:
    """Inverse of ``capture_rng_state`` (missing parts are left alone). A CUDA state that cannot be
    restored (another number of visible GPUs) raises ``CheckpointError`` instead of silently
    giving a run that is no longer a bitwise continuation."""
    if not state:
        return
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        if len(saved) != torch.cuda.device_count():
            raise CheckpointError(
                f"cannot restore the CUDA random state: the checkpoint holds {len(saved)} device state(s), this "
                f"process sees {torch.cuda.device_count()} GPU(s); resume with the same visible GPUs "
                "(CUDA_VISIBLE_DEVICES) for a bitwise continuation"
            )
        try:
            torch.cuda.set_rng_state_all([s.cpu() for s in saved])
        except RuntimeError as exc:
            raise CheckpointError(f"cannot restore the CUDA random state: {exc}") from exc
