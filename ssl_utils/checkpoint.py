"""Checkpoints: atomic writes, safe reads, RNG state capture.

A pre-training checkpoint is a dict with ``"state_dict"`` (unwrapped model weights, no
``module.`` / ``_orig_mod.`` prefix), ``"optimizer"``, ``"epoch"`` (the last completed epoch),
and ``"scheduler"``, ``"scaler"``, ``"rng"``, ``"config"``, ``"history"``, ``"best_val_loss"``.
The reference's fine-tuning code (keep the keys ``unetr.vit`` has) loads it as it is.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read. The message names the file and the reason."""


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> str:
    """Write ``obj`` with ``torch.save`` atomically: temp file in the same folder, fsync, rename.

    A crash or a failed write (no space, no permission) leaves any previous file at ``path``
    intact. Raises ``CheckpointError`` naming the path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, (OSError, RuntimeError)):
            reason = getattr(exc, "strerror", None) or str(exc)
            raise CheckpointError(f"cannot write checkpoint {path}: {reason}; the previous file is intact") from exc
        raise
    return path


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
            raise CheckpointError(
                f"checkpoint {path}: refused, it holds objects that would run code when loaded "
                "(only tensors, numbers, strings and containers are accepted). "
                "Re-save it as a plain state dict if you trust its origin."
            ) from None
        raise CheckpointError(f"checkpoint {path}: not a PyTorch checkpoint ({msg.splitlines()[0]})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"checkpoint {path}: not a readable PyTorch checkpoint ({first})") from None


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
    """Inverse of ``capture_rng_state`` (missing parts are left alone)."""
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
        try:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        except RuntimeError:
            pass  # a different number of GPUs: CUDA streams are re-seeded per epoch anyway
