"""A separated track's balance (from the engine's least-squares sums) and the quality flags a
catalog derives from it: checked against the stems written, on real audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import STEMS, MultiTasNet, TasNetConfig
from pipeline.audio import read_audio, write_audio
from pipeline.bench.signals import bench_audio
from pipeline.catalog.quality import quality_flags
from pipeline.separator import SeparatedFile, Separator
from pipeline.separator.balance import balance, least_squares

SMALL = TasNetConfig(N=32, B=16, H=16, layers=4, stack=1, num_mels=16)
RATE = 16000


def small_model(alike: bool = False) -> MultiTasNet:
    """A random small model; with ``alike``, "other" gets the instrument code of "vocals" in
    every stage, so that the two stems come out the same."""
    torch.manual_seed(0)
    model = MultiTasNet(SMALL).eval()
    if alike:
        with torch.no_grad():
            for stage in model.stages:
                stage.instrument_embedding.weight[2] = stage.instrument_embedding.weight[3]
    return model


def separate(model: MultiTasNet, audio: np.ndarray, tmp_path) -> SeparatedFile:
    write_audio(tmp_path / "song.wav", audio, RATE, format="wav")
    separator = Separator(model, "cpu", "float32", segment=1.0, context=0.25)
    (result,) = separator.separate_files([(tmp_path / "song.wav", tmp_path / "out")], format="wav")
    return result


def test_the_balance_from_the_sums_is_that_of_the_stems_written(tmp_path):
    """Levels, residual and likeness come from the least-squares sums, with no pass over the
    audio; they are those of the files on disk (32-bit float WAV)."""
    audio = bench_audio(4.0, RATE)
    result = separate(small_model(), audio, tmp_path)
    stems = np.stack([read_audio(result.paths[stem])[0] for stem in STEMS]).astype(np.float64)
    mixture = audio.astype(np.float64)
    power = (mixture**2).sum()
    found = result.balance
    assert found.mixture_dbfs == pytest.approx(10 * np.log10(power / mixture.size), abs=1e-3)
    for stem, signal in zip(STEMS, stems, strict=True):
        assert found.stems_db[stem] == pytest.approx(
            10 * np.log10((signal**2).sum() / power), abs=1e-3
        )
    residual = ((mixture - stems.sum(0)) ** 2).sum()
    assert found.residual_db == pytest.approx(10 * np.log10(residual / power), abs=1e-3)
    first, second, correlation = found.similar
    a, b = stems[STEMS.index(first)], stems[STEMS.index(second)]
    assert correlation == pytest.approx(
        (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()), abs=1e-4
    )


def test_two_stems_that_came_out_the_same_are_flagged(tmp_path):
    result = separate(small_model(alike=True), bench_audio(3.0, RATE), tmp_path)
    assert "alike_stems:other+vocals" in quality_flags(result)
    other = quality_flags(separate(small_model(), bench_audio(3.0, RATE), tmp_path / "b"))
    assert not [flag for flag in other if flag.startswith("alike_stems")]


def written(tmp_path, stems: np.ndarray, mixture: np.ndarray, gains: dict | None = None):
    """A SeparatedFile of ``stems`` (4, channels, n) written as files, with the balance the
    engine would give them against ``mixture`` (channels, n)."""
    paths = {}
    for stem, signal in zip(STEMS, stems, strict=True):
        paths[stem] = tmp_path / f"{stem}.wav"
        write_audio(paths[stem], signal.astype(np.float32), RATE, format="wav")
    per_channel = stems.transpose(1, 0, 2).astype(np.float64)  # (channels, 4, n)
    gram = per_channel @ per_channel.transpose(0, 2, 1)
    target = (per_channel @ mixture[:, :, None])[..., 0]
    ones = np.ones((mixture.shape[0], len(STEMS)))
    found = balance(gram, target, (mixture**2).sum(-1), ones, mixture.size)
    frames = mixture.shape[1]
    gains = gains or dict.fromkeys(STEMS, 1.0)
    return SeparatedFile(paths, RATE, mixture.shape[0], frames, gains, found, {})


def test_silence_residual_scaling_and_length_are_flagged(tmp_path):
    rng = np.random.default_rng(1)
    t = np.arange(RATE * 2) / RATE
    parts = [np.sin(2 * np.pi * f * t) * 0.2 for f in (55.0, 110.0, 440.0)]
    stems = np.stack([np.stack([p, p]) for p in parts] + [np.zeros((2, t.size))])
    mixture = stems.sum(0)
    assert quality_flags(written(tmp_path / "a", stems, mixture)) == ["silent_stem:vocals"]
    noisy = mixture + rng.standard_normal(mixture.shape) * 0.4  # the stems miss most of it
    assert "high_residual" in quality_flags(written(tmp_path / "b", stems, noisy))
    scaled = written(tmp_path / "c", stems, mixture, dict.fromkeys(STEMS, 0.5))  # -6 dB
    assert "scaled" in quality_flags(scaled)
    short = written(tmp_path / "d", stems, mixture)
    drums = short.paths["drums"]
    write_audio(drums, read_audio(drums)[0][:, :-10], RATE, format="wav")
    assert "length:drums" in quality_flags(short)
    silent = written(tmp_path / "e", stems * 0, mixture * 0)  # nothing plays: nothing is silent
    assert not [flag for flag in quality_flags(silent) if flag.startswith("silent_stem")]
    # the engine's own least squares put the coefficients where the balance's were given
    per_channel = stems.transpose(1, 0, 2)
    gram = per_channel @ per_channel.transpose(0, 2, 1)
    target = (per_channel @ mixture[:, :, None])[..., 0]
    np.testing.assert_allclose(least_squares(gram, target)[:, :3], 1.0, atol=1e-6)
