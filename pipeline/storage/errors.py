"""Errors as a person reads them: input a job cannot use, and a failure as one line.

:class:`CatalogError` is what the catalog listing, the reference catalogs, the estimate sources
and the flows raise for input they cannot use; the commands print it as a usage error.
:func:`readable_error` turns the exception of a failed track (or pair, in an evaluation) into
the line its manifest row records.
"""

from __future__ import annotations


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
