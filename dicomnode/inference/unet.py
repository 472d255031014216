"""A compact 3D U-Net: the architecture behind :class:`~dicomnode.inference.segmenter.UNetSegmenter`.

Contract:

- input: float32 tensor ``(N, in_channels, Z, Y, X)``, already normalised by the model's
  :class:`~dicomnode.inference.spec.PreprocessSpec` (axes in the Volume's (z, y, x) order);
- output: raw logits ``(N, num_classes, Z, Y, X)`` on the same grid; class 0 is background, class ``i`` is the
  spec's ``label_values[i - 1]``;
- each spatial size must be divisible by ``2 ** depth`` (the sliding-window runner only feeds patches of the
  spec's patch size, which is checked against this when the model is built).

Normalisation is BatchNorm: in eval mode it is a fixed per-channel affine map, so a voxel's output depends
only on its receptive field, never on the rest of the patch (sliding-window and whole-volume inference agree
up to border effects). The architecture is described by :class:`UNetConfig`, saved beside the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`UNet3D`; ``channels[i]`` is the width of encoder level ``i``."""

    in_channels: int = 1
    num_classes: int = 3
    channels: tuple[int, ...] = (8, 16, 32, 64)

    @property
    def depth(self) -> int:
        """Number of 2x down-samplings (levels minus one)."""
        return len(self.channels) - 1

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UNetConfig:
        return cls(
            in_channels=int(raw["in_channels"]),
            num_classes=int(raw["num_classes"]),
            channels=tuple(int(c) for c in raw["channels"]),
        )


class _DoubleConv(nn.Sequential):
    """(Conv3d 3x3x3 -> BatchNorm -> LeakyReLU) twice; keeps the spatial size."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv3d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm3d(c_out),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm3d(c_out),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet3D(nn.Module):
    """Encoder-decoder with skip connections; max-pool down, transposed-conv up, concatenation skips."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if len(config.channels) < 2:
            raise ValueError("a U-Net needs at least two levels")
        self.config = config
        ch = config.channels
        self.encoders = nn.ModuleList()
        c_prev = config.in_channels
        for c in ch:
            self.encoders.append(_DoubleConv(c_prev, c))
            c_prev = c
        self.pool = nn.MaxPool3d(2)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(len(ch) - 2, -1, -1):
            self.ups.append(nn.ConvTranspose3d(ch[level + 1], ch[level], kernel_size=2, stride=2))
            self.decoders.append(_DoubleConv(2 * ch[level], ch[level]))
        self.head = nn.Conv3d(ch[0], config.num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, decoder in zip(self.ups, self.decoders, strict=True):
            x = up(x)
            x = decoder(torch.cat([skips.pop(), x], dim=1))
        out: torch.Tensor = self.head(x)
        return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(int(p.numel()) for p in model.parameters() if p.requires_grad)
