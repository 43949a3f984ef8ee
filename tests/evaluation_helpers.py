"""Shared by the evaluation and benchmark tests: small reference catalogs, estimates in museval's
layout, and museval run directly on the same files (the yardstick the pipeline must equal)."""

from __future__ import annotations

from pathlib import Path

import museval
import numpy as np
import pandas as pd
import soundfile as sf

from model import STEMS

RATE = 44100


def write_references(
    root: Path, names: list[str], seconds: float = 3.0, silent: dict | None = None
) -> Path:
    """``root/test/<name>/{mixture,drums,bass,other,vocals}.wav`` (float WAV, stereo): each stem a
    differently coloured noise with its own envelope; ``silent`` maps a track to a stem left
    silent throughout (museval cannot score it: its scores must be NaN)."""
    rng = np.random.default_rng(len(names))
    samples = int(seconds * RATE)
    t = np.arange(samples) / RATE
    for k, name in enumerate(names):
        folder = root / "test" / name
        folder.mkdir(parents=True, exist_ok=True)
        stems = {}
        for index, stem in enumerate(STEMS):
            noise = rng.standard_normal((samples, 2))
            kernel = np.ones(1 + 4 * index) / (1 + 4 * index)  # darker noise for later stems
            coloured = np.stack([np.convolve(noise[:, c], kernel, "same") for c in range(2)], 1)
            envelope = 0.6 + 0.4 * np.sin(2 * np.pi * (0.5 + index + k) * t)[:, None]
            stems[stem] = (0.1 * coloured * envelope).astype(np.float32)
        if silent and name in silent:
            stems[silent[name]][:] = 0.0
        for stem, audio in stems.items():
            sf.write(folder / f"{stem}.wav", audio, RATE, subtype="FLOAT")
        mixture = np.sum(list(stems.values()), axis=0)
        sf.write(folder / "mixture.wav", mixture, RATE, subtype="FLOAT")
    return root


def write_estimates(references: Path, out: Path, leak: float = 0.3) -> Path:
    """``out/<track>/<stem>.wav``: each stem plus ``leak`` times the others (a plausible method)."""
    for folder in sorted((references / "test").iterdir()):
        stems = {s: sf.read(folder / f"{s}.wav", dtype="float32")[0] for s in STEMS}
        (out / folder.name).mkdir(parents=True, exist_ok=True)
        for stem in STEMS:
            others = sum(audio for name, audio in stems.items() if name != stem)
            sf.write(out / folder.name / f"{stem}.wav", stems[stem] + leak * others, RATE, "FLOAT")
    return out


def museval_frames(references: dict[str, Path], estimates: dict[str, Path]) -> dict:
    """SDR, SIR, ISR, SAR per frame from ``museval.evaluate`` on the files, per audible target."""
    refs = {t: sf.read(p, dtype="float32")[0].astype(np.float64) for t, p in references.items()}
    audible = [t for t in refs if np.any(refs[t])]
    ests = {t: sf.read(estimates[t], dtype="float32")[0].astype(np.float64) for t in audible}
    sdr, isr, sir, sar = museval.evaluate(
        np.stack([refs[t] for t in audible]), np.stack([ests[t] for t in audible])
    )
    return {
        t: {"SDR": sdr[i], "SIR": sir[i], "ISR": isr[i], "SAR": sar[i]}
        for i, t in enumerate(audible)
    }


def assert_frames_equal_museval(frames: pd.DataFrame, expected: dict, targets=STEMS) -> None:
    """The pipeline's frames of one method and track equal museval's; silent targets are NaN."""
    for target in targets:
        rows = frames[frames.target == target].sort_values("frame")
        assert len(rows), f"no frames for {target}"
        if target not in expected:
            assert rows.SDR.isna().all(), f"{target}: a silent reference must score NaN"
            continue
        for metric, values in expected[target].items():
            values = np.where(np.isinf(values), np.nan, values)  # as museval's JSON stores them
            # BSSEval's least-squares fits amplify rounding differences of BLAS builds and
            # thread counts (a Ray worker runs one thread) to ~1e-6 relative; museval's own JSON
            # keeps 5 decimals
            np.testing.assert_allclose(rows[metric].to_numpy(), values, rtol=1e-5, atol=1e-5)


def assert_summary_equals_evalstore(summary: pd.DataFrame, method_dir: Path) -> None:
    """The summary rows of a method equal museval's EvalStore (median over frames, then over
    tracks) built from the per-track JSON files the evaluation wrote."""
    store = museval.EvalStore(frames_agg="median", tracks_agg="median")
    store.add_eval_dir(method_dir)
    expected = store.agg_frames_tracks_scores()
    ours = summary[summary.method == method_dir.name].set_index("target")
    assert set(ours.index) == set(expected.index.get_level_values("target"))
    for (target, metric), value in expected.items():
        # the JSON holds 5 decimals (museval quantises): equal to that precision
        mine = ours.loc[target, f"{metric}_median"]
        assert (np.isnan(mine) and np.isnan(value)) or abs(mine - value) < 1e-4, (target, metric)
