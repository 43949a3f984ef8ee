"""Scoring equals museval: per-frame values and the SiSEC median-of-medians summary."""

from __future__ import annotations

import itertools
import json
import tracemalloc

import museval
import numpy as np
import pandas as pd
import pytest
from museval.metrics import _reshape_G

from pipeline.scoring import (
    FILTER_TAPS,
    METRICS,
    _LaggedProducts,
    _normal_equations,
    _solve,
    score_blocks,
    score_track,
    summarize,
    track_store,
)

TARGETS = ("drums", "bass", "other", "vocals")


def make_track(seed: int, seconds: int = 4) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    refs = {t: rng.standard_normal((2, 44100 * seconds)).astype(np.float32) for t in TARGETS}
    noise = {
        t: (0.1 + 0.2 * i) * rng.standard_normal((2, 44100 * seconds))
        for i, t in enumerate(TARGETS)
    }
    return refs, {t: (refs[t] + noise[t]).astype(np.float32) for t in TARGETS}


@pytest.mark.slow  # museval on whole tracks: 20-30 s each on this machine
def test_frames_equal_museval_evaluate():
    refs, ests = make_track(0, seconds=3)
    frames = score_track(refs, ests)
    sdr, isr, sir, sar = museval.evaluate(
        np.stack([refs[t].T for t in TARGETS]), np.stack([ests[t].T for t in TARGETS])
    )
    for index, target in enumerate(TARGETS):
        rows = frames[frames.target == target].sort_values("frame")
        for name, expected in (("SDR", sdr), ("ISR", isr), ("SIR", sir), ("SAR", sar)):
            np.testing.assert_allclose(rows[name].to_numpy(), expected[index], rtol=1e-6)
    assert len(frames) == 4 * 3  # 4 targets x 3 one-second frames


@pytest.mark.slow
def test_summary_equals_museval_evalstore(tmp_path):
    store = museval.EvalStore(frames_agg="median", tracks_agg="median")
    all_frames = []
    for seed, name in enumerate(("track a", "track b", "track c")):
        refs, ests = make_track(seed, seconds=2)
        frames = score_track(refs, ests)
        per_track = track_store(name, frames)
        (tmp_path / f"{name}.json").write_text(per_track.json)  # museval's per-track file
        store.add_track(per_track)
        all_frames.append(frames.assign(track=name, method="noisy"))
    expected = store.agg_frames_tracks_scores()
    ours = summarize(pd.concat(all_frames)).set_index("target")
    for target in TARGETS:
        for metric in METRICS:
            assert ours.loc[target, f"{metric}_median"] == pytest.approx(
                expected[(target, metric)], rel=1e-6
            )
    saved = json.loads((tmp_path / "track a.json").read_text())
    assert {t["name"] for t in saved["targets"]} == set(TARGETS)


def test_missing_or_misshapen_estimates_are_reported():
    refs, ests = make_track(1, seconds=2)
    with pytest.raises(ValueError, match="no estimate for vocals"):
        score_track(refs, {t: ests[t] for t in TARGETS[:3]})
    with pytest.raises(ValueError, match="differs"):
        score_track(refs, {**ests, "bass": ests["bass"][:, :-10]})


@pytest.mark.slow
def test_silent_reference_is_reported_as_nan_and_the_rest_scored():
    refs, ests = make_track(2, seconds=2)
    refs["vocals"] = np.zeros_like(refs["vocals"])
    frames = score_track(refs, ests)
    assert frames[frames.target == "vocals"].SDR.isna().all()
    assert len(frames[frames.target == "vocals"]) == 2
    assert frames[frames.target != "vocals"].SDR.notna().all()


@pytest.mark.slow
def test_a_last_partial_second_is_not_a_frame_as_in_museval():
    refs, ests = make_track(3, seconds=2)
    refs = {t: a[:, : int(1.5 * 44100)] for t, a in refs.items()}
    ests = {t: a[:, : int(1.5 * 44100)] for t, a in ests.items()}
    frames = score_track(refs, ests)
    sdr, _, _, _ = museval.evaluate(
        np.stack([refs[t].T for t in TARGETS]), np.stack([ests[t].T for t in TARGETS])
    )
    assert sdr.shape[1] == 1 and len(frames) == 4 * 1
    np.testing.assert_allclose(frames[frames.target == "bass"].SDR, sdr[1], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mono stem", "channel twice the other"])
def test_references_that_make_the_filters_singular_score_as_in_museval(case):
    """A reference whose channels are equal (a mono stem in both) or proportional makes the
    filters' matrix singular, where museval takes the minimum-norm least squares; metasep
    merges equal channels and solves other singular matrices with another factorisation. The
    frames still equal museval's."""
    refs, ests = make_track(5, seconds=2)
    targets = ("bass", "vocals")
    if case == "mono stem":
        refs["bass"] = np.repeat(refs["bass"][:1], 2, axis=0)  # the same samples left and right
    else:
        refs["bass"] = np.stack([refs["bass"][0], 2 * refs["bass"][0]])  # exactly, in floats
    refs, ests = {t: refs[t] for t in targets}, {t: ests[t] for t in targets}
    frames = score_track(refs, ests)
    expected = museval.evaluate(
        np.stack([refs[t].T for t in targets]), np.stack([ests[t].T for t in targets])
    )
    for index, target in enumerate(targets):
        rows = frames[frames.target == target].sort_values("frame")
        for name, values in zip(("SDR", "ISR", "SIR", "SAR"), expected, strict=True):
            np.testing.assert_allclose(rows[name].to_numpy(), values[index], rtol=1e-6)


def test_equal_channels_get_the_minimum_norm_filters_without_depending_on_rounding():
    """A mono stem in both channels makes the filters' matrix singular in exact arithmetic, but
    whether a LU factorisation hits an exactly zero pivot (museval's cue for its minimum-norm
    fallback) depends on rounding: on a synth track it did not, and the filters came out as
    noise (SIR -230 dB where museval said 12.9 dB). Merged equal channels give the minimum-norm
    solution, the SVD's, every time."""
    rng = np.random.default_rng(7)
    reference = rng.standard_normal((2, 2, 6000))
    reference[1, 1] = reference[1, 0]  # the second target is mono
    estimate = reference + 0.5 * rng.standard_normal(reference.shape)
    products = _LaggedProducts(2)
    products.add(reference, estimate)
    assert products.copies.tolist() == [[False, False], [False, True]]
    gram, cross = _normal_equations(products.finish(), [0, 1], 2)
    matrix, rhs = _reshape_G(gram), cross.reshape(2, -1, 2).transpose(1, 0, 2)
    filters = _solve(matrix, rhs, products.copies)
    expected = np.linalg.lstsq(matrix, rhs.reshape(len(matrix), -1), rcond=None)[0]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(filters.reshape(expected.shape), expected, atol=1e-8 * scale)
    by_channel = filters.reshape(2, 2, FILTER_TAPS, -1)
    np.testing.assert_array_equal(by_channel[1, 0], by_channel[1, 1])


@pytest.mark.slow
def test_blocks_of_any_size_score_as_the_whole_track():
    """The filters' sums carry 511 samples of history across blocks, and frames are cut from
    whatever blocks arrive: blocks shorter than that history and blocks spanning several frames
    give the frames of the whole track."""
    refs, ests = make_track(4, seconds=2)
    reference = np.stack([refs[t] for t in TARGETS])
    estimate = np.stack([ests[t] for t in TARGETS])
    bounds = np.cumsum([0, 300, 7, 70_000, 1, 4_410])
    bounds = [*bounds, reference.shape[-1]]

    def blocks():
        for start, stop in itertools.pairwise(bounds):
            yield reference[..., start:stop], estimate[..., start:stop]

    scores = score_blocks(TARGETS, blocks)
    expected = score_track(refs, ests)
    assert scores.samples == reference.shape[-1] and scores.silent == ()
    for metric in METRICS:
        np.testing.assert_allclose(scores.frames[metric], expected[metric], rtol=1e-9)


@pytest.mark.slow
def test_scoring_memory_does_not_grow_with_the_track():
    """Both passes read the track as blocks made on the fly: the peak of allocations (numpy's
    included) is the same for 2 s and 8 s (museval.evaluate's FFTs of the whole track would add
    about 100 MB here)."""

    def track(seconds: int):
        def blocks():
            for second in range(seconds):
                rng = np.random.default_rng(second)
                reference = rng.standard_normal((4, 2, 44100)).astype(np.float32)
                yield reference, reference + 0.3 * rng.standard_normal(reference.shape)

        return blocks

    peaks = []
    for seconds in (2, 8):
        tracemalloc.start()
        scores = score_blocks(TARGETS, track(seconds))
        peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()
        assert len(scores.frames) == 4 * seconds and scores.frames.SDR.notna().all()
    assert peaks[1] < peaks[0] + 8, f"peak {peaks[0]:.0f} MB for 2 s, {peaks[1]:.0f} MB for 8 s"
