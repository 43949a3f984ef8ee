"""BSSEval v4 scoring with museval, in the SiSEC 2018 convention, in memory bounded by a block.

Every track is scored per 1 s window with 1 s hop (at 44.1 kHz), as ``museval.evaluate`` scores
it; a method's number for a target is the median over frames of each track, then the median over
tracks, which is the figure MUSDB18 papers quote. The per-frame rows can also be stored as
museval's own per-track JSON, so ``museval.EvalStore`` reads them back.

BSSEval v4 fits its distortion filters (512 taps) once per track, from inner products of lagged
references and estimates over the whole track; each frame is then decomposed with museval's own
functions. ``museval.evaluate`` computes those inner products with FFTs of the whole track: a
ten-minute track took 16.9 GB (README). Here they are summed block by block (the same sums: the
lags reach into the previous block through a history of 511 samples), and the frames are
decomposed as they are read again, so memory does not depend on the track's length. The
per-track filters are solved with one factorisation for all targets, where museval factorises
the same matrix once per target.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import museval
import numpy as np
import pandas as pd
from museval.metrics import _any_source_silent, _bss_crit, _bss_decomp_mtifilt, _reshape_G
from scipy.linalg import toeplitz

log = logging.getLogger(__name__)
METRICS = ("SDR", "SIR", "ISR", "SAR")
SISEC_RATE = 44100
FILTER_TAPS = 512  # museval's filters_len
_FFT_SIZE = 1 << 16  # of the block correlations: blocks of _FFT_SIZE - FILTER_TAPS + 1 samples

# A track as blocks: a call starts a pass over it and yields (references, estimates), each
# (targets, channels, n) with the same n in both; the blocks' lengths may vary.
TrackBlocks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclass
class TrackScores:
    """One track's per-frame scores (columns target, frame, time and the metrics), the targets
    whose reference is silent over the whole track (their rows are NaN) and its length."""

    frames: pd.DataFrame
    silent: tuple[str, ...]
    samples: int


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
    reference = np.stack([references[t] for t in targets])
    estimate = np.stack([estimates[t] for t in targets])

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, reference.shape[-1], 8 * rate):
            yield reference[..., start : start + 8 * rate], estimate[..., start : start + 8 * rate]

    scores = score_blocks(targets, blocks, rate)
    for target in scores.silent:
        log.warning("%s: the reference is silent over the whole track; its scores are NaN", target)
    return scores.frames


def score_blocks(
    targets: Sequence[str], blocks: TrackBlocks, rate: int = SISEC_RATE
) -> TrackScores:
    """Per-frame scores of a track read twice as blocks (see :data:`TrackBlocks`): once for the
    filters, once for the frames. Memory holds a block, a frame and the filters' matrices.

    museval cannot score a reference that is silent over the whole track: those targets get NaN
    rows (reported in ``silent``, not dropped) and the others are scored together."""
    products = _LaggedProducts(len(targets))
    for reference, estimate in blocks():
        products.add(reference, estimate)
    if products.samples == 0:
        raise ValueError("no samples to score")
    scored = [k for k in range(len(targets)) if products.audible[k]]
    # museval's frames: whole windows only (a last partial second is not scored), at least one
    frames = max(1, products.samples // rate)
    scores = np.full((len(targets), 4, frames), np.nan)  # metrics in museval's order
    if scored:
        filters = _Filters(products, scored)
        for frame, (reference, estimate) in enumerate(_frames(blocks, rate, frames)):
            scores[scored, :, frame] = filters.decompose(reference[scored], estimate[scored])
    scores[np.isinf(scores)] = np.nan
    order = [0, 2, 1, 3]  # museval's (SDR, ISR, SIR, SAR) in METRICS order
    table = [
        (target, frame, float(frame), *map(float, scores[index, order, frame]))
        for index, target in enumerate(targets)
        for frame in range(frames)
    ]
    silent = tuple(t for k, t in enumerate(targets) if k not in scored)
    return TrackScores(
        pd.DataFrame(table, columns=["target", "frame", "time", *METRICS]), silent, products.samples
    )


class _LaggedProducts:
    """Inner products of every signal with each reference channel delayed by 0 to 511 samples,
    summed over a track fed block by block.

    ``sums[a, b, k]`` is the sum over time u of ``x_a(u) * r_b(u - k)``: ``a`` indexes the
    reference channels then the estimate channels (target-major), ``b`` the reference channels,
    and signals are zero before their start. A block's products with the lags that reach before
    it take the previous block's last 511 reference samples (the history). Each block is one FFT
    correlation of size ``_FFT_SIZE``."""

    def __init__(self, targets: int) -> None:
        self.targets, self.samples = targets, 0
        self.audible = np.zeros(targets, dtype=bool)
        self.sums: np.ndarray | None = None  # (signals, reference channels, taps), float64
        self._history: np.ndarray | None = None

    def add(self, reference: np.ndarray, estimate: np.ndarray) -> None:
        """One block: (targets, channels, n) references and estimates."""
        if reference.shape != estimate.shape or reference.shape[0] != self.targets:
            raise ValueError(f"blocks of {reference.shape} and {estimate.shape} do not match")
        self.audible |= np.any(reference != 0, axis=(1, 2))
        channels = reference.shape[0] * reference.shape[1]
        signals = np.concatenate([reference, estimate]).reshape(2 * channels, -1)
        if self.sums is None:
            self.sums = np.zeros((2 * channels, channels, FILTER_TAPS))
            self._history = np.zeros((channels, FILTER_TAPS - 1))
        step = _FFT_SIZE - FILTER_TAPS + 1
        for start in range(0, signals.shape[1], step):
            self._add_part(signals[:, start : start + step].astype(np.float64))

    def _add_part(self, signals: np.ndarray) -> None:
        channels = self._history.shape[0]
        extended = np.concatenate([self._history, signals[:channels]], axis=1)
        lagged = np.fft.rfft(extended, _FFT_SIZE)
        anchors = np.conj(np.fft.rfft(signals, _FFT_SIZE))
        for a, anchor in enumerate(anchors):
            # c[b, l] = sum_m x_a(m) * extended_b(m + l): lag k = taps - 1 - l
            correlation = np.fft.irfft(lagged * anchor, _FFT_SIZE)[:, :FILTER_TAPS]
            self.sums[a] += correlation[:, ::-1]
        self._history = extended[:, extended.shape[1] - (FILTER_TAPS - 1) :]
        self.samples += signals.shape[1]


class _Filters:
    """BSSEval v4's distortion filters of one track, as museval computes them from the whole
    track (``bss_eval`` with ``framewise_filters=False``), built from the lagged products of the
    ``scored`` targets; :meth:`decompose` scores a frame with museval's own decomposition."""

    def __init__(self, products: _LaggedProducts, scored: list[int]) -> None:
        sums, targets, taps = products.sums, products.targets, FILTER_TAPS
        channels = sums.shape[1] // targets
        pick = [t * channels + c for t in scored for c in range(channels)]
        references = sums[np.ix_(pick, pick)]  # (scored channels, scored channels, taps)
        estimates = sums[[sums.shape[1] + p for p in pick]][:, pick]
        count = len(scored)
        # G[j, i, c2, c1] as museval builds it: the Toeplitz matrix of the cross-correlation of
        # x = (i, c1) and y = (j, c2) at lags -(taps-1)..taps-1
        gram = np.zeros((count, count, channels, channels, taps, taps))
        pairs = itertools.product(range(count), range(channels))
        for (i, c1), (j, c2) in itertools.combinations_with_replacement(pairs, 2):
            x, y = i * channels + c1, j * channels + c2
            block = toeplitz(references[x, y], references[y, x])
            gram[j, i, c2, c1] = block
            gram[i, j, c1, c2] = block.T
        # D[j, cj, lag, c]: estimate channel c against reference (j, cj) delayed by lag
        cross = estimates.reshape(count, channels, count, channels, taps).transpose(0, 2, 3, 4, 1)
        solution = _solve(_reshape_G(gram), cross.reshape(count, -1, channels).transpose(1, 0, 2))
        self.all_sources = solution.transpose(1, 0, 2).reshape(
            count, count, channels, taps, channels
        )
        self.own_source = [
            _solve(
                _reshape_G(gram[k, k][None, None]), cross[k, k].reshape(-1, channels)[:, None]
            ).reshape(channels, taps, channels)
            for k in range(count)
        ]

    def decompose(self, reference: np.ndarray, estimate: np.ndarray) -> np.ndarray:
        """museval's (SDR, ISR, SIR, SAR) of each target over one frame, (targets, 4); NaN when
        a reference or an estimate is silent over the frame, as museval has it."""
        reference = reference.transpose(0, 2, 1).astype(np.float64)  # (targets, n, channels)
        estimate = estimate.transpose(0, 2, 1).astype(np.float64)
        result = np.full((reference.shape[0], 4), np.nan)
        if _any_source_silent(reference) or _any_source_silent(estimate):
            return result
        for k in range(reference.shape[0]):
            parts = _bss_decomp_mtifilt(
                reference, estimate[k], k, self.all_sources[k], self.own_source[k]
            )
            result[k] = _bss_crit(*parts, False)
        return result


def _solve(gram: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """museval's least squares of the filters: ``gram`` (n, n) regularised by machine epsilon,
    against ``targets`` (n, sets, channels), every set with one factorisation."""
    n, sets, channels = targets.shape
    flat = targets.reshape(n, sets * channels)
    try:
        solution = np.linalg.solve(gram + np.finfo(float).eps * np.eye(n), flat)
    except np.linalg.LinAlgError:
        solution = np.linalg.lstsq(gram, flat, rcond=None)[0]
    return solution.reshape(n, sets, channels)


def _frames(blocks: TrackBlocks, rate: int, count: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The track's first ``count`` frames of ``rate`` samples (one frame of all of it when it
    is shorter), as (references, estimates) pairs, from a second pass over its blocks."""
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    held = made = 0
    for block in itertools.chain(blocks(), [None]):
        if block is not None:
            pending.append(block)
            held += block[0].shape[-1]
        if held < rate and not (block is None and held):
            continue
        reference = np.concatenate([p[0] for p in pending], axis=-1)
        estimate = np.concatenate([p[1] for p in pending], axis=-1)
        start = 0
        while made < count and (held - start >= rate or (block is None and held > start)):
            stop = min(start + rate, held)
            yield reference[..., start:stop], estimate[..., start:stop]
            made, start = made + 1, stop
        if made == count:
            return
        pending, held = [(reference[..., start:], estimate[..., start:])], held - start


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
