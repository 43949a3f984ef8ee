"""Measurements of the engine and the jobs: speed, memory, agreement and ops, on test signals.

``metasep bench`` runs :mod:`pipeline.bench.engine`; ``python -m pipeline.bench.catalog_memory``
and ``python -m pipeline.bench.scoring_memory`` measure memory against track length. Product code
imports nothing from here: the bench watches the engine through the observer a separator is
built with (:class:`pipeline.separator.Observer`).
"""
