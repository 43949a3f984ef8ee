"""The web app of ``metasep serve`` (Starlette): the page, its static files and a small JSON API.

API (all under ``/api``; errors are ``{"error": "<one line>"}`` with a 4xx/5xx status):

- ``GET  /api/config``: stems, upload and length limits, whether a catalog is open, the model id.
- ``POST /api/jobs``: the request body is the audio file itself (any format ffmpeg reads); the
  ``X-Filename`` header, URL-encoded, is its name for display only. The header is required: a
  cross-site form cannot send one, and a cross-site script would need a CORS preflight that this
  server never grants, so other web sites cannot start jobs. 202 with the job; 413 over
  the size limit; 415 when the body does not decode as audio; 422 when it is too long; 503 when
  the queue is full.
- ``GET  /api/jobs/{id}``: state (queued, running, done, error), queue position, progress.
- ``DELETE /api/jobs/{id}``: cancel a queued or running job, or delete a finished one.
- ``GET  /api/jobs/{id}/stems/{stem}``: a stem as FLAC.
- ``GET  /api/jobs/{id}/remix?drums=G&bass=G&other=G&vocals=G&format=wav|flac|mp3``: the stems mixed
  with those gains, rendered on the server (so the file is exactly what the sliders say).
- ``GET  /api/catalog?q=WORDS``, ``POST /api/catalog/open`` (``{"key": ...}``): separated
  tracks of ``--catalog DST``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import quote, unquote

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model import STEMS
from pipeline.audio import FORMAT_NAMES, FORMATS, AudioError
from pipeline.separator import Separator
from pipeline.serve.catalog import Catalog
from pipeline.serve.jobs import (
    DONE,
    AudioInfo,
    Job,
    JobManager,
    QueueFull,
    new_job_id,
    probe_audio,
)
from pipeline.serve.mix import render_mix
from pipeline.stems import parse_gains

log = logging.getLogger(__name__)
STATIC = "static"
MEDIA_TYPES = {"flac": "audio/flac", "wav": "audio/wav", "mp3": "audio/mpeg"}
# The page loads nothing from elsewhere; audio is fetched from this server and decoded in JS.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_UNSAFE_NAME = re.compile(r"[^\w .,()&'+-]+")


@dataclass
class ServerLimits:
    """What this server allows and where it keeps jobs, from ``metasep serve``'s flags.

    Not settings in the sense of :mod:`pipeline.settings` (knobs shared by the CLI and the flows,
    with ``METASEP_*`` variables): these belong to one server. The shared ones (checkpoint,
    device, precision, storage options) come from there, through the separator and catalog
    that the command builds.
    """

    max_upload_bytes: int = 200 * 1024 * 1024
    max_seconds: float = 20 * 60.0
    keep_jobs: int = 10
    max_queue: int = 8
    workdir: Path | None = None  # job folders; a fresh temporary folder by default
    allowed_hosts: list[str] | None = None  # Host headers accepted (None: any)


class ApiError(Exception):
    """A request that cannot be served: its HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(
    separator: Separator, limits: ServerLimits | None = None, catalog: Catalog | None = None
) -> Starlette:
    """The app; its lifespan starts the separation worker and deletes every job folder at exit."""
    limits = limits or ServerLimits()
    state: dict[str, JobManager] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        with contextlib.ExitStack() as stack:
            workdir = limits.workdir or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="metasep-serve-"))
            )
            manager = JobManager(separator, workdir, limits.keep_jobs, limits.max_queue)
            manager.start()
            state["jobs"] = manager
            try:
                yield
            finally:
                manager.stop()

    api = _Api(separator, limits, catalog, state)
    routes = [
        Route("/", _page),
        Route("/api/config", api.config),
        Route("/api/jobs", api.create_job, methods=["POST"]),
        Route("/api/jobs/{job_id}", api.job, methods=["GET", "DELETE"]),
        Route("/api/jobs/{job_id}/stems/{stem}", api.stem),
        Route("/api/jobs/{job_id}/remix", api.remix),
        Route("/api/catalog", api.catalog_tracks),
        Route("/api/catalog/open", api.open_catalog_track, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("pipeline.serve", STATIC)]), name="static"),
    ]
    middleware = [Middleware(_SecurityHeaders)]
    if limits.allowed_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=limits.allowed_hosts))
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error},
    )


class _SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(SECURITY_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _page(request: Request) -> Response:
    html = resources.files("pipeline.serve").joinpath(STATIC, "index.html").read_text("utf-8")
    return Response(html, media_type="text/html; charset=utf-8")


async def _api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    return JSONResponse({"error": str(error)}, status_code=error.status)


class _Api:
    """The request handlers; they share the limits, the catalog and the job manager."""

    def __init__(
        self,
        separator: Separator,
        limits: ServerLimits,
        catalog: Catalog | None,
        state: dict[str, JobManager],
    ) -> None:
        self.separator, self.limits, self.catalog = separator, limits, catalog
        self._state = state

    @property
    def jobs(self) -> JobManager:
        return self._state["jobs"]

    async def config(self, request: Request) -> Response:
        return JSONResponse(
            {
                "stems": list(STEMS),
                "max_upload_bytes": self.limits.max_upload_bytes,
                "max_seconds": self.limits.max_seconds,
                "catalog": self.catalog is not None,
                "model_id": self.separator.model_id,
                "device": str(self.separator.device),
            }
        )

    async def create_job(self, request: Request) -> Response:
        if "x-filename" not in request.headers:  # also what keeps other sites' forms out
            raise ApiError(400, "send the file's name in the X-Filename header (URL-encoded)")
        name = display_name(unquote(request.headers["x-filename"]))
        limit = self.limits.max_upload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, too_large(name, limit))
        try:
            job_id, folder = self.jobs.new_folder()
        except QueueFull as error:
            raise ApiError(503, str(error)) from None
        try:
            info = await self._receive(request, folder / "upload", name)
            job = self.jobs.enqueue(job_id, folder, name, info)
        except BaseException as error:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(error, QueueFull):
                raise ApiError(503, str(error)) from None
            raise
        return JSONResponse(self.jobs.describe(job), status_code=202)

    async def _receive(self, request: Request, upload: Path, name: str) -> AudioInfo:
        """Stream the body to ``upload`` (never more than the limit), then check it decodes."""
        limit, size = self.limits.max_upload_bytes, 0
        with upload.open("wb") as file:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, too_large(name, limit))
                file.write(chunk)
        if size == 0:
            raise ApiError(400, f"{name}: the upload is empty")
        try:
            info = await _in_thread(probe_audio, upload, name)
        except AudioError as error:
            raise ApiError(415, str(error)) from None
        if info.duration_s > self.limits.max_seconds:
            raise ApiError(
                422,
                f"{name}: {_minutes(info.duration_s)} of audio is longer than this server's "
                f"limit of {_minutes(self.limits.max_seconds)}",
            )
        return info

    async def job(self, request: Request) -> Response:
        job = self._job(request)
        if request.method == "DELETE":
            self.jobs.remove(job.id)
            return Response(status_code=204)
        return JSONResponse(self.jobs.describe(job))

    async def stem(self, request: Request) -> Response:
        job = self._finished_job(request)
        stem = request.path_params["stem"]
        if stem not in STEMS:
            raise ApiError(404, f"no stem {stem!r}; the stems are {', '.join(STEMS)}")
        path = job.stems[stem]
        extension = path.suffix.lstrip(".").lower()
        return FileResponse(
            path,
            media_type=MEDIA_TYPES.get(extension, "application/octet-stream"),
            headers=_attachment(f"{_base(job.name)} - {stem}.{extension}"),
        )

    async def remix(self, request: Request) -> Response:
        job = self._finished_job(request)
        format = request.query_params.get("format", "wav")
        if format not in FORMATS:
            raise ApiError(400, f"format={format!r}: use {FORMAT_NAMES}")
        try:
            gains = parse_gains(request.query_params)
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        target = job.folder / f"remix-{new_job_id()}.{format}"
        try:
            await _in_thread(render_mix, job.stems, gains, target, format)
        except (AudioError, OSError) as error:
            target.unlink(missing_ok=True)
            raise ApiError(500, f"could not render the remix: {error}") from None
        return FileResponse(
            target,
            media_type=MEDIA_TYPES[format],
            headers=_attachment(f"{_base(job.name)} - remix.{format}"),
            background=BackgroundTask(target.unlink, missing_ok=True),
        )

    async def catalog_tracks(self, request: Request) -> Response:
        catalog = self._catalog()
        query = request.query_params.get("q", "")
        tracks, total = await _in_thread(catalog.search, query)
        return JSONResponse({"tracks": [track.describe() for track in tracks], "total": total})

    async def open_catalog_track(self, request: Request) -> Response:
        catalog = self._catalog()
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ApiError(415, "send JSON (Content-Type: application/json)")
        try:
            key = str((await request.json())["key"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(400, 'send {"key": "<track key>"}') from None
        track = (await _in_thread(catalog.tracks)).get(key)
        if track is None:
            raise ApiError(404, "no such track in the catalog")
        job_id = new_job_id()
        folder = self.jobs.workdir / job_id
        folder.mkdir()
        try:
            stems = await _in_thread(catalog.local_stems, track, folder)
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise ApiError(502, f"{track.track_id}: cannot read its stems ({error})") from None
        frames = round(track.duration_s * track.sample_rate)
        info = AudioInfo(track.sample_rate, track.channels, frames)
        job = self.jobs.add_finished(job_id, folder, display_name(track.track_id), info, stems)
        return JSONResponse(self.jobs.describe(job))

    def _job(self, request: Request) -> Job:
        job = self.jobs.get(request.path_params["job_id"])
        if job is None:
            raise ApiError(404, "no such job (it may have been removed to make room)")
        return job

    def _finished_job(self, request: Request) -> Job:
        job = self._job(request)
        if job.state != DONE:
            raise ApiError(409, f"the job is {job.state}, its stems are not ready")
        return job

    def _catalog(self) -> Catalog:
        if self.catalog is None:
            raise ApiError(404, "no catalog: start the server with --catalog DST")
        return self.catalog


def display_name(name: str) -> str:
    """A file's name as the page shows it: its last path part, letters, digits and a few
    punctuation marks only, at most 80 characters. Never used as a path."""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME.sub("_", name).strip(" ._")
    if len(name) > 80:
        stem, dot, extension = name.rpartition(".")
        name = (
            f"{stem[: 79 - len(extension)]}.{extension}"
            if dot and len(extension) < 8
            else name[:80]
        )
    return name or "track"


def _base(name: str) -> str:
    """A display name without its extension, for download names."""
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


def too_large(name: str, limit: int) -> str:
    return f"{name}: the file is larger than this server's upload limit of {limit / 2**20:g} MB"


def _attachment(filename: str) -> dict[str, str]:
    ascii_name = filename.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")
    return {
        "Content-Disposition": f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''"
        + quote(filename, safe="")
    }


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d} min"


async def _in_thread(function, *args):
    """Run blocking work (decoding, mixing, storage) off the event loop."""
    return await run_in_threadpool(function, *args)
