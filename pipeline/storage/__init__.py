"""Data in storage that every job reads and writes: locations and retries, manifests, run
records, reference catalogs, output paths, readable errors.

Catalog separation, evaluation, training, the weights store and the serve app all build on these
modules; none of them imports a job (``pipeline.catalog``, ``pipeline.evaluation``, ...), the
commands or the flows. Import each name from its module: this package re-exports nothing.
"""
