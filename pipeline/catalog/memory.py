"""How much memory a catalog run takes, per process and in all, against the length of its tracks.

``python -m pipeline.catalog.memory --minutes 1 120`` writes one stereo 44.1 kHz FLAC of each
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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_KIB = 1024 / 2**20  # kB in MiB


@dataclass
class MemoryPeaks:
    """The peaks a :class:`ProcessTreeMemory` saw."""

    largest_process_mb: float = 0.0
    whole_run_mb: float = 0.0
    processes: int = 0
    by_process: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> name, peak

    def as_dict(self) -> dict[str, float]:
        return {
            "largest_process_mb": round(self.largest_process_mb, 1),
            "whole_run_mb": round(self.whole_run_mb, 1),
            "processes": self.processes,
        }


class ProcessTreeMemory:
    """Samples this process and all its descendants in a background thread (a context
    manager); ``peaks`` holds what it saw."""

    def __init__(self, interval: float = 0.2, root: int | None = None) -> None:
        self.interval, self.root = interval, root or os.getpid()
        self.peaks = MemoryPeaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ProcessTreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Read every process of the tree once."""
        total = 0.0
        for pid in _descendants(self.root):
            status = _read_fields(f"/proc/{pid}/status", ("Name", "VmHWM"))
            pss = _read_fields(f"/proc/{pid}/smaps_rollup", ("Pss",)).get("Pss")
            if "VmHWM" not in status or pss is None:
                continue  # gone, or a kernel thread
            peak = _kb(status["VmHWM"]) * _KIB
            name, seen = self.peaks.by_process.get(pid, (status.get("Name", "?"), 0.0))
            self.peaks.by_process[pid] = (name, max(seen, peak))
            self.peaks.largest_process_mb = max(self.peaks.largest_process_mb, peak)
            total += _kb(pss) * _KIB
        self.peaks.whole_run_mb = max(self.peaks.whole_run_mb, total)
        self.peaks.processes = len(self.peaks.by_process)


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (from each process's parent in ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _read_fields(path: str, names: tuple[str, ...]) -> dict[str, str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in names:
            fields[key] = value.strip()
    return fields


def _kb(value: str) -> float:
    return float(value.split()[0])


def write_long_track(
    path: Path, minutes: float, rate: int = 44100, channels: int = 2, seed: int = 0
) -> Path:
    """A music-like FLAC of ``minutes``, written one minute at a time (each minute its own
    :func:`pipeline.bench.bench_audio` seed, so the file does not repeat; ``seed`` makes
    another file)."""
    import soundfile as sf

    from pipeline.bench import bench_audio

    total = round(minutes * 60 * rate)
    with sf.SoundFile(path, "w", rate, channels, format="FLAC", subtype="PCM_16") as file:
        for minute, start in enumerate(range(0, total, 60 * rate)):
            seconds = min(60 * rate, total - start) / rate
            block = bench_audio(seconds, rate, seed=minute + 100_000 * seed)[:channels]
            file.write(block.T)
    return path


def measure_catalog_run(
    source: Path,
    destination: Path,
    checkpoint: str,
    run_id: str,
    separator_options: dict[str, Any] | None = None,
) -> tuple[MemoryPeaks, Any]:
    """Separate the catalog ``source`` (a local Ray must be running) while sampling memory."""
    import ray

    from model import load_checkpoint
    from pipeline.catalog import JobConfig, list_catalog, run_job
    from pipeline.catalog.job import identify_separator

    model = load_checkpoint(checkpoint)
    options = dict(separator_options or {})
    model_id, options_hash = identify_separator(model, "float32", options)
    config = JobConfig(
        destination=str(destination),
        run_id=run_id,
        model_id=model_id,
        options_hash=options_hash,
        separator_options=options,
        workers=1,
    )
    tracks = list_catalog(str(source))
    model_ref = ray.put(model)
    with ProcessTreeMemory() as memory:
        result = run_job(tracks, model_ref, config)
    return memory.peaks, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.catalog.memory",
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
