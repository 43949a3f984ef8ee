"""The catalog flow end to end on real parts: Prefect's test harness, the session's local Ray
with 2 CPUs, S3 through a moto server on 127.0.0.1, a small random Meta-TasNet."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from model import STEMS, MultiTasNet, TasNetConfig, save_checkpoint
from pipeline.audio import read_audio
from pipeline.separator import SeparationOptions, resolve_precision
from pipeline.storage.location import open_location
from pipeline.storage.manifest import read_manifests

REQUIRED_COLUMNS = {
    "run_id",
    "track_id",
    "source_uri",
    "source_size",
    "source_version",
    "status",
    "error",
    "duration_s",
    "sample_rate",
    "channels",
    "gain_db",
    "residual_db",
    "flags",
    "precision",
    *(f"{stem}_uri" for stem in STEMS),
    "model_id",
    "options_hash",
    "started_at",
    "finished_at",
    "worker",
}
GOOD_TRACKS = {  # name: (seconds, rate, channels)
    "a.wav": (1.0, 44100, 2),
    "albums/b c/song one.flac": (0.8, 22050, 1),
    "albums/ünïcödé ✓/trąck.wav": (0.6, 48000, 2),
    "deep/x/y/z.wav": (0.5, 16000, 1),
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = MultiTasNet(TasNetConfig(N=32, B=16, H=16, layers=2, stack=1, num_mels=16))
    return str(save_checkpoint(model, tmp_path_factory.mktemp("model") / "tiny.safetensors"))


def tone_bytes(seconds: float, rate: int, channels: int, frequency: float, form: str) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * frequency * t) * np.exp(-t)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([tone * (0.5 + c) for c in range(channels)], 1), rate, format=form)
    return buffer.getvalue()


def file_format(name: str) -> str:
    return "FLAC" if name.endswith(".flac") else "WAV"


def manifest_rows(destination: str, options=None) -> list[dict]:
    fs, root = open_location(destination, options)
    return read_manifests(fs, root).to_pylist()


def test_s3_catalog_is_separated_then_rerun_incrementally(
    s3_bucket, prefect_api, ray_local, tiny_checkpoint
):
    from prefect.client.orchestration import get_client

    from flows.separate import separate_catalog

    fs, bucket, options = s3_bucket
    for k, (name, (seconds, rate, channels)) in enumerate(GOOD_TRACKS.items()):
        data = tone_bytes(seconds, rate, channels, 110.0 * (k + 1), file_format(name))
        fs.pipe(f"{bucket}/music/{name}", data)
    fs.pipe(f"{bucket}/music/liner notes.txt", b"not listed")
    source, destination = f"s3://{bucket}/music", f"s3://{bucket}/out"

    def run() -> dict:
        return separate_catalog(
            source,
            destination,
            options=SeparationOptions(checkpoint=tiny_checkpoint),
            storage_options=options,
        )

    first = run()
    assert first["tracks"] == {
        "listed": 4,
        "planned": 4,
        "ok": 4,
        "error": 0,
        "skipped": 0,
        "not_processed": 0,
        "lost": 0,
    }
    rows = manifest_rows(destination, options)
    assert set(rows[0]) >= REQUIRED_COLUMNS and len(rows) == 4
    assert {row["track_id"] for row in rows} == set(GOOD_TRACKS)
    for row in rows:
        seconds, rate, channels = GOOD_TRACKS[row["track_id"]]
        assert row["status"] == "ok" and row["error"] is None and row["run_id"] == first["run_id"]
        assert (row["sample_rate"], row["channels"]) == (rate, channels)
        assert row["duration_s"] == pytest.approx(seconds, abs=1e-3) and row["gain_db"] == 0
        assert row["source_version"].startswith("etag:") and row["model_id"]
        assert row["started_at"] <= row["finished_at"] and row["worker"]
        assert row["precision"] == resolve_precision("auto", "cpu")  # what the worker ran
        for stem in STEMS:
            uri = row[f"{stem}_uri"]
            key = row["track_id"].rsplit(".", 1)[0]
            assert uri == f"s3://{bucket}/out/stems/{key}/{stem}.flac"
            with fs.open(uri, "rb") as file:
                audio, stem_rate = read_audio(file)
            assert stem_rate == rate and audio.shape == (channels, int(seconds * rate))
            assert np.isfinite(audio).all()
    summary = json.loads(fs.cat_file(f"{bucket}/out/runs/{first['run_id']}.json"))
    assert summary["tracks"]["ok"] == 4 and summary["audio_seconds"] == pytest.approx(2.9, abs=0.01)
    (worker,) = summary["workers"].values()
    assert (
        worker["tracks"] == 4
        and 0 < worker["model_busy_seconds"] <= worker["wall_seconds_after_startup"] + 1e-6
    )
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    tables = [a for a in artifact if a.key == "separate-catalog"]
    assert tables and first["run_id"] in tables[0].description

    second = run()
    assert second["tracks"]["planned"] == 0 and second["tracks"]["skipped"] == 4
    assert len(manifest_rows(destination, options)) == 4

    fs.pipe(f"{bucket}/music/a.wav", tone_bytes(1.0, 44100, 2, 999.0, "WAV"))
    third = run()
    assert third["tracks"]["planned"] == 1 and third["tracks"]["ok"] == 1
    latest = [r for r in manifest_rows(destination, options) if r["run_id"] == third["run_id"]]
    assert [r["track_id"] for r in latest] == ["a.wav"]

    flac = tone_bytes(2.0, 8000, 1, 300.0, "FLAC")
    rng = np.random.default_rng(0)
    bad = {
        "corrupt.wav": b"RIFF" + rng.bytes(4000),
        "empty.flac": b"",
        "not audio.mp3": b"just some text, not an mp3\n" * 20,
    }
    for name, data in {**bad, "truncated.flac": flac[: len(flac) // 2]}.items():
        fs.pipe(f"{bucket}/music/{name}", data)
    fourth = run()
    assert fourth["tracks"]["planned"] == 4 and fourth["tracks"]["skipped"] == 4
    assert fourth["tracks"]["error"] >= 3 and fourth["tracks"]["not_processed"] == 0
    rows = {r["track_id"]: r for r in manifest_rows(destination, options)}
    assert len(rows) == 8 and {n for n, r in rows.items() if r["status"] == "error"} >= set(bad)
    for row in rows.values():
        if row["status"] == "error":
            assert row["error"] and "\n" not in row["error"] and "Traceback" not in row["error"]
            assert all(row[f"{stem}_uri"] is None for stem in STEMS)
        else:
            assert all(fs.exists(row[f"{stem}_uri"]) for stem in STEMS)
    assert not fs.exists(f"{bucket}/out/stems/corrupt")


KILLED_RUN = """
import sys
from flows.separate import separate_catalog
from pipeline.separator import SeparationOptions
source, destination, checkpoint, address = sys.argv[1:]
separate_catalog(source, destination, SeparationOptions(checkpoint=checkpoint),
                 ray_address=address, workers=1, flush_rows=1)
"""


def test_killed_run_resumes_without_repeating_work(
    tmp_path, prefect_api, ray_local, tiny_checkpoint
):
    from prefect.settings import PREFECT_API_URL

    from flows.separate import separate_catalog

    source, destination = tmp_path / "music", str(tmp_path / "out")
    names = [f"album/track {k:02d}.wav" for k in range(10)]
    for k, name in enumerate(names):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(tone_bytes(1.5, 16000, 2, 100.0 + 20 * k, "WAV"))
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [sys.executable, "-c", KILLED_RUN, str(source), destination, tiny_checkpoint]
    process = subprocess.Popen(
        [*command, ray_local], env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    manifests = tmp_path / "out" / "manifest"
    deadline = time.monotonic() + 180
    while len(list(manifests.glob("run=*/part-*.parquet"))) < 2:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the first run wrote no rows"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = manifest_rows(destination)
    assert 2 <= len(killed) < len(names), "the run finished before it was killed"
    for row in killed:
        for stem in STEMS:
            audio, rate = read_audio(row[f"{stem}_uri"])
            assert rate == 16000 and audio.shape == (2, 24000)

    resumed = separate_catalog(
        str(source), destination, SeparationOptions(checkpoint=tiny_checkpoint)
    )
    assert resumed["tracks"]["skipped"] == len(killed)
    assert resumed["tracks"]["planned"] == resumed["tracks"]["ok"] == len(names) - len(killed)
    rows = manifest_rows(destination)
    assert sorted(row["track_id"] for row in rows) == sorted(names)  # each exactly once
    assert all(row["status"] == "ok" for row in rows)


def test_separate_command_runs_the_flow_for_a_folder(
    tmp_path, prefect_api, ray_local, tiny_checkpoint, capsys
):
    from pipeline.cli import main

    library, out = tmp_path / "library", tmp_path / "out"
    library.mkdir()
    for k, name in enumerate(["one.wav", "two.flac"]):
        (library / name).write_bytes(tone_bytes(0.5, 22050, 2, 200.0 * (k + 1), file_format(name)))
    audio, rate = sf.read(library / "two.flac")  # tagged: the source's tags reach the row
    with sf.SoundFile(library / "two.flac", "w", rate, 2, format="FLAC") as tagged:
        tagged.artist, tagged.title = "Ünïcode Artist", "Two"
        tagged.write(audio)
    (library / "broken.wav").write_text("a text file with an audio name")
    command = ["separate", str(library), str(out), "--checkpoint", tiny_checkpoint]

    assert main([*command, "--format", "wav", "--tracks-per-call", "3"]) == 1  # a track failed
    printed = capsys.readouterr()
    assert "3 planned: 2 ok, 1 failed" in printed.out and "failed broken.wav" in printed.out
    rows = manifest_rows(str(out))  # one call of the worker's took all three
    assert len(rows) == 3 and len({row["started_at"] for row in rows}) == 1
    tags = {row["track_id"]: dict(row["tags"] or []) for row in rows}
    assert tags["two.flac"] == {"artist": "Ünïcode Artist", "title": "Two"}
    assert tags["one.wav"] == {} and tags["broken.wav"] == {}
    for name in ("one", "two"):
        audio, rate = read_audio(out / "stems" / name / "vocals.wav")
        assert rate == 22050 and audio.shape == (2, 11025)

    (library / "broken.wav").unlink()
    assert main([*command, "--format", "wav"]) == 0
    assert "nothing to separate" in capsys.readouterr().out
    assert main([*command, "--karaoke"]) == 2
    assert "--karaoke is for files" in capsys.readouterr().err
    assert main(["separate", str(tmp_path / "nowhere" / "*.wav"), str(out)]) == 2
    assert "no audio files" in capsys.readouterr().err

    # A float WAV far over full scale: its FLAC stems are scaled down together, not clipped.
    (tmp_path / "loud").mkdir()
    tone = 100 * np.sin(2 * np.pi * 200.0 * np.arange(11025) / 22050)
    sf.write(tmp_path / "loud" / "loud.wav", np.stack([tone, tone / 2], 1), 22050, subtype="FLOAT")
    assert main(["separate", str(tmp_path / "loud"), str(tmp_path / "loud-out"), *command[3:]]) == 0
    printed = capsys.readouterr().out
    assert "1 track(s) scaled down so that their stems do not clip" in printed
    assert re.search(r"1 track\(s\) flagged, worth a listen: loud\.wav \([^)]*scaled", printed)
    (row,) = manifest_rows(str(tmp_path / "loud-out"))
    assert "scaled" in row["flags"] and row["residual_db"] < 0
    stems = {stem: read_audio(row[f"{stem}_uri"])[0] for stem in STEMS}
    assert max(np.abs(audio).max() for audio in stems.values()) == pytest.approx(0.99, abs=1e-4)
    assert row["gain_db"] < 0


def test_cli_storage_options_reach_the_flow_but_not_its_recorded_parameters(
    tmp_path, prefect_api, ray_local, tiny_checkpoint, capsys
):
    """--storage-options may hold credentials: the CLI hands them to the flow as settings, so
    Prefect records neither them nor the key names' values, and the run's log redacts them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.logging.handlers import APILogHandler

    from pipeline.cli import main

    library, out = tmp_path / "library", tmp_path / "out"
    library.mkdir()
    (library / "one.wav").write_bytes(tone_bytes(0.5, 22050, 2, 220.0, "WAV"))
    secret = f"cli-secret-{os.getpid()}"
    options = json.dumps({"auto_mkdir": True, "session_token": secret})
    command = ["separate", str(library), str(out), "--checkpoint", tiny_checkpoint]
    assert main([*command, "--storage-options", options]) == 0
    assert (out / "stems" / "one" / "vocals.flac").exists()
    APILogHandler().flush()  # the run's logs, sent in the background, are on the API now
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        assert run.parameters["storage_options"] is None
        assert run.parameters["options"]["checkpoint"] == tiny_checkpoint
        logs = [
            log.message
            for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            )
        ]
    assert secret not in json.dumps(run.model_dump(mode="json")) + "".join(logs)
    (settings_line,) = [line for line in logs if line.startswith("settings:")]
    assert "'session_token': '***'" in settings_line and "'auto_mkdir': True" in settings_line


def test_cpu_workers_of_a_local_cluster_compute_on_the_cpus_no_worker_holds(ray_local, tmp_path):
    """On a machine of its own (a local Ray the run started: ``strict``), a CPU worker's network
    takes its share of the CPUs left for decoding and upload, and the worker sets it; on a
    cluster it joined, Ray's accounting stands (the CPUs each worker holds)."""
    import math
    from dataclasses import replace

    import ray

    from flows.separate import _size_workers
    from pipeline.catalog.job import JobConfig
    from pipeline.catalog.worker import SeparateWorker
    from pipeline.separator import Separator

    cpus = ray.cluster_resources()["CPU"]
    torch.manual_seed(0)
    model = MultiTasNet(TasNetConfig(N=32, B=16, H=16, layers=2, stack=1, num_mels=16))
    separator = Separator(model, device="cpu")
    config = JobConfig(
        destination=str(tmp_path),
        run_id="threads",
        model_id=separator.model_id,
        options_hash=separator.options_hash,
    )
    sized = _size_workers(ray, config, strict=True)
    assert sized.workers == max(1, math.floor(cpus - 1))
    assert sized.network_threads == max(1, math.floor(cpus / sized.workers))
    alone = _size_workers(ray, replace(config, workers=1), strict=True)
    assert alone.network_threads == math.floor(cpus) > 1
    assert _size_workers(ray, replace(config, workers=1), strict=False).network_threads == 0
    threads = torch.get_num_threads()
    try:
        SeparateWorker(model, replace(alone, network_threads=threads + 1), board=None)
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
