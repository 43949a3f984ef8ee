"""How much memory a catalog run takes, per process and in all, against the length of its tracks.

``python -m pipeline.bench.catalog_memory --minutes 1 120`` writes one stereo 44.1 kHz FLAC of each
length (music-like, made block by block, so making it takes no memory either), separates each
with the catalog job (:func:`pipeline.catalog.job.run_job` on a local Ray, one model worker), and
prints, for each length:

- ``largest_process_mb``: the highest peak resident size (``VmHWM``) of any one process of the
  run: the driver, Ray's own processes and its workers (the model worker among them);
- ``whole_run_mb``: the highest sum, over time, of the proportional set sizes (``Pss``) of all
  those processes. Pss shares each shared page among the processes that map it, so Ray's object
  store (shared memory) counts once, and so does the model the processes share.

The processes are the driver and everything it started (a local Ray's GCS, raylet and workers),
read from ``/proc`` every ``interval`` seconds (Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.bench.process import MemoryPeaks, ProcessTreeMemory
from pipeline.bench.signals import write_long_track
from pipeline.separator import SeparationOptions, identify


def measure_catalog_run(
    source: Path,
    destination: Path,
    checkpoint: str,
    run_id: str,
    options: SeparationOptions | None = None,
) -> tuple[MemoryPeaks, Any]:
    """Separate the catalog ``source`` (a local Ray must be running) while sampling memory;
    ``options`` default to float32 with the checkpoint given."""
    import ray

    from model import load_checkpoint
    from pipeline.catalog import JobConfig, list_catalog, run_job

    options = options or SeparationOptions(checkpoint=checkpoint, precision="float32")
    model = load_checkpoint(checkpoint)
    model_id, options_hash = identify(model, options)
    config = JobConfig(
        destination=str(destination),
        run_id=run_id,
        model_id=model_id,
        options_hash=options_hash,
        options=options,
        workers=1,
    )
    tracks = list_catalog(str(source))
    model_ref = ray.put(model)
    with ProcessTreeMemory() as memory:
        result = run_job(tracks, model_ref, config)
    return memory.peaks, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.catalog_memory",
        description="Peak memory of a catalog run (one model worker, local Ray) by track length",
    )
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 120.0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--workdir", type=Path, help="where the tracks and stems go (temporary)")
    args = parser.parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="metasep-memory-") as folder:
        for minutes in args.minutes:
            work = Path(folder) / f"{minutes:g}min"
            (work / "library").mkdir(parents=True)
            write_long_track(work / "library" / "track.flac", minutes)
            started = time.perf_counter()
            peaks, result = measure_catalog_run(
                work / "library", work / "out", args.checkpoint, f"memory-{minutes:g}"
            )
            print(
                json.dumps(
                    {
                        "minutes": minutes,
                        **peaks.as_dict(),
                        "ok": result.ok,
                        "error": result.error,
                        "wall_s": round(time.perf_counter() - started, 1),
                    }
                ),
                flush=True,
            )
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
