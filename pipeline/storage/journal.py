"""A local journal of what a run could not write to its destination, published later.

When the destination's store is down (or full, or read-only) a run keeps writing its manifest
parts and its summary, to a folder on this machine named after the destination, under the same
relative paths they would have there. Each later flush of the run, and the next run on this
machine for that destination, publish them (oldest first) and delete the local copies. So a
driver that dies during an outage still loses at most one flush interval of rows.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from pathlib import Path

from pipeline.storage.location import full_url, write_bytes
from pipeline.storage.paths import short_hash

log = logging.getLogger(__name__)

_DESTINATION_NAME = "destination.txt"  # the destination's URL, for the person who looks


class Journal:
    """The journal folder of one destination: ``root/<hash of its URL>/``."""

    def __init__(self, root: str | Path, fs, destination: str) -> None:
        self.fs, self.destination = fs, destination
        url = full_url(fs, destination)
        self.folder = Path(root) / short_hash(url, 16)
        self._url = url

    def keep(self, relative: str, data: bytes) -> Path:
        """Write ``data`` for ``destination/relative`` into the journal (atomically)."""
        path = self.folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.folder / _DESTINATION_NAME).write_text(self._url + "\n")
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    def pending(self) -> list[str]:
        """The relative paths waiting to be published, oldest first."""
        if not self.folder.is_dir():
            return []
        files = [
            path
            for path in self.folder.rglob("*")
            if path.is_file() and path.name != _DESTINATION_NAME and not path.name.startswith(".")
        ]
        files.sort(key=lambda path: (path.stat().st_mtime, str(path)))
        return [path.relative_to(self.folder).as_posix() for path in files]

    def publish(self) -> int:
        """Write every pending file to the destination, deleting each local copy once it is
        there; returns how many were published. Raises the store's error where one fails (the
        rest stay for the next try)."""
        published = 0
        for relative in self.pending():
            local = self.folder / relative
            write_bytes(self.fs, posixpath.join(self.destination, relative), local.read_bytes())
            local.unlink()
            published += 1
        if published:
            log.info("published %d journaled file(s) to %s", published, self._url)
        return published
