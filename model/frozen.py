"""An inference-only, frozen form of :class:`~model.network.MultiTasNet`.

At inference every generated kernel, bias and GroupNorm affine is a constant, so they are computed
once here instead of at every forward. The computation is also rearranged for speed without
changing what is computed (outputs equal ``MultiTasNet.separate`` up to float rounding):

- the per-instrument 1x1 convolutions are batched matrix products instead of grouped
  convolutions (which oneDNN runs far below the matrix-product rate);
- a GroupNorm followed by a 1x1 convolution is folded into that convolution's weights (its
  statistics are taken in one read, the normalised tensor is never written);
- the mask network's first GroupNorm and convolution read the mixture latents once instead of
  four expanded copies;
- the decoder's three transposed convolutions are one matrix product and one overlap-add.

On CUDA the TCN blocks can instead run through :func:`fused_block_step`, the same block written
as a pure function and compiled by torch.compile (``FrozenTasNet(..., fused=True)``): inductor
fuses the PReLUs, GroupNorm statistics, depthwise taps and casts between the matrix products into
a few Triton kernels. On a CPU the hand-written blocks above are faster and stay the default.

The frozen network holds its own copies of the weights (buffers, not parameters) and is rebuilt
from a model with :meth:`FrozenTasNet.from_model`; it has no ``state_dict`` of its own to save.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import INSTRUMENTS
from model.network import MultiTasNet, TasNetStage

# Pieces in which `_moments` reads activations: at most this many elements (a 2 MB float32 buffer,
# within the L2 caches of two cores) and at most this many time steps per row.
_MOMENT_PIECE = 2**19
_MOMENT_WIDTH = 2**13


class FrozenTasNet(nn.Module):
    """Constant-weight Meta-TasNet for inference; same inputs and outputs as ``separate``."""

    def __init__(
        self, model: MultiTasNet, dtype: torch.dtype = torch.float32, fused: bool = False
    ) -> None:
        super().__init__()
        self.config, self.dtype = model.config, dtype
        with torch.no_grad():
            self.stages = nn.ModuleList(_FrozenStage(stage, dtype) for stage in model.stages)
        self.fuse(fused)

    def fuse(self, fused: bool) -> None:
        """Run the TCN blocks through the compiled :func:`fused_block_step` (or not)."""
        self.fused = fused
        for stage in self.stages:
            stage.mask.fused = fused

    @torch.inference_mode()
    def separate(self, mixes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-stage stems (B, 4, 1, T_i) of per-stage mono mixes (B, 1, T_i), single pass."""
        return self._run(mixes, decode_all=True)

    @torch.inference_mode()
    def separate_last(self, mixes: list[torch.Tensor]) -> torch.Tensor:
        """The last stage's stems (B, 4, 1, T_last) only: earlier stages skip their decoders."""
        return self._run(mixes, decode_all=False)[-1]

    def forward(self, mixes: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.separate(mixes)

    def _run(self, mixes: list[torch.Tensor], decode_all: bool) -> list[torch.Tensor]:
        try:
            return self._stages(mixes, decode_all)
        except RuntimeError as error:
            if not (self.fused and _is_compile_error(error)):
                raise
            # A machine where the compiler cannot run (no C compiler, a Triton that does not
            # support the GPU) still separates: with the unfused kernels, which give the same
            # stems up to rounding.
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            warnings.warn(
                f"compiling the fused TCN blocks failed, running unfused: {first_line}",
                stacklevel=3,
            )
            self.fuse(False)
            return self._stages(mixes, decode_all)

    def _stages(self, mixes: list[torch.Tensor], decode_all: bool) -> list[torch.Tensor]:
        if len(mixes) != len(self.stages):
            raise ValueError(f"expected {len(self.stages)} mixes, one per stage")
        outputs, previous = [], None
        for index, (stage, mix) in enumerate(zip(self.stages, mixes, strict=True)):
            decode = decode_all or index == len(self.stages) - 1
            stems, previous = stage(mix.float(), previous, decode)
            if stems is not None:
                outputs.append(stems)
        return outputs


class _FrozenStage(nn.Module):
    def __init__(self, stage: TasNetStage, dtype: torch.dtype) -> None:
        super().__init__()
        instrument = stage.instruments()
        self.encoder = _FrozenEncoder(stage.encoder, dtype)
        self.mask = _FrozenMask(stage.mask, instrument, stage.N, dtype)
        self.decoder = _FrozenDecoder(stage.decoder, dtype)

    def forward(
        self, mix: torch.Tensor, previous: torch.Tensor | None, decode: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Stems (B, 4, 1, T) or None when ``decode`` is off, and the masked latents."""
        latent = self.encoder(mix)
        masked = self.mask(latent, previous)
        if not decode:
            return None, masked
        batch = mix.shape[0]
        stems = self.decoder(masked.view(batch * INSTRUMENTS, *masked.shape[2:]))
        return stems.view(batch, INSTRUMENTS, 1, -1), masked


class _FrozenEncoder(nn.Module):
    """The encoder with the filter outputs concatenated filter-major (the bottleneck's input
    columns are permuted to match), saving the release's interleaving copy."""

    def __init__(self, encoder: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.spectrogram = encoder.spectrogram  # stays float32: it takes logarithms
        self.strides = [f.stride[0] for f in encoder.filters]
        self.paddings = [f.padding[0] for f in encoder.filters]
        for level, f in enumerate(encoder.filters):
            self.register_buffer(f"filter_{level}", _constant(f.weight, dtype), persistent=False)
        count, width = len(encoder.filters), encoder.filters[0].out_channels
        first = encoder.bottleneck[0].weight.detach()[:, :, 0]
        # Column c*F + f (interleaved) becomes f*width + c (concatenated).
        order = torch.arange(count * width).view(width, count).t().reshape(-1)
        first = torch.cat([first[:, order], first[:, count * width :]], dim=1)
        self.register_buffer("first", _constant(first, dtype), persistent=False)
        second = encoder.bottleneck[2].weight[:, :, 0]
        self.register_buffer("second", _constant(second, dtype), persistent=False)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        """Latent frames of a float32 (B, 1, T) signal. The mel branch reads the signal in
        float32 whatever the network's dtype: it takes logarithms of the power spectrum, where
        rounding the signal to bfloat16 (-48 dB) would raise the floor of every quiet bin."""
        low = signal.to(self.first.dtype)
        parts = [
            F.relu_(F.conv1d(low, getattr(self, f"filter_{level}"), stride=stride, padding=pad))
            for level, (stride, pad) in enumerate(zip(self.strides, self.paddings, strict=True))
        ]
        frames = parts[0].shape[-1]
        mel = self.spectrogram(signal, frames)
        features = torch.cat([*parts, mel.to(parts[0].dtype)], dim=1)
        hidden = F.relu_(_shared_matmul(self.first, features))
        return _shared_matmul(self.second, hidden)


class _FrozenMask(nn.Module):
    """The four instruments' masking TCNs with materialised weights and folded GroupNorms."""

    def __init__(
        self, mask: nn.Module, instrument: torch.Tensor | None, N: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.N = N
        self.norm_1 = _Norm(mask.norm_1, instrument)
        self.in_conv = _Conv(mask.in_conv, instrument, dtype)
        self.slopes = [_slope(p) for p in (mask.prelu_1, mask.prelu_2, mask.prelu_3, mask.prelu_4)]
        self.norm_2 = _Norm(mask.norm_2, instrument)
        self.blocks = nn.ModuleList(_FrozenBlock(block, instrument, dtype) for block in mask.tcn)
        self.norm_3 = _Norm(mask.norm_3, instrument)
        self.mask_output = _Conv(mask.mask_output, instrument, dtype)
        self.norm_4 = _Norm(mask.norm_4, instrument)
        self.fused = False  # TCN blocks through `fused_block_step` (set by FrozenTasNet)

    def forward(self, latent: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        batch, frames = latent.shape[0], latent.shape[-1]
        slope_1, slope_2, slope_3, slope_4 = self.slopes
        # norm_1(prelu_1(input)) then in_conv, where input is the latent (the same for all four
        # instruments) concatenated with each instrument's previous-stage latents.
        shared = F.leaky_relu(latent, slope_1)
        own = F.leaky_relu(previous, slope_1) if previous is not None else None
        scale, shift = self.norm_1.affine_from_channels(_channel_moments(shared, own))
        weight, bias = self.in_conv.fold(scale, shift)  # (B, 4, O, C), (B, 4, O)
        out_channels = weight.shape[2]
        x = torch.matmul(
            weight[..., : self.N].reshape(batch, INSTRUMENTS * out_channels, self.N), shared
        ).view(batch * INSTRUMENTS, out_channels, frames)
        if own is not None:
            x.baddbmm_(
                weight[..., self.N :].reshape(batch * INSTRUMENTS, out_channels, -1),
                own.reshape(batch * INSTRUMENTS, -1, frames),
            )
        x = F.leaky_relu_(x.add_(bias.reshape(-1, out_channels, 1)), slope_2)
        x = self.norm_2.apply_(x, batch)

        skip = torch.zeros_like(x)
        carry = x.new_zeros(batch * INSTRUMENTS, out_channels, 1)  # constants not yet added to x
        skip_carry = torch.zeros_like(carry)
        # Every block's two intermediate activations go to the same two buffers: touching fresh
        # pages for each block's tensors cost more than the arithmetic on some machines.
        if self.fused:
            step = fused_block_step()
            for block in self.blocks:
                x, skip, carry, skip_carry = step(x, skip, carry, skip_carry, *block.constants())
        elif self.blocks:
            hidden_size = (batch * INSTRUMENTS, self.blocks[0].hidden_channels, frames)
            workspace = (x.new_empty(hidden_size), x.new_empty(hidden_size))
            for block in self.blocks:
                carry, skip_carry = block(x, skip, carry, skip_carry, batch, workspace)

        skip = F.leaky_relu_(skip.add_(skip_carry), slope_3)
        scale, shift = self.norm_3.affine(skip, batch)
        weight, bias = self.mask_output.fold(scale, shift)
        mask = torch.baddbmm(bias.reshape(batch * INSTRUMENTS, -1, 1), weight.flatten(0, 1), skip)
        mask = self.norm_4.apply_(F.leaky_relu_(mask, slope_4), batch)
        return _softmax_over_instruments_(mask.view(batch, INSTRUMENTS, self.N, frames), latent)


class _FrozenBlock(nn.Module):
    """One TCN block. The residual stream ``x`` is updated in place; per-channel constants that
    would be added to it (and to ``skip``) are carried as vectors and folded into the next matrix
    product, saving a pass over the activations."""

    def __init__(
        self, block: nn.Module, instrument: torch.Tensor | None, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.conv = _Conv(block.conv1d, instrument, dtype)
        self.norm_1 = _Norm(block.norm_1, instrument)
        self.depthwise = _Conv(block.dconv1d, instrument, dtype)
        self.norm_2 = _Norm(block.norm_2, instrument)
        self.res_out = _Conv(block.res_out, instrument, dtype)
        self.skip_out = _Conv(block.skip_out, instrument, dtype)
        self.slope_1, self.slope_2 = _slope(block.prelu_1), _slope(block.prelu_2)
        self.hidden_channels = self.conv.kernel.shape[1]
        self._constants: tuple | None = None

    def constants(self) -> tuple:
        """This block's arguments of :func:`fused_block_step` after the four activations: the
        kernels in the network's dtype, the normalisations' affines, biases and slopes in
        float32, the depthwise dilation and padding, and both normalisations' groups and
        epsilons."""
        if self._constants is None or self._constants[0].device != self.conv.kernel.device:
            slopes = torch.tensor([self.slope_1, self.slope_2], device=self.conv.kernel.device)
            self._constants = (
                self.conv.kernel[..., 0],
                self.norm_1.scale,
                self.norm_1.shift,
                self.depthwise.kernel[:, :, 0, :].float(),
                self.depthwise.bias,
                self.norm_2.scale,
                self.norm_2.shift,
                self.res_out.kernel[..., 0],
                self.res_out.bias,
                self.skip_out.kernel[..., 0],
                self.skip_out.bias,
                slopes,
                self.depthwise.dilation,
                self.depthwise.padding,
                self.norm_1.groups,
                self.norm_1.eps,
                self.norm_2.groups,
                self.norm_2.eps,
            )
        return self._constants

    def forward(
        self,
        x: torch.Tensor,
        skip: torch.Tensor,
        carry: torch.Tensor,
        skip_carry: torch.Tensor,
        batch: int,
        workspace: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update ``x`` and ``skip`` in place; return the new carries. ``workspace`` holds two
        (B*4, H, T) buffers that the block overwrites."""
        weight = self.conv.stacked(batch)
        hidden = torch.baddbmm(torch.bmm(weight, carry), weight, x, out=workspace[0])
        hidden = F.leaky_relu_(hidden, self.slope_1)
        scale, shift = self.norm_1.affine(hidden, batch)
        hidden = self.depthwise.depthwise(hidden, scale, shift, batch, out=workspace[1])
        hidden = F.leaky_relu_(hidden, self.slope_2)
        scale, shift = self.norm_2.affine(hidden, batch)
        res_weight, res_bias = self.res_out.fold(scale, shift)
        skip_weight, skip_bias = self.skip_out.fold(scale, shift)
        x.baddbmm_(res_weight.flatten(0, 1), hidden)
        skip.baddbmm_(skip_weight.flatten(0, 1), hidden)
        return carry + res_bias.reshape(carry.shape), skip_carry + skip_bias.reshape(carry.shape)


class _FrozenDecoder(nn.Module):
    """Bottleneck, ReLU, then the three transposed convolutions as one matrix product to
    overlapping frames (each filter's kernel placed at its offset in a common span, padded to
    whole strides) and one overlap-add of stride-long pieces."""

    def __init__(self, decoder: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        bottleneck = decoder.bottleneck[0].weight[:, :, 0].t()
        self.register_buffer("bottleneck", _constant(bottleneck, dtype), persistent=False)
        starts = [-f.padding[0] for f in decoder.filters]
        stops = [f.kernel_size[0] - f.padding[0] for f in decoder.filters]
        self.start, span = min(starts), max(stops) - min(starts)
        self.stride = decoder.filters[0].stride[0]
        span = -(-span // self.stride) * self.stride  # whole strides: zero rows at the end
        blocks = []
        for f, begin in zip(decoder.filters, starts, strict=True):
            kernel = f.weight.detach()[:, 0, :].t()  # (k, width)
            offset = begin - self.start
            blocks.append(F.pad(kernel, (0, 0, offset, span - offset - kernel.shape[0])))
        # Stored transposed, (width, span): the product is taken as hiddenᵀ @ this, which gives
        # time-major frames whose overlap-add needs no transposing copy at the end.
        self.register_buffer("frames", _constant(torch.cat(blocks, dim=1).t(), dtype), False)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        hidden = F.relu_(_shared_matmul(self.bottleneck, latent))
        frames = _shared_matmul(self.frames.t(), hidden, transpose=True)  # (B, T', span)
        batch, count, span = frames.shape
        pieces = frames.view(batch, count, span // self.stride, self.stride)
        # Piece p of frame t lands on stride-block t + p: a few shifted adds (F.fold's col2im
        # took longer than the decoder's matrix products).
        blocks = pieces.new_empty(
            batch, count + pieces.shape[2] - 1, self.stride, dtype=torch.float
        )
        blocks[:, :count] = pieces[:, :, 0]
        blocks[:, count:] = 0
        for p in range(1, pieces.shape[2]):
            blocks[:, p : p + count].add_(pieces[:, :, p])
        signal = blocks.view(batch, 1, -1)
        begin = -self.start
        return signal[..., begin : begin + count * self.stride]


class _Conv(nn.Module):
    """A per-instrument convolution's constant kernel (4, O, C/groups, k) and bias (4, O)."""

    def __init__(
        self, conv: nn.Module, instrument: torch.Tensor | None, dtype: torch.dtype
    ) -> None:
        super().__init__()
        kernel, bias = conv.weights(instrument)
        out_channels = kernel.shape[0] // INSTRUMENTS
        if bias is None:
            bias = kernel.new_zeros(kernel.shape[0])
        kernel = kernel.reshape(INSTRUMENTS, out_channels, *kernel.shape[1:])
        self.register_buffer("kernel", _constant(kernel, dtype), persistent=False)
        # The bias only enters float64 arithmetic (see `fold`); kept in float32.
        self.register_buffer("bias", _constant(bias.reshape(INSTRUMENTS, -1), None), False)
        self.dilation, self.padding = conv.dilation, conv.padding

    def stacked(self, batch: int) -> torch.Tensor:
        """The 1x1 kernel repeated over the batch: (B*4, O, C)."""
        matrix = self.kernel[..., 0]
        return matrix.expand(batch, *matrix.shape).reshape(-1, *matrix.shape[1:])

    def fold(self, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of ``conv(x * scale + shift)`` for per-channel (B, 4, C) scale/shift:
        weights (B, 4, O, C) and bias (B, 4, O)."""
        matrix = self.kernel[..., 0]
        weight = (matrix.unsqueeze(0) * scale.unsqueeze(2)).to(matrix.dtype)
        bias = torch.einsum("ioc,bic->bio", matrix.double(), shift) + self.bias.double()
        return weight, bias.to(matrix.dtype)

    def depthwise(
        self,
        x: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        batch: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The depthwise (groups = channels) convolution of ``x * scale + shift`` for x (B*4, C, T)
        and per-channel (B, 4, C) scale and shift (a GroupNorm folded in).

        Computed as one shifted multiply-add per tap, which is several times faster than oneDNN's
        dilated depthwise convolution. The shift is a constant per channel, so it adds
        ``shift * sum(kernel)`` inside and a little less at the ends, where taps fall into the
        zero padding. The result goes to ``out`` when given (and the fast path applies).
        """
        frames = x.shape[-1]
        kernel = self.kernel[:, :, 0, :].double()  # (4, C, k)
        offsets = [tap * self.dilation - self.padding for tap in range(kernel.shape[-1])]
        same_length = frames + 2 * self.padding - self.dilation * (kernel.shape[-1] - 1) == frames
        if 0 not in offsets or not same_length or frames <= max(map(abs, offsets)):
            return self._depthwise_reference(x, scale, shift, batch)
        shape = (batch * INSTRUMENTS, -1, 1)
        taps = (scale.unsqueeze(-1) * kernel).to(x.dtype).reshape(*shape[:2], len(offsets))
        constants = shift.unsqueeze(-1) * kernel  # each tap's contribution of the shift
        centre = offsets.index(0)
        inside = constants.sum(-1) + self.bias.double()
        # x * tap + inside, as a product then an in-place add: addcmul with a broadcast first
        # operand takes a slow path.
        y = torch.mul(x, taps[..., centre : centre + 1], out=out)
        y.add_(inside.to(x.dtype).reshape(shape))
        constants = constants.to(x.dtype).reshape(*shape[:2], len(offsets))
        for tap, offset in enumerate(offsets):
            weight, constant = taps[..., tap : tap + 1], constants[..., tap : tap + 1]
            if offset < 0:
                y[..., -offset:].addcmul_(x[..., :offset], weight)
                y[..., :-offset].sub_(constant)
            elif offset > 0:
                y[..., :-offset].addcmul_(x[..., offset:], weight)
                y[..., -offset:].sub_(constant)
        return y

    def _depthwise_reference(
        self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """:meth:`depthwise` by normalising explicitly and calling ``conv1d`` (short inputs)."""
        channels = x.shape[1]
        shape = (batch * INSTRUMENTS, -1, 1)
        x = x * scale.reshape(shape).to(x.dtype) + shift.reshape(shape).to(x.dtype)
        y = F.conv1d(
            x.reshape(batch, INSTRUMENTS * channels, -1),
            self.kernel.reshape(INSTRUMENTS * channels, 1, -1),
            self.bias.reshape(-1).to(x.dtype),
            padding=self.padding,
            dilation=self.dilation,
            groups=INSTRUMENTS * channels,
        )
        return y.view(batch * INSTRUMENTS, channels, -1)


class _Norm(nn.Module):
    """A per-instrument GroupNorm's constant affine; statistics are taken in float64 per group."""

    def __init__(self, norm: nn.Module, instrument: torch.Tensor | None) -> None:
        super().__init__()
        scale, shift = norm.weights(instrument)
        inner = getattr(norm, "group_norm", norm)
        groups = inner.num_groups if hasattr(norm, "group_norm") else INSTRUMENTS * norm.num_groups
        self.groups, self.eps = groups // INSTRUMENTS, inner.eps
        self.register_buffer("scale", _constant(scale.reshape(INSTRUMENTS, -1), None), False)
        self.register_buffer("shift", _constant(shift.reshape(INSTRUMENTS, -1), None), False)

    def affine(self, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (B, 4, C) scale and shift that normalise x (B*4, C, T) as GroupNorm."""
        mean, variance = _moments(x.reshape(batch, INSTRUMENTS, self.groups, -1))
        return self._from_group_moments(mean, variance)

    def affine_from_channels(
        self, moments: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`affine`, from per-channel means and variances (B, 4, C) in float64."""
        mean, variance = moments
        batch, channels = mean.shape[0], mean.shape[-1]
        mean = mean.view(batch, INSTRUMENTS, self.groups, channels // self.groups)
        variance = variance.view_as(mean)
        group_mean = mean.mean(-1)
        group_variance = (variance + mean.square()).mean(-1) - group_mean.square()
        return self._from_group_moments(group_mean, group_variance.clamp_min(0))

    def _from_group_moments(
        self, mean: torch.Tensor, variance: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_group = self.scale.shape[-1] // self.groups
        inverse = (variance + self.eps).rsqrt().repeat_interleave(per_group, dim=-1)
        mean = mean.repeat_interleave(per_group, dim=-1)
        scale = self.scale.double() * inverse
        return scale, self.shift.double() - mean * scale

    def apply_(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """GroupNorm of x (B*4, C, T), in place."""
        scale, shift = self.affine(x, batch)
        shape = (batch * INSTRUMENTS, -1, 1)
        return x.mul_(scale.reshape(shape).to(x.dtype)).add_(shift.reshape(shape).to(x.dtype))


def _shared_matmul(
    matrix: torch.Tensor, batch: torch.Tensor, transpose: bool = False
) -> torch.Tensor:
    """``matrix @ batch`` for one (M, K) matrix and a (B, K, T) batch, as one matrix product per
    item into a single output: torch's broadcast to a batched product ran about 1.4x slower on
    CPU for the encoder's and decoder's large products. With ``transpose``, the (B, T, M)
    transposed result (each item's product taken as ``itemᵀ @ matrixᵀ``)."""
    if batch.device.type != "cpu" or batch.dim() != 3:
        return torch.matmul(batch.mT, matrix.t()) if transpose else torch.matmul(matrix, batch)
    if transpose:
        out = batch.new_empty(batch.shape[0], batch.shape[-1], matrix.shape[0])
        for item, result in zip(batch, out, strict=True):
            torch.mm(item.t(), matrix.t(), out=result)
        return out
    out = batch.new_empty(batch.shape[0], matrix.shape[0], batch.shape[-1])
    for item, result in zip(batch, out, strict=True):
        torch.mm(matrix, item, out=result)
    return out


def _softmax_over_instruments_(logits: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """``softmax(logits, dim=1) * latent`` for (B, 4, N, T) logits and (B, N, T) latents,
    computed in the logits' memory. Each instrument's (N, T) slab is a whole array, so the
    maximum and the sum over instruments are element-wise operations between slabs: torch's
    softmax over a non-last dimension of size 4 took twice as long (and a second copy)."""
    slabs = logits.unbind(1)
    top = slabs[0].clone()
    for slab in slabs[1:]:
        torch.maximum(top, slab, out=top)
    logits.sub_(top.unsqueeze(1)).exp_()
    total = torch.add(slabs[0], slabs[1], out=top)
    for slab in slabs[2:]:
        total.add_(slab)
    return logits.mul_(torch.div(latent, total, out=total).unsqueeze(1))


def _channel_moments(
    shared: torch.Tensor, own: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance over time (B, 4, C) of ``cat([shared x4, own], dim=2)``."""
    mean, variance = _moments(shared)
    batch = shared.shape[0]
    mean = mean.unsqueeze(1).expand(batch, INSTRUMENTS, -1)
    variance = variance.unsqueeze(1).expand(batch, INSTRUMENTS, -1)
    if own is not None:
        own_mean, own_variance = _moments(own)
        mean = torch.cat([mean, own_mean], dim=-1)
        variance = torch.cat([variance, own_variance], dim=-1)
    return mean, variance


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance over the last dimension, in float64.

    From float32 sums and sums of squares (two vectorised reads; ``torch.var_mean`` is some 40x
    slower on CPU). E[x²] - E[x]² is formed in float64; it loses precision only where the mean is
    orders of magnitude above the spread, which these activations (PReLU of convolutions of
    normalised signals) are not.

    A lower-precision tensor is read in pieces of ``_MOMENT_PIECE`` elements that stay in the
    CPU's cache: each piece is cast into one reused float32 buffer and summed twice from there.
    Casting the whole tensor at once (a fresh allocation the size of the activation, whose pages
    the kernel must zero, then two reads from memory) took longer than the matrix products that
    made it; float32-accumulating reductions of bfloat16 are slower still.
    """
    count = x.shape[-1]
    rows = x.reshape(-1, count)
    width, height, buffer = count, rows.shape[0], None  # float32: read whole, as fast here
    if x.dtype != torch.float32 and x.device.type != "cpu":
        rows = rows.float()  # a GPU's cached allocator has no fresh pages; pieces = many launches
    elif x.dtype != torch.float32:
        width = min(count, _MOMENT_WIDTH)
        height = max(1, _MOMENT_PIECE // width)
        buffer = torch.empty(min(height, rows.shape[0]) * width, device=x.device)
    sums = torch.zeros(rows.shape[0], dtype=torch.float64, device=x.device)
    squares = torch.zeros_like(sums)
    for top in range(0, rows.shape[0], height):
        band = rows[top : top + height]
        for left in range(0, count, width):
            piece = band[:, left : left + width]
            if buffer is not None:
                piece = buffer[: piece.numel()].view(piece.shape).copy_(piece)
            sums[top : top + height] += piece.sum(-1)
            squares[top : top + height] += torch.linalg.vector_norm(piece, dim=-1).double() ** 2
    mean = (sums / count).view(x.shape[:-1])
    return mean, (squares.view(x.shape[:-1]) / count - mean.square()).clamp_min(0)


def _constant(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A detached, contiguous copy of a weight, in ``dtype`` (float32 when None)."""
    return tensor.detach().to(dtype or torch.float32).contiguous().clone()


def _slope(prelu: nn.PReLU) -> float:
    """A single-parameter PReLU's negative slope, as a constant."""
    if prelu.weight.numel() != 1:
        raise ValueError("frozen inference supports single-parameter PReLU only")
    return float(prelu.weight)


def frames_multiple(model: MultiTasNet) -> int:
    """Base-rate samples by which window starts should be aligned: the encoder stride and the mel
    branch's hop of every stage, so that a window sees the same frames as the whole track."""
    multiple = model.config.W
    for index, stage in enumerate(model.stages):
        hop = stage.encoder.spectrogram.hop
        if hop % 2**index == 0:
            multiple = math.lcm(multiple, hop // 2**index)
    return multiple


def _block_step(
    x: torch.Tensor,
    skip: torch.Tensor,
    carry: torch.Tensor,
    skip_carry: torch.Tensor,
    conv: torch.Tensor,
    norm_1_scale: torch.Tensor,
    norm_1_shift: torch.Tensor,
    depthwise: torch.Tensor,
    depthwise_bias: torch.Tensor,
    norm_2_scale: torch.Tensor,
    norm_2_shift: torch.Tensor,
    residual: torch.Tensor,
    residual_bias: torch.Tensor,
    skip_weight: torch.Tensor,
    skip_bias: torch.Tensor,
    slopes: torch.Tensor,
    dilation: int,
    padding: int,
    groups_1: int,
    eps_1: float,
    groups_2: int,
    eps_2: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One TCN block as :class:`_FrozenBlock` computes it, written as a pure function for a
    compiler: returns new ``(x, skip, carry, skip_carry)`` instead of updating them.

    Everything between the three matrix products (PReLU, both GroupNorms' statistics and affines,
    the dilated depthwise taps over the zero-padded normalised signal, the casts) is element-wise
    or a per-group reduction, which a compiler fuses into a few passes over the activations; the
    matrix products stay in the network's dtype. Statistics are float32 (Welford) here."""
    rows, channels, frames = x.shape
    batch, dtype = rows // INSTRUMENTS, x.dtype
    per_item = (batch, INSTRUMENTS)
    hidden = torch.matmul(conv, x.view(*per_item, channels, frames))
    hidden = hidden.float() + torch.matmul(conv, carry.view(*per_item, channels, 1)).float()
    hidden = torch.where(hidden >= 0, hidden, hidden * slopes[0])
    scale, shift = _group_affine(hidden, norm_1_scale, norm_1_shift, groups_1, eps_1)
    normalised = F.pad(hidden * scale + shift, (padding, padding))
    taps = depthwise.shape[-1]
    out = depthwise_bias.unsqueeze(-1) + sum(
        depthwise[..., tap : tap + 1] * normalised[..., tap * dilation : tap * dilation + frames]
        for tap in range(taps)
    )
    out = torch.where(out >= 0, out, out * slopes[1])
    scale, shift = _group_affine(out, norm_2_scale, norm_2_shift, groups_2, eps_2)
    out = out.to(dtype).view(rows, -1, frames)
    results = []
    for weight, bias, stream, stream_carry in (
        (residual, residual_bias, x, carry),
        (skip_weight, skip_bias, skip, skip_carry),
    ):
        # conv(out * scale + shift): the scale goes into the kernel, the shift into the carry.
        folded = (weight.float() * scale.transpose(-1, -2)).to(dtype).view(rows, -1, out.shape[1])
        constant = torch.matmul(weight.float(), shift) + bias.unsqueeze(-1)
        results.append(torch.baddbmm(stream, folded, out))
        results.append(stream_carry + constant.view(stream_carry.shape).to(stream_carry.dtype))
    x, carry, skip, skip_carry = results
    return x, skip, carry, skip_carry


def _group_affine(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (B, 4, C, 1) scale and shift that apply a GroupNorm of x (B, 4, C, T) with
    affine ``scale``/``shift`` (4, C)."""
    batch, instruments, channels, frames = x.shape
    grouped = x.view(batch, instruments, groups, channels // groups, frames)
    variance, mean = torch.var_mean(grouped, dim=(-2, -1), correction=0, keepdim=True)
    per_channel = scale.view(instruments, groups, -1, 1) * torch.rsqrt(variance + eps)
    offset = shift.view(instruments, groups, -1, 1) - mean * per_channel
    return (
        per_channel.reshape(batch, instruments, channels, 1),
        offset.reshape(batch, instruments, channels, 1),
    )


_COMPILED_BLOCK_STEP = None


def _is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` came from torch.compile (dynamo or inductor), not from the arithmetic."""
    dynamo = sys.modules.get("torch._dynamo.exc")
    return dynamo is not None and isinstance(error, dynamo.TorchDynamoException)


def fused_block_step() -> Callable[..., tuple[torch.Tensor, ...]]:
    """:func:`_block_step` compiled by ``torch.compile`` (inductor: Triton kernels on CUDA), once
    per process and for all shapes (``dynamic``: every block, stage and batch size shares it)."""
    global _COMPILED_BLOCK_STEP
    if _COMPILED_BLOCK_STEP is None:
        _COMPILED_BLOCK_STEP = torch.compile(_block_step, dynamic=True)
    return _COMPILED_BLOCK_STEP
