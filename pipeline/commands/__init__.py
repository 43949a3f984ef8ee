"""Subcommands of the ``metasep`` CLI, one module each (see ``pipeline.cli``).

:class:`UsageError` lives here, below both ``pipeline.cli`` and every command module, so that the
commands import it without importing the CLI that imports them.
"""


class UsageError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""
