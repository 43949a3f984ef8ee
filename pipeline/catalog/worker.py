"""A catalog's model worker: a Ray actor that holds one separator and turns tracks into stems.

Each call takes a few tracks (a batch of listing rows). It asks the run's board which of them it
may separate (see :mod:`pipeline.catalog.watchdog`), reads each source from storage block by
block, runs them through the engine's streaming file path (the same code as ``metasep separate
FILE``), puts the stems in place (renamed on a local disk, uploaded whole to an object store),
checks that they are there, and returns one result row per track. A track that fails anywhere is
that track's error row; the others go on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from model import STEMS
from pipeline.catalog.quality import quality_flags
from pipeline.catalog.watchdog import STOPPED, Heartbeat, Progress
from pipeline.runtime import keep_freed_memory
from pipeline.separator import SeparatedFile, Separator
from pipeline.settings import load_settings
from pipeline.storage.errors import readable_error, storage_problem
from pipeline.storage.location import full_url, open_location, open_source, upload_file
from pipeline.storage.paths import stem_paths

log = logging.getLogger(__name__)

# The outcome of a track in a worker's result rows
OK, ERROR, NOT_STARTED = "ok", "error", "not started"


@dataclass(frozen=True)
class Stems:
    """A track's stems, in place, and their quality flags."""

    result: SeparatedFile
    flags: list[str]


class StemsMissing(OSError):
    """A stem that was written is not where it should be, or not whole."""


class SeparateWorker:
    """A Ray actor holding one :class:`Separator`, built once, called with a few tracks."""

    def __init__(self, model: Any, config: Any, board: Any) -> None:
        import ray
        import torch

        keep_freed_memory()  # the actor's process: allocator tuning at its start
        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        device = torch.device(
            "cuda" if config.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        )
        if config.network_threads:  # else Ray's OMP_NUM_THREADS: the CPUs the worker holds
            torch.set_num_threads(config.network_threads)
        self.progress = Progress(device)
        spool = load_settings().spool_dir  # this machine's own setting, not the driver's
        self.separator = Separator.from_options(
            config.options, device, model=model, observer=self.progress, spool_dir=spool
        )
        if self.separator.model_id != config.model_id:
            raise RuntimeError(
                f"worker loaded model {self.separator.model_id}, the run planned {config.model_id}"
            )
        self.config, self.board = config, board
        self.fs, self.root = open_location(config.destination, config.storage_options)
        node = ray.get_runtime_context().get_node_id()[:8]
        self.name = f"{socket.gethostname()}/{node}/{os.getpid()}"
        if board is not None:  # the actor, for the watchdog to stop at the run's end
            board.register.remote(self.name, ray.get_runtime_context().current_actor)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["track_id"]))]
        ids = [str(row["track_id"]) for row in rows]
        handle = ray.get_runtime_context().current_actor  # what the watchdog kills if it stalls
        try:
            refused = ray.get(self.board.start.remote(self.name, handle, ids))
        except ray.exceptions.RayError as error:  # no watchdog, but no track lost for that
            log.warning("the run's board is gone (%s): separating without a watchdog", error)
            refused = {}
        todo = [row for row in rows if str(row["track_id"]) not in refused]
        interval = min(1.0, self.config.stall_timeout / 10)
        with (
            Heartbeat(self.board, self.name, self.progress, interval) as heart,
            tempfile.TemporaryDirectory(prefix="metasep-stems-") as work,
        ):
            started = time.time()
            results = iter(self._separate(todo, Path(work)))
            ended = time.time()
        with contextlib.suppress(Exception):
            self.board.finish.remote(self.name)
        busy = max(0.0, ended - started - heart.frozen_s)  # computation only
        device_s = self.progress.take()
        outcomes = [refused.get(track) or next(results) for track in ids]
        audio = [o.result.frames / o.result.rate if isinstance(o, Stems) else 0.0 for o in outcomes]
        share = [a / sum(audio) if sum(audio) else 1 / len(rows) for a in audio]
        out: dict[str, list[Any]] = {k: list(v) for k, v in batch.items()}
        for result, part in zip(outcomes, share, strict=True):
            figures = {
                **self._describe(result),
                "worker": self.name,
                "precision": self.separator.precision,
                "started_at": started,
                "finished_at": ended,
                "model_seconds": busy * part,
                "device_seconds": device_s * part if device_s is not None else -1.0,
            }
            for key, value in figures.items():
                out.setdefault(key, []).append(value)
        for stem in STEMS:
            out[f"{stem}_uri"] = [self._stem_urls(str(key))[stem] for key in batch["output_key"]]
        return _columns(out)

    def _describe(self, outcome: Stems | Exception | str) -> dict[str, Any]:
        """The result columns of one track: its outcome, its audio's shape and its quality
        flags, or its error."""
        if isinstance(outcome, Stems):
            result = outcome.result
            gain = 20 * np.log10(min(result.gains.values(), default=1.0))
            return {
                "outcome": OK,
                "error": "",
                "problem": "",
                "channels": result.channels,
                "samples": result.frames,
                "sample_rate": result.rate,
                "gain_db": float(gain),
                "residual_db": float(result.balance.residual_db),
                "flags": ",".join(outcome.flags),
                "tags": json.dumps(result.tags),
            }
        failed = isinstance(outcome, Exception)
        return {
            "outcome": ERROR if failed or outcome != STOPPED else NOT_STARTED,
            "error": readable_error(outcome) if failed else str(outcome),
            "problem": (storage_problem(outcome) or "") if failed else "",
            "channels": 0,
            "samples": 0,
            "sample_rate": 0,
            "gain_db": 0.0,
            "residual_db": math.nan,
            "flags": "",
            "tags": "{}",
        }

    def _stem_urls(self, output_key: str) -> dict[str, str]:
        paths = stem_paths(self.root, output_key, self.config.options.stem_format)
        return {stem: full_url(self.fs, path) for stem, path in paths.items()}

    def _separate(self, rows: list[dict[str, Any]], work: Path) -> list[Stems | Exception]:
        """Read each row's source from storage, separate all together, put the stems in place
        and check them; a track that fails anywhere is that track's error."""
        config, local = self.config, isinstance(self.fs, LocalFileSystem)
        results: list[Stems | Exception | None] = [None] * len(rows)
        jobs, order = [], []
        with contextlib.ExitStack() as stack:
            for index, row in enumerate(rows):
                paths = stem_paths(self.root, str(row["output_key"]), config.options.stem_format)
                folder = posixpath.dirname(paths[STEMS[0]])
                try:
                    source = open_source(stack, str(row["source_uri"]), config.storage_options)
                except Exception as failure:  # the object could not even be opened
                    results[index] = failure
                    continue
                jobs.append((source, Path(folder) if local else work / str(index)))
                order.append(index)
            separated = self.separator.separate_files(jobs, format=config.options.stem_format)
        for index, result in zip(order, separated, strict=True):
            if isinstance(result, SeparatedFile):
                try:
                    flags = quality_flags(result)  # before an upload takes the files away
                    self._put_in_place(result, str(rows[index]["output_key"]), local)
                    result = Stems(result, flags)
                except Exception as failure:
                    result = failure
            results[index] = result
        return results  # type: ignore[return-value]

    def _put_in_place(self, result: SeparatedFile, output_key: str, local: bool) -> None:
        """Upload a track's stems (object stores), then check that each is where its row will
        say, whole: the same size as what was written."""
        paths = stem_paths(self.root, output_key, self.config.options.stem_format)
        for stem, written in result.paths.items():
            size = os.path.getsize(written)
            if not local:
                upload_file(self.fs, written, paths[stem])
            found = self.fs.size(paths[stem])
            if found != size:
                raise StemsMissing(
                    f"{stem} stem not in place after writing ({found} of {size} bytes at "
                    f"{full_url(self.fs, paths[stem])})"
                )


def _columns(values: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    """Lists to numpy columns; bytes and text stay object arrays (Arrow binary and strings)."""
    columns = {}
    for key, items in values.items():
        if any(isinstance(item, bytes | str) or item is None for item in items):
            array = np.empty(len(items), dtype=object)
            array[:] = items
            columns[key] = array
        else:
            columns[key] = np.asarray(items)
    return columns
