"""Source tags kept: read from FLAC (with its ISRC), MP3, WAV and M4A sources made by ffmpeg, and
carried by every stem, with the stem's name and the model; non-ASCII text survives MP3's ID3."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from model import STEMS
from pipeline.audio import open_audio
from pipeline.separator import Separator
from pipeline.tags import flac_comments

TAGS = {
    "title": "Déjà vu",
    "artist": "Beyoncé",
    "album": "B'Day",
    "track": "3/12",
    "date": "2006",
    "genre": "R&B",
    "ISRC": "USSM10603618",
}
pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")


def tagged(path, codec: list[str]) -> None:
    """A 3 s stereo file made by ffmpeg with the tags above (ffmpeg writes each format's own)."""
    metadata = [item for name, value in TAGS.items() for item in ("-metadata", f"{name}={value}")]
    command = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=f=220:d=3", "-ac", "2"]
    subprocess.run([*command, *metadata, *codec, str(path)], check=True)


@pytest.mark.parametrize(
    ("name", "codec", "kept"),
    [
        ("song.flac", [], {"title", "artist", "album", "tracknumber", "date", "genre", "isrc"}),
        ("song.mp3", [], {"title", "artist", "album", "tracknumber", "date", "genre"}),
        ("song.wav", [], {"title", "artist", "album", "date", "genre"}),
        ("song.m4a", ["-c:a", "aac"], {"title", "artist", "album", "date", "genre"}),
    ],
)
def test_tags_are_read_from_each_kind_of_source(tmp_path, name, codec, kept):
    tagged(tmp_path / name, codec)
    with open_audio(tmp_path / name) as reader:
        tags = reader.tags
    assert set(tags) == kept
    assert tags["artist"] == "Beyoncé" and tags["title"] == "Déjà vu" and tags["genre"] == "R&B"
    if "isrc" in kept:
        assert tags["isrc"] == "USSM10603618" and tags["tracknumber"] == "3/12"
    with open(tmp_path / name, "rb") as stream, open_audio(stream) as reader:
        assert reader.tags == tags  # the same through a file object (an object store's)


@pytest.mark.parametrize("format", ["flac", "wav", "mp3"])
def test_every_stem_carries_the_source_tags_its_stem_name_and_the_model(tmp_path, format):
    tagged(tmp_path / "song.flac", [])
    separator = Separator("default", "cpu", "float32")
    paths = separator.separate_file(tmp_path / "song.flac", tmp_path / "out", format=format)
    for stem in STEMS:
        with sf.SoundFile(paths[stem]) as file:
            assert (file.artist, file.title, file.album) == ("Beyoncé", "Déjà vu", "B'Day")
            assert (file.date, file.genre) == ("2006", "R&B")
            assert file.comment == (
                f"{stem} stem; metasep model {separator.model_id}; ISRC USSM10603618"
            )
        assert np.isfinite(sf.read(paths[stem])[0]).all()


def test_a_flac_header_without_comments_or_truncated_gives_no_fields(tmp_path):
    sf.write(tmp_path / "plain.flac", np.zeros((100, 1)), 8000)
    assert "ISRC" not in flac_comments((tmp_path / "plain.flac").read_bytes())
    tagged(tmp_path / "song.flac", [])
    data = (tmp_path / "song.flac").read_bytes()
    assert flac_comments(data)["ISRC"] == "USSM10603618"
    assert flac_comments(data[:60]) == {} and flac_comments(b"RIFF....") == {}
