"""Training data: MUSDB18-HQ-layout catalogs, resampled once per stage, sampled as the paper does.

A catalog is ``ROOT/<split>/<track>/{drums,bass,other,vocals}.wav`` (what ``metasep synth`` writes
and MUSDB18-HQ ships), on a local path or any fsspec URL, or a local MUSDB18 folder of
``.stem.mp4`` files. Each track is resampled once to every
stage rate, normalised by the standard deviation of its mono mix (as the release does) and cached
as ``.npy`` files that are memory-mapped, so a catalog larger than RAM still trains.

Training examples follow the paper: a random crop, a random channel per stem, a random gain per
stem, stems taken from different tracks in part of each batch, and a mask for silent stems.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model import STEMS
from pipeline.audio import resample
from pipeline.catalog.references import ReferenceTrack, list_references, read_references
from pipeline.settings import load_settings
from pipeline.training.config import TrainConfig

log = logging.getLogger(__name__)
CACHE_VERSION = "1"


class StageTrack:
    """A track ready for sampling: per stage an array (4 stems, channels, samples * 2**i).

    The arrays are memory-mapped cache files; pickling (to a Ray worker) sends only the folder.
    """

    def __init__(self, name: str, folder: Path, stage_count: int) -> None:
        self.name, self.folder, self.stage_count = name, folder, stage_count
        self.stages = [np.load(folder / f"stage{i}.npy", mmap_mode="r") for i in range(stage_count)]

    @property
    def base_length(self) -> int:
        return self.stages[0].shape[-1]

    def __reduce__(self):
        return (StageTrack, (self.name, self.folder, self.stage_count))


def find_tracks(
    root: str, split: str, storage_options: dict[str, Any] | None = None
) -> list[ReferenceTrack]:
    """The tracks under ``root/split`` (or ``root`` itself when it has no such folder) that have
    all four stems, sorted by name; a track folder that lacks one is skipped with a warning."""
    tracks = []
    for track in list_references(root, split, storage_options):
        missing = track.missing(STEMS)
        if missing:
            log.warning("skipping %s: it has no %s", track.location, ", ".join(missing))
            continue
        tracks.append(track)
    if not tracks:
        raise ValueError(f"{root}: no tracks with {', '.join(f'{s}.wav' for s in STEMS)}")
    return tracks


def _read_stems(
    source: ReferenceTrack, storage_options: dict[str, Any] | None
) -> tuple[np.ndarray, int]:
    """The four stems of a track as (4, 2, samples) and their rate (mono stems duplicated)."""
    audio, rate = read_references(source, STEMS, storage_options)
    stems = [a if a.shape[0] == 2 else np.repeat(a[:1], 2, axis=0) for a in audio.values()]
    return np.stack(stems), rate


def default_cache_dir() -> Path:
    """``<cache_dir>/train``: the cache folder of the settings (``METASEP_CACHE_DIR``)."""
    return load_settings().cache_dir / "train"


def prepare_tracks(
    sources: list[ReferenceTrack],
    rates: list[int],
    cache_dir: Path,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[StageTrack]:
    """Resample and normalise every track once (cached), then memory-map the caches."""
    tracks = []
    for source in tqdm(sources, desc="preparing tracks", unit="track", disable=not progress):
        folder = cache_dir / _cache_key(source, rates)
        if not (folder / "done").exists():
            _write_cache(source, rates, folder, storage_options)
        tracks.append(StageTrack(source.name, folder, len(rates)))
    return tracks


def _cache_key(source: ReferenceTrack, rates: list[int]) -> str:
    files = [source.files[name] for name in sorted(source.files)]
    text = "|".join([CACHE_VERSION, *files, source.version(STEMS), *map(str, rates)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _write_cache(
    source: ReferenceTrack, rates: list[int], folder: Path, storage_options: dict[str, Any] | None
) -> None:
    stacked, rate = _read_stems(source, storage_options)  # (4, 2, samples)
    staged = [resample(stacked.reshape(-1, stacked.shape[-1]), rate, r) for r in rates]
    base = min(s.shape[-1] // 2**i for i, s in enumerate(staged))
    folder.mkdir(parents=True, exist_ok=True)
    for i, audio in enumerate(staged):
        audio = audio[:, : base * 2**i].reshape(4, 2, -1)
        mono_mix = audio.sum(0).mean(0)
        audio = audio / max(float(mono_mix.std()), 1e-8)
        partial = folder / f"stage{i}.{os.getpid()}.tmp.npy"  # unique: runs may share a cache
        np.save(partial, audio.astype(np.float32))
        os.replace(partial, folder / f"stage{i}.npy")
    (folder / "done").write_text(source.name)


Batch = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


class CropSampler:
    """Random training batches: per stage mixes (B, 1, T), stems (B, 4, 1, T), masks (B, 4, 1)."""

    def __init__(
        self, tracks: list[StageTrack], config: TrainConfig, base_rate: int, stride: int, seed: int
    ) -> None:
        self.crop = round(config.crop_seconds * base_rate / stride) * stride
        self.tracks = [t for t in tracks if t.base_length >= self.crop]
        if not self.tracks:
            raise ValueError(f"no track is longer than a {config.crop_seconds} s training crop")
        self.config = config
        self.rng = np.random.default_rng(seed)

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state

    def batch(self, size: int) -> Batch:
        examples = [self._example() for _ in range(size)]
        portion = int(size * self.config.shuffle_p + 0.5)
        if portion > 1:  # example j takes stem s from example (j + s) % portion
            mixed = [
                [
                    np.stack([examples[(j + s) % portion][i][s] for s in range(4)])
                    for i in range(len(examples[0]))
                ]
                for j in range(portion)
            ]
            examples = mixed + examples[portion:]
        order = self.rng.permutation(size)
        stages = len(examples[0])
        separated = [
            torch.from_numpy(np.stack([examples[b][i] for b in order])) for i in range(stages)
        ]
        mixes = [s.sum(1) for s in separated]
        masks = [(s != 0).any(-1).float() for s in separated]
        return mixes, separated, masks

    def _example(self) -> list[np.ndarray]:
        """One crop: per stage (4, 1, T_i) with a random channel and gain per stem."""
        track = self.tracks[self.rng.integers(len(self.tracks))]
        start = int(self.rng.integers(0, track.base_length - self.crop + 1))
        channels = self.rng.integers(0, 2, size=4)
        gains = self.rng.uniform(*self.config.gain_range, size=4).astype(np.float32)
        stages = []
        for i, audio in enumerate(track.stages):
            m = 2**i
            crop = (
                audio[np.arange(4), channels, m * start : m * (start + self.crop)] * gains[:, None]
            )
            silent = np.abs(crop).max(axis=-1) < self.config.silence_peak
            crop[silent] = 0.0  # silent stems are exactly zero: masked out of the loss
            stages.append(crop[:, None, :].astype(np.float32))
        # A stem silent at one rate is silent at all: keep the masks of all stages consistent.
        silent_any = np.any([~s[:, 0].any(-1) for s in stages], axis=0)
        for s in stages:
            s[silent_any] = 0.0
        return stages
