"""Tags: what an audio file says about itself (title, artist, album...), read from a source and
written into the stems made from it.

libsndfile (through soundfile, LGPL, which the project has already) reads and writes the common
fields of FLAC and Ogg (Vorbis comments), WAV (RIFF INFO) and MP3 (ID3); sources that ffmpeg
decodes (M4A, ``.stem.mp4``) keep theirs through the WAV it decodes them to. The ISRC, which
libsndfile has no field for, is read from a FLAC source's Vorbis comments here, and written into
a stem's comment with the stem's name and the model that made it. mutagen, which writes any
field, is GPL and stays out of an MIT project.
"""

from __future__ import annotations

import re
import struct
from typing import BinaryIO

import soundfile as sf

# The fields a stem keeps: libsndfile's names, which every format above can hold
FIELDS = ("title", "artist", "album", "tracknumber", "date", "genre")
_ISRC = re.compile(r"^[A-Z]{2}[A-Z0-9]{3}\d{7}$")
_VORBIS_COMMENT = 4  # FLAC metadata block type


def read_tags(file: sf.SoundFile, header: bytes = b"") -> dict[str, str]:
    """The tags of an open file (the fields it has, not empty), with the ISRC where the file's
    first bytes, ``header``, are a FLAC stream that carries one."""
    tags = {name: getattr(file, name).strip() for name in FIELDS}
    tags = {name: value for name, value in tags.items() if value}
    isrc = flac_comments(header).get("ISRC", "").replace("-", "").upper()
    if _ISRC.match(isrc):
        tags["isrc"] = isrc
    return tags


def flac_comments(header: bytes) -> dict[str, str]:
    """The Vorbis comments of a FLAC stream (field names upper-case, the first value of each),
    read from its first bytes; {} for anything else or a truncated header."""
    if not header.startswith(b"fLaC"):
        return {}
    position, comments = 4, {}
    while position + 4 <= len(header):
        kind, size = header[position] & 0x7F, int.from_bytes(header[position + 1 : position + 4])
        last, body = header[position] & 0x80, header[position + 4 : position + 4 + size]
        if kind == _VORBIS_COMMENT and len(body) == size:
            comments = _vorbis_comments(body)
        if last or len(body) < size:
            break
        position += 4 + size
    return comments


def _vorbis_comments(body: bytes) -> dict[str, str]:
    """A VORBIS_COMMENT block's fields (its integers are little-endian, unlike FLAC's)."""
    try:
        (vendor,) = struct.unpack_from("<I", body, 0)
        offset = 4 + vendor
        (count,) = struct.unpack_from("<I", body, offset)
        offset += 4
        comments: dict[str, str] = {}
        for _ in range(count):
            (length,) = struct.unpack_from("<I", body, offset)
            text = body[offset + 4 : offset + 4 + length].decode("utf-8", "replace")
            offset += 4 + length
            name, _, value = text.partition("=")
            comments.setdefault(name.upper(), value)
        return comments
    except struct.error:
        return {}


def stem_tags(source: dict[str, str], output: str, model_id: str) -> dict[str, str]:
    """What a stem file carries: the source's fields, and a comment that names the stem, the
    model and, where the source has one, its ISRC."""
    comment = f"{output} stem; metasep model {model_id}"
    if "isrc" in source:
        comment += f"; ISRC {source['isrc']}"
    return {**{name: source[name] for name in FIELDS if name in source}, "comment": comment}


def write_tags(file: sf.SoundFile, tags: dict[str, str]) -> None:
    """Set the tags of a file being written (before its first frames). MP3's ID3 frames are
    Latin-1 in libsndfile: its text goes there as Latin-1, what Latin-1 cannot hold as '?'."""
    latin1 = file.format == "MP3"
    for name, value in tags.items():
        if latin1:
            data = value.encode("latin-1", "replace")
            sf._snd.sf_set_string(file._file, sf._str_types[name], data)
        else:
            setattr(file, name, value)


def peek(stream: BinaryIO, size: int = 1 << 16) -> bytes:
    """The first ``size`` bytes of a seekable stream, which is left where it was."""
    where = stream.tell()
    try:
        stream.seek(0)
        return stream.read(size)
    finally:
        stream.seek(where)
