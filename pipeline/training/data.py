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
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from tqdm import tqdm

from model import STEMS
from pipeline.audio import AudioError, read_audio, resample
from pipeline.settings import load_settings
from pipeline.training.config import TrainConfig

log = logging.getLogger(__name__)
CACHE_VERSION = "1"


@dataclass(frozen=True)
class TrackSource:
    """One track of a catalog: its name and the URL of each stem file."""

    name: str
    stems: dict[str, str]
    version: str  # sizes and modification times; a change invalidates the cache


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


STEM_CONTAINER = "stem.mp4"


def find_tracks(
    root: str, split: str, storage_options: dict[str, Any] | None = None
) -> list[TrackSource]:
    """Tracks under ``root/split`` (or ``root`` itself when it has no such folder), sorted by name.

    A local catalog of MUSDB18 ``.stem.mp4`` files is read through the musdb package (its
    ``train``/``valid``/``test`` splits); otherwise the MUSDB18-HQ layout of WAV files is expected.
    """
    fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
    if fs.protocol in ("file", ("file", "local")) and list(Path(base).glob("*/*.stem.mp4")):
        return _musdb_tracks(Path(base), split)
    folder = posixpath.join(base, split)
    if not fs.isdir(folder):
        folder = base
    if not fs.isdir(folder):
        raise ValueError(f"{root}: no such catalog folder")
    tracks = []
    for entry in sorted(fs.ls(folder, detail=True), key=lambda e: e["name"]):
        if entry["type"] != "directory":
            continue
        files = {posixpath.basename(p["name"]): p for p in fs.ls(entry["name"], detail=True)}
        names = {stem: f"{stem}.wav" for stem in STEMS}
        if not all(name in files for name in names.values()):
            log.warning("skipping %s: it lacks one of %s", entry["name"], sorted(names.values()))
            continue
        info = [files[names[stem]] for stem in STEMS]
        version = ";".join(
            f"{i.get('size')}:{i.get('mtime') or i.get('LastModified') or i.get('ETag')}"
            for i in info
        )
        urls = {stem: fs.unstrip_protocol(files[names[stem]]["name"]) for stem in STEMS}
        tracks.append(TrackSource(posixpath.basename(entry["name"]), urls, version))
    if not tracks:
        raise ValueError(
            f"{root}: no tracks with {', '.join(f'{s}.wav' for s in STEMS)} in {folder}"
        )
    return tracks


def _musdb_tracks(root: Path, split: str) -> list[TrackSource]:
    import musdb

    subsets, musdb_split = ("test", None) if split == "test" else ("train", split)
    database = musdb.DB(root=str(root), subsets=subsets, split=musdb_split)
    tracks = []
    for track in database.tracks:
        info = Path(track.path).stat()
        tracks.append(
            TrackSource(track.name, {STEM_CONTAINER: track.path}, f"{info.st_size}:{info.st_mtime}")
        )
    if not tracks:
        raise ValueError(f"{root}: no MUSDB18 .stem.mp4 tracks in the {split} split")
    return tracks


def _read_stems(
    source: TrackSource, storage_options: dict[str, Any] | None
) -> tuple[np.ndarray, int]:
    """The four stems of a track as (4, 2, samples) and their rate."""
    if STEM_CONTAINER in source.stems:  # MUSDB18: mixture, drums, bass, other, vocals streams
        import stempeg

        audio, rate = stempeg.read_stems(
            source.stems[STEM_CONTAINER], stem_id=[1, 2, 3, 4], dtype=np.float32, always_3d=True
        )
        return np.ascontiguousarray(audio.transpose(0, 2, 1)), int(rate)
    stems, rate = [], None
    for stem in STEMS:
        with fsspec.open(source.stems[stem], "rb", **(storage_options or {})) as file:
            audio, stem_rate = read_audio(file)
        if rate not in (None, stem_rate) or (stems and audio.shape[-1] != stems[0].shape[-1]):
            raise AudioError(f"{source.name}: stems differ in rate or length")
        stems.append(audio if audio.shape[0] == 2 else np.repeat(audio[:1], 2, axis=0))
        rate = stem_rate
    return np.stack(stems), int(rate)


def default_cache_dir() -> Path:
    """``<cache_dir>/train``: the cache folder of the settings (``METASEP_CACHE_DIR``)."""
    return load_settings().cache_dir / "train"


def prepare_tracks(
    sources: list[TrackSource],
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


def _cache_key(source: TrackSource, rates: list[int]) -> str:
    text = "|".join([CACHE_VERSION, *source.stems.values(), source.version, *map(str, rates)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _write_cache(
    source: TrackSource, rates: list[int], folder: Path, storage_options: dict[str, Any] | None
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


def validation_set(tracks: list[StageTrack], limit: int, silence_peak: float) -> list[Batch]:
    """Whole held-out tracks in mono: per stage the mix (1, 1, T), stems (1, 4, 1, T), mask (1, 4, 1)."""
    examples = []
    for track in tracks[:limit]:
        stems = [torch.from_numpy(np.asarray(a).mean(1, keepdims=True)[None]) for a in track.stages]
        masks = [(s.abs().amax(-1) >= silence_peak).float() for s in stems]
        examples.append(([s.sum(1) for s in stems], stems, masks))
    return examples
