"""A small UNet noise-prediction model, the DDPM noise schedule, loss and samplers (Ho et al., 2020).

Model ``ε_θ(x_t, t)``: sinusoidal time embedding → MLP; ``conv_in`` (3×3); per resolution level
``blocks_per_level`` residual blocks (GroupNorm → SiLU → 3×3 conv, plus the projected time embedding,
→ GroupNorm → SiLU → 3×3 conv, 1×1 conv skip when the width changes), a stride-2 3×3 conv between
levels; a middle block; the mirrored decoder with skip concatenations and nearest-neighbour 2×
upsampling + 3×3 conv; GroupNorm → SiLU → ``conv_out`` (3×3). With the default width 64 and
multipliers (1, 2), the 3×3 convs are 64×64×3×3 = 36,864 … 128×256×3×3 = 294,912 weights, above the
Tucker threshold (numel > 9216); the decoder's 1×1 skips (e.g. 128×256×1×1) are single-mode Tucker
candidates; ``conv_in``/``conv_out`` (64×C×3×3) stay below it.

Schedule (linear betas, the DDPM paper's)::

    β_t = linspace(β_start, β_end, T)[t],   ᾱ_t = Π_{s ≤ t} (1 − β_s)      (t = 0 … T−1)
    x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε,           ε ~ 𝒩(0, I)
    loss = mean((ε_θ(x_t, t) − ε)²),          t ~ U{0 … T−1}
    one-step denoise:  x̂₀ = (x_t − √(1 − ᾱ_t) ε_θ) / √ᾱ_t
    ancestral step:    x_{t−1} = (x_t − β_t/√(1 − ᾱ_t) ε_θ)/√(1 − β_t) + √β_t z   (z = 0 at t = 0)

All random draws take an explicit ``torch.Generator``, so runs replay exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coap_compile.projection.tucker import MIN_CONV_NUMEL

__all__ = [
    "DDPMSchedule",
    "UNet",
    "UNetConfig",
    "build_unet",
    "conv_weights_above_threshold",
    "ddpm_loss",
    "ddpm_sample",
    "demo_unet_config",
    "denoise_one_step",
    "smoke_unet_config",
    "tiny_unet_config",
]


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the UNet.

    Attributes:
        in_channels: image channels (1 grayscale, 3 RGB).
        base_channels: width of the first level; level ``i`` has ``base_channels · channel_mults[i]``.
        channel_mults: one multiplier per resolution level (the image side must be divisible by
            ``2^(levels − 1)``).
        blocks_per_level: residual blocks per level in the encoder (the decoder has the same number).
        time_dim: width of the time embedding MLP.
        groups: GroupNorm groups (must divide every width).
    """

    in_channels: int = 1
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2)
    blocks_per_level: int = 1
    time_dim: int = 128
    groups: int = 8

    def __post_init__(self) -> None:
        for name in ("in_channels", "base_channels", "blocks_per_level", "time_dim", "groups"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"UNetConfig.{name} must be an int >= 1, got {v!r}")
        if not self.channel_mults or any(not isinstance(m, int) or m < 1 for m in self.channel_mults):
            raise ValueError(f"UNetConfig.channel_mults must be ints >= 1, got {self.channel_mults!r}")
        bad = [self.base_channels * m for m in self.channel_mults if (self.base_channels * m) % self.groups]
        if bad:
            raise ValueError(f"UNetConfig.groups={self.groups} must divide every width, not {bad}")
        if self.time_dim % 2:
            raise ValueError(f"UNetConfig.time_dim must be even, got {self.time_dim}")


def tiny_unet_config(in_channels: int = 1) -> UNetConfig:
    """A configuration for unit tests (24k parameters; no conv above the Tucker threshold)."""
    return UNetConfig(in_channels=in_channels, base_channels=8, channel_mults=(1, 2), time_dim=16, groups=4)


def smoke_unet_config(in_channels: int = 1) -> UNetConfig:
    """The smallest configuration with Tucker candidates, for end-to-end CI runs: widths 8 and 64, so the
    six 3×3 convs at the half resolution (64×64×3×3, 64×128×3×3) exceed 9216 weights; 285k parameters,
    ~45 ms per step (batch 8, 16×16, 1 thread, measured on a loaded 2-core machine)."""
    return UNetConfig(in_channels=in_channels, base_channels=8, channel_mults=(1, 8), time_dim=16, groups=4)


def demo_unet_config(in_channels: int = 1) -> UNetConfig:
    """The benchmark configuration: widths 48 and 96 (13 Tucker candidates, from 48×48×3×3 = 20,736 up to
    96×192×3×3, and the 96×192×1×1 decoder skip, single-mode); 834k parameters; ~0.3 s per step at
    batch 16 on 16×16 patches and ~1.2 s on 32×32 (1 thread, loaded 2-core machine). The default
    :class:`UNetConfig` (widths 64/128, 1.5M parameters) is ~0.45 s at 16×16 and ~1.9 s at 32×32."""
    return UNetConfig(in_channels=in_channels, base_channels=48, channel_mults=(1, 2), time_dim=64, groups=8)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """``[sin(t·ω_i), cos(t·ω_i)]`` with ``ω_i = 10000^(−i/(dim/2))`` (the Transformer/DDPM embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ResBlock(nn.Module):
    """GN → SiLU → conv3 (+ time) → GN → SiLU → conv3, plus a (1×1 when needed) skip."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """``ε_θ(x, t)``: ``x`` is ``B×C×H×W``, ``t`` a ``B`` vector of timesteps; returns ``B×C×H×W``."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim)
        )
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, ch = [], widths[0]
        for i, w in enumerate(widths):
            for _ in range(cfg.blocks_per_level):
                self.down.append(ResBlock(ch, w, cfg.time_dim, cfg.groups))
                ch = w
                skips.append(ch)
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid = ResBlock(ch, ch, cfg.time_dim, cfg.groups)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(cfg.blocks_per_level):
                self.up.append(ResBlock(ch + skips.pop(), w, cfg.time_dim, cfg.groups))
                ch = w
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = nn.GroupNorm(cfg.groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        cfg = self.config
        levels = len(cfg.channel_mults)
        if x.shape[-1] % 2 ** (levels - 1) or x.shape[-2] % 2 ** (levels - 1):
            raise ValueError(
                f"image side must be divisible by {2 ** (levels - 1)}, got {tuple(x.shape[-2:])}"
            )
        temb = self.time_mlp(timestep_embedding(t, cfg.time_dim))
        h = self.conv_in(x)
        skips, blocks = [], iter(self.down)
        for i in range(levels):
            for _ in range(cfg.blocks_per_level):
                h = next(blocks)(h, temb)
                skips.append(h)
            if i < levels - 1:
                h = self.downsample[i](h)
        h = self.mid(h, temb)
        blocks, ups = iter(self.up), iter(self.upsample)
        for i in reversed(range(levels)):
            for _ in range(cfg.blocks_per_level):
                h = next(blocks)(torch.cat([h, skips.pop()], dim=1), temb)
            if i > 0:
                h = next(ups)(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def build_unet(cfg: UNetConfig, *, seed: int = 0, device: torch.device | str | None = None) -> UNet:
    """A UNet with parameters drawn from a private RNG seeded by ``seed`` (global RNG state untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet(cfg)
    return model.to(device) if device is not None else model


def conv_weights_above_threshold(
    model: nn.Module, threshold: int = MIN_CONV_NUMEL
) -> list[tuple[str, tuple]]:
    """``(name, shape)`` of every 4-D parameter with more than ``threshold`` elements (Tucker candidates)."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.ndim == 4 and p.numel() > threshold]


class DDPMSchedule:
    """Linear-beta DDPM schedule (module docstring); tables are float64 on the CPU, cast on use."""

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start!r}, {beta_end!r}")
        self.num_steps = num_steps
        self.betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        self.alpha_bars = torch.cumprod(1 - self.betas, dim=0)

    def _at(self, table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        return table.to(like.device)[t.long()].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε``."""
        ab = self._at(self.alpha_bars, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x̂₀ = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t``."""
        ab = self._at(self.alpha_bars, t, x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


Denoiser = Callable[[Tensor, Tensor], Tensor]


def ddpm_loss(
    model: Denoiser,
    x0: Tensor,
    schedule: DDPMSchedule,
    *,
    generator: torch.Generator,
    t: Tensor | None = None,
) -> Tensor:
    """``mean((ε_θ(x_t, t) − ε)²)`` with ``t`` uniform (unless given) and ``ε`` from ``generator``."""
    if t is None:
        t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=generator, device=generator.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=generator.device)
    t, noise = t.to(x0.device), noise.to(x0.device)
    return F.mse_loss(model(schedule.q_sample(x0, t, noise), t), noise)


@torch.no_grad()
def denoise_one_step(
    model: Denoiser, x0: Tensor, schedule: DDPMSchedule, t: int, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Noise ``x0`` to level ``t`` and predict it back in one step: returns ``(x_t, x̂₀)``."""
    if not 0 <= t < schedule.num_steps:
        raise ValueError(f"t must be in [0, {schedule.num_steps}), got {t!r}")
    ts = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=generator.device).to(x0.device)
    x_t = schedule.q_sample(x0, ts, noise)
    return x_t, schedule.predict_x0(x_t, ts, model(x_t, ts)).clamp(-1, 1)


@torch.no_grad()
def ddpm_sample(
    model: Denoiser,
    schedule: DDPMSchedule,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """Ancestral DDPM sampling from pure noise (``T`` model calls; ``σ_t² = β_t``), clamped to ``[-1, 1]``.

    Noise is drawn on ``generator``'s device and moved to ``device`` (default: the generator's).
    """
    dev = torch.device(device) if device is not None else generator.device

    def noise() -> Tensor:
        return torch.randn(shape, generator=generator, device=generator.device).to(dev)

    x = noise()
    for t in reversed(range(schedule.num_steps)):
        ts = torch.full((shape[0],), t, dtype=torch.long, device=dev)
        beta = float(schedule.betas[t])
        ab = float(schedule.alpha_bars[t])
        x = (x - beta / math.sqrt(1 - ab) * model(x, ts)) / math.sqrt(1 - beta)
        if t > 0:
            x = x + math.sqrt(beta) * noise()
    return x.clamp(-1, 1)
