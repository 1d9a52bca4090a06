"""Counting what is read from files, at the file-system boundary: every ``open`` of a watched
path and the bytes read through it (compressed bytes, for a ``.nii.gz``), whichever library opens
it (nibabel through gzip, MONAI through nibabel). Nothing is replaced: the real file is opened and
read, its ``read``/``readinto`` only counted on the way.

Used by ``test_cache.py`` and ``ddp_cache_worker.py`` to show that set-up reads each volume once.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import threading
from typing import Iterable, Iterator


class Reads:
    """Per watched path: ``opens[path]`` and ``bytes[path]`` read since the counting began."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.watched = {os.path.abspath(p) for p in paths}
        self.opens = dict.fromkeys(self.watched, 0)
        self.bytes = dict.fromkeys(self.watched, 0)
        self._lock = threading.Lock()

    def _count(self, path: str, n: int, opened: bool = False) -> None:
        with self._lock:
            self.bytes[path] += n
            self.opens[path] += opened

    def wrap(self, f, path: str):
        read, readinto = f.read, f.readinto

        def counted_read(*args):
            data = read(*args)
            self._count(path, len(data))
            return data

        def counted_readinto(buffer):
            n = readinto(buffer)
            self._count(path, n or 0)
            return n

        f.read, f.readinto = counted_read, counted_readinto
        self._count(path, 0, opened=True)
        return f

    def reset(self) -> None:
        with self._lock:
            self.opens = dict.fromkeys(self.watched, 0)
            self.bytes = dict.fromkeys(self.watched, 0)


@contextlib.contextmanager
def count_reads(paths: Iterable[str]) -> Iterator[Reads]:
    """Count the opens of and the bytes read from ``paths`` inside the ``with`` block."""
    reads = Reads(paths)
    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and "r" in mode and "b" in mode:
            path = os.path.abspath(os.fspath(file))
            if path in reads.watched:
                return reads.wrap(f, path)
        return f

    builtins.open = counting_open
    try:
        yield reads
    finally:
        builtins.open = real_open
