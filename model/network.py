"""The Meta-TasNet network (Samuel, Ganeshan & Naradowsky, ICASSP 2020).

Each stage is a Conv-TasNet-like extractor: an encoder (three strided convolutions plus a learnable
mel branch) produces latent frames of the mixture, a masking TCN per instrument predicts a softmax
mask over the four instruments, and a decoder (three transposed convolutions) turns each masked
latent back into a waveform. Stages run at 8, 16 and 32 kHz; every stage after the first also reads
the previous stage's masked latents. Module and parameter names equal the release's, so its
``state_dict`` loads unchanged.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from model.config import TasNetConfig
from model.layers import INSTRUMENTS, conv1d, group_norm
from model.loss import separation_loss


class Spectrogram(nn.Module):
    """Learnable mel branch: dB STFT magnitude, normalised, affine, 1x1 conv to ``mels`` bands."""

    def __init__(self, n_fft: int, hop: int, mels: int) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        bins = n_fft // 2 + 1
        self.window = nn.Parameter(torch.hann_window(n_fft), requires_grad=False)
        self.mel_transform = nn.Conv1d(bins, mels, kernel_size=1)
        # Dataset statistics of the dB magnitude, set by `set_statistics` before training.
        self.mean = nn.Parameter(torch.zeros(1, bins, 1), requires_grad=False)
        self.std = nn.Parameter(torch.ones(1, bins, 1), requires_grad=False)
        self.affine_bias = nn.Parameter(torch.zeros(1, bins, 1))
        self.affine_scale = nn.Parameter(torch.ones(1, bins, 1))

    def magnitude_db(self, signal: torch.Tensor) -> torch.Tensor:
        """log10 power spectrum (B, bins, frames) of a (B, 1, T) signal."""
        stft = torch.stft(
            signal.reshape(-1, signal.shape[-1]),
            n_fft=self.n_fft,
            hop_length=self.hop,
            window=self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        return torch.log10(torch.view_as_real(stft).pow(2).sum(-1) + 1e-8)

    def set_statistics(self, magnitudes_db: torch.Tensor) -> None:
        """Set the normalisation from dB magnitudes (examples, bins, frames) of training data."""
        self.mean.data = magnitudes_db.mean(dim=(0, 2), keepdim=True)
        self.std.data = magnitudes_db.std(dim=(0, 2), keepdim=True)

    def forward(self, signal: torch.Tensor, frames: int) -> torch.Tensor:
        mag = (self.magnitude_db(signal) - self.mean) / self.std
        mel = self.mel_transform(mag * self.affine_scale + self.affine_bias)
        return F.interpolate(mel, size=frames, mode="linear", align_corners=True)


class Encoder(nn.Module):
    """Waveform (B, 1, T) to latent frames (B, N, T/W)."""

    def __init__(self, N: int, L: int, W: int, filters: int, num_mels: int, rate: int) -> None:
        super().__init__()
        scale = rate // 8000
        self.spectrogram = Spectrogram(n_fft=1024 * scale, hop=256 * scale, mels=num_mels)
        self.filters = nn.ModuleList()
        for level in range(filters):
            k = L * 2**level
            self.filters.append(nn.Conv1d(1, N // 4, k, stride=W, padding=(k - W) // 2, bias=False))
        width = num_mels + filters * (N // 4)
        self.bottleneck = nn.Sequential(
            nn.Conv1d(width, N, 1, bias=False), nn.ReLU(), nn.Conv1d(N, N, 1, bias=False)
        )

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        # Interleave the filters' channels as the release does: channel c of filter f -> c*F + f.
        convolved = torch.stack([f(signal) for f in self.filters], dim=2)
        convolved = F.relu(convolved.flatten(1, 2))
        mel = self.spectrogram(signal, convolved.shape[-1])
        return self.bottleneck(torch.cat([convolved, mel], dim=1))


class Decoder(nn.Module):
    """Latent frames (B, N, T') to waveform (B, 1, T'*W): three transposed convolutions summed."""

    def __init__(self, N: int, L: int, W: int, filters: int) -> None:
        super().__init__()
        self.widths = [N // 2 ** (level + 1) for level in range(filters)]
        self.bottleneck = nn.Sequential(
            nn.ConvTranspose1d(N, sum(self.widths), 1, bias=False), nn.ReLU()
        )
        self.filters = nn.ModuleList()
        for level, width in enumerate(self.widths):
            k = L * 2**level
            self.filters.append(
                nn.ConvTranspose1d(width, 1, k, stride=W, padding=(k - W) // 2, bias=False)
            )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        # The 1x1 transposed convolution is a 1x1 convolution with the weight transposed (faster).
        hidden = F.relu(F.conv1d(latent, self.bottleneck[0].weight.transpose(0, 1)))
        parts = hidden.split(self.widths, dim=1)
        return sum(_overlap_add(f, part) for f, part in zip(self.filters, parts, strict=True))


def _overlap_add(deconv: nn.ConvTranspose1d, x: torch.Tensor) -> torch.Tensor:
    """``deconv(x)`` for a one-output-channel transposed convolution, as matmul + overlap-add.

    Same result as the module; PyTorch's CPU transposed convolution takes a slow path for these
    long kernels (it was 40% of inference time), while a matrix product and ``fold`` are fast.
    """
    kernel, stride, padding = deconv.kernel_size[0], deconv.stride[0], deconv.padding[0]
    frames = torch.einsum("bct,ck->bkt", x, deconv.weight[:, 0, :])
    full = (x.shape[-1] - 1) * stride + kernel
    signal = F.fold(frames, output_size=(1, full), kernel_size=(1, kernel), stride=(1, stride))
    return signal[:, :, 0, padding : full - padding]


class TCNBlock(nn.Module):
    """Dilated depthwise-separable block with residual and skip outputs."""

    def __init__(self, generated: bool, config: TasNetConfig, dilation: int, bias: bool) -> None:
        super().__init__()
        E_1, E_2, B, H = config.E_1, config.E_2, config.B, config.H
        self.norm_1 = group_norm(generated, E_1, E_2, 8, H)
        self.prelu_1 = nn.PReLU()
        self.conv1d = conv1d(generated, E_1, E_2, B, H, 1)
        self.norm_2 = group_norm(generated, E_1, E_2, 8, H)
        self.prelu_2 = nn.PReLU()
        # "Same" padding; equals the release's padding=dilation for its kernel size 3.
        padding = dilation * (config.kernel - 1) // 2
        self.dconv1d = conv1d(
            generated, E_1, E_2, H, H, config.kernel, dilation=dilation, padding=padding, groups=H
        )
        self.res_out = conv1d(generated, E_1, E_2, H, B, 1, bias=bias)
        self.skip_out = conv1d(generated, E_1, E_2, H, B, 1, bias=bias)

    def forward(
        self, instrument: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm_1(instrument, self.prelu_1(self.conv1d(instrument, x)))
        x = self.norm_2(instrument, self.prelu_2(self.dconv1d(instrument, x)))
        return self.res_out(instrument, x), self.skip_out(instrument, x)


class MaskingNetwork(nn.Module):
    """The four instruments' masking TCNs; output is a softmax over instruments (B, 4, N, T')."""

    def __init__(self, generated: bool, config: TasNetConfig, N: int, partial_input: bool) -> None:
        super().__init__()
        E_1, E_2, B = config.E_1, config.E_2, config.B
        in_channels = N + N // 2 if partial_input else N
        self.norm_1 = group_norm(generated, E_1, E_2, 8, in_channels)
        self.prelu_1 = nn.PReLU()
        self.in_conv = conv1d(generated, E_1, E_2, in_channels, B, 1)
        self.norm_2 = group_norm(generated, E_1, E_2, 8, B)
        self.prelu_2 = nn.PReLU()
        self.tcn = nn.ModuleList(
            TCNBlock(generated, config, 2**i, config.residual_bias)
            for _ in range(config.stack)
            for i in range(config.layers)
        )
        self.norm_3 = group_norm(generated, E_1, E_2, 8, B)
        self.prelu_3 = nn.PReLU()
        self.mask_output = conv1d(generated, E_1, E_2, B, N, 1)
        self.norm_4 = group_norm(generated, E_1, E_2, 8, N)
        self.prelu_4 = nn.PReLU()

    def forward(self, instrument: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(instrument, self.norm_1(instrument, self.prelu_1(x)))
        x = self.norm_2(instrument, self.prelu_2(x))
        skip = 0.0
        for block in self.tcn:
            residual, block_skip = block(instrument, x)
            x = x + residual
            skip = skip + block_skip
        mask = self.mask_output(instrument, self.norm_3(instrument, self.prelu_3(skip)))
        mask = self.norm_4(instrument, self.prelu_4(mask))
        return F.softmax(mask, dim=1)


class TasNetStage(nn.Module):
    """One extractor (encoder, generated masking TCNs, decoder) at one sampling rate."""

    def __init__(self, config: TasNetConfig, index: int) -> None:
        super().__init__()
        m = 2**index
        self.N, self.stride, self.rate = m * config.N, m * config.W, m * config.sampling_rate
        generated = not config.independent_params
        self.encoder = Encoder(
            self.N, m * config.L, self.stride, config.filters, config.num_mels, self.rate
        )
        self.decoder = Decoder(self.N, m * config.L, self.stride, config.filters)
        self.dropout = nn.Dropout2d(config.dropout)
        self.mask = MaskingNetwork(generated, config, self.N, partial_input=index > 0)
        self.instrument_embedding = (
            nn.Embedding(INSTRUMENTS, config.E_1) if generated and config.E_1 is not None else None
        )

    def instruments(self) -> torch.Tensor | None:
        """The (4, E_1) instrument embedding, or None where layers need none."""
        if self.instrument_embedding is None:
            return None
        return self.instrument_embedding.weight

    def separate(
        self, mix: torch.Tensor, previous: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Separate a (B, 1, T) mix.

        Returns the stems (B, 4, 1, T), the masked latents (B, 4, N, T') that feed the next stage,
        and the mixture latent (B, N, T').
        """
        batch = mix.shape[0]
        latent = self.encoder(mix)
        latents = latent.unsqueeze(1).expand(-1, INSTRUMENTS, -1, -1)
        mask_input = self.dropout(latents.reshape(batch * INSTRUMENTS, self.N, -1, 1))
        mask_input = mask_input.view(batch, INSTRUMENTS, self.N, -1)
        if previous is not None:
            mask_input = torch.cat([mask_input, previous], dim=2)
        masked = latents * self.mask(self.instruments(), mask_input)
        stems = self.decoder(masked.reshape(batch * INSTRUMENTS, self.N, -1))
        return stems.view(batch, INSTRUMENTS, 1, -1), masked, latent

    def forward(
        self,
        mix: torch.Tensor,
        sources: torch.Tensor,
        source_mask: torch.Tensor,
        previous: torch.Tensor | None,
        config: TasNetConfig,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward: (loss, stats (7), masked latents for the next stage)."""
        stems, masked, latent = self.separate(mix, previous)
        reconstruction = self.decoder(latent) if config.reconstruction_loss_weight > 0 else None
        source_latents = None
        if config.similarity_loss_weight > 0 or config.dissimilarity_loss_weight > 0:
            batch = mix.shape[0]
            encoded = self.encoder(sources.reshape(batch * INSTRUMENTS, 1, -1))
            source_latents = encoded.view(batch, INSTRUMENTS, self.N, -1).transpose(2, 3)
        loss, stats = separation_loss(
            stems, sources, source_mask, source_latents, reconstruction, mix, config
        )
        return loss, stats, masked


class MultiTasNet(nn.Module):
    """Meta-TasNet: stages at ``sampling_rate * 2**i`` each feeding the next.

    Inputs are lists with one mono mix per stage, (B, 1, T * 2**i) for a base length T that is a
    multiple of ``config.W``; outputs are per-stage stems (B, 4, 1, T * 2**i) in the order
    drums, bass, other, vocals.
    """

    def __init__(self, config: TasNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or TasNetConfig()
        self.stages = nn.ModuleList(TasNetStage(self.config, i) for i in range(self.config.stages))

    def forward(
        self,
        mixes: list[torch.Tensor],
        separated: list[torch.Tensor],
        masks: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training objective summed over stages, shape (1,), and the stats row (1, 4*S + 3).

        ``separated[i]`` holds the true stems (B, 4, 1, T_i) and ``masks[i]`` (B, 4, 1) is 1 where a
        stem is not silent; silent stems are left out of the SI-SNR average.
        """
        if not len(mixes) == len(separated) == len(masks) == len(self.stages):
            raise ValueError(f"expected {len(self.stages)} inputs per stage list")
        total, stats, previous = None, [], None
        for stage, mix, sources, mask in zip(self.stages, mixes, separated, masks, strict=True):
            loss, stage_stats, previous = stage(mix, sources, mask, previous, self.config)
            total = loss if total is None else total + loss
            stats.append(stage_stats[:INSTRUMENTS])
        stats[-1] = stage_stats  # the last stage keeps its reconstruction and latent terms
        return total.unsqueeze(0), torch.cat(stats).unsqueeze(0)

    def separate(self, mixes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Single-pass separation of whole inputs (no chunking): per-stage stems."""
        outputs, previous = [], None
        for stage, mix in zip(self.stages, mixes, strict=True):
            stems, previous, _ = stage.separate(mix, previous)
            outputs.append(stems)
        return outputs

    @torch.inference_mode()
    def inference(self, mixes: list[torch.Tensor], n_chunks: int = 4) -> list[torch.Tensor]:
        """Separation with the release's chunking: ``n_chunks`` pieces, 8 s of context each side.

        Gives the release's numbers exactly; ``n_chunks=1`` is a single pass.
        """
        if len(mixes) != len(self.stages):
            raise ValueError(f"expected {len(self.stages)} mixes, one per stage")
        length = mixes[0].shape[-1]
        context = 8 * self.config.sampling_rate
        outputs: list[list[torch.Tensor]] = [[] for _ in self.stages]
        for start, stop, begin, end in release_chunks(length, n_chunks, context, self.config.W):
            pieces = [mix[..., 2**i * begin : 2**i * end] for i, mix in enumerate(mixes)]
            for i, stems in enumerate(self.separate(pieces)):
                m = 2**i
                outputs[i].append(stems[..., m * (start - begin) : m * (stop - begin)])
        return [torch.cat(parts, dim=-1) for parts in outputs]

    def parameter_count(self) -> int:
        """Number of values in the state dict (the count the release reports)."""
        return sum(p.numel() for p in self.parameters())


def release_chunks(
    length: int, n_chunks: int, context: int, stride: int
) -> list[tuple[int, int, int, int]]:
    """The release's chunk plan over a base-rate length.

    Each entry is (start, stop, begin, end): the output span [start, stop) is computed from input
    [begin, end), which adds up to ``context`` samples on each side and is trimmed to a multiple of
    ``stride`` at the side that is not the track's start.
    """
    edges = [int(length / n_chunks * c + 0.5) for c in range(n_chunks)] + [length]
    plan = []
    for start, stop in itertools.pairwise(edges):
        begin, end = max(0, start - context), min(stop + context, length)
        if begin == 0:
            end -= (end - begin) % stride
        else:
            begin += (end - begin) % stride
        plan.append((start, stop, begin, end))
    return plan
