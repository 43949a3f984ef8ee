"""Downloading one large file, resumably: the transport under :mod:`pipeline.weights.store`.

Bytes go to ``<destination>.part``, which survives a failed attempt and a later run, so that the
next attempt continues where the last one stopped: with an HTTP ``Range`` request for
``http(s)://`` URLs, with a seek for every other fsspec URL (``s3://``, ``file://``, ...). The
finished file is renamed into place, so ``destination`` is whole or absent. Transient failures
(connection resets, a cut transfer, timeouts, HTTP 5xx and 429) are retried a few times with
back-off through :func:`pipeline.storage.location.retry_storage`; the rest fail at once, among them
a host that cannot be reached at all (offline: the caller says how to import the file instead).

HTTP goes through ``urllib`` rather than fsspec's HTTP filesystem: a resumable download needs
the status (206 or 200), ``Content-Range`` and ``Content-Type`` of each response, which fsspec's
file objects hide.
"""

from __future__ import annotations

import base64
import errno
import http.client
import logging
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

from tqdm import tqdm

from pipeline.settings import redact_url
from pipeline.storage.location import open_location, retry_storage

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 30.0  # connecting, and every read: a stalled server is a transient failure
ATTEMPTS = 4  # back-off 0.5, 1 and 2 s between them
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


class DownloadError(Exception):
    """A download that failed for good; the message is one line and names the URL."""


class _NotTheFile(DownloadError):
    """The source answers with something else than the file (a web page, another length): what
    the partial file holds cannot be trusted either."""


class _StartOver(ConnectionError):
    """The partial file cannot be continued: drop it and try again from the first byte."""


@dataclass
class _Remote:
    """An open source of bytes: ``start`` is the offset its first byte has in the file (0 when
    the server ignored the range asked for), ``total`` the file's length when known."""

    stream: BinaryIO
    start: int
    total: int | None


def download(
    url: str,
    destination: Path,
    storage_options: dict[str, Any] | None = None,
    expected_size: int | None = None,
    label: str = "download",
    check_head: Callable[[bytes], str | None] | None = None,
) -> None:
    """Fetch ``url`` into ``destination`` (see the module docstring), showing a progress bar
    titled ``label``. ``check_head`` sees the first bytes of the file and returns what is wrong
    with them, if anything (a web page, say), before more is fetched. Raises
    :class:`DownloadError` when it cannot."""
    part = destination.with_name(destination.name + ".part")
    shown = redact_url(url)
    try:
        retry_storage(
            lambda: _attempt(url, part, storage_options, expected_size, label, check_head),
            f"downloading {shown}",
            attempts=ATTEMPTS,
        )
    except _NotTheFile:
        part.unlink(missing_ok=True)
        raise
    except DownloadError:
        raise  # the partial file stays for the next run to continue
    except Exception as error:
        raise DownloadError(f"{shown}: {_reason(error)}") from None
    os.replace(part, destination)


def _attempt(
    url: str,
    part: Path,
    options: dict[str, Any] | None,
    expected: int | None,
    label: str,
    check_head: Callable[[bytes], str | None] | None,
) -> None:
    """One try: continue ``part`` from its current length to the end of the file."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        with _open(url, offset, options) as remote:
            if remote.total is not None and expected is not None and remote.total != expected:
                raise _NotTheFile(
                    f"{redact_url(url)}: {remote.total} bytes where {expected} are expected"
                )
            if offset and remote.start == offset:
                log.info("resuming %s at byte %d", redact_url(url), offset)
            written = _copy(remote, part, label, url, check_head)
    except _StartOver:
        part.unlink(missing_ok=True)
        raise
    if remote.total is not None and written != remote.total:
        raise ConnectionError(f"the transfer stopped at byte {written} of {remote.total}")


def _copy(
    remote: _Remote,
    part: Path,
    label: str,
    url: str,
    check_head: Callable[[bytes], str | None] | None,
) -> int:
    """Append the remote bytes to ``part`` (rewriting it when they start at 0); returns the
    length ``part`` has afterwards."""
    chunk = _read(remote.stream)
    problem = check_head(chunk) if check_head and remote.start == 0 else None
    if problem:
        raise _NotTheFile(f"{redact_url(url)}: {problem}")
    written = remote.start
    with (
        part.open("ab" if remote.start else "wb") as out,
        tqdm(
            total=remote.total,
            initial=remote.start,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            dynamic_ncols=True,
            mininterval=0.5,
        ) as bar,
    ):
        while chunk:
            out.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
            chunk = _read(remote.stream)
    return written


def _read(stream: BinaryIO) -> bytes:
    """The next bytes there are, up to ``CHUNK``: ``read1`` where the stream has it, so that a
    connection that stalls or drops costs only what has not arrived yet."""
    try:
        return getattr(stream, "read1", stream.read)(CHUNK)
    except http.client.HTTPException as error:  # IncompleteRead: the connection was cut
        raise ConnectionError(f"connection lost ({type(error).__name__})") from None


@contextmanager
def _open(url: str, offset: int, options: dict[str, Any] | None) -> Iterator[_Remote]:
    remote = _open_http(url, offset) if _is_http(url) else _open_fsspec(url, offset, options)
    try:
        yield remote
    finally:
        remote.stream.close()


def _is_http(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


def _open_http(url: str, offset: int) -> _Remote:
    """GET ``url`` from byte ``offset``; redirects are followed (Dropbox answers with one)."""
    request = _request(url)
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416:  # the partial file is not a prefix of this one
            raise _StartOver("the server refused to resume (HTTP 416)") from None
        if error.code in (408, 429) or error.code >= 500:
            raise ConnectionError(f"HTTP {error.code} {error.reason}") from None
        raise DownloadError(f"{redact_url(url)}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        if _unreachable(error.reason):  # offline: retrying within seconds will not help
            raise DownloadError(f"{redact_url(url)}: {_reason(error)}") from None
        raise
    if response.headers.get_content_type() == "text/html":
        response.close()
        raise _NotTheFile(f"{redact_url(url)}: the server sent a web page, not a checkpoint")
    if response.status == 206:
        return _Remote(response, *_content_range(response, offset, url))
    length = response.headers.get("Content-Length")
    return _Remote(response, 0, int(length) if length and length.isdigit() else None)


def _request(url: str) -> urllib.request.Request:
    """A GET of ``url``; ``user:password@`` in it becomes HTTP basic authentication, sent to
    that host only (an unredirected header is not repeated to where a redirect points)."""
    parts = urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url, headers={"User-Agent": "metasep"})
    host = parts.netloc.rsplit("@", 1)[1]
    request = urllib.request.Request(
        urlunsplit(parts._replace(netloc=host)), headers={"User-Agent": "metasep"}
    )
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    token = base64.b64encode(pair.encode()).decode()
    request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


def _content_range(
    response: http.client.HTTPResponse, offset: int, url: str
) -> tuple[int, int | None]:
    """Where a 206 answer starts and the file's length; one that does not start where the
    partial file ends cannot be appended to it."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if not match or int(match[1]) != offset:
        response.close()
        raise _StartOver(f"{redact_url(url)}: a partial answer that does not start at {offset}")
    return offset, int(match[2]) if match[2].isdigit() else None


def _open_fsspec(url: str, offset: int, options: dict[str, Any] | None) -> _Remote:
    fs, path = open_location(url, options)
    total = int(fs.size(path))
    stream = fs.open(path, "rb")
    start = offset if offset <= total else 0
    stream.seek(start)
    return _Remote(stream, start, total)


def _unreachable(reason: object) -> bool:
    """Whether a connection failed because the host cannot be reached at all (no route, no
    name resolution, nothing listening) rather than because the transfer went wrong."""
    if isinstance(reason, ConnectionRefusedError | socket.gaierror):
        return True
    return isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)


def _reason(error: BaseException) -> str:
    """What went wrong, in a few words (urllib wraps the socket error in ``reason``)."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    reason = getattr(error, "reason", None) or error
    text = str(reason).strip().splitlines()
    return text[0] if text else type(error).__name__
