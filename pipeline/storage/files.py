"""Stored files: which are audio (by name), and a version that changes when a file's content does.

A catalog's listing, a reference catalog and a folder of estimates all keep the audio files they
find and record each one's version, so that a later run sees what changed.
"""

from __future__ import annotations

import posixpath
from typing import Any

AUDIO_EXTENSIONS = frozenset(
    [
        "aac",
        "aif",
        "aifc",
        "aiff",
        "caf",
        "flac",
        "m4a",
        "mka",
        "mp3",
        "oga",
        "ogg",
        "opus",
        "w64",
        "wav",
        "wave",
        "webm",
        "wma",
    ]
)


def is_audio_name(name: str) -> bool:
    """An audio file by extension; dot-files (e.g. macOS ``._x.wav`` resource forks) are not."""
    base = posixpath.basename(name)
    extension = posixpath.splitext(base)[1].lower().lstrip(".")
    return not base.startswith(".") and extension in AUDIO_EXTENSIONS


def source_version(info: dict[str, Any]) -> str:
    """What changes when an object's content does: its ETag or generation, else mtime and size."""
    for key in ("ETag", "etag", "generation", "md5Hash"):
        if info.get(key):
            return f"{key.lower()}:{str(info[key]).strip(chr(34))}"
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
    if hasattr(stamp, "timestamp"):
        stamp = stamp.timestamp()
    return f"mtime:{stamp}:size:{info.get('size')}"
