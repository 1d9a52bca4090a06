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
import re
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read. The message names the file and the reason."""


class _RecordingWriter:
    """A binary file wrapper that remembers the ``OSError`` behind a failed write, so the
    message can say "No space left on device" rather than the serializer's internal assertion."""

    def __init__(self, f) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _temp_prefix(path: str) -> str:
    return f"{os.path.basename(path)}.{socket.gethostname()}-{os.getpid()}."


def _remove_stale_temps(path: str) -> list[str]:
    """Delete temp files left by earlier writers of ``path`` on this host that no longer run
    (a process killed while writing). Returns the removed paths."""
    folder, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    host = socket.gethostname()
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(base + ".") and name.endswith(".tmp")):
            continue
        tag = name[len(base) + 1 : -len(".tmp")].rsplit(".", 1)[0]  # "<host>-<pid>"
        who, _, pid = tag.rpartition("-")
        if who != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # the writer is alive
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except OSError:
            pass
    return removed


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> str:
    """Write ``obj`` with ``torch.save`` atomically: temp file in the same folder, fsync, rename.

    A crash, a kill or a failed write (no space, no permission) leaves any previous file at
    ``path`` intact; temp files left by killed writers are removed on the next save. Raises
    ``CheckpointError`` naming the path and the reason (e.g. "No space left on device").
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=folder)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        blocker = next((p for p in [folder, *Path(folder).parents] if os.path.exists(p)), None)
        if blocker is not None and not os.path.isdir(blocker):
            reason = f"{blocker} is a file, not a folder"
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}") from exc
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, (OSError, RuntimeError)):
            cause = (writer.error if writer is not None else None) or (exc if isinstance(exc, OSError) else None)
            reason = f"{cause.strerror} (errno {cause.errno})" if cause is not None and cause.strerror else str(exc)
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
