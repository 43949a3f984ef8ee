"""The run summary of a catalog separation: ``DST/runs/<run_id>.json`` and the lines printed at
the end of a run (the parts it shares with evaluation's come from :mod:`pipeline.storage.runs`)."""

from __future__ import annotations

import posixpath
from datetime import datetime
from typing import Any

from pipeline.catalog.job import JobResult
from pipeline.catalog.plan import Plan
from pipeline.storage.location import full_url, open_location
from pipeline.storage.manifest import manifest_root
from pipeline.storage.runs import MAX_LISTED, counts, worker_summaries


def build_summary(
    *,
    run_id: str,
    source: str,
    destination: str,
    plan: Plan,
    result: JobResult,
    model_id: str,
    options_hash: str,
    started_at: datetime,
    finished_at: datetime,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a run did, where its outputs are and how fast each worker was."""
    fs, root = open_location(destination, storage_options)
    wall_s = (finished_at - started_at).total_seconds()
    return {
        "run_id": run_id,
        "source": source,
        "destination": destination,
        "stems": full_url(fs, posixpath.join(root, "stems")),
        "manifest": full_url(fs, manifest_root(root)),  # a hive-partitioned Parquet dataset
        "model_id": model_id,
        "options_hash": options_hash,
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "tracks": {
            **counts(listed=plan.listed, planned=plan.planned, skipped=plan.skipped, tally=result),
            "lost": plan.lost,
        },
        "stopped": result.stopped,
        "lost": plan.lost_examples,
        "partials_removed": plan.partials_removed,
        "quarantined": plan.quarantined,
        "journaled": result.journaled,
        "audio_seconds": round(result.audio_s, 3),
        "wall_seconds": round(wall_s, 3),
        "job_seconds": round(result.wall_s, 3),
        "audio_seconds_per_second": round(result.audio_s / result.wall_s, 3)
        if result.wall_s
        else None,
        "workers": worker_summaries(result, busy="model_busy_seconds"),
        "errors": [
            {"track_id": track_id, "error": message}
            for track_id, message in result.errors[:MAX_LISTED]
        ],
        "flagged_count": len(result.flagged),
        "flagged": [
            {"track_id": track_id, "flags": flags}
            for track_id, flags in result.flagged[:MAX_LISTED]
        ],
        "rescaled_count": len(result.rescaled),
        "rescaled": [
            {"track_id": track_id, "gain_db": round(gain, 2)}
            for track_id, gain in result.rescaled[:MAX_LISTED]
        ],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The few lines a person reads at the end of a run."""
    tracks = summary["tracks"]
    speed = summary["audio_seconds_per_second"]
    lines = [
        f"run {summary['run_id']}: {tracks['listed']} tracks listed, {tracks['skipped']} already "
        f"done, {tracks['planned']} planned: {tracks['ok']} ok, {tracks['error']} failed"
        + (f", {tracks['not_processed']} not processed" if tracks["not_processed"] else ""),
        *_warnings(summary),
        f"separated {summary['audio_seconds']:.1f} s of audio in {summary['job_seconds']:.1f} s"
        + (f" ({speed:.2f} s of audio per second)" if speed else "")
        + f"; whole run {summary['wall_seconds']:.1f} s"
        if tracks["planned"]
        else "nothing to separate: every track is already in the manifest",
    ]
    for name, worker in summary["workers"].items():
        lines.append(
            f"  worker {name}: {worker['tracks']} tracks, model busy "
            f"{worker['model_busy_seconds']:.1f} s of {worker['wall_seconds_after_startup']:.1f} s "
            f"({100 * worker['busy_fraction']:.0f}%)"
            + (
                f", GPU busy {100 * worker['device_busy_fraction']:.0f}%"
                if "device_busy_fraction" in worker
                else ""
            )
        )
    for error in summary["errors"][:10]:
        lines.append(f"  failed {error['track_id']}: {error['error']}")
    if tracks["error"] > 10:
        lines.append(f"  ... {tracks['error'] - 10} more failures in the manifest")
    if summary.get("rescaled_count"):
        shown = ", ".join(
            f"{item['track_id']} ({item['gain_db']:+.2f} dB)" for item in summary["rescaled"][:5]
        )
        more = summary["rescaled_count"] - min(5, len(summary["rescaled"]))
        lines.append(
            f"  {summary['rescaled_count']} track(s) scaled down so that their stems do not clip: "
            f"{shown}" + (f" and {more} more (manifest column gain_db)" if more else "")
        )
    lines.append(f"stems: {summary['stems']}/")
    lines.append(f"manifest: {summary['manifest']}/ (one row per track and run)")
    return "\n".join(lines)


def _warnings(summary: dict[str, Any]) -> list[str]:
    """The lines about what went wrong around the tracks: why the run stopped early, stems
    that were lost, leftovers cleaned up, rows waiting in the journal."""
    lines = []
    if summary["stopped"]:
        lines.append(f"stopped early: {summary['stopped']}; the rest is left for the next run")
    if summary["tracks"]["lost"]:
        names = ", ".join(summary["lost"][:5])
        more = summary["tracks"]["lost"] - min(5, len(summary["lost"]))
        lines.append(
            f"  {summary['tracks']['lost']} track(s) separated again, their stems were gone: "
            f"{names}" + (f" and {more} more" if more else "")
        )
    if summary["partials_removed"]:
        lines.append(f"  removed {summary['partials_removed']} partial file(s) of killed writers")
    for part in summary["quarantined"]:
        lines.append(f"  unreadable manifest part moved to {part}; its tracks were planned again")
    if summary["flagged_count"]:
        shown = "; ".join(
            f"{item['track_id']} ({', '.join(item['flags'])})" for item in summary["flagged"][:5]
        )
        more = summary["flagged_count"] - min(5, len(summary["flagged"]))
        lines.append(
            f"  {summary['flagged_count']} track(s) flagged, worth a listen: {shown}"
            + (f" and {more} more (manifest column flags)" if more else "")
        )
    if summary["journaled"]:
        lines.append(
            f"  {summary['journaled']} manifest file(s) wait in the local journal: the "
            "destination did not take them; the next run publishes them"
        )
    return lines
