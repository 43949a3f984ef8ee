"""Run accounting shared by catalog separation and evaluation (pipeline.storage.runs)."""

from __future__ import annotations

import json

import pytest

from pipeline.storage.runs import RunTally, counts, worker_summaries, write_summary


def test_a_worker_is_busy_for_its_items_out_of_its_wall_time_after_start_up():
    tally = RunTally()
    tally.count_ok("a", audio_s=30.0, started=100.0, busy_s=6.0)
    tally.count_ok("a", audio_s=10.0, started=108.0, busy_s=2.0)  # idle 2 s between the two
    tally.count_ok("b", audio_s=5.0, started=101.0, busy_s=1.0)
    tally.error += 1
    assert (tally.ok, tally.audio_s) == (3, 45.0)
    workers = worker_summaries(tally, busy="model_busy_seconds")
    assert list(workers) == ["a", "b"]
    assert workers["a"] == {
        "tracks": 2,
        "audio_seconds": 40.0,
        "model_busy_seconds": 8.0,
        "wall_seconds_after_startup": 10.0,
        "busy_fraction": 0.8,
    }
    assert workers["b"]["busy_fraction"] == 1.0
    assert counts(listed=7, planned=5, skipped=2, tally=tally) == {
        "listed": 7,
        "planned": 5,
        "ok": 3,
        "error": 1,
        "skipped": 2,
        "not_processed": 1,
    }


def test_a_gpu_worker_reports_its_device_busy_fraction_next_to_model_busy():
    tally = RunTally()
    tally.count_ok("gpu", audio_s=60.0, started=0.0, busy_s=4.0, device_s=1.0)
    tally.count_ok("gpu", audio_s=60.0, started=4.0, busy_s=4.0, device_s=2.0)
    tally.count_ok("cpu", audio_s=60.0, started=0.0, busy_s=8.0)  # no CUDA events: not reported
    workers = worker_summaries(tally, busy="model_busy_seconds")
    assert workers["gpu"]["device_busy_fraction"] == pytest.approx(3.0 / 8.0)
    assert "device_busy_fraction" not in workers["cpu"]


def test_the_summary_lands_under_runs_of_its_destination(tmp_path):
    summary = {"run_id": "r1", "destination": str(tmp_path / "dst"), "value": 1.5}
    url = write_summary(summary)
    assert url == str(tmp_path / "dst" / "runs" / "r1.json")
    assert json.loads((tmp_path / "dst" / "runs" / "r1.json").read_text()) == summary
    with pytest.raises(KeyError):
        write_summary({"destination": str(tmp_path)})  # a summary names its run
