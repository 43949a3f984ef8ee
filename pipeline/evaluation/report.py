"""What an evaluation leaves behind: tables, box plots, the run summary and the printed lines.

- ``DST/frames.parquet``: one row per method, track, target and 1 s frame (SDR, SIR, ISR, SAR).
- ``DST/tracks.parquet``: one row per method and track: ``ok`` or ``error`` with its reason,
  warnings, the versions scored and where museval's JSON is.
- ``DST/summary.parquet``: per method and target the median over frames then over tracks (the
  SiSEC convention, the number papers quote), the mean of the track medians, and counts.
- ``DST/boxplot.png``: per target, a box of the tracks' median SDR per method (SiSEC 2018 style).
- ``DST/runs/<run_id>.json``: what the run did and where everything is.

All of them describe the pairs of this evaluation: scores of earlier runs that still hold are
taken from the manifests, so an incremental run reports the whole catalog.
"""

from __future__ import annotations

import io
import json
import posixpath
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.evaluation.job import EvaluationResult
from pipeline.evaluation.plan import EvaluationPlan
from pipeline.scoring import METRICS, summarize
from pipeline.storage.location import full_url, open_location, write_bytes
from pipeline.storage.manifest import manifest_root
from pipeline.storage.runs import MAX_LISTED, counts, worker_summaries

FRAME_COLUMNS = ["method", "track", "target", "frame", "time", *METRICS]


def final_rows(manifests: pa.Table, plan: EvaluationPlan, run_id: str) -> pa.Table:
    """One manifest row per pair of ``plan`` that has one: this run's row for a pair it scored
    (or failed), the ``ok`` row it relied on for a pair it skipped."""
    keys = manifests.select(["run_id", "method", "track", "status", "finished_at"]).to_pylist()
    this_run: dict[tuple[str, str], int] = {}
    latest_ok: dict[tuple[str, str], tuple[Any, int]] = {}
    for index, row in enumerate(keys):
        key = (row["method"], row["track"])
        if row["run_id"] == run_id:
            this_run[key] = index
        if row["status"] == "ok" and (
            key not in latest_ok or row["finished_at"] >= latest_ok[key][0]
        ):
            latest_ok[key] = (row["finished_at"], index)
    skipped = {pair.key for pair in plan.skipped}
    indices = []
    for pair in plan.pairs:
        if pair.key in skipped:
            indices.append(latest_ok[pair.key][1])
        elif pair.key in this_run:
            indices.append(this_run[pair.key])
    return manifests.take(pa.array(indices, type=pa.int64()))


def frames_table(rows: pa.Table) -> pd.DataFrame:
    """Per-frame scores of the ``ok`` rows: method, track, target, frame, time and metrics."""
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    lists = (
        ok["frames"].combine_chunks()
        if ok.num_rows
        else pa.array([], ok.schema.field("frames").type)
    )
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists)
    columns = {
        "method": pc.take(ok["method"], parents),
        "track": pc.take(ok["track"], parents),
        **{name: flat.field(name) for name in FRAME_COLUMNS[2:]},
    }
    return pa.table(columns).to_pandas()


def tracks_table(rows: pa.Table) -> pd.DataFrame:
    """One row per method and track, without the frames."""
    return rows.drop_columns(["frames"]).to_pandas()


def scores_summary(frames: pd.DataFrame, tracks: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """:func:`pipeline.scoring.summarize` per method and target, with the failed tracks counted
    and the methods in the order they were given."""
    if frames.empty:
        return pd.DataFrame(columns=["method", "target", "tracks", "errors"])
    summary = summarize(frames)
    errors = tracks[tracks.status != "ok"].groupby("method").size()
    summary["errors"] = summary.method.map(errors).fillna(0).astype(int)
    order = {name: index for index, name in enumerate(methods)}
    targets = {name: index for index, name in enumerate(dict.fromkeys(frames.target))}
    return summary.sort_values(
        ["method", "target"],
        key=lambda column: column.map(order if column.name == "method" else targets),
    ).reset_index(drop=True)


def format_scores(summary: pd.DataFrame) -> str:
    """The table a person reads: per method and target, the SiSEC medians and the SDR mean."""
    header = "| method | target | SDR | SIR | ISR | SAR | SDR mean | tracks |"
    lines = [header, "| --- | --- |" + " ---: |" * 6]
    for row in summary.itertuples(index=False):
        values = [getattr(row, f"{m}_median") for m in METRICS] + [row.SDR_mean]
        cells = " | ".join(_db(value) for value in values)
        lines.append(f"| {row.method} | {row.target} | {cells} | {row.tracks} |")
    return "\n".join(lines)


def format_sdr_table(summary: pd.DataFrame) -> str:
    """Methods by targets: median SDR (median over frames, then over tracks), the comparison."""
    targets = list(dict.fromkeys(summary.target))
    methods = list(dict.fromkeys(summary.method))
    pivot = summary.pivot(index="method", columns="target", values="SDR_median")
    lines = ["| method | " + " | ".join(targets) + " |", "| --- |" + " ---: |" * len(targets)]
    for method in methods:
        cells = " | ".join(_db(pivot.loc[method].get(t, np.nan)) for t in targets)
        lines.append(f"| {method} | {cells} |")
    return "\n".join(lines)


def _db(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.2f}"


def boxplot_png(frames: pd.DataFrame, methods: list[str]) -> bytes:
    """Per target, a box of the tracks' median SDR for each method (SiSEC 2018 style): methods
    sorted by their median, every track a dot, the median written next to its box."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    per_track = frames.groupby(["method", "target", "track"]).SDR.median().reset_index()
    targets = list(dict.fromkeys(frames.target))
    methods = [m for m in methods if m in set(per_track.method)]
    colours = dict(zip(methods, plt.get_cmap("tab10").colors, strict=False))
    columns = min(2, len(targets))
    rows = -(-len(targets) // columns)
    figure, axes = plt.subplots(
        rows,
        columns,
        figsize=(5.2 * columns, rows * (0.9 + 0.45 * len(methods)) + 0.6),
        sharex=True,
        squeeze=False,
    )
    for axis, target in zip(axes.flat, targets, strict=False):
        values = {
            m: per_track[(per_track.method == m) & (per_track.target == target)].SDR.dropna()
            for m in methods
        }
        ranked = sorted((m for m in methods if len(values[m])), key=lambda m: values[m].median())
        _draw_target(axis, target, ranked, values, colours)
    for axis in axes.flat[len(targets) :]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("SDR (dB)")
        axis.xaxis.set_tick_params(labelbottom=True)
    tracks = per_track.track.nunique()
    figure.suptitle(
        f"BSSEval v4 SDR of each track (median over its 1 s frames), {tracks} tracks", fontsize=11
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150)
    plt.close(figure)
    return buffer.getvalue()


def _draw_target(axis, target: str, ranked: list[str], values: dict, colours: dict) -> None:
    rng = np.random.default_rng(0)
    if ranked:
        boxes = axis.boxplot(
            [values[m] for m in ranked],
            orientation="horizontal",
            widths=0.6,
            patch_artist=True,
            showfliers=False,
            medianprops={"color": "black", "linewidth": 1.5},
        )
        for patch, method in zip(boxes["boxes"], ranked, strict=True):
            patch.set(facecolor=colours[method], alpha=0.35, edgecolor=colours[method])
        for position, method in enumerate(ranked, start=1):
            points = values[method].to_numpy()
            jitter = position + rng.uniform(-0.18, 0.18, len(points))
            axis.scatter(points, jitter, s=9, color=colours[method], zorder=3, linewidths=0)
            axis.annotate(
                f"{np.median(points):.2f}",
                (1.0, position),
                xycoords=("axes fraction", "data"),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        axis.set_yticks(range(1, len(ranked) + 1), ranked)
    axis.set_title(target, fontsize=10, loc="left", fontweight="bold")
    axis.grid(axis="x", alpha=0.3)
    axis.tick_params(labelsize=8)


def write_reports(
    destination: str,
    rows: pa.Table,
    methods: list[str],
    storage_options: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Write frames, tracks, summary and box plot under ``destination``; return the summary and
    the URL of each output."""
    fs, root = open_location(destination, storage_options)
    frames = frames_table(rows)
    tracks = tracks_table(rows)
    summary = scores_summary(frames, tracks, methods)
    outputs = {}
    for name, table in (("frames", frames), ("tracks", tracks), ("summary", summary)):
        outputs[name] = _write(fs, root, f"{name}.parquet", _parquet(table))
    if not frames.empty:
        outputs["boxplot"] = _write(fs, root, "boxplot.png", boxplot_png(frames, methods))
    outputs["museval"] = full_url(fs, posixpath.join(root, "museval"))
    outputs["manifest"] = full_url(fs, manifest_root(root))
    return summary, outputs


def _parquet(table: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), buffer, compression="zstd")
    return buffer.getvalue()


def _write(fs, root: str, name: str, data: bytes) -> str:
    path = posixpath.join(root, name)
    write_bytes(fs, path, data)
    return full_url(fs, path)


def build_summary(
    *,
    run_id: str,
    references: str,
    methods: dict[str, str],
    destination: str,
    plan: EvaluationPlan,
    result: EvaluationResult,
    rows: pa.Table,
    summary: pd.DataFrame,
    outputs: dict[str, str],
    started_at: datetime,
    finished_at: datetime,
) -> dict[str, Any]:
    """What a run did, how fast, and where its outputs are (``DST/runs/<run_id>.json``)."""
    statuses = rows["status"].to_pylist()
    failed = [
        {"method": m, "track": t, "error": e}
        for m, t, s, e in zip(
            rows["method"].to_pylist(),
            rows["track"].to_pylist(),
            statuses,
            rows["error"].to_pylist(),
            strict=True,
        )
        if s != "ok"
    ]
    scored = len(plan.todo) + len(plan.failing)
    return {
        "run_id": run_id,
        "references": references,
        "methods": methods,
        "destination": destination,
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "tracks": len({pair.track for pair in plan.pairs}),
        "pairs": counts(
            listed=len(plan.pairs), planned=scored, skipped=len(plan.skipped), tally=result
        ),
        "failing_now": len(failed),
        "unmatched_estimates": {name: n for name, n in plan.unmatched.items() if n},
        "audio_seconds": round(result.audio_s, 3),
        "wall_seconds": round((finished_at - started_at).total_seconds(), 3),
        "job_seconds": round(result.wall_s, 3),
        "tracks_per_hour": round(result.tracks_per_hour, 1) if result.tracks_per_hour else None,
        "cpu_seconds_per_track": round(result.cpu_s / result.ok, 2) if result.ok else None,
        "workers": worker_summaries(result, busy="scoring_seconds"),
        "errors": failed[:MAX_LISTED],
        "warnings": [
            {"method": m, "track": t, "warnings": w} for m, t, w in result.warnings[:MAX_LISTED]
        ],
        "scores": json.loads(summary.to_json(orient="records")),
        "outputs": outputs,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The lines a person reads at the end of a run (the score table is printed after them)."""
    pairs = summary["pairs"]
    methods = ", ".join(summary["methods"])
    lines = [
        f"run {summary['run_id']}: {summary['tracks']} tracks x {len(summary['methods'])} "
        f"methods ({methods}) = {pairs['listed']} pairs; {pairs['skipped']} already scored, "
        f"{pairs['planned']} planned: {pairs['ok']} ok, {pairs['error']} failed"
        + (f", {pairs['not_processed']} not processed" if pairs["not_processed"] else "")
    ]
    if summary["tracks_per_hour"]:
        lines.append(
            f"scored {summary['audio_seconds']:.1f} s of audio in {summary['job_seconds']:.1f} s "
            f"on {len(summary['workers'])} worker(s): {summary['tracks_per_hour']:.0f} tracks/hour "
            f"({summary['cpu_seconds_per_track']:.1f} CPU s per track)"
        )
    for name, count in summary["unmatched_estimates"].items():
        lines.append(f"  {name}: {count} estimate tracks have no reference (not scored)")
    for warning in summary["warnings"][:5]:
        lines.append(f"  warning {warning['method']}/{warning['track']}: {warning['warnings']}")
    for error in summary["errors"][:10]:
        lines.append(f"  failed {error['method']}/{error['track']}: {error['error']}")
    if summary["failing_now"] > 10:
        lines.append(f"  ... {summary['failing_now'] - 10} more in tracks.parquet")
    outputs = summary["outputs"]
    lines.append(f"scores: {outputs['summary']} (per frame: {outputs['frames']})")
    lines.append(f"per track: {outputs['tracks']}; museval JSON: {outputs['museval']}/")
    if "boxplot" in outputs:
        lines.append(f"box plot: {outputs['boxplot']}")
    return "\n".join(lines)
