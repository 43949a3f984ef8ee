"""Storage through fsspec: one place that opens locations, retries transient errors and writes
objects so that a reader never sees a partial file.

:func:`retry_storage` is the only retry layer for storage errors. It wraps each request, so a
throttled or reset request is repeated alone, where it failed, whoever made it: a flow task, a
Ray task decoding a track, the serve app or the CLI. The flows' Prefect tasks therefore have no
retries of their own (stacked on these, one bad minute of an object store meant up to 20 attempts
and a minute of waiting per listing), and Ray's retries are left to what only Ray can handle: a
worker process or node that died.

Every URL fsspec knows works: local paths, ``file://``, ``s3://`` (s3fs; endpoint, region, profile
and anonymous access come from the storage options or the usual ``AWS_*`` environment variables,
so MinIO, Ceph RGW and AWS all work), ``gs://`` where gcsfs is installed, ``memory://``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that say something about the request, not the network: retrying cannot help.
_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
# What a local disk says that waiting will not change: full, read-only, over quota
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}
# Network errors some clients raise without wrapping them in OSError (botocore, aiohttp).
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientPayloadError",
}


class StorageError(OSError):
    """A storage operation that failed for good; the message names the location."""


def open_location(url: str, storage_options: dict[str, Any] | None = None):
    """The filesystem and the protocol-less path of ``url`` (a local path or an fsspec URL)."""
    fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    return fs, path.rstrip("/") or path


def full_url(fs, path: str) -> str:
    """``path`` with its protocol, as written into manifests (``s3://bucket/key``, ``/abs/path``)."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def is_transient(error: BaseException) -> bool:
    """Whether an error from a storage call may go away when the call is repeated."""
    if isinstance(error, _PERMANENT) or getattr(error, "errno", None) in _PERMANENT_ERRNOS:
        return False
    if isinstance(error, OSError | TimeoutError | ConnectionError):
        return True
    return any(cls.__name__ in _TRANSIENT_NAMES for cls in type(error).__mro__)


def retry_storage(
    call: Callable[[], T],
    what: str,
    attempts: int = 5,
    first_delay: float = 0.5,
    quiet: bool = False,
) -> T:
    """Run ``call``, repeating it with exponential back-off while it fails transiently.

    Object stores fail now and then (throttling, resets, timeouts); a catalog of 100,000 tracks
    meets such errors every night, and one of them must not cost a track. Each retry is a
    warning, unless ``quiet`` (a check whose caller reports the outcome in a line of its own).
    """
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            if not is_transient(error) or attempt == attempts:
                raise
            level = logging.DEBUG if quiet else logging.WARNING
            log.log(level, "%s failed (%s), retry %d/%d", what, error, attempt, attempts - 1)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def read_bytes(fs, path: str) -> bytes:
    """The whole object at ``path``, with retries."""
    return retry_storage(lambda: fs.cat_file(path), f"reading {path}")


def write_bytes(fs, path: str, data: bytes, quiet: bool = False) -> None:
    """Write ``data`` to ``path`` so that the object appears whole or not at all.

    Object stores publish an upload only when it completes; on a local disk the bytes go to a
    temporary name in the same folder first and are renamed into place.
    """

    def write() -> None:
        parent = posixpath.dirname(path)
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(parent, exist_ok=True)
            temporary = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}")
            try:
                fs.pipe_file(temporary, data)
                fs.mv(temporary, path)
            finally:
                if fs.exists(temporary):
                    fs.rm_file(temporary)
        else:
            fs.pipe_file(path, data)

    retry_storage(write, f"writing {path}", quiet=quiet)


def upload_file(fs, local_path: str | os.PathLike, path: str) -> None:
    """Copy a finished local file to ``path`` on ``fs`` with retries, streamed from disk (object
    stores publish the object only when the upload completes)."""
    retry_storage(lambda: fs.put_file(str(local_path), path), f"writing {path}")


def open_source(stack: contextlib.ExitStack, uri: str, storage_options: dict[str, Any] | None):
    """What the decoder reads ``uri`` from: a local path as it is; an object as a streaming
    file (opened with retries, ranges fetched as the decoder seeks), closed with ``stack``. The
    file is named ``uri``, so that decoding errors name the object."""
    fs, path = open_location(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        return path
    file = retry_storage(lambda: fs.open(path, "rb"), f"opening {uri}")
    with contextlib.suppress(AttributeError):
        file.name = uri
    return stack.enter_context(file)


def open_audio_at(stack: contextlib.ExitStack, uri: str, storage_options: dict[str, Any] | None):
    """``uri`` open for block-wise decoding (:class:`pipeline.audio.AudioReader`, closed with
    ``stack``), in memory bounded by a block whatever the file's length. Raises ``AudioError``
    naming ``uri`` for an empty, undecodable or sample-less file, and (while reading) for NaN
    samples."""
    from pipeline.audio import open_audio

    return stack.enter_context(open_audio(open_source(stack, uri, storage_options)))
