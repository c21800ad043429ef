"""Non-token models: a deep MLP and a small U-Net-like CNN."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from autopart.models.zoo._common import Built, seeded_build

__all__ = ["MLP", "UNet", "build_cnn", "build_mlp"]


class MLP(nn.Module):
    """``depth`` Linear+GELU layers of equal width, then a linear classifier."""

    def __init__(
        self, in_features: int = 1024, width: int = 1024, depth: int = 8, classes: int = 10
    ):
        super().__init__()
        dims = [in_features] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x)


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm rather than BatchNorm: it has no running statistics to mutate and normalises each
    # sample on its own, so a pipeline that splits the batch into micro-batches computes exactly what
    # the unpartitioned model computes.
    return nn.GroupNorm(8, channels)


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = _norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = _norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(y)))


class _ConvNormReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), _norm(c_out), nn.ReLU()
        )


class UNet(nn.Module):
    """Two-level U-Net: residual blocks, strided-conv downsampling, transposed-conv upsampling, and
    long skips that concatenate encoder features into the decoder. (B, 3, H, W) -> per-pixel
    logits (B, classes, H, W); H and W must divide by 4."""

    def __init__(self, in_channels: int = 3, base: int = 32, classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3 = base, 2 * base, 4 * base
        self.stem = nn.Sequential(_ConvNormReLU(in_channels, c1), _ResBlock(c1))
        self.down1 = nn.Sequential(_ConvNormReLU(c1, c2, stride=2), _ResBlock(c2))
        self.down2 = nn.Sequential(_ConvNormReLU(c2, c3, stride=2), _ResBlock(c3))
        self.up2 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.dec2 = nn.Sequential(_ConvNormReLU(2 * c2, c2), _ResBlock(c2))
        self.up1 = nn.ConvTranspose2d(c2, c1, 2, stride=2)
        self.dec1 = nn.Sequential(_ConvNormReLU(2 * c1, c1), _ResBlock(c1))
        self.head = nn.Conv2d(c1, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.stem(x)  # full resolution
        e2 = self.down1(e1)  # 1/2
        bottom = self.down2(e2)  # 1/4
        d2 = self.dec2(torch.cat((self.up2(bottom), e2), dim=1))
        d1 = self.dec1(torch.cat((self.up1(d2), e1), dim=1))
        return self.head(d1)


def _randn(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor]:
    if device.type == "meta":
        return (torch.empty(shape, device=device, dtype=dtype),)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return (x.to(device=device, dtype=dtype),)


def build_mlp(batch: int, seq: int, device: torch.device, dtype: torch.dtype, seed: int) -> Built:
    with seeded_build(device, seed):
        model = MLP().to(dtype)
    return model, _randn((batch, 1024), device, dtype, seed), {}


def build_cnn(batch: int, seq: int, device: torch.device, dtype: torch.dtype, seed: int) -> Built:
    with seeded_build(device, seed):
        model = UNet().to(dtype)
    return model, _randn((batch, 3, 32, 32), device, dtype, seed), {}
