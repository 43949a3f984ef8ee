"""Quality flags of a separated track: what a listener should check, found without listening.

A flagged track is still ``ok``: its stems are written and whole. The flags come from the
track's balance (:class:`pipeline.separator.Balance`, from the engine's least-squares sums) and
from the stem files' headers, so they cost no pass over the audio. The thresholds sit where the
shipped model's separations of synthetic songs never reach (stems from -4 to -22 dB against the
mixture, residuals from -11 to -16 dB, the two most alike stems at a correlation of 0.78 to 0.90).
"""

from __future__ import annotations

import math

import soundfile as sf

from pipeline.separator import SeparatedFile

SILENT_STEM_DB = -50.0  # a stem this far below the mixture is silent...
AUDIBLE_MIXTURE_DBFS = -60.0  # ...when the mixture is louder than this
RESIDUAL_DB = -6.0  # the stems leave more than a quarter of the mixture's energy unexplained
ALIKE = 0.98  # two stems' correlation over the track: nearly copies of each other
SCALED_DB = -3.0  # the stems were turned down by more than this so as not to clip


def quality_flags(result: SeparatedFile) -> list[str]:
    """The flags of a track's stems, each ``name`` or ``name:detail``: ``silent_stem:<stem>``,
    ``high_residual``, ``alike_stems:<stem>+<stem>``, ``scaled``, ``length:<stem>``."""
    balance, flags = result.balance, []
    if balance.mixture_dbfs > AUDIBLE_MIXTURE_DBFS:
        flags += [
            f"silent_stem:{stem}"
            for stem, level in balance.stems_db.items()
            if level < SILENT_STEM_DB
        ]
    if balance.residual_db > RESIDUAL_DB:
        flags.append("high_residual")
    first, second, correlation = balance.similar
    if correlation > ALIKE:
        flags.append(f"alike_stems:{first}+{second}")
    if 20 * math.log10(min(result.gains.values(), default=1.0)) < SCALED_DB:
        flags.append("scaled")
    flags += [
        f"length:{name}"
        for name, path in result.paths.items()
        if sf.info(str(path)).frames != result.frames
    ]
    return flags
