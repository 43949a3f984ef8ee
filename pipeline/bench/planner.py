"""How a catalog run's planning scales with the library: peak memory and time of a no-op plan.

``python -m pipeline.bench.planner --tracks 1000000`` writes the manifest a library of that many
tracks has after its first run (one ``ok`` row per track, in parts of 256 rows as a run flushes
them), then, in a fresh process, plans the next night with the code a run uses: the listing built
from the catalog's entries (:func:`pipeline.catalog.listing.listing_table`), the manifests read
and reduced to each track's last ``ok`` row (:func:`pipeline.catalog.housekeeping.read_done`),
one listing of the stems (:class:`pipeline.catalog.plan.StemIndex`) and the plan itself
(:func:`pipeline.catalog.plan.plan_tracks`). The entries of the catalog and of its stems are
generated as a stream, as a store's listing pages would come, so the figures are the planner's
own: the process's peak resident size (``VmHWM``) and the seconds of each step. Nothing is to
do, so the plan must skip every track.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from model import STEMS
from pipeline.bench.process import in_fresh_process, peak_rss_mb
from pipeline.storage.manifest import MANIFEST_SCHEMA
from pipeline.storage.paths import sanitized_key

MODEL_ID, OPTIONS_HASH, FLUSH_ROWS = "0123456789abcdef", "fedcba987654", 256


def track_id(index: int) -> str:
    """A track's path in the generated library: artist, album, numbered song."""
    return f"artist {index // 1000:04d}/album {index // 10 % 100:02d}/{index:07d} song.flac"


def entries(tracks: int) -> Iterator[tuple[str, str, int, str]]:
    """The catalog's listing entries, as :func:`pipeline.catalog.listing.walk_files` yields
    them from a store (track_id, URI, size, version)."""
    for index in range(tracks):
        name = track_id(index)
        yield name, f"s3://music/library/{name}", 30_000_000, f"etag:{index:032x}"


def stem_files(tracks: int) -> Iterator[str]:
    """The stems the destination holds, relative to ``DST/stems``."""
    for index in range(tracks):
        key = sanitized_key(track_id(index))
        for stem in STEMS:
            yield f"{key}/{stem}.flac"


def write_manifest(destination: Path, tracks: int) -> None:
    """One ``ok`` row per track, in parts of 256 rows under one run, as a first run leaves."""
    folder = destination / "manifest" / "run=first"
    folder.mkdir(parents=True)
    finished = datetime(2026, 12, 1, tzinfo=UTC)
    for part, start in enumerate(range(0, tracks, FLUSH_ROWS)):
        rows = []
        for index in range(start, min(tracks, start + FLUSH_ROWS)):
            name = track_id(index)
            key = sanitized_key(name)
            rows.append(
                {
                    "run_id": "first",
                    "track_id": name,
                    "source_uri": f"s3://music/library/{name}",
                    "source_size": 30_000_000,
                    "source_version": f"etag:{index:032x}",
                    "status": "ok",
                    "duration_s": 180.0,
                    "sample_rate": 44100,
                    "channels": 2,
                    "gain_db": 0.0,
                    **{f"{s}_uri": f"s3://music/separated/stems/{key}/{s}.flac" for s in STEMS},
                    "model_id": MODEL_ID,
                    "options_hash": OPTIONS_HASH,
                    "precision": "bfloat16",
                    "started_at": finished,
                    "finished_at": finished,
                    "worker": "node/1234",
                    "model_seconds": 12.0,
                }
            )
        buffer = io.BytesIO()
        pq.write_table(
            pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), buffer, compression="zstd"
        )
        (folder / f"part-{part:05d}.parquet").write_bytes(buffer.getvalue())


def plan_no_op(destination: str, tracks: int) -> dict[str, Any]:
    """In a fresh process: the night's plan, step by step, with the peak memory."""
    from pipeline.catalog.housekeeping import read_done
    from pipeline.catalog.listing import listing_table
    from pipeline.catalog.plan import StemIndex, plan_tracks
    from pipeline.storage.location import open_location

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    listing = listing_table(entries(tracks))
    seconds["listing_s"] = time.perf_counter() - started
    fs, root = open_location(destination)
    done, _ = read_done(fs, root)
    seconds["manifests_s"] = time.perf_counter() - started - sum(seconds.values())
    stems = StemIndex(stem_files(tracks))
    seconds["stems_s"] = time.perf_counter() - started - sum(seconds.values())
    plan = plan_tracks(listing, done, MODEL_ID, OPTIONS_HASH, stems, "flac")
    seconds["plan_s"] = time.perf_counter() - started - sum(seconds.values())
    return {
        "tracks": tracks,
        "planned": plan.planned,
        "skipped": plan.skipped,
        "lost": plan.lost,
        "total_s": round(time.perf_counter() - started, 2),
        **{name: round(value, 2) for name, value in seconds.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.planner",
        description="Peak memory and time of a no-op nightly plan over a generated library",
    )
    parser.add_argument("--tracks", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--workdir", type=Path, help="where the manifest goes (temporary)")
    args = parser.parse_args(argv)
    for tracks in args.tracks:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="metasep-planner-") as work:
            write_manifest(Path(work), tracks)
            figures = in_fresh_process(plan_no_op, work, tracks)
        print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
