"""BSSEval v4 scoring with museval, in the SiSEC 2018 convention.

Every track is scored per 1 s window with 1 s hop (at 44.1 kHz) by ``museval.evaluate``; a
method's number for a target is the median over frames of each track, then the median over tracks,
which is the figure MUSDB18 papers quote. The per-frame rows can also be stored as museval's own
per-track JSON, so ``museval.EvalStore`` reads them back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import museval
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
METRICS = ("SDR", "SIR", "ISR", "SAR")
SISEC_RATE = 44100


def score_track(
    references: Mapping[str, np.ndarray],
    estimates: Mapping[str, np.ndarray],
    rate: int = SISEC_RATE,
) -> pd.DataFrame:
    """Per-frame scores of one track: columns target, frame, time and the four metrics.

    ``references`` and ``estimates`` map a target name to (channels, samples) audio at ``rate``;
    every target of ``references`` must have an estimate of the same shape. Infinite values (a
    frame whose estimate equals its reference) are NaN, as museval's per-track JSON stores them,
    so that these frames and a ``museval.EvalStore`` built from the JSON give the same numbers.
    """
    targets = list(references)
    missing = [t for t in targets if t not in estimates]
    if missing:
        raise ValueError(f"no estimate for {', '.join(missing)}")
    for target in targets:
        if estimates[target].shape != references[target].shape:
            raise ValueError(
                f"{target}: estimate shape {estimates[target].shape} differs from the reference's "
                f"{references[target].shape}"
            )
    # museval cannot score a reference that is silent over the whole track: those targets get
    # NaN rows (reported, not dropped) and the others are scored together.
    scored = [t for t in targets if np.any(references[t])]
    for target in sorted(set(targets) - set(scored)):
        log.warning("%s: the reference is silent over the whole track; its scores are NaN", target)
    # museval's frames: whole windows only (a last partial second is not scored), at least one
    frames = max(1, references[targets[0]].shape[-1] // rate)
    scores = np.full((len(targets), 4, frames), np.nan)
    if scored:
        ref = np.stack([references[t].T for t in scored]).astype(np.float64)
        est = np.stack([estimates[t].T for t in scored]).astype(np.float64)
        sdr, isr, sir, sar = museval.evaluate(ref, est, win=rate, hop=rate, mode="v4", padding=True)
        rows = [targets.index(t) for t in scored]
        scores[rows] = np.stack([sdr, sir, isr, sar], axis=1)[..., :frames]
        scores[np.isinf(scores)] = np.nan
    table = [
        (target, frame, float(frame), *map(float, scores[index, :, frame]))
        for index, target in enumerate(targets)
        for frame in range(frames)
    ]
    return pd.DataFrame(table, columns=["target", "frame", "time", *METRICS])


def track_store(track: str, frames: pd.DataFrame) -> museval.TrackStore:
    """museval's TrackStore of one track's frames (its ``.json`` is the museval per-track file)."""
    store = museval.TrackStore(track_name=track, win=1, hop=1)
    for target, rows in frames.groupby("target", sort=False):
        store.add_target(target_name=target, values={m: rows[m].tolist() for m in METRICS})
    return store


def summarize(frames: pd.DataFrame, by: tuple[str, ...] = ("method", "target")) -> pd.DataFrame:
    """Median over frames per track, then median (and mean) over tracks, per method and target.

    ``frames`` needs the columns of ``by``, ``track`` and the metrics; NaN frames (silent
    references) are left out as museval does. ``tracks`` counts the tracks with an SDR (a track
    whose reference is silent throughout has none).
    """
    per_track = frames.groupby([*by, "track"])[list(METRICS)].median()
    grouped = per_track.groupby(list(by))
    median = grouped.median().add_suffix("_median")
    mean = grouped.mean().add_suffix("_mean")
    tracks = grouped.SDR.count().rename("tracks")
    return pd.concat([median, mean, tracks], axis=1).reset_index()
