"""metasep serve: the JSON API and the job queue, with the shipped model separating real audio."""

from __future__ import annotations

import io
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from starlette.testclient import TestClient

from model import STEMS
from pipeline.audio import read_audio, write_audio
from pipeline.cli import main
from pipeline.separator import Separator
from pipeline.serve.app import ServerLimits, create_app
from pipeline.serve.catalog import Catalog
from pipeline.serve.jobs import DONE, ERROR, QUEUED, JobManager, QueueFull, probe_audio
from pipeline.serve.mix import render_mix
from pipeline.storage.location import open_location
from pipeline.storage.manifest import ManifestWriter

RATE = 22050


def tone(seconds: float, channels: int = 2, frequency: float = 220.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    notes = 0.3 * np.sin(2 * np.pi * frequency * t) + 0.1 * np.sin(2 * np.pi * 3 * frequency * t)
    beat = 0.4 * np.sin(2 * np.pi * 60 * t) * np.exp(-(t % 0.5) * 12)
    mono = (notes + beat).astype(np.float32)
    return np.stack([mono * (1.0 - 0.3 * c) for c in range(channels)])


def wav_bytes(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    write_audio(buffer, audio, RATE, "wav")
    return buffer.getvalue()


def wait_done(client: TestClient, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in (DONE, ERROR):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished after {timeout} s: {job}")


def decode(content: bytes) -> tuple[np.ndarray, int]:
    return read_audio(io.BytesIO(content))


@pytest.fixture(scope="module")
def separator() -> Separator:
    return Separator("default", device="cpu")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-jobs")


@pytest.fixture(scope="module")
def client(separator, workdir):
    limits = ServerLimits(max_upload_bytes=1 << 20, max_seconds=30.0, keep_jobs=20, workdir=workdir)
    with TestClient(create_app(separator, limits)) as client:
        yield client


@pytest.fixture(scope="module")
def separated(client) -> tuple[dict, np.ndarray]:
    """One upload, separated: its finished job and the mixture that was sent."""
    mixture = tone(3.0)
    response = client.post(
        "/api/jobs", content=wav_bytes(mixture), headers={"X-Filename": quote("my song.wav")}
    )
    assert response.status_code == 202, response.text
    assert response.json()["state"] in (QUEUED, "running")
    job = wait_done(client, response.json()["id"])
    assert job["state"] == DONE, job
    return job, mixture


def test_upload_is_separated_with_progress_and_stems(client, separated):
    job, mixture = separated
    assert job["name"] == "my song.wav"
    assert job["windows_total"] > 0 and job["windows_done"] == job["windows_total"]
    assert job["progress"] == 1.0
    assert (job["sample_rate"], job["channels"]) == (RATE, 2)
    stems = {}
    for stem in STEMS:
        response = client.get(job["stems"][stem])
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/flac"
        assert 'filename="my song - ' in response.headers["content-disposition"]
        stems[stem], rate = decode(response.content)
        assert rate == RATE and stems[stem].shape == mixture.shape
        assert np.isfinite(stems[stem]).all()
    # the stems are scaled to sum to the mixture: they account for most of its energy
    residual = mixture - sum(stems.values())
    assert np.sum(residual**2) < 0.5 * np.sum(mixture**2)


def test_remix_is_the_stems_times_the_gains(client, separated):
    job, _ = separated
    stems = {stem: decode(client.get(job["stems"][stem]).content)[0] for stem in STEMS}
    gains = {"drums": 0.25, "bass": 1.0, "other": 1.5, "vocals": 0.0}
    response = client.get(job["remix"], params={**gains, "format": "wav"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/wav"
    assert 'filename="my song - remix.wav"' in response.headers["content-disposition"]
    remix, rate = decode(response.content)
    expected = sum(gains[stem] * stems[stem] for stem in STEMS)
    assert rate == RATE
    np.testing.assert_allclose(remix, expected, atol=1e-6)
    assert np.abs(remix - sum(stems.values())).max() > 0.01  # the gains did change the mix
    flac = decode(client.get(job["remix"], params={"format": "flac"}).content)[0]
    np.testing.assert_allclose(flac, sum(stems.values()), atol=1e-4)  # missing gains are 1
    response = client.get(job["remix"], params={"format": "mp3"})
    assert response.headers["content-type"] == "audio/mpeg"
    mp3 = decode(response.content)[0]
    assert mp3.shape == flac.shape  # gapless, sample-aligned
    assert np.sum((mp3 - flac) ** 2) < 0.01 * np.sum(flac**2)  # 320 kbps: within -20 dB


def test_a_flac_remix_that_would_clip_is_scaled_as_a_whole(tmp_path):
    """Float WAV keeps a loud remix's peaks; 24-bit FLAC gets the same mix, scaled to fit."""
    t = np.arange(RATE) / RATE
    stems = {}
    for k, stem in enumerate(STEMS):
        stems[stem] = tmp_path / f"{stem}.flac"
        tone = 0.5 * np.sin(2 * np.pi * 110.0 * (k + 1) * t)
        write_audio(stems[stem], np.stack([tone, tone / 2]).astype(np.float32), RATE)
    gains = dict.fromkeys(STEMS, 4.0)
    loud = read_audio(render_mix(stems, gains, tmp_path / "remix.wav", "wav"))[0]
    fitted = read_audio(render_mix(stems, gains, tmp_path / "remix.flac", "flac"))[0]
    peak = np.abs(loud).max()
    assert peak > 4  # the tones add up
    np.testing.assert_allclose(fitted, loud * (0.99 / peak), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("remix")) == [
        "remix.flac",
        "remix.wav",
    ]


@pytest.mark.parametrize(
    "query, reason",
    [
        ({"drums": "loud"}, "not a number"),
        ({"vocals": "-1"}, "between 0 and"),
        ({"bass": "nan"}, "between 0 and"),
        ({"format": "ogg"}, "use flac, wav, mp3"),
    ],
)
def test_remix_rejects_bad_parameters(client, separated, query, reason):
    response = client.get(separated[0]["remix"], params=query)
    assert response.status_code == 400
    assert reason in response.json()["error"]


def test_non_audio_upload_is_refused_with_the_reason(client, workdir):
    before = set(workdir.iterdir())
    response = client.post(
        "/api/jobs",
        content=b"just some notes, not audio\n" * 50,
        headers={"X-Filename": "notes.txt"},
    )
    assert response.status_code == 415
    message = response.json()["error"]
    assert message.startswith("notes.txt: not a readable audio file")
    assert str(workdir) not in message and "upload" not in message
    assert set(workdir.iterdir()) == before  # nothing kept


def test_upload_without_its_name_header_is_refused(client):
    # what a cross-site HTML form would send: no custom header is possible there
    response = client.post(
        "/api/jobs", content=wav_bytes(tone(1.0)), headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 400 and "X-Filename" in response.json()["error"]


def test_empty_upload_is_refused(client):
    response = client.post("/api/jobs", content=b"", headers={"X-Filename": "empty.wav"})
    assert response.status_code == 400
    assert "empty" in response.json()["error"]


def test_oversize_upload_is_413_declared_or_streamed(client, workdir):
    before = set(workdir.iterdir())
    big = wav_bytes(tone(30.0))  # ~5 MB of float WAV; the limit is 1 MB
    response = client.post("/api/jobs", content=big, headers={"X-Filename": "big.wav"})
    assert response.status_code == 413
    assert "upload limit of 1 MB" in response.json()["error"]

    def chunks():  # no Content-Length: the server counts while it receives
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    response = client.post("/api/jobs", content=chunks(), headers={"X-Filename": "big.wav"})
    assert response.status_code == 413
    assert set(workdir.iterdir()) == before


def test_too_long_audio_is_refused(separator, tmp_path):
    limits = ServerLimits(max_seconds=1.0, workdir=tmp_path)
    with TestClient(create_app(separator, limits)) as client:
        headers = {"X-Filename": "long.wav"}
        response = client.post("/api/jobs", content=wav_bytes(tone(2.0)), headers=headers)
    assert response.status_code == 422
    assert "longer than this server's limit" in response.json()["error"]


def test_uploaded_names_never_become_paths(client, workdir):
    name = "../../../etc/x/..\\zz_escape\x00probe.wav"
    response = client.post(
        "/api/jobs", content=wav_bytes(tone(1.0)), headers={"X-Filename": quote(name)}
    )
    assert response.status_code == 202
    job = wait_done(client, response.json()["id"])
    assert job["name"] == "zz_escape_probe.wav"
    folder = workdir / job["id"]
    assert folder.is_dir() and folder.parent == workdir
    written = {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    assert written == {"stems"} | {f"stems/{stem}.flac" for stem in STEMS}
    assert not list(workdir.parent.rglob("*zz_escape*"))
    disposition = client.get(job["stems"]["vocals"]).headers["content-disposition"]
    assert 'filename="zz_escape_probe - vocals.flac"' in disposition


@pytest.mark.parametrize(
    "path",
    [
        "/api/jobs/..%2F..%2Fetc",
        "/api/jobs/nosuchjob0000000",
        "/api/jobs/nosuchjob0000000/stems/drums",
        "/static/..%2F..%2Fjobs.py",
        "/static/../app.py",
    ],
)
def test_unknown_and_traversing_paths_are_404(client, path):
    assert client.get(path).status_code == 404


def test_unknown_stem_is_404(client, separated):
    job_id = separated[0]["id"]
    for stem in ("piano", "..%2F..%2Fupload", "%2E%2E"):
        assert client.get(f"/api/jobs/{job_id}/stems/{stem}").status_code == 404


def test_page_and_static_files_are_served_with_security_headers(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and response.headers["x-content-type-options"]
    config = client.get("/api/config").json()
    assert config["stems"] == list(STEMS) and config["max_upload_bytes"] == 1 << 20


def test_requests_for_other_host_names_are_refused(separator, tmp_path):
    limits = ServerLimits(workdir=tmp_path, allowed_hosts=["127.0.0.1", "localhost"])
    app = create_app(separator, limits)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/api/config").status_code == 200
        assert client.get("/api/config", headers={"host": "attacker.example"}).status_code == 400


def test_queue_runs_one_job_at_a_time_in_order_and_keeps_a_limit(separator, tmp_path):
    manager = JobManager(separator, tmp_path / "jobs", keep=2, max_queue=3)
    manager.workdir.mkdir()
    jobs = []
    for k in range(3):  # queued before the worker starts: the order is known
        job_id, folder = manager.new_folder()
        write_audio(folder / "upload", tone(1.0, frequency=200.0 + 50 * k), RATE, "wav")
        jobs.append(
            manager.enqueue(job_id, folder, f"song {k}", probe_audio(folder / "upload", "x"))
        )
    assert [manager.position(job) for job in jobs] == [0, 1, 2]
    assert manager.describe(jobs[2])["queue_position"] == 2
    with pytest.raises(QueueFull):
        manager.new_folder()
    assert manager.remove(jobs[1].id)  # cancelled while queued: gone, folder deleted
    assert not jobs[1].folder.exists() and manager.get(jobs[1].id) is None
    assert manager.position(jobs[2]) == 1
    manager.start()
    try:
        deadline = time.monotonic() + 120
        while not jobs[2].finished and time.monotonic() < deadline:
            time.sleep(0.05)
        assert jobs[0].state == jobs[2].state == DONE
        assert jobs[0].seconds is not None and jobs[2].seconds is not None
        job_id, folder = manager.new_folder()  # room again
        write_audio(folder / "upload", tone(1.0), RATE, "wav")
        third = manager.enqueue(job_id, folder, "song 3", probe_audio(folder / "upload", "x"))
        while not third.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        assert third.state == DONE
        # keep=2: the oldest finished job is gone with its folder
        assert manager.get(jobs[0].id) is None and not jobs[0].folder.exists()
        assert manager.get(jobs[2].id) is jobs[2] and jobs[2].stems["bass"].exists()
    finally:
        manager.stop()
    assert not any(manager.workdir.iterdir())


def test_a_job_that_fails_to_decode_reports_it_and_the_worker_goes_on(separator, tmp_path):
    manager = JobManager(separator, tmp_path, keep=5)
    manager.start()
    try:
        bad_id, bad_folder = manager.new_folder()
        good_id, good_folder = manager.new_folder()
        header = wav_bytes(tone(2.0))
        (bad_folder / "upload").write_bytes(header[: len(header) // 3])  # truncated data
        write_audio(good_folder / "upload", tone(1.0), RATE, "wav")
        info = probe_audio(good_folder / "upload", "good.wav")
        bad = manager.enqueue(bad_id, bad_folder, "bad.wav", info)
        good = manager.enqueue(good_id, good_folder, "good.wav", info)
        deadline = time.monotonic() + 120
        while not good.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        assert good.state == DONE
        assert bad.state in (DONE, ERROR)  # libsndfile may read a truncated WAV as shorter
        if bad.state == ERROR:
            assert bad.error.startswith("bad.wav: ") and str(tmp_path) not in bad.error
    finally:
        manager.stop()


def write_separated_catalog(root: Path) -> Path:
    """A catalog destination as ``metasep separate SRC DST`` leaves it: stems and a manifest
    with one ok track, one failed track and one row pointing outside DST/stems."""
    fs, destination = open_location(str(root))
    audio = tone(1.5)
    rows = []
    for track_id, status in (("album/first song.wav", "ok"), ("broken.wav", "error")):
        folder = root / "stems" / Path(track_id).with_suffix("")
        uris = {}
        for k, stem in enumerate(STEMS):
            path = folder / f"{stem}.flac"
            if status == "ok":
                write_audio(path, audio * (k + 1) / 10, RATE)
            uris[f"{stem}_uri"] = str(path)
        rows.append({"track_id": track_id, "status": status, "duration_s": 1.5, **uris})
    outside = {f"{stem}_uri": "/etc/passwd" for stem in STEMS}
    rows.append({"track_id": "sneaky.wav", "status": "ok", "duration_s": 1.0, **outside})
    writer = ManifestWriter(fs, destination, "20260101T000000Z-test")
    for row in rows:
        writer.add({"sample_rate": RATE, "channels": 2, **row})
    writer.close()
    return root


def test_catalog_tracks_can_be_listed_opened_and_remixed(separator, tmp_path):
    destination = write_separated_catalog(tmp_path / "separated")
    catalog = Catalog(str(destination))
    limits = ServerLimits(workdir=tmp_path / "jobs")
    with TestClient(create_app(separator, limits, catalog)) as client:
        assert client.get("/api/config").json()["catalog"] is True
        listing = client.get("/api/catalog").json()
        assert [track["name"] for track in listing["tracks"]] == ["album/first song.wav"]
        assert client.get("/api/catalog", params={"q": "nothing like it"}).json()["total"] == 0
        key = listing["tracks"][0]["key"]
        job = client.post("/api/catalog/open", json={"key": key}).json()
        assert job["state"] == DONE and job["name"] == "first song.wav"
        drums = decode(client.get(job["stems"]["drums"]).content)[0]
        np.testing.assert_allclose(drums, tone(1.5) * 0.1, atol=1e-5)
        remix = decode(client.get(job["remix"], params={"drums": 2, "vocals": 0}).content)[0]
        expected = tone(1.5) * (2 * 0.1 + 0.2 + 0.3)
        np.testing.assert_allclose(remix, expected, atol=1e-5)
        assert client.post("/api/catalog/open", json={"key": "nope"}).status_code == 404
        assert client.post("/api/catalog/open", json=[]).status_code == 400
        form = client.post("/api/catalog/open", content=f'{{"key": "{key}"}}'.encode())
        assert form.status_code == 415  # not JSON by its Content-Type
    assert (destination / "stems" / "album" / "first song" / "drums.flac").exists()  # untouched


def test_without_catalog_the_catalog_api_says_how_to_get_one(client):
    response = client.get("/api/catalog")
    assert response.status_code == 404 and "--catalog" in response.json()["error"]


def test_serve_command_reports_a_busy_port(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--device", "cpu"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
