"""What a separation is asked to do: one frozen, validated value from the command line to the worker.

:class:`SeparationOptions` is built once (from the settings, which hold the command line's flags
over the ``METASEP_*`` environment, or by a program), checked when it is built, and then carried
whole: through a catalog flow's parameters and the job's config into every worker's
:class:`~pipeline.separator.Separator`. ``precision="auto"`` stays ``"auto"`` in it; each
separator makes it concrete for its own device (:func:`resolve_precision`), and the options hash
keeps what was asked for while a catalog's manifest row records what ran.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.audio import FORMATS

# Window defaults, from `metasep bench` (docs/performance.md): the mask network's GroupNorms take
# their statistics over the whole window, so agreement with the single pass grows with the
# window's length (paper model, 60 s: 38 dB with 30 s segments, bf16 included); 2 s of context
# cover the TCN's receptive field (~0.95 s each side) and cost 13% extra work.
DEFAULT_SEGMENT = 30.0  # seconds of output per window
DEFAULT_CONTEXT = 2.0  # seconds of context on each side of a segment
DEFAULT_BATCH = 2  # windows (window x channel) per forward on a CPU: a stereo window
MAX_AUTO_BATCH = 32  # the most windows per forward when the batch is picked from device memory
GPU_TRACKS_PER_CALL = 8  # tracks a GPU separates together: their windows fill its forward passes
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Precision = Annotated[
    Literal["auto", "float32", "bfloat16", "float16"],
    Field(
        description="auto (bfloat16 on a GPU, or a CPU with AMX or AVX-512 BF16; else float32), "
        "float32, bfloat16 or float16"
    ),
]
StemFormat = Annotated[
    Literal[tuple(FORMATS)],
    Field(description="stem files: flac (24-bit), wav (32-bit float) or mp3 (320 kbps)"),
]
Checkpoint = Annotated[
    str,
    Field(
        min_length=1,
        description="weights: a name of `metasep weights list` (default: shipped; release: the "
        "paper's, downloaded once) or a checkpoint file",
    ),
]
Segment = Annotated[
    float,
    Field(
        gt=0,
        allow_inf_nan=False,
        description=f"seconds of output per window (default {DEFAULT_SEGMENT:g})",
    ),
]
Context = Annotated[
    float,
    Field(
        ge=0,
        allow_inf_nan=False,
        description=f"seconds of context on each side of a window (default {DEFAULT_CONTEXT:g})",
    ),
]
BatchSize = Annotated[
    int | None,
    Field(
        ge=1,
        description=f"windows of one channel per forward pass (default: {DEFAULT_BATCH} on a "
        "CPU; on a GPU as many as half its free memory holds)",
    ),
]
TracksPerCall = Annotated[
    int | None,
    Field(
        ge=1,
        description="tracks separated together, their windows sharing forward passes (default: "
        f"{GPU_TRACKS_PER_CALL} on a GPU, 1 on a CPU)",
    ),
]


class SeparationFields(BaseModel):
    """The fields of the separation options, with their types, bounds and defaults: those of
    :class:`SeparationOptions`, and the same settings in :class:`pipeline.settings.Settings`."""

    checkpoint: Checkpoint = "default"
    precision: Precision = "auto"
    segment: Segment = DEFAULT_SEGMENT
    context: Context = DEFAULT_CONTEXT
    batch_size: BatchSize = None
    tracks_per_call: TracksPerCall = None
    stem_format: StemFormat = "flac"


class SeparationOptions(SeparationFields):
    """How to separate: the weights, the precision, the windows, the batching, the stem format.

    Frozen and checked on construction (a bad value raises pydantic's ``ValidationError``,
    which :func:`pipeline.settings.describe_errors` turns into one line per field). The device is
    not an option: it is where a separator runs, and ``precision="auto"`` is resolved there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def tracks_on(self, device: str | torch.device) -> int:
        """Tracks to separate together on ``device``: as given, else several on a GPU, whose
        forward passes their windows fill and whose idle time their decoding and encoding would
        otherwise be; one on a CPU, where a stereo window fills a forward pass and the cores are
        the network's."""
        if self.tracks_per_call:
            return self.tracks_per_call
        return GPU_TRACKS_PER_CALL if torch.device(device).type != "cpu" else 1


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX tiles or AVX-512 BF16):
    there the network runs 1.8-2.8x faster in bfloat16 than in float32 (docs/performance.md)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``"auto"`` made concrete for a device: bfloat16 on a GPU that has it and on a CPU with
    bfloat16 matrix hardware, float32 elsewhere. Other names are returned as they are."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu" and cpu_has_fast_bfloat16():
        return "bfloat16"
    return "float32"


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype a concrete precision computes in, refused where the device cannot run it well."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    dtype = PRECISIONS[precision]
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bfloat16; use float16 or float32")
    if device.type == "cpu" and dtype is not torch.float32:
        check = getattr(
            torch.ops.mkldnn,
            f"_is_mkldnn_{'bf16' if dtype is torch.bfloat16 else 'fp16'}_supported",
            None,
        )
        if check is not None and not check():
            raise ValueError(f"this CPU has no fast {precision} matrix products; use float32")
    return dtype
