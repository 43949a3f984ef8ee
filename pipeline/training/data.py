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

import contextlib
import hashlib
import itertools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model import STEMS
from pipeline.audio import AudioReader, StreamResampler
from pipeline.settings import load_settings
from pipeline.storage.references import ReferenceTrack, list_references, open_references
from pipeline.training.config import TrainConfig

log = logging.getLogger(__name__)
CACHE_VERSION = "1"
_TAIL = 64  # mix samples kept per stage: the cut to a common length is within them


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
    """``folder/stage<i>.npy``: the four stems (4, 2, base * 2**i) at each stage rate, divided
    by the standard deviation of that stage's mono mix, as the release normalises them.

    The stems are read block by block twice (the deviations, then the arrays written into
    memory-mapped files), so memory does not grow with the track's length."""
    with contextlib.ExitStack() as stack:
        readers = open_references(stack, source, STEMS, storage_options)
        statistics = [_MixStatistics() for _ in rates]
        for stage, block in _staged_blocks(readers, rates):
            statistics[stage].add(block.sum(0).mean(0))
        base = min(s.count // 2**i for i, s in enumerate(statistics))
        folder.mkdir(parents=True, exist_ok=True)
        partials = [folder / f"stage{i}.{os.getpid()}.tmp.npy" for i in range(len(rates))]
        scales = [s.deviation(base * 2**i) for i, s in enumerate(statistics)]
        arrays = [
            np.lib.format.open_memmap(path, "w+", np.float32, (4, 2, base * 2**i))
            for i, path in enumerate(partials)  # unique names: runs may share a cache
        ]
        written = [0] * len(rates)
        for stage, block in _staged_blocks(readers, rates):
            block = block[..., : arrays[stage].shape[-1] - written[stage]]
            arrays[stage][..., written[stage] : written[stage] + block.shape[-1]] = (
                block / scales[stage]
            )
            written[stage] += block.shape[-1]
        for array in arrays:
            array.flush()
        arrays.clear()
        for i, partial in enumerate(partials):
            os.replace(partial, folder / f"stage{i}.npy")
    (folder / "done").write_text(source.name)


def _staged_blocks(
    readers: dict[str, AudioReader], rates: list[int]
) -> Iterator[tuple[int, np.ndarray]]:
    """(stage, (4, 2, n) block) of the stems at each stage rate, in order per stage; a mono
    stem is used for both channels, a stem of more channels by its first."""
    first = readers[STEMS[0]]
    resamplers = [StreamResampler(first.rate, rate, 4 * 2) for rate in rates]
    blocks = zip(*(readers[stem].blocks() for stem in STEMS), strict=True)
    for parts in itertools.chain(blocks, [None]):
        last = parts is None
        if last:
            stems = np.zeros((4 * 2, 0), np.float32)
        else:
            stems = np.concatenate(
                [np.repeat(p[:1], 2, 0) if p.shape[0] != 2 else p for p in parts]
            )
        for stage, resampler in enumerate(resamplers):
            staged = resampler.push(stems, last)
            if staged.shape[-1]:
                yield stage, staged.reshape(4, 2, -1)


class _MixStatistics:
    """A mono mix's sum and sum of squares, block by block; the last ``_TAIL`` samples are kept,
    so that the deviation of a prefix cut a few samples short of the end can be had."""

    def __init__(self) -> None:
        self.count, self.sum, self.squares = 0, 0.0, 0.0
        self.tail = np.zeros(0)

    def add(self, mix: np.ndarray) -> None:
        mix = mix.astype(np.float64)
        self.count += mix.shape[0]
        self.sum += float(mix.sum())
        self.squares += float(np.dot(mix, mix))
        self.tail = np.concatenate([self.tail, mix])[-_TAIL:]

    def deviation(self, length: int) -> float:
        """The standard deviation of the first ``length`` samples (at least 1e-8)."""
        cut = self.count - length
        if cut > self.tail.shape[0]:
            raise RuntimeError("internal error: a stage's cut reaches past its kept tail")
        dropped = self.tail[self.tail.shape[0] - cut :]
        total = self.sum - float(dropped.sum())
        squares = self.squares - float(np.dot(dropped, dropped))
        mean = total / max(length, 1)
        return max(float(np.sqrt(max(squares / max(length, 1) - mean * mean, 0.0))), 1e-8)


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
