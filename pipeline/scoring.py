"""BSSEval v4 scoring with museval, in the SiSEC 2018 convention, in memory bounded by a block.

Every track is scored per 1 s window with 1 s hop (at 44.1 kHz), as ``museval.evaluate`` scores
it; a method's number for a target is the median over frames of each track, then the median over
tracks, which is the figure MUSDB18 papers quote. The per-frame rows can also be stored as
museval's own per-track JSON, so ``museval.EvalStore`` reads them back.

BSSEval v4 fits its distortion filters (512 taps) once per track, from inner products of lagged
references and estimates over the whole track, then decomposes each frame by projecting its
references through them. ``museval.evaluate`` computes those inner products with FFTs of the
whole track: a ten-minute track took 16.9 GB (README). Here they are summed block by block (the
same sums: the lags reach into the previous block through a history of 511 samples), and the
frames are decomposed as they are read again, so memory does not depend on the track's length.
The same numbers come with less work: the filters of all targets are solved with one
factorisation (museval factorises the same matrix once per target); the blocks' correlation
spectra are summed and transformed back once per track; a frame's projections transform each
reference channel once, where museval runs one FFT convolution per target, source and channel
pair. The tests hold every frame to ``museval.evaluate``.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import museval
import numpy as np
import pandas as pd
import scipy.fft
import scipy.linalg
from museval.metrics import _reshape_G
from scipy.linalg import toeplitz

log = logging.getLogger(__name__)
METRICS = ("SDR", "SIR", "ISR", "SAR")
SISEC_RATE = 44100
FILTER_TAPS = 512  # museval's filters_len
# Bump when a change alters the scores of the same files, so that evaluations score them again.
# 2: equal reference channels merged (the filters of a mono stem were noise where LU missed that
# the matrix is singular).
SCORER_VERSION = 2
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
        filters = _Filters(products.finish(), scored, products.copies[scored])
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
    correlation of size ``_FFT_SIZE``; the correlations' spectra are summed over the track and
    transformed back once, at the end (the inverse transform is linear)."""

    def __init__(self, targets: int) -> None:
        self.targets, self.samples = targets, 0
        self.audible = np.zeros(targets, dtype=bool)
        self.copies: np.ndarray | None = None  # (targets, channels): equal to the first so far
        self._spectra: np.ndarray | None = None  # (signals, reference channels, bins), complex
        self._history: np.ndarray | None = None

    def finish(self) -> np.ndarray:
        """The sums, (signals, reference channels, taps) float64, over every block added; the
        spectra are let go (no block can be added after)."""
        spectra, self._spectra = self._spectra, None
        # c[a, b, l] = sum_m x_a(m) * extended_b(m + l): lag k = taps - 1 - l
        sums = [np.fft.irfft(spectrum, _FFT_SIZE)[:, FILTER_TAPS - 1 :: -1] for spectrum in spectra]
        return np.stack(sums)

    def add(self, reference: np.ndarray, estimate: np.ndarray) -> None:
        """One block: (targets, channels, n) references and estimates."""
        if reference.shape != estimate.shape or reference.shape[0] != self.targets:
            raise ValueError(f"blocks of {reference.shape} and {estimate.shape} do not match")
        self.audible |= np.any(reference != 0, axis=(1, 2))
        if self.copies is None:
            self.copies = np.ones(reference.shape[:2], dtype=bool)
            self.copies[:, 0] = False
        self.copies &= np.all(reference == reference[:, :1], axis=2)
        channels = reference.shape[0] * reference.shape[1]
        signals = np.concatenate([reference, estimate]).reshape(2 * channels, -1)
        if self._spectra is None:
            self._spectra = np.zeros((2 * channels, channels, _FFT_SIZE // 2 + 1), complex)
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
            self._spectra[a] += lagged * anchor
        self._history = extended[:, extended.shape[1] - (FILTER_TAPS - 1) :]
        self.samples += signals.shape[1]


class _Filters:
    """BSSEval v4's distortion filters of one track, as museval computes them from the whole
    track (``bss_eval`` with ``framewise_filters=False``), built from the lagged products of the
    ``scored`` targets; :meth:`decompose` scores a frame as museval's decomposition does."""

    def __init__(self, sums: np.ndarray, scored: list[int], copies: np.ndarray) -> None:
        """``sums``: :meth:`_LaggedProducts.finish` of a track; ``scored``: the targets to build
        filters for (those whose reference is not silent throughout); ``copies``: (scored,
        channels), which of their reference channels equal their first."""
        taps, (count, channels) = FILTER_TAPS, copies.shape
        gram, cross = _normal_equations(sums, scored, channels)
        solution = _solve(
            _reshape_G(gram), cross.reshape(count, -1, channels).transpose(1, 0, 2), copies
        )
        self.all_sources = solution.transpose(1, 0, 2).reshape(
            count, count, channels, taps, channels
        )
        self.own_source = [
            _solve(
                _reshape_G(gram[k, k][None, None]),
                cross[k, k].reshape(-1, channels)[:, None],
                copies[k : k + 1],
            ).reshape(channels, taps, channels)
            for k in range(count)
        ]
        self._filter_spectra: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}

    def decompose(self, reference: np.ndarray, estimate: np.ndarray) -> np.ndarray:
        """museval's (SDR, ISR, SIR, SAR) of each target over one frame, (targets, 4); NaN when
        a reference or an estimate is silent over the frame, as museval has it.

        museval projects a frame's references through the filters with one FFT convolution per
        (target, source, channel, channel) and the frame zero outside it; these are the same
        convolutions, as products of spectra: each reference channel is transformed once and
        the filters' spectra are kept for the track."""
        reference = reference.astype(np.float64)  # (targets, channels, n)
        estimate = estimate.astype(np.float64)
        result = np.full((reference.shape[0], 4), np.nan)
        if _any_silent(reference) or _any_silent(estimate):
            return result
        n = reference.shape[-1]
        size, all_sources, own_source = self._spectra(n)
        spectra = scipy.fft.rfft(reference, size, axis=-1)  # (sources, channels, bins)
        # projections[k, c]: target k's estimate channel c from all sources, or its own only
        projected_all = np.einsum("jdf,kjdcf->kcf", spectra, all_sources, optimize=True)
        projected_own = np.einsum("kdf,kdcf->kcf", spectra, own_source, optimize=True)
        length = n + FILTER_TAPS - 1
        on_all = scipy.fft.irfft(projected_all, size, axis=-1)[..., :length]
        on_own = scipy.fft.irfft(projected_own, size, axis=-1)[..., :length]
        true = np.zeros(on_all.shape)
        true[..., :n] = reference
        padded = np.zeros(on_all.shape)
        padded[..., :n] = estimate
        energy = functools.partial(np.sum, axis=(1, 2))
        with np.errstate(divide="ignore"):
            result[:, 0] = _db(energy(true**2), energy((padded - true) ** 2))  # SDR
            result[:, 1] = _db(energy(true**2), energy((on_own - true) ** 2))  # ISR
            result[:, 2] = _db(energy(on_own**2), energy((on_all - on_own) ** 2))  # SIR
            result[:, 3] = _db(energy(on_all**2), energy((padded - on_all) ** 2))  # SAR
        return result

    def _spectra(self, n: int) -> tuple[int, np.ndarray, np.ndarray]:
        """The FFT size for frames of ``n`` samples and the filters' spectra at that size:
        (targets, sources, channels, channels, bins) and (targets, channels, channels, bins)."""
        if n not in self._filter_spectra:
            size = scipy.fft.next_fast_len(n + FILTER_TAPS - 1, real=True)
            all_sources = scipy.fft.rfft(self.all_sources.transpose(0, 1, 2, 4, 3), size)
            own_source = scipy.fft.rfft(np.stack(self.own_source).transpose(0, 1, 3, 2), size)
            self._filter_spectra[n] = (size, all_sources, own_source)
        return self._filter_spectra[n]


def _normal_equations(
    sums: np.ndarray, scored: list[int], channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """museval's G and D of the ``scored`` targets from a track's lagged sums: G[j, i, c2, c1],
    (targets, targets, channels, channels, taps, taps), the Toeplitz matrix of the correlation
    of references (i, c1) and (j, c2) at lags -(taps-1)..taps-1; D[k, j, cj, lag, c], estimate
    (k, c) against reference (j, cj) delayed by lag."""
    taps, count = FILTER_TAPS, len(scored)
    pick = [t * channels + c for t in scored for c in range(channels)]
    references = sums[np.ix_(pick, pick)]  # (scored channels, scored channels, taps)
    estimates = sums[[sums.shape[1] + p for p in pick]][:, pick]
    gram = np.zeros((count, count, channels, channels, taps, taps))
    pairs = itertools.product(range(count), range(channels))
    for (i, c1), (j, c2) in itertools.combinations_with_replacement(pairs, 2):
        x, y = i * channels + c1, j * channels + c2
        block = toeplitz(references[x, y], references[y, x])
        gram[j, i, c2, c1] = block
        gram[i, j, c1, c2] = block.T
    cross = estimates.reshape(count, channels, count, channels, taps).transpose(0, 2, 3, 4, 1)
    return gram, cross


def _any_silent(signals: np.ndarray) -> bool:
    """museval's test of a frame: a signal of (signals, channels, n) whose channels sum to zero
    at every sample."""
    return bool(np.any(np.all(signals.sum(axis=1) == 0, axis=1)))


def _db(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """10 log10 of the ratio; +inf where the denominator is 0, as museval's ``_safe_db``."""
    ratio = np.divide(
        numerator, denominator, out=np.full(numerator.shape, np.inf), where=denominator != 0
    )
    return 10 * np.log10(ratio)


def _solve(gram: np.ndarray, targets: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """museval's least squares of the filters: ``gram`` (n, n) regularised by machine epsilon,
    against ``targets`` (n, sets, channels), every set with one factorisation.

    ``copies`` (sources, channels) marks the reference channels equal to their source's first
    (a mono stem in both channels). Their rows equal the first's, so the matrix is singular and
    museval takes the minimum-norm least-squares solution (numpy's ``lstsq``, an SVD: 25 s for
    4,096 rows on this project's CPU). That solution gives equal channels equal filters: here
    their unknowns are merged into the first's, the smaller system is solved as any other, and
    the result is split evenly among them. Where the matrix is singular anyway, the minimum-norm
    solution comes from LAPACK's complete orthogonal factorisation (``gelsy``) with numpy's
    rank cut-off, as the SVD would give it in half to two thirds of the time (5.5 against
    10.9 s for 3,072 rows, 17.3 against 25.0 s for 4,096)."""
    n, sets, channels = targets.shape
    flat = targets.reshape(n, sets * channels)
    taps = n // copies.size
    kept = ~np.repeat(copies.reshape(-1), taps)
    reduced = gram[np.ix_(kept, kept)] if not kept.all() else gram
    try:
        merged = np.linalg.solve(reduced + np.finfo(float).eps * np.eye(len(reduced)), flat[kept])
    except np.linalg.LinAlgError:
        cutoff = np.finfo(float).eps * len(reduced)  # numpy's rcond=None
        merged = scipy.linalg.lstsq(reduced, flat[kept], cond=cutoff, lapack_driver="gelsy")[0]
    solution = np.zeros_like(flat)
    solution[kept] = merged
    by_channel = solution.reshape(*copies.shape, taps, -1)  # a view: (sources, channels, ...)
    for source, equal in enumerate(copies):
        if equal.any():
            share = by_channel[source, 0] / (1 + equal.sum())
            by_channel[source, 0] = share
            by_channel[source, equal] = share
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
