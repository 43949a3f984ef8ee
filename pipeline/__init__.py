"""metasep's pipeline: audio I/O, the separation engine, catalog jobs and the CLI."""
