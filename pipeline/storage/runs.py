"""Run accounting and summaries, shared by catalog separation and evaluation.

Both jobs turn a plan (what to do, what is already done) into result rows on Ray workers; the
driver adds each row to a :class:`RunTally` (counts, audio, and per worker its busy time against
its wall time), and the flow writes a summary to ``DST/runs/<run_id>.json``. The summaries differ
in what they count (tracks, or pairs of method and track) and in their extra fields; the parts
that mean the same thing are built here, so that they read the same in both.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

from pipeline.storage.journal import Journal
from pipeline.storage.location import full_url, open_location, write_bytes

log = logging.getLogger(__name__)

MAX_LISTED = 100  # errors and warnings listed in a summary; the manifests hold all of them


@dataclass
class WorkerStats:
    """One worker's share of a run."""

    tracks: int = 0
    audio_s: float = 0.0
    busy_s: float = 0.0  # time in the model, or in museval: the work the worker is there for
    device_s: float | None = None  # time its GPU spent in forward passes (CUDA events), if any
    first_start: float = float("inf")
    last_end: float = 0.0

    @property
    def wall_s(self) -> float:
        """Wall time from its first item's start to its last item's end: after start-up."""
        return max(0.0, self.last_end - self.first_start)

    @property
    def busy_fraction(self) -> float:
        return self.busy_s / self.wall_s if self.wall_s > 0 else 1.0

    @property
    def device_busy_fraction(self) -> float | None:
        if self.device_s is None:
            return None
        return self.device_s / self.wall_s if self.wall_s > 0 else 1.0


@dataclass
class RunTally:
    """What a job did: items done and failed, audio processed, job wall time, per-worker timing."""

    ok: int = 0
    error: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0
    workers: dict[str, WorkerStats] = field(default_factory=dict)

    def count_ok(
        self,
        worker: str,
        audio_s: float,
        started: float,
        busy_s: float,
        device_s: float | None = None,
    ) -> None:
        """One item done by ``worker``: ``audio_s`` of audio, busy ``busy_s`` from ``started``
        (a Unix time), of which ``device_s`` on its GPU when measured."""
        self.ok += 1
        self.audio_s += audio_s
        stats = self.workers.setdefault(worker, WorkerStats())
        stats.tracks += 1
        stats.audio_s += audio_s
        stats.busy_s += busy_s
        stats.first_start = min(stats.first_start, started)
        stats.last_end = max(stats.last_end, started + busy_s)
        if device_s is not None:
            stats.device_s = (stats.device_s or 0.0) + device_s


def counts(listed: int, planned: int, skipped: int, tally: RunTally) -> dict[str, int]:
    """The counts of a run: ``listed`` items, ``skipped`` as already done, ``planned`` to do, of
    which ``ok``, ``error``, and ``not_processed`` (a run stopped or killed before them)."""
    return {
        "listed": listed,
        "planned": planned,
        "ok": tally.ok,
        "error": tally.error,
        "skipped": skipped,
        "not_processed": planned - tally.ok - tally.error,
    }


def worker_summaries(tally: RunTally, busy: str) -> dict[str, dict[str, Any]]:
    """Per worker, sorted by name: items, audio, busy seconds (under the key ``busy``), wall
    seconds after start-up and the busy fraction; with a GPU also the fraction of that wall time
    its device spent in forward passes (``device_busy_fraction``)."""
    return {
        name: {
            "tracks": stats.tracks,
            "audio_seconds": round(stats.audio_s, 3),
            busy: round(stats.busy_s, 3),
            "wall_seconds_after_startup": round(stats.wall_s, 3),
            "busy_fraction": round(stats.busy_fraction, 4),
            **(
                {"device_busy_fraction": round(stats.device_busy_fraction, 4)}
                if stats.device_busy_fraction is not None
                else {}
            ),
        }
        for name, stats in sorted(tally.workers.items())
    }


def write_summary(
    summary: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
    journal: Journal | None = None,
) -> str:
    """Write ``summary`` to ``<its destination>/runs/<run_id>.json``; returns its URL. Where the
    destination does not take it and a ``journal`` is given, it goes there (to be published by
    the next run), and the journal's path is returned."""
    fs, root = open_location(summary["destination"], storage_options)
    relative = posixpath.join("runs", f"{summary['run_id']}.json")
    data = json.dumps(summary, indent=2, ensure_ascii=False).encode()
    try:
        write_bytes(fs, posixpath.join(root, relative), data)
    except Exception as error:
        if journal is None:
            raise
        kept = journal.keep(relative, data)
        log.warning("run summary kept in %s (the destination did not take it: %s)", kept, error)
        return str(kept)
    return full_url(fs, posixpath.join(root, relative))
