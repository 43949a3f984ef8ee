"""Separate a reference catalog with one or more checkpoints and score every method with museval.

The reference catalog is in the MUSDB18-HQ layout (``<split>/<track>/{mixture,drums,...}.wav``,
what ``metasep synth`` writes). Besides each checkpoint, the *mixture* baseline (the mixture as
every estimate) is scored the same way, so a table always shows what separation adds.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from model import STEMS
from pipeline.audio import read_audio, resample
from pipeline.scoring import SISEC_RATE, score_track

log = logging.getLogger(__name__)
MIXTURE = "mixture"


@dataclass(frozen=True)
class ReferenceTrack:
    name: str
    folder: Path


def reference_tracks(
    root: Path, split: str = "test", limit: int | None = None
) -> list[ReferenceTrack]:
    """Track folders with a mixture and all four stems under ``root/split`` (or ``root``)."""
    folder = root / split if (root / split).is_dir() else root
    names = ("mixture", *STEMS)
    tracks = [
        ReferenceTrack(path.name, path)
        for path in sorted(folder.iterdir())
        if path.is_dir() and all((path / f"{n}.wav").exists() for n in names)
    ]
    if not tracks:
        raise ValueError(f"{folder}: no track folders with mixture.wav and {', '.join(STEMS)}")
    return tracks[:limit]


def _load(path: Path) -> np.ndarray:
    audio, rate = read_audio(path)
    return resample(audio, rate, SISEC_RATE)


def _score_method(job: tuple[str, str, ReferenceTrack]) -> pd.DataFrame:
    """Separate one track with one method and score it (runs in a worker process)."""
    method, checkpoint, track = job
    references = {stem: _load(track.folder / f"{stem}.wav") for stem in STEMS}
    mixture = _load(track.folder / "mixture.wav")
    if method == MIXTURE:
        estimates = dict.fromkeys(STEMS, mixture)
    else:
        estimates = _separator(checkpoint).separate(mixture, SISEC_RATE)
    return score_track(references, estimates).assign(method=method, track=track.name)


_SEPARATORS: dict[str, object] = {}


def _separator(checkpoint: str):
    """One Separator per checkpoint and process (loaded once, reused for every track)."""
    from pipeline.separator import Separator

    if checkpoint not in _SEPARATORS:
        _SEPARATORS[checkpoint] = Separator(checkpoint, device="cpu")
    return _SEPARATORS[checkpoint]


def benchmark(
    tracks: list[ReferenceTrack],
    checkpoints: dict[str, str],
    workers: int = 1,
    with_mixture: bool = True,
) -> pd.DataFrame:
    """Per-frame scores of every method (checkpoint name, and ``mixture``) on every track."""
    methods = {**checkpoints, **({MIXTURE: ""} if with_mixture else {})}
    jobs = [
        (method, checkpoint, track) for method, checkpoint in methods.items() for track in tracks
    ]
    if workers <= 1:
        results = [_score_method(job) for job in tqdm(jobs, desc="scoring", unit="track")]
        return pd.concat(results, ignore_index=True)
    # spawn, not fork: a forked child of a process whose torch thread pool runs can deadlock
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        scored = pool.map(_score_method, jobs)
        results = list(tqdm(scored, total=len(jobs), desc="scoring", unit="track"))
    return pd.concat(results, ignore_index=True)


def sdr_table(summary: pd.DataFrame) -> str:
    """Markdown table of median SDR (median over frames, then over tracks): methods x stems."""
    pivot = summary.pivot(index="method", columns="target", values="SDR_median")[list(STEMS)]
    lines = ["| method | " + " | ".join(STEMS) + " |", "| --- |" + " ---: |" * len(STEMS)]
    for method, row in pivot.iterrows():
        lines.append(f"| {method} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines)
