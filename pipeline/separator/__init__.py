"""The separation engine: any audio in, four stems out, fast and in bounded memory.

What :meth:`Separator.separate` does with a (channels, samples) array at any rate:

1. resample each channel to the model's stage rates (8, 16 and 32 kHz for the paper's model) and
   normalise each stage's signal by its standard deviation, as the release does (the mean is
   removed first and the deviation floored, so silence and DC give zeros, never NaN or inf);
2. cut the track into fixed-length windows, each a *segment* with *context* on both sides (slid
   inwards at the track's ends so that every window has the same length), and run several windows
   and all channels as one batch through the frozen network (:class:`model.frozen.FrozenTasNet`);
   peak memory depends on the window and batch sizes, not on the track's length;
3. keep each window's segment of the last stage's output, resample it back to the source rate;
4. scale the four stems of each channel by least squares so that they sum to the mixture as
   closely as possible, as the release's evaluation does.

One engine for every device: between decoded PCM and finished stems everything is torch tensors
on the separator's device. The device decides two ops: the resampler (soxr on a CPU, a
windowed-sinc resampler in torch elsewhere) and the TCN blocks' kernels (hand-written on a CPU,
compiled by torch.compile on CUDA). Everything streams: a source is read block by block, twice
(statistics, then windows), and stems are produced in time order.

The modules, one job each: :mod:`~pipeline.separator.api` (the :class:`Separator`),
:mod:`~pipeline.separator.schedule` (windows through shared forward passes),
:mod:`~pipeline.separator.track` (one track's items and outputs),
:mod:`~pipeline.separator.balance` (the least squares), :mod:`~pipeline.separator.feed`
(stage signals), :mod:`~pipeline.separator.sources`, :mod:`~pipeline.separator.outputs`,
:mod:`~pipeline.separator.windows`, :mod:`~pipeline.separator.identity`,
:mod:`~pipeline.separator.options`, :mod:`~pipeline.separator.observe` and
:mod:`~pipeline.separator.threads`.
"""

from pipeline.separator.api import KERNELS, RESAMPLERS, Separator
from pipeline.separator.balance import Balance
from pipeline.separator.identity import ENGINE_VERSION, identify, model_fingerprint
from pipeline.separator.observe import ForwardTimer, Observer
from pipeline.separator.options import (
    DEFAULT_BATCH,
    DEFAULT_CONTEXT,
    DEFAULT_SEGMENT,
    GPU_TRACKS_PER_CALL,
    SeparationOptions,
    resolve_precision,
)
from pipeline.separator.outputs import FOUR_STEMS, Mixes, SeparatedFile
from pipeline.separator.schedule import WindowCallback
from pipeline.separator.windows import Window, plan_windows

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_CONTEXT",
    "DEFAULT_SEGMENT",
    "ENGINE_VERSION",
    "FOUR_STEMS",
    "GPU_TRACKS_PER_CALL",
    "KERNELS",
    "RESAMPLERS",
    "Balance",
    "ForwardTimer",
    "Mixes",
    "Observer",
    "SeparatedFile",
    "SeparationOptions",
    "Separator",
    "Window",
    "WindowCallback",
    "identify",
    "model_fingerprint",
    "plan_windows",
    "resolve_precision",
]
