"""Named weights: fetched through a mirror from real servers on 127.0.0.1 (HTTP, moto's S3, a
folder), resumed after a cut, checked (web pages, other shapes, planted pickles, NaN refused),
cached as safetensors and used again without a request; offline gives one line and exit 2.

Most tests serve a small release-format file and point the ``release`` entry's expected
configuration at it (``small_release``); ``test_paper_configuration_*`` serves the real paper
configuration (45.5 M parameters, random weights)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from test_checkpoint import TINY, _Payload, release_file

from model import MultiTasNet, TasNetConfig, load_checkpoint
from pipeline.cli import build_parser, main
from pipeline.commands.bench import _named_weights
from pipeline.separator import SeparationOptions
from pipeline.settings import load_settings
from pipeline.weights import REGISTRY, WeightsError, cached_file, fetch_weights, resolve_weights
from pipeline.weights.store import expected_shapes

FILENAME = REGISTRY["release"].filename


class FileServer:
    """An HTTP server on 127.0.0.1 serving ``files`` (path -> bytes), honouring ``Range:
    bytes=N-`` and recording every request as (path, Range header). ``cut_after`` bytes: the
    next full (not ranged) answer stops there and the connection is dropped."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.content_type = "application/octet-stream"
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None
        self.stall_seconds = 0.0  # with cut_after: wait this long before dropping the connection
        self.honour_range = True
        self.authorization: str | None = None  # an Authorization header every request must carry
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/weights"

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path, asked = urlsplit(self.path).path, self.headers.get("Range")
                owner.requests.append((path, asked))
                if owner.authorization and self.headers.get("Authorization") != owner.authorization:
                    self.send_error(401)
                    return
                body = owner.files.get(path.removeprefix("/weights"))
                if body is None:
                    self.send_error(404)
                    return
                if not owner.honour_range:
                    asked = None
                start = int(re.fullmatch(r"bytes=(\d+)-", asked)[1]) if asked else 0
                self.send_response(206 if asked else 200)
                self.send_header("Content-Type", owner.content_type)
                self.send_header("Content-Length", str(len(body) - start))
                if asked:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                if owner.cut_after is not None and not asked:
                    self.wfile.write(body[: owner.cut_after])
                    self.wfile.flush()
                    owner.cut_after = None
                    time.sleep(owner.stall_seconds)
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args) -> None:
                pass

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def weights_env(monkeypatch, tmp_path):
    """A cache of the test's own and no METASEP_* of the machine."""
    import os

    for name in list(os.environ):
        if name.startswith("METASEP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("METASEP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def server():
    served = FileServer()
    yield served
    served.close()


@pytest.fixture
def small_release(monkeypatch):
    """The ``release`` entry expecting the small test configuration instead of the paper's."""
    entry = dataclasses.replace(REGISTRY["release"], config=TINY)
    monkeypatch.setitem(REGISTRY, "release", entry)
    return entry


def release_bytes(tmp_path: Path, config: TasNetConfig = TINY, seed: int = 0, **extra):
    """A release-format checkpoint (the authors' torch.save layout) of random weights: its
    bytes and the model."""
    torch.manual_seed(seed)
    model = MultiTasNet(config).eval()
    path = tmp_path / f"release-{seed}.pt"
    release_file(path, model, **extra)
    return path.read_bytes(), model


def serve(server: FileServer, monkeypatch, data: bytes) -> None:
    server.files[f"/{FILENAME}"] = data
    monkeypatch.setenv("METASEP_WEIGHTS_MIRROR", server.url + "/")


def assert_same_weights(path: Path, model: MultiTasNet) -> None:
    loaded = load_checkpoint(path).state_dict()
    original = model.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[key], original[key]) for key in original)


def assert_one_line(text: str, *parts: str) -> None:
    """``text`` (stderr) holds one line besides the progress bar of a download that happened,
    with no traceback, and that line holds every one of ``parts``."""
    lines = [line for line in text.strip().splitlines() if "%|" not in line]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    for part in parts:
        assert part in lines[0], (part, lines[0])


def cache_folder() -> Path:
    return load_settings().cache_dir / "weights"


# --- fetching, caching, converting -------------------------------------------------------------


def test_fetch_through_http_mirror_converts_records_and_second_use_makes_no_request(
    server, monkeypatch, small_release, tmp_path, capsys
):
    data, model = release_bytes(tmp_path)
    serve(server, monkeypatch, data)
    assert main(["weights", "fetch", "release"]) == 0
    assert server.requests == [(f"/weights/{FILENAME}", None)]
    cached = cached_file("release")
    assert str(cached) in capsys.readouterr().out
    assert_same_weights(cached, model)
    with safe_open(str(cached), framework="pt") as file:  # converted: no pickle left to read
        header = json.loads(file.metadata()["metasep.metadata"])
    sidecar = json.loads(cached.with_suffix(".json").read_text())
    assert sidecar["sha256"] == hashlib.sha256(data).hexdigest() == header["weights"]["sha256"]
    assert sidecar["origin"] == f"{server.url}/{FILENAME}"
    assert sidecar["url"] == REGISTRY["release"].url and sidecar["bytes"] == len(data)
    assert {p.name for p in cache_folder().iterdir() if not p.name.startswith(".")} == {
        "release.safetensors",
        "release.json",
    }  # the downloaded original is gone
    assert resolve_weights("release") == cached
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"release\s+cached\s+[\d.]+ MB", listing)
    assert "vocals 6.40" in listing and "ICASSP 2020" in listing
    assert len(server.requests) == 1  # neither the second resolve nor the listing asked


def test_separate_with_named_weights_fetches_once_then_uses_the_cache(
    server, monkeypatch, small_release, tmp_path
):
    data, _ = release_bytes(tmp_path)
    serve(server, monkeypatch, data)
    rate = 44100
    song = tmp_path / "song.wav"
    sf.write(song, np.random.default_rng(0).normal(0, 0.1, (rate, 2)).astype(np.float32), rate)
    for run in ("first", "second"):
        out = tmp_path / run
        assert main(["separate", str(song), "--checkpoint", "release", "-o", str(out)]) == 0
        stems = sorted(p.name for p in (out / "song").iterdir())
        assert stems == ["bass.flac", "drums.flac", "other.flac", "vocals.flac"]
    # metasep bench --config release benches the cached file; paper stays random weights
    assert _named_weights("release") == str(cached_file("release"))
    assert _named_weights("paper") == "paper"
    assert len(server.requests) == 1


def test_a_cut_download_resumes_with_a_range_request(server, monkeypatch, small_release, tmp_path):
    data, model = release_bytes(tmp_path)
    serve(server, monkeypatch, data)
    server.cut_after = len(data) // 3
    path = fetch_weights("release")
    assert server.requests == [
        (f"/weights/{FILENAME}", None),
        (f"/weights/{FILENAME}", f"bytes={len(data) // 3}-"),
    ]
    assert_same_weights(path, model)
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == (
        hashlib.sha256(data).hexdigest()
    )


def test_a_stalled_transfer_times_out_and_resumes(server, monkeypatch, small_release, tmp_path):
    from pipeline.weights import download

    monkeypatch.setattr(download, "TIMEOUT_S", 0.5)  # the test's patience, not 30 s
    data, model = release_bytes(tmp_path)
    serve(server, monkeypatch, data)
    server.cut_after, server.stall_seconds = 5000, 3.0
    started = time.monotonic()
    assert_same_weights(fetch_weights("release"), model)
    assert time.monotonic() - started < 3.0  # gave up on the stalled answer, did not wait
    assert server.requests[1] == (f"/weights/{FILENAME}", "bytes=5000-")


def test_a_partial_file_of_an_earlier_run_is_continued(
    server, monkeypatch, small_release, tmp_path
):
    data, model = release_bytes(tmp_path)
    serve(server, monkeypatch, data)
    cache_folder().mkdir(parents=True)
    (cache_folder() / f".release-{FILENAME}.part").write_bytes(data[:1000])
    assert_same_weights(fetch_weights("release"), model)
    assert server.requests == [(f"/weights/{FILENAME}", "bytes=1000-")]


def test_a_server_that_ignores_range_gets_the_file_rewritten_from_the_start(
    server, monkeypatch, small_release, tmp_path
):
    data, model = release_bytes(tmp_path)
    serve(server, monkeypatch, data)
    server.honour_range = False
    cache_folder().mkdir(parents=True)
    stale = b"\x80stale bytes"
    (cache_folder() / f".release-{FILENAME}.part").write_bytes(stale)
    assert_same_weights(fetch_weights("release"), model)
    assert server.requests == [(f"/weights/{FILENAME}", f"bytes={len(stale)}-")]


def test_http_mirror_credentials_are_sent_and_never_shown(
    server, monkeypatch, small_release, tmp_path, capsys
):
    data, model = release_bytes(tmp_path)
    serve(server, monkeypatch, data)
    server.authorization = "Basic " + base64.b64encode(b"reader:s3cr%t").decode()
    host = urlsplit(server.url).netloc
    monkeypatch.setenv("METASEP_WEIGHTS_MIRROR", f"http://reader:s3cr%25t@{host}/weights")
    assert_same_weights(fetch_weights("release"), model)
    sidecar = cached_file("release").with_suffix(".json").read_text()
    assert "s3cr" not in sidecar and f"http://***@{host}/weights/{FILENAME}" in sidecar
    monkeypatch.setenv("METASEP_WEIGHTS_MIRROR", f"http://reader:wrong@{host}/weights")
    cached_file("release").unlink()
    assert main(["weights", "fetch", "release"]) == 2
    error = capsys.readouterr().err
    assert_one_line(error, "HTTP 401", f"http://***@{host}/weights/{FILENAME}")
    assert "wrong" not in error


def test_s3_mirror(s3_bucket, monkeypatch, small_release, tmp_path):
    fs, bucket, options = s3_bucket
    data, model = release_bytes(tmp_path)
    fs.pipe_file(f"{bucket}/weights/{FILENAME}", data)
    monkeypatch.setenv("METASEP_WEIGHTS_MIRROR", f"s3://{bucket}/weights")
    monkeypatch.setenv("METASEP_STORAGE_OPTIONS", json.dumps(options))
    cache_folder().mkdir(parents=True)
    (cache_folder() / f".release-{FILENAME}.part").write_bytes(data[:777])  # resumed by a seek
    path = fetch_weights("release")
    assert_same_weights(path, model)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["origin"] == f"s3://{bucket}/weights/{FILENAME}"
    assert sidecar["sha256"] == hashlib.sha256(data).hexdigest()


def test_file_mirror_and_import_from_a_file(server, monkeypatch, small_release, tmp_path, capsys):
    data, model = release_bytes(tmp_path)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / FILENAME).write_bytes(data)
    monkeypatch.setenv("METASEP_WEIGHTS_MIRROR", f"file://{mirror}")
    assert_same_weights(fetch_weights("release"), model)
    # --from replaces what is cached, with a file got another way, and needs no network
    other, other_model = release_bytes(tmp_path, seed=1)
    (tmp_path / "downloaded.pt").write_bytes(other)
    serve(server, monkeypatch, data)
    args = ["weights", "fetch", "release", "--from", str(tmp_path / "downloaded.pt")]
    assert main(args) == 0
    assert_same_weights(cached_file("release"), other_model)
    sidecar = json.loads(cached_file("release").with_suffix(".json").read_text())
    assert sidecar["origin"] == str(tmp_path / "downloaded.pt")
    assert sidecar["sha256"] == hashlib.sha256(other).hexdigest()
    assert (tmp_path / "downloaded.pt").exists() and server.requests == []


def test_authors_reference_checkpoint_imports(reference_dir, monkeypatch):
    """The file the authors' own code wrote (../shared/reference) passes the checks."""
    folder = reference_dir / "small-generated"
    meta = json.loads((folder / "meta.json").read_text())
    config = TasNetConfig.from_dict(meta["config"])
    monkeypatch.setitem(
        REGISTRY, "release", dataclasses.replace(REGISTRY["release"], config=config)
    )
    path = fetch_weights("release", source=folder / "checkpoint.pt")
    loaded = load_checkpoint(path)
    assert {k: list(v.shape) for k, v in loaded.state_dict().items()} == meta["state_dict"]


def test_catalog_flow_driver_resolves_the_name_from_the_cache(
    server, monkeypatch, small_release, tmp_path
):
    from flows.separate import checkpoint_file, load_model

    data, model = release_bytes(tmp_path)
    serve(server, monkeypatch, data)
    fetch_weights("release")
    path = checkpoint_file("release", load_settings())
    assert path == str(cached_file("release"))
    loaded, model_id, _ = load_model.fn(path, SeparationOptions(checkpoint=path))
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert model_id and len(server.requests) == 1


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_a_web_page_is_refused_with_one_line(
    server, monkeypatch, small_release, content_type, capsys
):
    serve(server, monkeypatch, b"<!DOCTYPE html><html><body>Sign in to Dropbox</body></html>")
    server.content_type = content_type
    assert main(["weights", "fetch", "release"]) == 2
    assert_one_line(capsys.readouterr().err, f"{server.url}/{FILENAME}", "web page")
    assert not cached_file("release").exists()
    assert not any(p.name.endswith(".part") for p in cache_folder().iterdir())


def test_weights_of_other_shapes_are_refused(server, monkeypatch, small_release, tmp_path, capsys):
    wider = dataclasses.replace(TINY, N=64)
    data, _ = release_bytes(tmp_path, wider)
    serve(server, monkeypatch, data)
    assert main(["weights", "fetch", "release"]) == 2
    assert_one_line(capsys.readouterr().err, "another architecture", "N=64 (expected 32)")
    # same options as expected, but a tensor of another shape
    payload = torch.load(tmp_path / "release-0.pt", weights_only=False)
    payload["args"].N = 32
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=re.escape(f"{key} has shape (3, 3)")):
        fetch_weights("release", source=tmp_path / "bad.pt")
    assert not cached_file("release").exists()


def test_non_finite_weights_are_refused(monkeypatch, small_release, tmp_path):
    torch.manual_seed(0)
    model = MultiTasNet(TINY)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    release_file(tmp_path / "nan.pt", model)
    with pytest.raises(WeightsError, match="NaN"):
        fetch_weights("release", source=tmp_path / "nan.pt")


def test_a_planted_pickle_is_refused_without_running(
    server, monkeypatch, small_release, tmp_path, capsys
):
    marker = tmp_path / "pwned"
    data, _ = release_bytes(tmp_path, extra=_Payload(str(marker)))
    serve(server, monkeypatch, data)
    assert main(["weights", "fetch", "release"]) == 2
    assert_one_line(capsys.readouterr().err, "refused")
    assert not marker.exists() and not cached_file("release").exists()
    assert [p.name for p in cache_folder().iterdir() if not p.name.endswith(".lock")] == []


def test_a_download_of_another_size_is_refused(server, monkeypatch, tmp_path):
    data, _ = release_bytes(tmp_path)
    entry = dataclasses.replace(REGISTRY["release"], config=TINY, size=len(data) + 1)
    monkeypatch.setitem(REGISTRY, "release", entry)
    serve(server, monkeypatch, data)
    with pytest.raises(WeightsError, match=f"{len(data)} bytes where {len(data) + 1}"):
        fetch_weights("release")


def test_unreachable_mirror_gives_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("METASEP_WEIGHTS_MIRROR", f"http://127.0.0.1:{port}/w")
    cache_folder().mkdir(parents=True)
    partial = cache_folder() / f".release-{FILENAME}.part"
    partial.write_bytes(b"\x80 the first bytes of an earlier run")
    for command in (
        ["weights", "fetch", "release"],
        ["separate", "x.wav", "--checkpoint", "release"],
    ):
        assert main(command) == 2
        assert_one_line(
            capsys.readouterr().err,
            f"http://127.0.0.1:{port}/w/{FILENAME}",
            REGISTRY["release"].url,
            f"metasep weights fetch release --from {FILENAME}",
        )
    assert partial.exists()  # kept for the run that has network again


def test_unknown_names_shipped_default_and_missing_import(capsys, tmp_path):
    assert main(["weights", "fetch", "release", "--from", str(tmp_path / "nope.pt")]) == 2
    assert_one_line(capsys.readouterr().err, "nope.pt: no such file")
    assert main(["weights", "fetch", "nope"]) == 2
    assert "no weights named 'nope'" in capsys.readouterr().err
    assert main(["weights", "fetch", "default"]) == 2
    assert "shipped" in capsys.readouterr().err
    with pytest.raises(WeightsError, match=r"no checkpoint file 'nope\.pt'"):
        resolve_weights("nope.pt")
    assert resolve_weights("default").name == "default.safetensors"


# --- the paper configuration ---------------------------------------------------------------------


def test_paper_configuration_is_fetched_verified_and_converted(server, monkeypatch, tmp_path):
    """The registry entry as shipped: the real paper configuration's keys and shapes."""
    config = REGISTRY["release"].config
    assert config == TasNetConfig()
    data, model = release_bytes(tmp_path, config)
    serve(server, monkeypatch, data)
    path = resolve_weights("release")
    loaded = load_checkpoint(path)
    shapes = {key: tuple(value.shape) for key, value in loaded.state_dict().items()}
    assert shapes == expected_shapes(config)
    assert loaded.parameter_count() == 45_545_602  # the reference's count (shared/reference)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert len(server.requests) == 1


# --- settings and the image ------------------------------------------------------------------


def test_mirror_setting_never_shows_credentials(monkeypatch):
    monkeypatch.setenv("METASEP_WEIGHTS_MIRROR", "https://me:hunter2@mirror.example/w/")
    settings = load_settings()
    assert settings.weights_mirror == "https://me:hunter2@mirror.example/w/"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.describe())
    monkeypatch.setenv("METASEP_WEIGHTS_MIRROR", "")  # as a Docker build argument left empty
    assert load_settings().weights_mirror is None


def test_dockerfile_bakes_named_weights_from_a_build_argument():
    from test_infra_files import dockerfile_args, instructions

    assert dockerfile_args()["WEIGHTS"] == '""'
    runs = [i.value[0] for i in instructions() if i.cmd == "RUN"]
    (bake,) = [run for run in runs if "weights fetch" in run]
    assert "for name in ${WEIGHTS}" in bake
    command = re.search(r'metasep (weights fetch "\$\{name\}");', bake)[1]
    parsed = build_parser().parse_args(command.replace('"${name}"', "release").split())
    assert (parsed.command, parsed.action, parsed.name) == ("weights", "fetch", "release")


def test_the_legacy_torch_save_format_is_checked_and_imported(monkeypatch, small_release, tmp_path):
    """Files written by torch < 1.6 (a bare pickle stream, not a zip archive) pass the same
    checks: a 2020 release may be one."""
    torch.manual_seed(0)
    model = MultiTasNet(TINY).eval()
    release_file(tmp_path / "zip.pt", model)
    payload = torch.load(tmp_path / "zip.pt", weights_only=False)
    torch.save(payload, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert (tmp_path / "legacy.pt").read_bytes()[:1] == b"\x80"
    assert_same_weights(fetch_weights("release", source=tmp_path / "legacy.pt"), model)
