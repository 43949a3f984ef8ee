"""One track in the engine: the window items it feeds, and what becomes of their outputs.

A :class:`Track` is built by the scheduler once its first pass is done. :meth:`Track.items`
reads the source again as the windows need it; :meth:`Track.deliver` takes each item's network
output; when all channels of the next window in time order are in, the window's segment is
resampled back to the source rate, added to the least-squares sums and stored in the sink;
:meth:`Track.finish` flushes the resampler and returns what the sink makes of the scaled stems.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import numpy as np
import torch

from model import STEMS
from pipeline.separator.balance import Solution, balance, least_squares
from pipeline.separator.feed import MixtureBuffer, Resample, StageFeed, Statistics
from pipeline.separator.observe import Observer
from pipeline.separator.outputs import Sink
from pipeline.separator.sources import Source
from pipeline.separator.threads import Download, Once
from pipeline.separator.windows import Window


class Item:
    """One (window, channel) of a track: its per-stage network inputs, views of the feed."""

    __slots__ = ("channel", "inputs", "track", "window")

    def __init__(self, track: Track, window: int, channel: int, inputs: list[torch.Tensor]):
        self.track, self.window, self.channel, self.inputs = track, window, channel, inputs

    @property
    def size(self) -> int:
        return self.inputs[0].shape[-1]


class Track:
    """A source being separated: its plan, feed and sink, and the resources it holds (the feed's
    reader: :meth:`close` releases them, and the scheduler calls it whatever happens)."""

    def __init__(
        self,
        source: Source,
        sink: Sink,
        statistics: Statistics,
        plan: list[Window],
        feed: StageFeed,
        mixture: MixtureBuffer,
        back: Resample,
        precision: str,
        observer: Observer,
        resources: contextlib.ExitStack,
    ) -> None:
        self.source, self.sink, self.statistics, self.plan = source, sink, statistics, plan
        self.channels = source.channels
        self.item_count = len(plan) * self.channels
        self.error: Exception | None = None
        self.on_done: Callable[[], None] | None = None  # called once the last window is out
        self._feed, self._mixture, self._back = feed, mixture, back
        self._precision, self._observer, self._resources = precision, observer, resources
        self._stages = len(statistics.mean)
        self._top = 2 ** (self._stages - 1)
        self._pending: dict[int, list[torch.Tensor | None]] = {}
        self._ready = 0  # the next window in time order
        shape = (self.channels, len(STEMS))
        device = statistics.mean.device
        self._gram = torch.zeros(*shape, len(STEMS), dtype=torch.float64, device=device)
        self._target = torch.zeros(*shape, dtype=torch.float64, device=device)
        self._power = torch.zeros(self.channels, dtype=torch.float64, device=device)  # of the mix
        self._written = 0

    def items(self, strict: bool = True) -> Iterator[Item]:
        """The track's items in time order; reading fails the track (or raises if ``strict``)."""
        stages = range(self._stages)
        try:
            for index, window in enumerate(self.plan):
                with self._observer.phase("resample_in"):
                    self._feed.ensure(window.end)
                    self._feed.release(window.begin)
                for channel in range(self.channels):
                    inputs = [
                        self._feed.window(channel, window.begin, window.end, stage)
                        for stage in stages
                    ]
                    yield Item(self, index, channel, inputs)
        except Exception as error:
            if strict:
                raise
            self.error = error

    @property
    def windows_done(self) -> int:
        """Windows whose every channel is out of the network (the track's progress)."""
        return self._ready

    def deliver(self, item: Item, stems: torch.Tensor) -> None:
        """Take one item's last-stage output (4, n)."""
        window = self.plan[item.window]
        keep = slice(
            self._top * (window.start - window.begin), self._top * (window.stop - window.begin)
        )
        self._pending.setdefault(item.window, [None] * self.channels)[item.channel] = stems[:, keep]
        while self._ready in self._pending and all(
            part is not None for part in self._pending[self._ready]
        ):
            self._window_done(torch.stack(self._pending.pop(self._ready)))
            self._ready += 1
        if self._ready == len(self.plan) and self.on_done is not None:
            done, self.on_done = self.on_done, None
            done()

    def finish(self) -> object:
        """Flush, and hand the sink a solver of the least squares: the sums come down
        asynchronously, so that the engine's thread does not wait for the device here; the sink
        solves when it needs the coefficients (a file sink: in its encoding threads)."""
        frames = self.statistics.frames
        with self._observer.phase("resample_out"):
            empty = self._gram.new_zeros(self.channels * len(STEMS), 0, dtype=torch.float32)
            self._emit(self._back(empty, True))
            if self._written < frames:  # the resampler came up a few samples short
                self._emit(empty.new_zeros(empty.shape[0], frames - self._written))
            # (channels, 4, 6): the Gram matrix, the target, and the mixture's power
            power = self._power[:, None, None].expand(-1, len(STEMS), 1)
            sums = Download(torch.cat([self._gram, self._target.unsqueeze(-1), power], dim=-1))
        return self.sink.finish(Once(functools.partial(self._solve, sums)))

    def close(self) -> None:
        """Release what the track holds (its feed's reader); safe to call more than once."""
        self._resources.close()

    def _solve(self, sums: Download) -> Solution:
        """The least-squares coefficients (channels, 4) from the downloaded sums, and the
        track's balance (what the sums say of the scaled stems against the mixture)."""
        downloaded = sums.numpy()
        gram, target = downloaded[..., : len(STEMS)], downloaded[..., len(STEMS)]
        power = downloaded[:, 0, len(STEMS) + 1]
        if not np.isfinite(downloaded).all():
            raise FloatingPointError(
                f"{self.source.name}: the network produced non-finite values at "
                f"{self._precision} precision"
                + ("; use float32" if self._precision != "float32" else "")
            )
        coefficients = least_squares(gram, target)
        # A channel without any signal beyond a constant (silence, DC) has nothing to separate:
        # fitting the network's output to the offset would invent stems.
        coefficients[self.statistics.silent] = 0
        samples = self.statistics.frames * self.channels
        return Solution(coefficients, balance(gram, target, power, coefficients, samples))

    def _window_done(self, top: torch.Tensor) -> None:
        """A window's segment of all channels (channels, 4, n) at the last stage's rate."""
        self._observer.window(self.source.name, top)
        with self._observer.phase("resample_out"):
            self._emit(self._back(top.reshape(self.channels * len(STEMS), -1), False))

    def _emit(self, block: torch.Tensor) -> None:
        """Source-rate stems (channels * 4, n): least-squares sums, then the sink."""
        block = block[:, : self.statistics.frames - self._written]
        block = block.reshape(self.channels, len(STEMS), -1)
        count = block.shape[-1]
        if not count:
            return
        mix = self._mixture.take(self._written, self._written + count).double()
        stems = block.double()
        self._gram += stems @ stems.transpose(1, 2)
        self._target += (stems @ mix.unsqueeze(-1))[..., 0]
        self._power += (mix * mix).sum(-1)
        self.sink.store(self._written, block)
        self._written += count
