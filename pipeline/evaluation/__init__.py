"""Catalog evaluation: museval BSSEval v4 scores of one or more methods' estimates against a
reference catalog, one Ray task per track and method, with incremental reruns.

``sources`` finds the estimates of each method (a ``separate_catalog`` destination, a folder in
museval's layout, or the mixture baseline); ``plan`` pairs them with the reference tracks and
leaves out what is already scored; ``job`` scores the rest on Ray and records every result in
Parquet manifests; ``report`` writes the frames, the summary, museval's per-track JSON and the box
plots. The Prefect flow that strings these together is ``flows/evaluate.py``.
"""
