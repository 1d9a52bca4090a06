"""One atomic writer for every file the project writes (checkpoints, histories, results, reports).

``atomic_write(path, write)`` writes into a temporary file in the target's folder, flushes and
fsyncs it, renames it over ``path`` and fsyncs the folder: a crash, a kill or a failed write (no
space, no permission) leaves the previous file intact, and temporary files left by killed writers
are removed by the next write. ``write_json``, ``write_csv``, ``write_text`` and ``write_nifti``
(the one NIfTI writer: the embedded cohort and ``prepare`` both write through it) build on it;
``jsonable`` is the one conversion of configs and results to JSON types.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence


class WriteError(RuntimeError):
    """A file cannot be written. The message names the file and the reason; the old file is intact."""


class _RecordingWriter:
    """A binary file wrapper that remembers the ``OSError`` behind a failed write, so the
    message can say "No space left on device" rather than a serializer's internal assertion."""

    def __init__(self, f: IO[bytes]) -> None:
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


def remove_stale_temps(path: str) -> list[str]:
    """Delete temp files left by earlier writers of ``path`` on this host that no longer run
    (a process killed while writing). Returns the removed paths."""
    folder, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    host, removed = socket.gethostname(), []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(base + ".") and name.endswith(".tmp")):
            continue
        tag = name[len(base) + 1 : -len(".tmp")].rsplit(".", 1)[0]  # "<host>-<pid>"
        who, _, pid = tag.rpartition("-")
        if who != host or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True


def _open_temp(path: str, what: str) -> tuple[int, str]:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temps(path)
        return tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=folder)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        blocker = next((p for p in [folder, *Path(folder).parents] if os.path.exists(p)), None)
        if blocker is not None and not os.path.isdir(blocker):
            reason = f"{blocker} is a file, not a folder"
        raise WriteError(f"cannot write {what} {path}: {reason}") from exc


def _fsync_folder(folder: str) -> None:
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], what: str = "file") -> str:
    """Write ``path`` atomically: ``write(f)`` fills a binary temp file in the same folder, which
    is fsynced and renamed over ``path``. Raises ``WriteError`` naming ``what``, the path and the
    reason (e.g. "No space left on device"); the previous file is intact."""
    path = os.fspath(path)
    fd, tmp = _open_temp(path, what)
    recorder = None
    try:
        with os.fdopen(fd, "wb") as f:
            recorder = _RecordingWriter(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(os.path.dirname(os.path.abspath(path)))
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, (OSError, RuntimeError)):
            cause = (recorder.error if recorder is not None else None) or (exc if isinstance(exc, OSError) else None)
            reason = f"{cause.strerror} (errno {cause.errno})" if cause is not None and cause.strerror else str(exc)
            raise WriteError(f"cannot write {what} {path}: {reason}; the previous file is intact") from exc
        raise
    return path


def jsonable(obj: Any) -> Any:
    """``obj`` in JSON types: tuples as lists, mappings (a ``Config`` too) as dicts, numpy and
    torch scalars as numbers, typed results through their ``to_dict``."""
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


def write_text(path: str | os.PathLike, text: str, what: str = "file") -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), what)


def write_json(path: str | os.PathLike, obj: Any, what: str = "file") -> str:
    """Write ``jsonable(obj)`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(jsonable(obj), indent=1), what)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], what: str = "file") -> str:
    """Write ``rows`` (dicts; the header is every key in order of first appearance) atomically."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return write_text(path, buf.getvalue(), what)


def write_nifti(path: str | os.PathLike, data: Any, affine: Any, what: str = "volume", compresslevel: int = 1) -> str:
    """Write ``data`` (voxels ``[x, y, z]``, their dtype kept) as NIfTI-1 with ``affine`` (4x4, mm,
    RAS world) in both the qform and the sform, atomically. A ``.gz`` path is gzip-compressed at
    ``compresslevel`` with no timestamp, so the same voxels give the same bytes."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    payload = img.to_bytes()
    if os.fspath(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=compresslevel, mtime=0)
    return atomic_write(path, lambda f: f.write(payload), what)
