"""The jobs of ``metasep serve``: uploads waiting for the one separator, and what they produced.

One worker thread owns the :class:`~pipeline.separator.Separator` and separates one upload at a
time, in arrival order; every other upload waits in the queue and knows its place in it. Each job
lives in its own folder, named by a random server-made id (what a client calls its file never
becomes a path). Finished jobs are kept up to a limit and then deleted, oldest first.

Progress is the separator's own: the windows its network has run, out of the windows its plan
has, as its ``callback`` reports them; the same callback stops a cancelled job between two
forward passes.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model import STEMS
from pipeline.audio import AudioError, open_audio
from pipeline.separator import Separator, WindowCallback

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, ERROR = "queued", "running", "done", "error"
UPLOAD_NAME = "upload"  # the one name an upload gets on disk, inside its job's folder
STEMS_FOLDER = "stems"


class QueueFull(Exception):
    """No room for another job: the queue holds its limit of waiting uploads."""


class JobCancelled(Exception):
    """Raised inside the separator's loop when the running job was cancelled."""


@dataclass
class AudioInfo:
    """What decoding the header of an input found."""

    sample_rate: int
    channels: int
    frames: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


@dataclass
class Job:
    """One track: an upload to separate or a catalog track whose stems exist already."""

    id: str
    name: str  # for display and download names only, never a path
    folder: Path
    info: AudioInfo
    state: str = QUEUED
    windows_total: int = 0
    windows_done: int = 0
    error: str | None = None
    stems: dict[str, Path] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    seconds: float | None = None  # separation wall time
    finished_at: float = 0.0  # when it finished (what the retention limit goes by)
    cancelled: bool = False

    @property
    def upload(self) -> Path:
        return self.folder / UPLOAD_NAME

    @property
    def finished(self) -> bool:
        return self.state in (DONE, ERROR)

    def phase(self) -> str:
        """What a running job is doing: analysing, separating or writing."""
        if self.windows_total == 0:
            return "analysing"
        return "separating" if self.windows_done < self.windows_total else "writing"

    def progress(self) -> float:
        """Fraction done: windows run out of windows planned (1 when done)."""
        if self.state == DONE:
            return 1.0
        if self.windows_total == 0:
            return 0.0
        return min(1.0, self.windows_done / self.windows_total)


def new_job_id() -> str:
    """A random, URL-safe id of 16 characters (96 bits: not guessable by another client)."""
    return secrets.token_urlsafe(12)


def probe_audio(path: Path, name: str) -> AudioInfo:
    """Open ``path`` as audio (libsndfile, else ffmpeg) and return its rate, channels, length.

    Raises :class:`AudioError` with ``name`` (not the server's path) in its message.
    """
    try:
        with open_audio(str(path)) as reader:
            return AudioInfo(reader.rate, reader.channels, reader.frames)
    except AudioError as error:
        raise AudioError(public_message(error, path, name)) from None


def public_message(error: BaseException, path: Path, name: str) -> str:
    """An error's first line with the server-side ``path`` replaced by the client's ``name``."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = text.replace(str(path), name)
    if text.startswith(f"{path.name}: "):  # audio errors name a Path input by its last part
        text = f"{name}: {text[len(path.name) + 2 :]}"
    return text.replace(f"({name}: ", "(")  # a decoder's reason need not repeat the name


def window_counter(job: Job, cancelled: Callable[[], bool]) -> WindowCallback:
    """A separator callback that records finished and total windows in ``job`` and raises
    :class:`JobCancelled` when ``cancelled()`` says so."""

    def count(done: int, total: int) -> None:
        if cancelled():
            raise JobCancelled
        job.windows_done, job.windows_total = done, total

    return count


class JobManager:
    """The job table, the queue and the worker thread that separates.

    ``keep`` finished jobs are kept (their folders deleted after that, oldest first);
    ``max_queue`` uploads may wait. All methods are thread-safe.
    """

    def __init__(
        self, separator: Separator, workdir: Path, keep: int = 10, max_queue: int = 8
    ) -> None:
        self.separator = separator
        self.workdir = Path(workdir)
        self.keep, self.max_queue = keep, max_queue
        self._jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._running: Job | None = None
        self._thread = threading.Thread(target=self._work, name="metasep-separator", daemon=True)

    # ------------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job, drop the queue, wait for the worker and delete every folder."""
        with self._lock:
            self._stopping = True
            if self._running is not None:
                self._running.cancelled = True
            self._queue.clear()
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for job in jobs:
            shutil.rmtree(job.folder, ignore_errors=True)

    # ------------------------------------------------------------------------------------------
    # Jobs

    def new_folder(self) -> tuple[str, Path]:
        """A fresh job id and its (new, empty) folder; raises :class:`QueueFull` when full."""
        self.check_room()
        job_id = new_job_id()
        folder = self.workdir / job_id
        folder.mkdir()
        return job_id, folder

    def check_room(self) -> None:
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._queue)} songs are waiting already (the limit); try again later"
                )

    def enqueue(self, job_id: str, folder: Path, name: str, info: AudioInfo) -> Job:
        """Queue a validated upload (``folder/upload``) for separation."""
        job = Job(job_id, name, folder, info)
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull("the queue filled up while the file was uploading; try again")
            self._jobs[job.id] = job
            self._queue.append(job)
            self._wake.notify_all()
        self._evict()
        log.info("job %s queued: %s (%.1f s of audio)", job.id, name, info.duration_s)
        return job

    def add_finished(
        self, job_id: str, folder: Path, name: str, info: AudioInfo, stems: dict[str, Path]
    ) -> Job:
        """Register a job whose stems exist already (a catalog track)."""
        job = Job(job_id, name, folder, info, state=DONE, stems=dict(stems))
        job.finished_at = time.time()
        job.windows_total = job.windows_done = 1
        with self._lock:
            self._jobs[job.id] = job
        self._evict()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """How many queued jobs are ahead of ``job`` (0 for the next one; -1 if not queued)."""
        with self._lock:
            for index, waiting in enumerate(self._queue):
                if waiting is job:
                    return index
        return -1

    def remove(self, job_id: str) -> bool:
        """Cancel a queued or running job, or delete a finished one; False if unknown."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is None:
                return False
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
            running = job is self._running
        if not running:  # the worker deletes a running job's folder when it stops
            shutil.rmtree(job.folder, ignore_errors=True)
        return True

    def describe(self, job: Job) -> dict[str, Any]:
        """The JSON view of a job that the page polls."""
        view: dict[str, Any] = {
            "id": job.id,
            "name": job.name,
            "state": job.state,
            "progress": round(job.progress(), 4),
            "windows_done": job.windows_done,
            "windows_total": job.windows_total,
            "queue_position": self.position(job) if job.state == QUEUED else None,
            "phase": job.phase() if job.state == RUNNING else None,
            "error": job.error,
            "duration_s": round(job.info.duration_s, 3),
            "sample_rate": job.info.sample_rate,
            "channels": job.info.channels,
            "seconds": None if job.seconds is None else round(job.seconds, 2),
        }
        if job.state == DONE:
            view["stems"] = {stem: f"/api/jobs/{job.id}/stems/{stem}" for stem in STEMS}
            view["remix"] = f"/api/jobs/{job.id}/remix"
        return view

    # ------------------------------------------------------------------------------------------
    # The worker

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self._running = job
                job.state = RUNNING
            state, job.error = self._separate(job)
            with self._lock:
                self._running = None
                forgotten = job.id not in self._jobs
            if forgotten:  # removed while it ran
                shutil.rmtree(job.folder, ignore_errors=True)
            job.finished_at = time.time()
            self._evict(finishing=job)
            job.state = state  # published last: a finished job's limit is already applied

    def _separate(self, job: Job) -> tuple[str, str | None]:
        """Separate one upload into its folder; the job's final state and error message."""
        started = time.perf_counter()
        try:
            count = window_counter(job, lambda: job.cancelled or self._stopping)
            paths = self.separator.separate_file(
                job.upload, job.folder / STEMS_FOLDER, callback=count
            )
            job.stems = {stem: paths[stem] for stem in STEMS}
            job.seconds = time.perf_counter() - started
            log.info("job %s separated in %.1f s", job.id, job.seconds)
            return DONE, None
        except JobCancelled:
            return ERROR, "cancelled"
        except (AudioError, OSError, FloatingPointError, ValueError) as error:
            message = public_message(error, job.upload, job.name)
            log.warning("job %s failed: %s", job.id, message)
            return ERROR, message
        except Exception as error:  # the worker must outlive any one job
            log.exception("job %s failed", job.id)
            return ERROR, f"internal error: {type(error).__name__}"
        finally:
            job.upload.unlink(missing_ok=True)

    def _evict(self, finishing: Job | None = None) -> None:
        """Delete the jobs finished longest ago beyond ``keep`` (``finishing`` counts as one)."""
        with self._lock:
            finished = sorted(
                (job for job in self._jobs.values() if job.finished or job is finishing),
                key=lambda j: j.finished_at,
            )
            doomed = finished[: max(0, len(finished) - self.keep)]
            for job in doomed:
                del self._jobs[job.id]
        for job in doomed:
            log.info("job %s removed (keeping the %d newest)", job.id, self.keep)
            shutil.rmtree(job.folder, ignore_errors=True)
