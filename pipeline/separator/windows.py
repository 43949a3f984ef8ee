"""The window plan: how a track is cut into fixed-length windows of segment and context."""

from __future__ import annotations

import math
from typing import NamedTuple

from model import MultiTasNet
from model.frozen import frames_multiple


class Window(NamedTuple):
    """Base-rate sample spans: the output segment [start, stop) is computed from [begin, end)."""

    start: int
    stop: int
    begin: int
    end: int


def plan_windows(length: int, segment: int, context: int, align: int = 1) -> list[Window]:
    """Windows covering [0, length) in near-equal segments of at most ``segment`` samples.

    Every window spans ``segment + 2 * context`` samples around its segment, shifted inwards at
    the ends so that all windows have the same length; a track no longer than one window is a
    single window (a single pass). ``length``, ``segment`` and ``context`` are multiples of
    ``align``, and so are all window bounds.
    """
    size = segment + 2 * context
    if length <= size:
        return [Window(0, length, 0, length)]
    count = math.ceil(length / segment)
    step = round_up(math.ceil(length / count), align)
    plan = []
    for start in range(0, length, step):
        stop = min(start + step, length)
        begin = min(max(0, start - context), length - size)
        plan.append(Window(start, stop, begin, begin + size))
    return plan


def window_frames(model: MultiTasNet, segment: float, context: float) -> tuple[int, int]:
    """Segment and context (seconds) in base-rate samples, rounded to the network's frame
    alignment; a segment is at least one aligned frame."""
    if segment <= 0 or context < 0:
        raise ValueError("segment must be > 0 and context >= 0")
    align, base = frames_multiple(model), model.config.sampling_rate
    return max(align, round_to(segment * base, align)), round_to(context * base, align)


def round_to(value: float, multiple: int) -> int:
    return round(value / multiple) * multiple


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
