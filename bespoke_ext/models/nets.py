"""Small networks for the embedded models: an MLP for 2-D data and a two-resolution U-Net.

Both are plain networks ``net(x, t) -> f`` with f of x's shape; whether f is a velocity, a noise or a
data prediction is decided at training time and turned into a velocity by ``VelocityAdapter``.
Time t may be 0-dim or [B]; everything is differentiable in x and t.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._time import as_time, per_sample_time

__all__ = ["SinusoidalTimeEmbedding", "MLPVelocity", "UNetVelocity", "NETS", "build_net"]


class SinusoidalTimeEmbedding(nn.Module):
    """emb(t) = [sin(w_j t), cos(w_j t)], w_j = scale * max_period^(-j / half), j = 0..half-1.

    t in [0, 1] is multiplied by ``scale`` (1000) so that the highest frequency resolves the fine
    time differences a solver visits; smooth in t, so the network is differentiable in t.
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = scale * torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t: [B]
        arg = t[:, None] * self.freqs.to(t.dtype)[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class MLPVelocity(nn.Module):
    """MLP for low-dimensional data: f(x, t) = MLP([x, emb(t)]), SiLU activations.

    Args: dim (data dimension), hidden (width), layers (hidden layers), time_dim (embedding size).
    """

    def __init__(self, dim: int = 2, hidden: int = 256, layers: int = 4, time_dim: int = 64):
        super().__init__()
        if dim < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"MLPVelocity needs dim, hidden, layers >= 1, got {dim}, {hidden}, {layers}")
        self.dim = dim
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        mods = [nn.Linear(dim + time_dim, hidden), nn.SiLU()]
        for _ in range(layers - 1):
            mods += [nn.Linear(hidden, hidden), nn.SiLU()]
        mods.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, t, **extras) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}], got {tuple(x.shape)}")
        t = per_sample_time(as_time(t, x), x.shape[0])
        return self.net(torch.cat([x, self.time_embed(t)], dim=-1))


def _groups(channels: int, groups: int) -> int:
    # GroupNorm needs groups | channels; fall back to the largest divisor not above the request.
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> (+ time projection) -> GN -> SiLU -> conv3x3, plus a skip path."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in, groups), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out, groups), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of the low-resolution level (global context)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, HW, C]
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class UNetVelocity(nn.Module):
    """A small U-Net with two resolutions (H x W and H/2 x W/2) for 1x28x28 or 1x8x8 images.

    in-conv -> ResBlock(c0) [skip] -> down(stride 2) -> ResBlock(c1) -> [attention] -> ResBlock(c1)
    -> up(transposed conv 2x2) -> concat skip -> ResBlock(c0) -> GN, SiLU, out-conv.
    The time embedding (sinusoidal -> MLP) is added in every ResBlock. Height and width must be even.
    Class-conditional with ``num_classes`` > 0: a learned label embedding is added to the time
    embedding, and ``forward(x, t, y=labels)`` takes integer labels [B] in [0, num_classes]; the index
    ``num_classes`` is the null label (the unconditional model of classifier-free guidance, learned by
    label dropout), which is also what a missing ``y`` means.

    Args:
        in_channels: image channels; channels: (c0, c1) widths of the two levels;
        time_dim: embedding width; groups: GroupNorm groups; attention: self-attention at H/2;
        num_classes: class labels of a class-conditional model (0: unconditional).
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64), time_dim: int = 128,
                 groups: int = 8, attention: bool = True, num_classes: int = 0):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 2 or min(channels) < 1:
            raise ValueError(f"channels must be two positive widths (c0, c1), got {channels}")
        c0, c1 = channels
        self.in_channels = in_channels
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        self.label_embed = nn.Embedding(num_classes + 1, time_dim) if num_classes else None
        self.time_embed = nn.Sequential(
            SinusoidalTimeEmbedding(time_dim), nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.down_block = ResBlock(c0, c0, time_dim, groups)
        self.down = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.mid1 = ResBlock(c0, c1, time_dim, groups)
        self.attn = SelfAttention(c1, groups) if attention else nn.Identity()
        self.mid2 = ResBlock(c1, c1, time_dim, groups)
        self.up = nn.ConvTranspose2d(c1, c0, 2, stride=2)  # cheaper than upsample + 3x3 conv at full size
        self.up_block = ResBlock(2 * c0, c0, time_dim, groups)
        self.norm_out = nn.GroupNorm(_groups(c0, groups), c0)
        self.conv_out = nn.Conv2d(c0, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t, y=None, **extras) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W] with even H, W, got {tuple(x.shape)}")
        t = per_sample_time(as_time(t, x), x.shape[0])
        temb = self.time_embed(t)
        if self.label_embed is not None:
            temb = temb + self.label_embed(self._labels(y, x))
        elif y is not None:
            raise ValueError("y: this UNetVelocity is unconditional (num_classes 0) and takes no labels")
        h0 = self.down_block(self.conv_in(x), temb)                 # H x W
        h = self.mid1(self.down(h0), temb)                          # H/2 x W/2
        h = self.mid2(self.attn(h), temb)
        h = self.up(h)
        h = self.up_block(torch.cat([h, h0], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _labels(self, y, x: torch.Tensor) -> torch.Tensor:
        """Labels [B] (long) on x's device; None means the null label."""
        b = x.shape[0]
        if y is None:
            return torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
        y = torch.as_tensor(y, device=x.device)
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if y.dim() == 0:
            y = y.expand(b)
        if y.shape != (b,):
            raise ValueError(f"y must be labels [B] = [{b}] (or one label), got shape {tuple(y.shape)}")
        return y.long()


NETS = {"MLPVelocity": MLPVelocity, "UNetVelocity": UNetVelocity}


def build_net(class_name: str, kwargs: dict) -> nn.Module:
    """Construct a network from its class name and constructor kwargs (as stored in a model card)."""
    if class_name not in NETS:
        raise ValueError(f"architecture: unknown class {class_name!r}; expected one of {sorted(NETS)}")
    try:
        return NETS[class_name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"architecture: bad kwargs for {class_name}: {kwargs!r} ({exc})") from exc
