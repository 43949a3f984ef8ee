"""Subcommands of the ``metasep`` CLI, one module each (see ``pipeline.cli``)."""
