"""The scheduler: every (window, channel) item of a call's tracks through shared forward passes.

One :class:`Engine` per separator holds the frozen network on its device. :meth:`Engine.run`
opens each source as a :class:`~pipeline.separator.track.Track` (its first pass, in a pool of
threads while the device works on earlier tracks), feeds their items to the network
``batch_size`` at a time (items of consecutive tracks share a batch when their windows are as
long), hands each output back to its track, and finishes each track as soon as its last window is
out. Everything the call starts, threads and readers, is stopped before it returns.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import torch
from tqdm import tqdm

from model import STEMS, TasNetConfig
from model.frozen import FrozenTasNet
from pipeline.separator.feed import MixtureBuffer, StageFeed, Statistics, make_resampler, measure
from pipeline.separator.observe import Observer
from pipeline.separator.options import DEFAULT_BATCH, MAX_AUTO_BATCH
from pipeline.separator.outputs import ArraySink, Sink
from pipeline.separator.sources import ArraySource, Source, device_blocks
from pipeline.separator.threads import ReadAhead, thread_pool
from pipeline.separator.track import Item, Track
from pipeline.separator.windows import Window, plan_windows, round_up

# Source frames per read: 3 s at 44.1 kHz for soxr (a CPU), 12 s for the torch resampler (the
# device path), where each block costs every stage's resampler a dozen ops, each a kernel launch
# on a GPU: with 3 s blocks they were most of the engine's ops outside the network. On a CPU the
# larger blocks were no faster (docs/performance.md).
READ_BLOCK = {"soxr": 1 << 17, "torch": 1 << 19}
_RESAMPLE_THREADS = 2  # parallel soxr streams (channel groups) per resampler
# (done, total) (window, channel) items, told before the first forward pass and after each one
WindowCallback = Callable[[int, int], None]


class Engine:
    """The network on its device and the scheduling of windows through it. Calls from several
    threads share it: their forward passes take turns (each call's host work, decoding, first
    passes and encoding, goes on meanwhile)."""

    def __init__(
        self,
        network: FrozenTasNet,
        config: TasNetConfig,
        device: torch.device,
        windows: tuple[int, int, int],
        precision: str,
        batch_size: int | None,
        resampler: str,
        observer: Observer,
    ) -> None:
        self.network, self.config, self.precision = network, config, precision
        self.segment, self.context, self.align = windows
        self.device = device
        self.batch_size, self.resampler, self.observer = batch_size, resampler, observer
        self.stage_rates = config.stage_rates()
        self._network_lock = threading.Lock()

    def windows(self, length: int) -> list[Window]:
        """The window plan for a base-rate length."""
        return plan_windows(length, self.segment, self.context, self.align)

    def run(
        self,
        sources: Sequence[Source | Exception],
        progress: bool,
        callback: WindowCallback | None,
        strict: bool,
        sinks: Sequence[Sink | None] | None = None,
        then: Callable[[int, Any], Any] | None = None,
    ) -> list:
        """Separate ``sources`` through shared forward passes; each result is its sink's output
        (stems for arrays) or, unless ``strict``, the exception that stopped that source. A
        track is finished as soon as its last window is out, and ``then(index, output)`` (when
        given) is called with its sink's output right away: its result takes the output's place.
        """
        tracks: list[Track | Exception | None] = [None] * len(sources)
        results: list = [None] * len(sources)
        opened: list[Track] = []  # every track made, closed when the call ends

        def start(index: int, resample_pool: Executor | None) -> Track | Exception:
            source = sources[index]
            if isinstance(source, Exception):
                return source
            sink = sinks[index] if sinks is not None else ArraySink(source.audio.shape, self.device)
            try:
                track = self._open_track(source, sink, resample_pool)
            except Exception as error:
                if strict:
                    raise
                return error
            opened.append(track)
            return track

        def finish(index: int, track: Track) -> None:
            try:
                output = track.finish()
                results[index] = then(index, output) if then is not None else output
            except Exception as error:
                if strict:
                    raise
                results[index] = error

        def started(pool: Executor, resample_pool: Executor | None) -> Iterator[Track]:
            """The tracks in order, each as soon as its first pass is done; the later tracks'
            first passes go on in the pool while the device works on the earlier ones."""
            futures = [pool.submit(start, index, resample_pool) for index in range(len(sources))]
            for index, future in enumerate(futures):
                track = tracks[index] = future.result()
                if isinstance(track, Exception):
                    results[index] = track
                    continue
                track.on_done = functools.partial(finish, index, track)
                yield track

        # First passes (decoding and the statistics) run in threads: decoding and the resamplers
        # release the GIL. On a GPU several at once; a CPU's cores are the network's, so there
        # one thread reads ahead of it. A serial observer (a phase clock) has all done here.
        threads = min(len(sources), os.cpu_count() or 1) if self.device.type != "cpu" else 1
        serial = self.observer.serial
        with contextlib.ExitStack() as stack:
            resample_pool = None
            if self.resampler == "soxr" and not serial:
                resample_pool = stack.enter_context(
                    ThreadPoolExecutor(_RESAMPLE_THREADS, "metasep-resample")
                )
            stack.callback(_close_all, opened)  # after the first passes have stopped
            pool = stack.enter_context(thread_pool(threads, serial, "first-pass"))
            self._schedule(started(pool, resample_pool), progress, callback, strict, len(sources))
        for index, track in enumerate(tracks):
            if isinstance(track, Track) and results[index] is None:
                results[index] = track.error or RuntimeError(
                    f"internal error: {track.source.name} was not finished"
                )
        return results

    def _open_track(self, source: Source, sink: Sink, resample_pool: Executor | None) -> Track:
        """A source's track: its first pass done, holding the reader of its second pass."""
        resources = contextlib.ExitStack()
        try:
            statistics, feed, mixture = self.open_feed(source, resources, resample_pool)
            stems = source.channels * len(STEMS)
            back = self._resampler(self.config.top_rate, source.rate, stems, resample_pool)
            plan = self.windows(feed.length)
            return Track(
                source,
                sink,
                statistics,
                plan,
                feed,
                mixture,
                back,
                self.precision,
                self.observer,
                resources,
            )
        except BaseException:
            resources.close()
            raise

    def open_feed(
        self,
        source: Source,
        resources: contextlib.ExitStack,
        resample_pool: Executor | None = None,
    ) -> tuple[Statistics, StageFeed, MixtureBuffer]:
        """A source's first pass (with a reader of its own, closed here), then the feed of its
        stage signals, whose reader ``resources`` will close, and the buffer of its mixture."""
        with contextlib.ExitStack() as first:
            statistics = measure(
                source.name,
                source.channels,
                self.device,
                self._blocks(source, first),
                self._stage_resamplers(source, resample_pool),
                self.observer,
            )
        base = self.config.sampling_rate
        length = round_up(math.ceil(statistics.frames * base / source.rate), self.align)
        mixture = MixtureBuffer()
        feed = StageFeed(
            functools.partial(self._blocks, source, resources),
            self._stage_resamplers(source, resample_pool),
            statistics,
            length,
            mixture,
        )
        return statistics, feed, mixture

    def _blocks(self, source: Source, stack: contextlib.ExitStack) -> Iterator[torch.Tensor]:
        """The source's blocks as float32 tensors on the device, read ahead in a thread that
        ``stack`` stops. An array goes up to a GPU once, whole, and both passes read it there."""
        size = READ_BLOCK[self.resampler]
        if isinstance(source, ArraySource) and self.device.type == "cuda":
            return iter(source.on(self.device).split(size, dim=1))
        blocks = source.blocks(size)
        if not self.observer.serial:  # a serial observer times decoding where it happens
            blocks = stack.enter_context(ReadAhead(blocks))
        return device_blocks(blocks, self.device, self.observer)

    def _stage_resamplers(self, source: Source, pool: Executor | None) -> list:
        return [
            self._resampler(source.rate, rate, source.channels, pool) for rate in self.stage_rates
        ]

    def _resampler(self, from_rate: int, to_rate: int, channels: int, pool: Executor | None):
        return make_resampler(self.resampler, from_rate, to_rate, channels, self.device, pool)

    def _schedule(
        self,
        tracks: Iterable[Track],
        progress: bool,
        callback: WindowCallback | None,
        strict: bool,
        count: int,
    ) -> None:
        """Run every (window, channel) item of ``tracks`` (``count`` of them, taken as they
        come) through the network, ``batch_size`` at a time; items of consecutive tracks share a
        batch when their windows are as long. ``callback`` is told the items of the tracks
        started so far (a single track's total is known before the first forward)."""
        total = done = 0
        batch: list[Item] = []
        name = f"{count} tracks" if count > 1 else None
        with tqdm(total=0, disable=not progress, unit="window", leave=False, desc=name) as bar:

            def flush() -> None:
                nonlocal done
                self._forward(batch, strict)
                bar.update(len(batch))
                done += len(batch)
                batch.clear()
                if callback is not None:
                    callback(done, total)

            for track in tracks:
                total += track.item_count
                bar.total = total
                if count == 1:
                    bar.set_description_str(track.source.name)
                if callback is not None and done == 0:
                    callback(done, total)
                for item in track.items(strict):
                    full = len(batch) == (self.batch_size or MAX_AUTO_BATCH)
                    if batch and (full or item.size != batch[0].size):
                        flush()
                    batch.append(item)
            if batch:
                flush()

    def _forward(self, batch: list[Item], strict: bool) -> None:
        """One forward pass over ``batch``; each item's output goes back to its track."""
        live = [item for item in batch if item.track.error is None]
        if not live:
            return
        try:
            with self._network_lock, self.observer.phase("network"):
                if self.batch_size is None:
                    self.batch_size = self._auto_batch(live[0])
                inputs = [
                    torch.stack([item.inputs[stage] for item in live]).unsqueeze(1)
                    for stage in range(len(self.stage_rates))
                ]
                stems = self.network.separate_last(inputs)[:, :, 0]
        except Exception as error:
            if strict:
                raise
            for track in {id(item.track): item.track for item in live}.values():
                track.error = error
            return
        for item, output in zip(live, stems, strict=True):
            item.track.deliver(item, output)

    def _auto_batch(self, item: Item) -> int:
        """Windows per forward that fit in half the device's free memory, from one window's
        measured peak (CUDA); 2 elsewhere."""
        if self.device.type != "cuda":
            return DEFAULT_BATCH
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        # Two copies of the window: a batch of one would make the compiled kernels specialise on
        # that size and compile again for the real batches.
        inputs = [torch.stack([x, x]).unsqueeze(1) for x in item.inputs]
        self.network.separate_last(inputs)
        per_window = max(1, (torch.cuda.max_memory_allocated(self.device) - before) // 2)
        # Memory grows with the window's length: a short first track (a single short window)
        # must not size the batches of the full windows that follow.
        per_window *= max(1.0, (self.segment + 2 * self.context) / item.size)
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, min(MAX_AUTO_BATCH, int(0.5 * free // per_window)))


def _close_all(tracks: list[Track]) -> None:
    """Close every track (each releases its reader), even when one fails to."""
    with contextlib.ExitStack() as stack:
        for track in tracks:
            stack.callback(track.close)
