"""One run per destination: a lease object in DST that names its holder and proves it alive.

A run takes ``DST/lease.json`` before it plans, with a create-only write where the store has one
(``O_EXCL`` on a local disk, ``If-None-Match: *`` on S3), rewrites it every
:data:`HEARTBEAT_SECONDS` while it works, and deletes it when it ends. Another run finds the lease
taken and says who holds it and since when (or waits for it, when asked). A lease whose holder
has been silent for ``stale_after`` seconds (a driver killed without a chance to delete it) is
taken over, with a warning. Staleness is judged by the store's own modification time where it
gives one, so that the clocks of the two machines do not matter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from pipeline.periodic import Periodic
from pipeline.storage.location import full_url, open_location, retry_storage

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0  # ten missed heartbeats
WAIT_POLL_SECONDS = 10.0


class LeaseHeld(Exception):
    """The destination is leased by another live run; the message names it."""


@dataclass(frozen=True)
class Holder:
    """What a lease says about its holder."""

    run_id: str
    host: str
    pid: int
    since: str  # when it took the lease (UTC, ISO 8601)
    silent_s: float  # seconds since its last heartbeat, by the store's clock where it has one

    def is_dead_here(self) -> bool:
        """Whether the holder ran on this machine and its process is gone (a driver killed
        without the chance to release: no need to wait for its lease to go stale)."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        status = Path(f"/proc/{self.pid}/status")
        return status.is_file() and "\nState:\tZ" in status.read_text()

    def describe(self) -> str:
        return (
            f"run {self.run_id} on {self.host} (pid {self.pid}) holds it since {self.since}, "
            f"last heard from {self.silent_s:.0f} s ago"
        )


class Lease:
    """A held lease: its heartbeat thread runs until :meth:`release` (use it as a context)."""

    def __init__(self, fs, destination: str, run_id: str, body: dict) -> None:
        self.fs, self.run_id, self._body = fs, run_id, body
        self.path = posixpath.join(destination, LEASE_NAME)
        self.url = full_url(fs, self.path)
        self._heartbeat = Periodic(HEARTBEAT_SECONDS, self._beat, "lease").start()

    def _beat(self) -> bool:
        """Rewrite the lease, unless another run has taken it (then stop beating). A store
        that is down for a while fails the step, logged, and the next one tries again."""
        holder = read_holder(self.fs, self.path)
        if holder is not None and holder.run_id != self.run_id:
            log.error("lost the lease of %s: %s", self.url, holder.describe())
            return False
        _write(self.fs, self.path, {**self._body, "heartbeat_at": _now()}, create=False)
        return True

    def release(self) -> None:
        """Stop the heartbeat, and delete the lease if it is still this run's."""
        self._heartbeat.stop()
        with contextlib.suppress(Exception):
            holder = read_holder(self.fs, self.path)
            if holder is not None and holder.run_id == self.run_id:
                retry_storage(lambda: self.fs.rm_file(self.path), f"deleting {self.url}")

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_lease(
    fs,
    destination: str,
    run_id: str,
    wait: bool = False,
    stale_after: float = STALE_AFTER_SECONDS,
) -> Lease:
    """Take the lease of ``destination`` for ``run_id``, or raise :class:`LeaseHeld` naming the
    run that has it (with ``wait``: poll until it is free or stale)."""
    path = posixpath.join(destination, LEASE_NAME)
    body = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
    while True:
        try:
            _write(fs, path, {**body, "heartbeat_at": body["since"]}, create=True)
            return Lease(fs, destination, run_id, body)
        except FileExistsError:
            pass
        holder = read_holder(fs, path)
        if holder is None:
            continue  # released between our write and our read: try again
        if holder.silent_s > stale_after or holder.is_dead_here():
            log.warning(
                "taking over the lease of %s: %s (%s)",
                full_url(fs, path),
                holder.describe(),
                "its process is gone"
                if holder.is_dead_here()
                else f"silent for more than {stale_after:.0f} s",
            )
            with contextlib.suppress(FileNotFoundError):
                retry_storage(lambda: fs.rm_file(path), f"deleting {path}")
            continue  # a create-only write again: of two runs taking over, one wins
        if not wait:
            raise LeaseHeld(f"{full_url(fs, destination)} is in use: {holder.describe()}")
        time.sleep(WAIT_POLL_SECONDS)


def current_holder(destination: str, storage_options: dict | None = None) -> Holder | None:
    """Who holds the lease of ``destination`` now (None: nobody)."""
    fs, root = open_location(destination, storage_options)
    return read_holder(fs, posixpath.join(root, LEASE_NAME))


def read_holder(fs, path: str) -> Holder | None:
    """The holder a lease file names, or None where there is none."""
    try:
        data = retry_storage(lambda: fs.cat_file(path), f"reading {path}")
        info = retry_storage(lambda: fs.info(path), f"reading {path}")
    except FileNotFoundError:
        return None
    try:
        body = json.loads(data)
    except ValueError:
        body = {}
    heard = _modified(info) or _parse(body.get("heartbeat_at"))
    silent = (datetime.now(UTC) - heard).total_seconds() if heard else float("inf")
    return Holder(
        str(body.get("run_id", "?")),
        str(body.get("host", "?")),
        int(body.get("pid", 0) or 0),
        str(body.get("since", "?")),
        max(0.0, silent),
    )


def _write(fs, path: str, body: dict, create: bool) -> None:
    """Write the lease; ``create``: only if there is none (``FileExistsError`` otherwise)."""
    data = json.dumps(body, indent=2).encode()
    if isinstance(fs, LocalFileSystem):
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        if create:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
            return
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
        return
    if create and type(fs).__name__ == "S3FileSystem":
        retry_storage(lambda: fs.pipe_file(path, data, mode="create"), f"writing {path}")
        return
    if create and fs.exists(path):  # stores without a create-only write: a narrow race
        raise FileExistsError(path)
    retry_storage(lambda: fs.pipe_file(path, data), f"writing {path}")


def _modified(info: dict) -> datetime | None:
    stamp = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if isinstance(stamp, int | float):
        return datetime.fromtimestamp(stamp, UTC)
    if isinstance(stamp, datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    return None


def _parse(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
