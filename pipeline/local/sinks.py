"""The sink interface on a local directory."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path


class DirectorySink:
    """A local directory.

    Files are written in place, not through a temporary file and a rename (which costs six
    times as much per file): a drain that dies mid-write has not deleted its message, so
    the file is written again, whole, on redelivery; the manifest marks a finished run.
    A put replaces the file whole, as an S3 PUT does: the drains of one process (the only
    one a state directory admits) write under one lock, so two of them finishing a run at
    once cannot interleave their manifests.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self._made: set[str] = set()
        self._lock = threading.Lock()

    def put(self, key: str, blob: bytes, content_type: str) -> str:
        path = os.path.join(self.location, key)
        parent = os.path.dirname(path)
        if parent not in self._made:
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        with self._lock:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, blob)
            finally:
                os.close(fd)
        return path

    def get(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.exists() else None

    def keys(self, prefix: str) -> Iterator[str]:
        """Every file's key under the directory `prefix`, in S3's order (by the key's
        characters). os.walk, not Path.rglob: 0.05 s for 35,000 files against 0.74 s, and a
        run's manifest counts them all."""
        found: list[str] = []
        for folder, _, files in os.walk(os.path.join(self.location, prefix)):
            under = os.path.relpath(folder, self.location).replace(os.sep, "/")
            found.extend(name if under == "." else f"{under}/{name}" for name in files)
        yield from sorted(found)
