"""How much memory scoring a track takes, against the track's length.

``python -m pipeline.bench.scoring_memory --minutes 1 30`` writes, for each length, a reference
track in the MUSDB18-HQ layout (four stereo 44.1 kHz FLAC stems, music-like, made block by block)
and a method's estimates of it (other music-like files of the same length), scores the pair with
the evaluation task's own code (:func:`pipeline.evaluation.job.score_pair`, in this process, no
Ray) and prints, for each length, the peak resident size of the process (``VmHWM``), the scoring
time and the median SDR it found.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from model import STEMS
from pipeline.bench.process import ProcessTreeMemory
from pipeline.bench.signals import write_long_track


def measure_scoring(folder: Path, minutes: float) -> dict[str, float]:
    """Write a reference track and estimates of ``minutes`` under ``folder``, score them while
    sampling memory; returns the figures."""
    from pipeline.evaluation.job import score_pair
    from pipeline.evaluation.plan import Pair
    from pipeline.evaluation.sources import EstimateTrack
    from pipeline.storage.references import list_references

    references, estimates = folder / "references" / "track", folder / "estimates" / "track"
    references.mkdir(parents=True)
    estimates.mkdir(parents=True)
    for seed, stem in enumerate(STEMS):
        write_long_track(references / f"{stem}.flac", minutes, seed=1 + seed)
        write_long_track(estimates / f"{stem}.flac", minutes, seed=11 + seed)
    (reference,) = list_references(str(folder / "references"))
    files = {stem: str(estimates / f"{stem}.flac") for stem in STEMS}
    pair = Pair(
        method="memory",
        reference=reference,
        estimate=EstimateTrack(files=files, version="1", location=str(estimates)),
        targets=STEMS,
        json_uri=str(folder / "scores" / "track.json"),
        reference_version="1",
        estimate_version="1",
        scoring="memory",
    )
    started = time.perf_counter()
    with ProcessTreeMemory() as memory:
        row = score_pair(pair)
    if row["status"] != "ok":
        raise RuntimeError(row["error"])
    sdr = [frame["SDR"] for frame in row["frames"]]
    return {
        "minutes": minutes,
        "peak_rss_mb": round(memory.peaks.largest_process_mb, 1),
        "score_s": round(time.perf_counter() - started, 1),
        "frames": len(sdr),
        "median_sdr_db": round(float(np.nanmedian(sdr)), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.scoring_memory",
        description="Peak memory of scoring one track (museval BSSEval v4) by track length",
    )
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 30.0])
    parser.add_argument("--workdir", type=Path, help="where the tracks go (temporary)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="metasep-scoring-") as work:
        for minutes in args.minutes:
            figures = measure_scoring(Path(work) / f"{minutes:g}min", minutes)
            print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
