"""Errors as a person reads them: input a job cannot use, and a failure as one line.

:class:`CatalogError` is what the catalog listing, the reference catalogs, the estimate sources
and the flows raise for input they cannot use; the commands print it as a usage error.
:func:`readable_error` turns the exception of a failed track (or pair, in an evaluation) into
the line its manifest row records.
"""

from __future__ import annotations

import errno

# Error names of storage clients (botocore, aiohttp) that say the store cannot be reached, and
# those that say it refused the credentials: checked by name, so that no client is imported here.
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
}
_CREDENTIALS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AccessDenied",
}


class CatalogError(ValueError):
    """Input a job cannot use (a SOURCE that cannot be listed, say): the message names it and
    says why."""


def readable_error(error: BaseException) -> str:
    """An error as one line a person can act on."""
    from pipeline.audio import AudioError

    if isinstance(error, FileNotFoundError):
        return f"file not found ({error})"
    if isinstance(error, PermissionError):
        return f"permission denied ({error})"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, AudioError) else f"{type(error).__name__}: {text}"


def storage_problem(error: BaseException) -> str | None:
    """What an expected storage failure is, in a few words (``"disk full"``, ``"read-only"``,
    ``"credentials refused"``, ``"permission denied"``, ``"unreachable"``), or None for any
    other error: an operator acts on these without a traceback. The causes of ``error`` (an
    S3 client's error under the ``OSError`` s3fs raises) are looked at too."""
    chain, cause = [], error
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    names = {cls.__name__ for item in chain for cls in type(item).__mro__}
    codes = {_error_code(item) for item in chain}
    if any(isinstance(item, OSError) and item.errno == errno.ENOSPC for item in chain):
        return "disk full"
    if any(isinstance(item, OSError) and item.errno == errno.EROFS for item in chain):
        return "read-only"
    if (names | codes) & _CREDENTIALS:
        return "credentials refused"
    if any(isinstance(item, PermissionError) for item in chain):
        return "permission denied"
    if names & _UNREACHABLE or any(isinstance(item, ConnectionError) for item in chain):
        return "unreachable"
    return None


def _error_code(error: BaseException) -> str:
    """The error code of an S3 client's error (``"InvalidAccessKeyId"``), or ''."""
    response = getattr(error, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
