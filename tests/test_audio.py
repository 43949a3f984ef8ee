"""Audio decoding (libsndfile, ffmpeg fallback), one-line errors, atomic writes, streaming."""

from __future__ import annotations

import io
import itertools
import os
import stat
import subprocess

import numpy as np
import pytest
import soundfile as sf

from pipeline import audio
from pipeline.audio import (
    RESCALE_PEAK,
    AudioError,
    AudioWriter,
    StreamResampler,
    check_writable,
    headroom_gain,
    open_audio,
    read_audio,
    resample,
    write_audio,
)

RATE = 22050
TONES = (440.0, 660.0)  # left, right


def tones(seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return np.stack([0.4 * np.sin(2 * np.pi * f * t) for f in TONES]).astype(np.float32)


def dominant_frequency(channel: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(channel * np.hanning(channel.size)))
    return float(np.argmax(spectrum) * rate / channel.size)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> dict[str, object]:
    """The same stereo tones as WAV, FLAC, OGG and MP3 (libsndfile) and M4A/AAC (ffmpeg)."""
    folder = tmp_path_factory.mktemp("encoded")
    audio = tones()
    files = {}
    for suffix, subtype in (("wav", "FLOAT"), ("flac", "PCM_24"), ("ogg", "VORBIS"), ("mp3", None)):
        files[suffix] = folder / f"tones.{suffix}"
        sf.write(files[suffix], audio.T, RATE, subtype=subtype)
    files["m4a"] = folder / "tones.m4a"
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(files["wav"]), "-c:a", "aac"]
    subprocess.run([*command, str(files["m4a"])], check=True)
    return files


@pytest.mark.parametrize("suffix", ["wav", "flac", "ogg", "mp3", "m4a"])
def test_every_format_decodes_to_the_same_stereo_tones(encoded, suffix):
    audio, rate = read_audio(encoded[suffix])
    assert audio.dtype == np.float32 and rate == RATE and audio.shape[0] == 2
    # Lossy codecs pad by up to a frame or two.
    assert RATE <= audio.shape[1] <= RATE + 4096
    for channel, frequency in zip(audio, TONES, strict=True):
        assert abs(dominant_frequency(channel, rate) - frequency) < 3
    if suffix in ("wav", "flac"):
        np.testing.assert_allclose(audio, tones(), atol=1e-6)


def test_m4a_is_decoded_by_the_ffmpeg_fallback(encoded):
    with pytest.raises(sf.LibsndfileError):
        sf.info(encoded["m4a"])
    with open_audio(encoded["m4a"]) as reader:
        assert (reader.rate, reader.channels) == (RATE, 2)
        assert sum(block.shape[1] for block in reader.blocks(1000)) == reader.frames


def bad_inputs(folder) -> dict[str, object]:
    """One of each kind of input that is not usable audio."""
    (folder / "empty.wav").write_bytes(b"")
    sf.write(folder / "zero.wav", np.zeros((0, 2), np.float32), RATE)
    (folder / "notes.mp3").write_text("these are not the samples you are looking for\n" * 20)
    (folder / "noise.flac").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "folder.wav").mkdir()
    return {
        "empty file": folder / "empty.wav",
        "zero-length": folder / "zero.wav",
        "not a readable audio file": folder / "notes.mp3",
        "not a readable audio file ": folder / "noise.flac",
        "is a directory": folder / "folder.wav",
        "no such file": folder / "missing.wav",
    }


def test_bad_inputs_give_one_line_errors_that_name_the_file(tmp_path):
    for reason, path in bad_inputs(tmp_path).items():
        with pytest.raises(AudioError) as caught:
            read_audio(path)
        message = str(caught.value)
        assert str(path) in message and reason.strip() in message, message
        assert "\n" not in message and "Traceback" not in message


def test_interrupted_write_leaves_no_file(tmp_path):
    target = tmp_path / "out.flac"
    with pytest.raises(RuntimeError), AudioWriter(target, RATE, 2) as writer:
        writer.write(tones())
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with AudioWriter(target, RATE, 2) as writer:
        writer.write(tones())
    assert [p.name for p in tmp_path.iterdir()] == ["out.flac"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_permissions_of_any_new_file(tmp_path, umask):
    """0666 less the umask, as the file would get from open(): not mkstemp's 0600."""
    previous = os.umask(umask)
    try:
        write_audio(tmp_path / "out.flac", tones(), RATE)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out.flac").stat().st_mode) == 0o666 & ~umask


def test_a_wav_file_that_would_pass_4_gb_is_rf64_and_one_that_fits_stays_riff(tmp_path):
    """A RIFF WAV's sizes are 32-bit: past 4 GB readers lose the end, so such a file is RF64.
    (Writing 4 GB here would be slow: the size is announced, a second of audio written.)"""
    huge = 2**32 // 8 + 1  # stereo float32 frames just over 4 GB
    with AudioWriter(tmp_path / "long.wav", RATE, 2, "wav", frames=huge) as writer:
        writer.write(tones())
    with AudioWriter(tmp_path / "short.wav", RATE, 2, "wav", frames=RATE) as writer:
        writer.write(tones())
    assert (tmp_path / "long.wav").read_bytes()[:4] == b"RF64"
    assert (tmp_path / "short.wav").read_bytes()[:4] == b"RIFF"
    for name in ("long.wav", "short.wav"):
        np.testing.assert_array_equal(read_audio(tmp_path / name)[0], tones())


def test_a_wav_writer_not_told_its_length_refuses_to_pass_4_gb(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "_WAV_DATA_BYTES", 3 * RATE * 2 * 4)  # 4 GB, scaled to 3 s
    refused = pytest.raises(AudioError, match="more than 4 GB of WAV data")
    with refused, AudioWriter(tmp_path / "out.wav", RATE, 2, "wav") as writer:
        for _ in range(4):
            writer.write(tones())
    assert list(tmp_path.iterdir()) == []  # nothing that looks complete


def test_formats_that_cannot_hold_the_audio_are_found_before_writing():
    check_writable("a.wav", "mp3", 48000, 2)
    check_writable("a.wav", "wav", 192000, 12)
    for format, rate, channels in (("mp3", 96000, 2), ("mp3", 44100, 6), ("flac", 44100, 9)):
        with pytest.raises(AudioError, match=f"a.wav: {format} files cannot hold {channels}"):
            check_writable("a.wav", format, rate, channels)


def test_written_bytes_depend_on_the_samples_alone(tmp_path):
    """No PEAK chunk in float WAV (libsndfile stamps the time of writing into it), to a path or a
    file object alike; int16 samples reach a 16-bit WAV exactly."""
    audio = tones()
    pcm = np.round(audio * 32767).astype(np.int16)
    for format, samples in (("wav", audio), ("wav16", pcm), ("flac", audio)):
        path = tmp_path / f"tones-{format}"
        write_audio(path, samples, RATE, format)
        buffer = io.BytesIO()
        write_audio(buffer, samples, RATE, format)
        assert buffer.getvalue() == path.read_bytes()
        assert b"PEAK" not in buffer.getvalue()
    written, _ = sf.read(tmp_path / "tones-wav16", dtype="int16", always_2d=True)
    assert sf.info(tmp_path / "tones-wav16").subtype == "PCM_16"
    assert np.array_equal(written.T, pcm)


def test_a_writer_clips_integer_pcm_at_full_scale_and_measures_what_it_was_given(tmp_path):
    """FLAC (24-bit) clips and records the peak that went over, so that a caller can write
    the file again scaled (``headroom_gain``); float WAV keeps every level as it is."""
    audio = tones() * 3  # peaks near 1.5
    peak = float(np.abs(audio).max())
    with AudioWriter(tmp_path / "loud.flac", RATE, 2) as writer:
        for block in np.array_split(audio, 5, axis=1):
            writer.write(block)
    assert writer.peak == pytest.approx(peak)
    clipped, _ = read_audio(tmp_path / "loud.flac")
    np.testing.assert_allclose(clipped, np.clip(audio, -1, 1), atol=1e-6)
    with AudioWriter(tmp_path / "loud.wav", RATE, 2, "wav") as writer:
        writer.write(audio)
    np.testing.assert_array_equal(read_audio(tmp_path / "loud.wav")[0], audio)
    assert headroom_gain(0.7) == headroom_gain(1.0) == 1.0
    assert headroom_gain(peak) * peak == pytest.approx(RESCALE_PEAK)


@pytest.mark.parametrize(("source", "target"), [(44100, 32000), (22050, 16000), (8000, 48000)])
def test_streamed_resampling_equals_resampling_at_once(source, target):
    signal = np.random.default_rng(1).standard_normal((3, source)).astype(np.float32)
    stream = StreamResampler(source, target, channels=3)
    edges = [0, 1, 1000, 1001, 7000, source]
    parts = [stream.push(signal[:, a:b]) for a, b in itertools.pairwise(edges)]
    parts.append(stream.push(signal[:, :0], last=True))
    streamed = np.concatenate(parts, axis=1)
    whole = resample(signal, source, target)
    assert streamed.shape == whole.shape == (3, target)
    np.testing.assert_allclose(streamed, whole, atol=1e-5)
