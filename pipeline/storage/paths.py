"""Where a track's stems go: ``DST/stems/<track_id without extension>/<stem>.<ext>``, sanitised.

Object keys are chosen by whoever filled the bucket: they may hold ``..``, leading slashes,
backslashes or control characters. A track's output folder keeps its relative path where that is
safe and replaces what is not; a folder that had to change, or that two tracks would share (say
``a.wav`` and ``a.flac``), gets a short hash of the ``track_id`` so that it stays unique. Nothing
ever resolves to a path outside ``DST/stems/``.
"""

from __future__ import annotations

import hashlib
import posixpath
import re

from model import STEMS

_UNSAFE_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\\]")
_MAX_PART_BYTES = 180  # file systems allow 255 bytes per name; leave room for a hash suffix


def short_hash(text: str, length: int = 8) -> str:
    """A stable short hexadecimal digest of ``text``."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def sanitized_key(track_id: str) -> str:
    """A safe relative folder for ``track_id``: the path without extension, minus anything that
    could climb out or confuse a file system. Changed paths carry a hash of the original."""
    stem = posixpath.splitext(track_id)[0]
    parts = []
    for part in stem.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        part = "__" if part == ".." else _UNSAFE_CHARACTERS.sub("_", part)
        if part.startswith("."):
            part = "_" + part[1:]
        encoded = part.encode("utf-8", "surrogatepass")
        if len(encoded) > _MAX_PART_BYTES:
            part = encoded[:_MAX_PART_BYTES].decode("utf-8", "ignore")
        parts.append(part)
    key = "/".join(parts) or "_"
    return key if key == stem else f"{key}-{short_hash(track_id)}"


def stem_paths(destination: str, output_key: str, extension: str) -> dict[str, str]:
    """The protocol-less path of each stem of a track under ``destination`` (also protocol-less).

    Raises ``ValueError`` if a path would leave ``destination/stems/``, which a key from
    :func:`sanitized_key` never does: this is the last line of defence, not the mechanism.
    """
    root = posixpath.join(destination, "stems")
    paths = {stem: posixpath.join(root, output_key, f"{stem}.{extension}") for stem in STEMS}
    for path in paths.values():
        if not posixpath.normpath(path).startswith(posixpath.normpath(root) + "/"):
            raise ValueError(f"refusing to write {path!r}: outside {root!r}")
        if any(part in ("", ".", "..") for part in path[len(root) + 1 :].split("/")):
            raise ValueError(f"refusing to write {path!r}: unsafe path")
    return paths
