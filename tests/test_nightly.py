"""A library job's bad nights, with real parts: a worker stopped mid-track, a storage outage with
a store that comes back empty, a disk that fills, a read-only destination, two runs at once, a
time limit, an empty source. Every run ends, says what happened in a line, and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model import STEMS, MultiTasNet, TasNetConfig, save_checkpoint
from pipeline.cli import main
from pipeline.storage.location import open_location
from pipeline.storage.manifest import read_manifests

RUN = """
import json, sys
from flows.separate import separate_catalog
from pipeline.separator import SeparationOptions
source, destination, checkpoint, address, extra = sys.argv[1:]
extra = json.loads(extra)
summary = separate_catalog(source, destination, SeparationOptions(checkpoint=checkpoint),
                           ray_address=address, workers=1, flush_rows=1, flush_seconds=1, **extra)
print("SUMMARY " + json.dumps(summary), flush=True)
"""


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = MultiTasNet(TasNetConfig(N=32, B=16, H=16, layers=2, stack=1, num_mels=16))
    return str(save_checkpoint(model, tmp_path_factory.mktemp("model") / "tiny.safetensors"))


def make_library(folder: Path, tracks: int, seconds: float, rate: int = 16000) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    t = np.arange(int(seconds * rate)) / rate
    for k in range(tracks):
        tone = 0.3 * np.sin(2 * np.pi * (100 + 25 * k) * t) * (1 + 0.3 * np.sin(3 * t))
        name = f"track {k:02d}.wav"
        sf.write(folder / name, np.stack([tone, 0.6 * tone], 1), rate)
        names.append(name)
    return names


def rows(destination: str, options: dict | None = None) -> list[dict]:
    fs, root = open_location(destination, options)
    return read_manifests(fs, root).to_pylist()


def start_run(environment: dict, *arguments: str, **extra) -> subprocess.Popen:
    command = [sys.executable, "-c", RUN, *arguments, json.dumps(extra)]
    return subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def summary_of(process: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-4000:]
    (line,) = [line for line in out.splitlines() if line.startswith("SUMMARY ")]
    return json.loads(line[len("SUMMARY ") :])


def wait_for(condition, what: str, process: subprocess.Popen | None = None, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def environment(prefect_api, tmp_path) -> dict:
    from prefect.settings import PREFECT_API_URL

    return {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "METASEP_CACHE_DIR": str(tmp_path / "cache"),  # where the journal goes
    }


def test_a_stopped_worker_is_replaced_and_its_track_becomes_a_stalled_row(
    environment, ray_local, tiny_checkpoint, tmp_path
):
    """A worker frozen mid-track (SIGSTOP) makes no progress. Frozen for less than the stall
    timeout, its track goes on, and the frozen seconds are not counted as model time; frozen
    for longer, the driver kills it, Ray starts another, the frozen track is an error row that
    says so, and the run goes on with the rest."""
    names = make_library(tmp_path / "music", 6, 120.0)  # about 3 s a track
    destination = str(tmp_path / "out")
    run = start_run(
        environment, str(tmp_path / "music"), destination, tiny_checkpoint, ray_local,
        stall_timeout=8,
    )  # fmt: skip
    wait_for(lambda: len(rows(destination)) >= 1, "a first row", run)
    worker = int(rows(destination)[0]["worker"].rsplit("/", 1)[1])
    time.sleep(0.5)  # into the next track
    stopped_at = time.time()
    os.kill(worker, signal.SIGSTOP)
    time.sleep(4)
    os.kill(worker, signal.SIGCONT)

    def paused() -> list[dict]:  # the row of the track the pause fell in
        return [
            row
            for row in rows(destination)
            if row["started_at"].timestamp() <= stopped_at <= row["finished_at"].timestamp()
        ]

    wait_for(paused, "the paused track's row", run)
    (row,) = paused()
    wall = (row["finished_at"] - row["started_at"]).total_seconds()
    assert row["status"] == "ok" and row["model_seconds"] < wall - 2.5
    time.sleep(0.5)
    os.kill(worker, signal.SIGSTOP)
    try:
        summary = summary_of(run)
        status = Path(f"/proc/{worker}/status")
        assert not status.exists() or "State:\tZ" in status.read_text(), "left stopped"
    finally:
        if Path(f"/proc/{worker}").exists():
            os.kill(worker, signal.SIGKILL)
    found = {row["track_id"]: row for row in rows(destination)}
    assert sorted(found) == names  # every track once
    stalled = [row for row in found.values() if row["status"] == "error"]
    assert len(stalled) == 1 and stalled[0]["error"].startswith("stalled: no progress for")
    assert summary["tracks"]["ok"] == len(names) - 1 and summary["tracks"]["error"] == 1
    assert any(str(worker) not in row["worker"] for row in found.values()), "never replaced"


def test_two_runs_at_once_one_waits_and_a_dead_holders_lease_is_taken_over(
    environment, ray_local, tiny_checkpoint, tmp_path, capsys
):
    """One run per destination: a second run says who holds DST and exits with code 3; a
    lease whose holder's process is gone (killed without releasing it) is taken over."""
    make_library(tmp_path / "music", 4, 20.0)
    destination = str(tmp_path / "out")
    first = start_run(environment, str(tmp_path / "music"), destination, tiny_checkpoint, ray_local)
    wait_for((tmp_path / "out" / "lease.json").exists, "the first run's lease", first)
    command = ["separate", str(tmp_path / "music"), destination, "--checkpoint", tiny_checkpoint]
    assert main(command) == 3
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is in use: run " in err and "--wait" in err
    summary = summary_of(first)
    assert summary["tracks"]["ok"] == 4 and not (tmp_path / "out" / "lease.json").exists()
    assert len(rows(destination)) == 4  # not separated twice

    ghost = subprocess.Popen([sys.executable, "-c", "pass"])
    ghost.wait()
    lease = {"run_id": "ghost", "host": socket.gethostname(), "pid": ghost.pid, "since": "x"}
    (tmp_path / "out" / "lease.json").write_text(json.dumps(lease))
    (tmp_path / "music" / "new.wav").write_bytes((tmp_path / "music" / "track 00.wav").read_bytes())
    assert main([*command, "--ray-address", ray_local]) == 0
    assert "1 planned: 1 ok" in capsys.readouterr().out


def test_a_run_stops_at_its_time_limit_and_the_next_one_finishes(
    environment, ray_local, tiny_checkpoint, tmp_path
):
    """--timeout ends a run cleanly: the rows of finished tracks are written, the others are left
    for the next run (not error rows), the summary says why, and counts add up."""
    names = make_library(tmp_path / "music", 8, 120.0)
    destination = str(tmp_path / "out")
    run = start_run(
        environment, str(tmp_path / "music"), destination, tiny_checkpoint, ray_local, timeout=10
    )
    summary = summary_of(run)
    tracks = summary["tracks"]
    assert summary["stopped"] == "the time limit was reached"
    assert tracks["not_processed"] > 0 and tracks["error"] == 0
    assert tracks["ok"] + tracks["not_processed"] == tracks["planned"] == len(names)
    assert len(rows(destination)) == tracks["ok"]
    fs, root = open_location(destination)
    assert json.loads(fs.cat_file(f"{root}/runs/{summary['run_id']}.json"))["stopped"]
    again = summary_of(start_run(environment, str(tmp_path / "music"), destination,
                                 tiny_checkpoint, ray_local))  # fmt: skip
    assert again["tracks"]["skipped"] == tracks["ok"]
    assert again["tracks"]["ok"] == tracks["not_processed"]


def test_expected_failures_before_the_run_are_one_line(tmp_path, capsys):
    """An empty source, a destination that cannot be written: one line each, exit code 2,
    before Ray, Prefect or the model start (and no traceback)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no audio here")
    assert main(["separate", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no audio files" in err and "Traceback" not in err
    make_library(tmp_path / "music", 1, 0.5)
    (tmp_path / "file").write_text("a file where DST's folder should be")
    assert main(["separate", str(tmp_path / "music"), str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "Traceback" not in err


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (mounting needs root; skipped with the reason where it is not allowed)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_destination_is_refused_in_one_line(small_disk, tmp_path, capsys):
    make_library(tmp_path / "music", 1, 0.5)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert main(["separate", str(tmp_path / "music"), str(small_disk / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "read-only" in err and "Traceback" not in err


def test_the_spool_stays_out_of_a_destination_that_has_room_for_the_stems_only(
    small_disk, tmp_path
):
    """The unscaled stems wait in the spool folder (the system's temporary folder by default),
    never in DST: a destination with room for a track's FLAC stems but not for its float32
    spool (16 bytes a frame and channel) still takes the track."""
    from pipeline.separator import Separator

    rate, seconds = 44100, 5.0  # a spool of 7 MB, FLAC stems of 3.3 MB, a 4 MB disk
    (tmp_path / "spool").mkdir()
    make_library(tmp_path / "music", 1, seconds, rate)
    separator = Separator("default", "cpu", "float32", spool_dir=tmp_path / "spool")
    paths = separator.separate_file(tmp_path / "music" / "track 00.wav", small_disk / "song")
    assert sorted(path.name for path in (small_disk / "song").iterdir()) == sorted(
        f"{stem}.flac" for stem in STEMS
    )
    assert all(sf.info(path).frames == int(seconds * rate) for path in paths.values())


def test_a_disk_that_fills_mid_run_stops_it_cleanly_and_loses_no_row(
    environment, ray_local, tiny_checkpoint, small_disk, tmp_path
):
    """The stems of the first tracks fit, then the disk is full: the track that met it is an
    error row, the run stops (the rest is left, not failed), rows and summary that the full
    disk did not take wait in the journal, and the next run publishes them and goes on."""
    names = make_library(tmp_path / "music", 8, 1.5, rate=44100)  # 1 MB of stems each
    destination = str(small_disk / "out")
    summary = summary_of(
        start_run(environment, str(tmp_path / "music"), destination, tiny_checkpoint, ray_local)
    )
    tracks = summary["tracks"]
    assert summary["stopped"].startswith("the destination is full")
    assert tracks["ok"] >= 1 and tracks["error"] == 1 and tracks["not_processed"] >= 1
    assert tracks["ok"] + tracks["error"] + tracks["not_processed"] == len(names)
    kept = len(rows(destination)) + summary["journaled"]
    assert kept >= 1  # nothing in memory only: in DST or in the journal
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = summary_of(
        start_run(environment, str(tmp_path / "music"), destination, tiny_checkpoint, ray_local)
    )
    assert again["tracks"]["skipped"] == tracks["ok"] and not again["stopped"]
    found = {row["track_id"] for row in rows(destination) if row["status"] == "ok"}
    assert found == set(names)
    assert (small_disk / "out" / "runs" / f"{summary['run_id']}.json").exists()  # published
    for name in names:
        for stem in STEMS:
            assert sf.info(small_disk / "out" / "stems" / name[:-4] / f"{stem}.flac").frames


@pytest.fixture
def moto_process(tmp_path):
    """A moto S3 server in a process of its own, which a test can kill and start again (empty,
    as a store that lost its data)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "moto.log", "w")  # noqa: SIM115 (closed below)
    processes = []

    def start():
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        processes.append(subprocess.Popen(command, stdout=log, stderr=log))
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    return
            assert time.monotonic() < deadline, "moto did not start"
            time.sleep(0.1)

    def stop():
        processes[-1].kill()
        processes[-1].wait()

    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
    }
    start()
    yield start, stop, options
    if processes[-1].poll() is None:
        stop()
    log.close()


def test_a_storage_outage_loses_no_row_and_lost_stems_are_made_again(
    environment, ray_local, tiny_checkpoint, moto_process, tmp_path
):
    """DST on S3, whose server dies mid-run and comes back empty: the rows written while it was
    down wait in the journal and reach the store when it is back; the tracks whose stems the
    store lost are separated again by the next run, which names them."""
    import s3fs

    start, stop, options = moto_process
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("night")
    names = make_library(tmp_path / "music", 8, 20.0)
    environment = {**environment, "METASEP_STORAGE_OPTIONS": json.dumps(options)}
    destination = "s3://night/out"
    run = start_run(environment, str(tmp_path / "music"), destination, tiny_checkpoint, ray_local)
    wait_for(lambda: len(rows(destination, options)) >= 2, "two rows", run)
    stop()
    time.sleep(6)  # rows go on being made: to the journal
    start()
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.mkdir("night")  # the store is back, empty
    first = summary_of(run)
    assert first["tracks"]["ok"] + first["tracks"]["error"] == len(names)
    published = {row["track_id"] for row in rows(destination, options)}
    assert published, "the rows made during the outage never reached the store"
    second = summary_of(
        start_run(environment, str(tmp_path / "music"), destination, tiny_checkpoint, ray_local)
    )
    lost = set(second["lost"])
    assert lost and second["tracks"]["lost"] == len(lost)  # named, counted, made again
    assert second["tracks"]["ok"] + second["tracks"]["skipped"] == len(names)
    for row in rows(destination, options):
        if row["status"] == "ok" and row["run_id"] == second["run_id"]:
            assert all(fs.exists(row[f"{stem}_uri"]) for stem in STEMS)
    done = {row["track_id"] for row in rows(destination, options) if row["status"] == "ok"}
    assert done == set(names)


@pytest.mark.slow  # a moto server of its own; storage calls retried with back-off
@pytest.mark.parametrize("fault", ["unreachable", "credentials refused"])
def test_an_unreachable_store_or_refused_credentials_are_one_line(fault, tmp_path, capsys):
    """Before anything starts, the probe of DST tells an operator what to fix: the store's
    endpoint does not answer, or it refuses the credentials."""
    make_library(tmp_path / "music", 1, 0.5)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = None
    if fault == "credentials refused":  # moto checks signatures once its free actions are used
        environment = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        server = subprocess.Popen(command, env=environment, stderr=subprocess.DEVNULL)
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, "moto")
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "wrong",
        "secret": "wrong",
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    try:
        command = ["separate", str(tmp_path / "music"), "s3://night/out"]
        assert main([*command, "--storage-options", json.dumps(options)]) == 2
    finally:
        if server is not None:
            server.kill()
            server.wait()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"({fault}:" in err and "Traceback" not in err
    assert "wrong" not in err  # never a credential


def test_interrupted_run_writes_its_summary_with_counts_that_add_up(
    environment, ray_local, tiny_checkpoint, tmp_path
):
    names = make_library(tmp_path / "music", 8, 120.0)  # a run of 20 s and more
    destination = str(tmp_path / "out")
    command = [
        sys.executable, "-m", "pipeline.cli", "separate", str(tmp_path / "music"), destination,
        "--checkpoint", tiny_checkpoint, "--ray-address", ray_local,
    ]  # fmt: skip
    run = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    # the first rows, flushed after 10 s: mid-run
    wait_for(lambda: any((tmp_path / "out" / "manifest").glob("run=*/*.parquet")), "a row", run)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-3000:]
    (summary_file,) = (tmp_path / "out" / "runs").glob("*.json")
    summary = json.loads(summary_file.read_text())
    tracks = summary["tracks"]
    assert summary["stopped"] == "interrupted"
    assert tracks["ok"] + tracks["error"] + tracks["not_processed"] == tracks["planned"]
    assert tracks["planned"] == len(names) and tracks["ok"] == len(rows(destination))
    assert not (tmp_path / "out" / "lease.json").exists()


def test_no_op_plan_of_a_generated_library_skips_everything():
    """The planner benchmark's own check, small: a second night over a library whose every
    track is done plans nothing."""
    from pipeline.bench.planner import plan_no_op, write_manifest

    with tempfile.TemporaryDirectory() as work:
        write_manifest(Path(work), 3000)
        figures = plan_no_op(work, 3000)
    assert (figures["planned"], figures["skipped"], figures["lost"]) == (0, 3000, 0)
