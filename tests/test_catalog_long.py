"""A catalog run's memory does not grow with track length: a 20-minute track through the catalog
job peaks no higher than 1.5x a 1-minute one, per process and for the whole run, and its stems
are exactly those of ``metasep separate FILE``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import STEMS, MultiTasNet, TasNetConfig, save_checkpoint
from pipeline.audio import read_audio
from pipeline.bench.catalog_memory import measure_catalog_run
from pipeline.bench.signals import write_long_track
from pipeline.cli import main
from pipeline.storage.location import open_location
from pipeline.storage.manifest import read_manifests

RATE = 16000  # mono at 16 kHz: 20 minutes stay cheap to make, separate and check


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(3)
    model = MultiTasNet(TasNetConfig(N=32, B=16, H=16, layers=2, stack=1, num_mels=16)).eval()
    return str(save_checkpoint(model, tmp_path_factory.mktemp("model") / "tiny"))


@pytest.mark.slow
def test_a_20_minute_track_takes_the_memory_of_a_1_minute_track(
    ray_local, tiny_checkpoint, tmp_path
):
    peaks = {}
    for minutes in (1, 20):
        library = tmp_path / f"{minutes}min" / "library"
        library.mkdir(parents=True)
        write_long_track(library / "track.flac", minutes, rate=RATE, channels=1)
        destination = tmp_path / f"{minutes}min" / "out"
        peaks[minutes], result = measure_catalog_run(
            library, destination, tiny_checkpoint, f"long-{minutes}"
        )
        assert (result.ok, result.error) == (1, 0), result.errors

    short, long = peaks[1], peaks[20]
    assert long.largest_process_mb <= 1.5 * short.largest_process_mb, (short, long)
    assert long.whole_run_mb <= 1.5 * short.whole_run_mb, (short, long)

    # Exact lengths and the row of the long track.
    fs, root = open_location(str(tmp_path / "20min" / "out"))
    (row,) = read_manifests(fs, root).to_pylist()
    assert row["status"] == "ok" and row["duration_s"] == 20 * 60
    mixture, _ = read_audio(tmp_path / "20min" / "library" / "track.flac")
    stems = []
    for stem in STEMS:
        audio, rate = read_audio(row[f"{stem}_uri"])
        assert rate == RATE and audio.shape == (1, 20 * 60 * RATE)
        stems.append(audio[0].astype(np.float64))

    # One least-squares fit for the whole track: the residual is orthogonal to every stem over
    # all 20 minutes (the stems are 24-bit FLAC, hence the tolerance).
    residual = mixture[0] - np.sum(stems, axis=0)
    for stem in stems:
        cosine = stem @ residual / (np.linalg.norm(stem) * np.linalg.norm(residual))
        assert abs(cosine) < 1e-3


def test_catalog_stems_are_those_of_separating_the_file(ray_local, tiny_checkpoint, tmp_path):
    """The catalog worker and `metasep separate FILE` run the same engine code: the same
    stems, up to float rounding (the worker's torch runs on one thread, the command on all)."""
    library = tmp_path / "library"
    library.mkdir()
    source = write_long_track(library / "track.flac", 1, rate=RATE, channels=2)
    _, result = measure_catalog_run(library, tmp_path / "out", tiny_checkpoint, "same")
    assert result.ok == 1
    fs, root = open_location(str(tmp_path / "out"))
    (row,) = read_manifests(fs, root).to_pylist()
    single = tmp_path / "single"
    command = ["separate", str(source), "-o", str(single), "--checkpoint", tiny_checkpoint]
    assert main([*command, "--precision", "float32"]) == 0  # the memory script's precision
    for stem in STEMS:
        catalog, _ = read_audio(row[f"{stem}_uri"])
        alone, _ = read_audio(single / "track" / f"{stem}.flac")
        np.testing.assert_allclose(catalog, alone, rtol=0, atol=2.0**-21)  # 4 steps of 24 bits
