"""Per-instrument layers of the masking network: generated or independent weights.

All four instruments are processed at once. Activations have shape (B, 4, C, T); they are viewed as
(B, 4*C, T) so that one grouped convolution (groups = 4 * groups) runs the four extractors side by
side. With *generated* weights (the paper's meta-learning), each kernel, bias and GroupNorm affine is
a linear function of the instrument embedding; with *independent* weights each instrument owns its
parameters (the paper's ablation). Parameter names equal the release's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INSTRUMENTS = 4


def _bottleneck(E_1: int | None, E_2: int) -> nn.Module | nn.Parameter:
    """A layer's map from the (4, E_1) instrument embedding to its own (4, E_2) code.

    With ``E_1=None`` there is no shared embedding and the code is learned directly.
    """
    return nn.Linear(E_1, E_2) if E_1 is not None else nn.Parameter(torch.randn(INSTRUMENTS, E_2))


def _instrument_code(
    bottleneck: nn.Module | nn.Parameter, instrument: torch.Tensor
) -> torch.Tensor:
    """The layer's (4, E_2) instrument code."""
    if isinstance(bottleneck, nn.Parameter):
        return bottleneck
    return bottleneck(instrument)


class _InstrumentConv1d(nn.Module):
    """A 1-D convolution of each instrument's channels (x of shape (B, 4, C, T)), all four in one
    grouped convolution; subclasses say where each instrument's weights come from."""

    def __init__(
        self,
        E_1: int | None,
        E_2: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        dilation: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = (
            in_channels,
            out_channels,
            kernel_size,
        )
        self.dilation, self.padding, self.groups = dilation, padding, groups
        self._build(E_1, E_2, bias)

    def _build(self, E_1: int | None, E_2: int, bias: bool) -> None:
        raise NotImplementedError

    def weights(self, instrument: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The grouped-convolution kernel (4*C_out, C_in/groups, k) and bias (4*C_out) or None."""
        raise NotImplementedError

    def forward(self, instrument: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        kernel, bias = self.weights(instrument)
        return _grouped_conv(x, kernel, bias, self.dilation, self.padding, self.groups)


class GeneratedConv1d(_InstrumentConv1d):
    """1-D convolution whose kernel (and optional bias) is generated from the instrument embedding."""

    def _build(self, E_1: int | None, E_2: int, bias: bool) -> None:
        self.bottleneck = _bottleneck(E_1, E_2)
        size = self.out_channels * self.in_channels // self.groups * self.kernel_size
        self.kernel = nn.Linear(E_2, size)
        self.bias = nn.Linear(E_2, self.out_channels) if bias else None

    def weights(self, instrument: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        code = _instrument_code(self.bottleneck, instrument)
        kernel = self.kernel(code).view(
            INSTRUMENTS * self.out_channels, self.in_channels // self.groups, self.kernel_size
        )
        bias = self.bias(code).reshape(-1) if self.bias is not None else None
        return kernel, bias


class IndependentConv1d(_InstrumentConv1d):
    """1-D convolution with separate weights per instrument (one grouped nn.Conv1d)."""

    def _build(self, E_1: int | None, E_2: int, bias: bool) -> None:
        self.conv = nn.Conv1d(
            INSTRUMENTS * self.in_channels,
            INSTRUMENTS * self.out_channels,
            self.kernel_size,
            padding=self.padding,
            dilation=self.dilation,
            groups=INSTRUMENTS * self.groups,
            bias=bias,
        )

    def weights(self, instrument: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.conv.weight, self.conv.bias


def _grouped_conv(
    x: torch.Tensor,
    kernel: torch.Tensor,
    bias: torch.Tensor | None,
    dilation: int,
    padding: int,
    groups: int,
) -> torch.Tensor:
    """Apply the four instruments' kernels to x of shape (B, 4, C, T) in one grouped convolution."""
    batch = x.shape[0]
    y = F.conv1d(
        x.reshape(batch, -1, x.shape[-1]),
        kernel,
        bias,
        padding=padding,
        dilation=dilation,
        groups=INSTRUMENTS * groups,
    )
    return y.view(batch, INSTRUMENTS, -1, y.shape[-1])


class GeneratedGroupNorm(nn.Module):
    """GroupNorm over each instrument's channels with a generated affine (scale and shift)."""

    def __init__(
        self, E_1: int | None, E_2: int, num_groups: int, num_channels: int, eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.bottleneck = _bottleneck(E_1, E_2)
        self.affine = nn.Linear(E_2, 2 * num_channels)

    def weights(self, instrument: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel scale and shift, each of shape (4*C)."""
        affine = self.affine(_instrument_code(self.bottleneck, instrument))
        scale = affine[:, : self.num_channels].reshape(-1)
        shift = affine[:, self.num_channels :].reshape(-1)
        return scale, shift

    def forward(self, instrument: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.weights(instrument)
        return _grouped_norm(x, INSTRUMENTS * self.num_groups, scale, shift, self.eps)


class IndependentGroupNorm(nn.Module):
    """GroupNorm over each instrument's channels with an independent affine per instrument."""

    def __init__(
        self, E_1: int | None, E_2: int, num_groups: int, num_channels: int, eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(INSTRUMENTS * num_groups, INSTRUMENTS * num_channels, eps)

    def weights(self, instrument: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.group_norm.weight, self.group_norm.bias

    def forward(self, instrument: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        norm = self.group_norm
        return _grouped_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def _grouped_norm(
    x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor, eps: float
) -> torch.Tensor:
    batch = x.shape[0]
    y = F.group_norm(x.reshape(batch, -1, x.shape[-1]), groups, scale, shift, eps)
    return y.view_as(x)


def conv1d(generated: bool, *args, **kwargs) -> GeneratedConv1d | IndependentConv1d:
    """A per-instrument convolution: generated from the embedding or independent."""
    return (GeneratedConv1d if generated else IndependentConv1d)(*args, **kwargs)


def group_norm(generated: bool, *args, **kwargs) -> GeneratedGroupNorm | IndependentGroupNorm:
    """A per-instrument GroupNorm: generated affine or independent affine."""
    return (GeneratedGroupNorm if generated else IndependentGroupNorm)(*args, **kwargs)
