"""Stem names and gains as people type them: one rule for ``metasep separate`` (``--stems``,
``--remix``), ``metasep evaluate`` (``--targets``), the serve page and its remix API.

A gain is a plain factor between 0 and :data:`MAX_GAIN` (+12 dB), the page's rule, now the CLI's
too (it took any finite number). Zero mutes a stem; a negative factor flips the stem's polarity,
which no remix means (it is a typo for a small gain); beyond +12 dB the stem of a well-levelled
mix clips in FLAC (24-bit, the default format of both), so larger factors only make distortion.
The page's sliders stop at 2 (+6 dB).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from model import STEMS

MAX_GAIN = 4.0


def parse_stems(text: str) -> tuple[str, ...]:
    """``"vocals, drums"`` -> ``("vocals", "drums")``; raises ``ValueError`` naming the stems
    that are not among :data:`model.STEMS`, or when none is given."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in STEMS]
    if unknown or not names:
        raise ValueError(
            f"unknown stem(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(STEMS)}"
        )
    return names


def parse_gain(stem: str, text: str) -> float:
    """One stem's gain from its text; raises ``ValueError`` naming the bad value: not a number,
    not finite, negative or above :data:`MAX_GAIN`."""
    try:
        gain = float(text)
    except ValueError:
        raise ValueError(f"{stem}={text!r} is not a number") from None
    if not math.isfinite(gain) or not 0.0 <= gain <= MAX_GAIN:
        raise ValueError(f"{stem}={text!r}: a gain must be between 0 and {MAX_GAIN:g}")
    return gain


def parse_gains(values: Mapping[str, str]) -> dict[str, float]:
    """All four stems' gains from name -> text (query parameters, say); a missing stem keeps
    gain 1, other keys are ignored."""
    return {stem: parse_gain(stem, values[stem]) if stem in values else 1.0 for stem in STEMS}


def parse_remix(text: str) -> dict[str, float]:
    """``"vocals=1.2,drums=0.3"`` -> the gains of the named stems; raises ``ValueError``."""
    gains = {}
    for item in text.split(","):
        stem, sep, value = item.partition("=")
        stem = stem.strip()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r} in {text!r}; choose from {', '.join(STEMS)}")
        if not sep:
            raise ValueError(f"{item!r} is not STEM=GAIN")
        gains[stem] = parse_gain(stem, value.strip())
    return gains
