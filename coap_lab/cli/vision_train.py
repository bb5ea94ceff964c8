"""The vision task's optimizers and training loop (``coap-compile demo --task vision``, ``bench vision``).

Task: DDPM noise prediction (:mod:`coap_lab.models.unet`) on patches of matplotlib's sample images
(:mod:`coap_lab.data.images`), ``loss = mean((ε_θ(x_t, t) − ε)²)``. Every run of a seed starts from
the same weights (``build_unet(cfg, seed=seed)``) and sees the same batches, timesteps and noise (one
``torch.Generator`` seeded with ``seed + 1``); the learning rate follows the same warm-up + cosine
schedule; validation uses fixed ``t`` and noise per patch (generator seed 12345), so every optimizer
and every evaluation sees the same validation problem. Only the optimizer differs.

Optimizers (:data:`VISION_OPTIMIZERS`), one shared ``lr`` (``bench vision --tune-lr``: each its own):

* ``adamw``: ``torch.optim.AdamW``;
* ``coap``: COAP-AdamW, ``optimize(model, AdamW, rank_ratio=ρ, conv_rank_ratio=ρ_c)``: the Linear
  weights get matrix COAP, the conv weights above the Tucker threshold Tucker COAP;
* ``coap-adafactor``: COAP over transformers' ``Adafactor(beta1=0.9, relative_step=False,
  scale_parameter=False)`` (the paper's base; ``torch.optim.Adafactor`` when transformers is missing,
  which has no first moment, so COAP keeps ``coap_exp_avg`` and saves nothing on the factored states),
  with ``conv_rank_ratio`` when this build's ``optimize`` has it;
* ``galore``: the GaLore policy over AdamW (SVD refresh every ``update_interval``), matrices only;
* ``adafactor``: the full-rank base of ``coap-adafactor``;
* ``coap-official``: ``coap`` with ``basis="official"`` (LAPACK's signs at every refresh, null directions
  kept: the official code's refresh, issue 19), on request only (not in :data:`VISION_DEFAULT`).

``scale_parameter=False`` makes Adafactor's step size ``lr`` itself (its update RMS is clipped to
``clip_threshold = 1``), comparable with AdamW's at the shared ``lr``.

State bytes are reported twice: the library's memory plan (``memory_plan()``; for the plain optimizers the
plan of the same base with nothing projected, on a meta-device copy of the model) and the bytes really
held in ``optimizer.state`` after training (:func:`coap_lab.cli.memory.measured_state_bytes`).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from coap_lab.cli.memory import measured_state_bytes
from coap_lab.cli.progress import Progress
from coap_lab.cli.train import lr_factor
from coap_lab.data import SAMPLE_IMAGES, PatchSet, load_patches
from coap_lab.models import (
    DDPMSchedule,
    UNet,
    UNetConfig,
    build_unet,
    ddpm_loss,
    demo_unet_config,
    denoise_one_step,
    smoke_unet_config,
)

__all__ = [
    "MODEL_CONFIGS",
    "VISION_DEFAULT",
    "VISION_OPTIMIZERS",
    "VisionConfig",
    "VisionRun",
    "adafactor_base",
    "build_vision_optimizer",
    "load_vision_data",
    "plan_state_bytes",
    "train_vision_run",
    "validation_loss",
    "vision_availability",
]

VISION_OPTIMIZERS = ("adamw", "coap", "coap-adafactor", "galore", "adafactor", "coap-official")
#: ``bench vision`` without ``--optimizers``.
VISION_DEFAULT = VISION_OPTIMIZERS[:5]
MODEL_CONFIGS = {"smoke": smoke_unet_config, "demo": demo_unet_config, "default": UNetConfig}
_VAL_SEED = 12345


@dataclass(frozen=True)
class VisionConfig:
    """One run's settings (everything except the optimizer name and the seed's role)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    eval_every: int = 50
    patch_size: int = 16
    channels: int = 1
    model: str = "demo"
    rank: int | None = None
    rank_ratio: float | None = 4.0
    conv_rank_ratio: float = 4.0
    update_interval: int = 32
    reproject_factor: int = 5
    weight_decay: float = 0.0
    num_timesteps: int = 1000
    denoise_t: int = 150
    samples: int = 8
    seed: int = 0
    device: str = "cpu"
    images: tuple[str, ...] = SAMPLE_IMAGES
    image_root: str | None = None

    def unet_config(self) -> UNetConfig:
        return MODEL_CONFIGS[self.model](in_channels=self.channels)


def adafactor_base(lr: float) -> tuple[type[torch.optim.Optimizer], dict, str]:
    """``(class, kwargs, label)`` of the Adafactor base: transformers' with β₁ = 0.9 when installed."""
    try:
        from transformers.optimization import Adafactor
    except Exception:
        return torch.optim.Adafactor, {"lr": lr}, "torch.optim.Adafactor (transformers not installed)"
    kw = dict(lr=lr, beta1=0.9, relative_step=False, scale_parameter=False, warmup_init=False)
    return Adafactor, kw, "transformers.optimization.Adafactor(beta1=0.9)"


def vision_availability() -> dict[str, str | None]:
    """``{name: None if usable here, else why not}`` (every vision optimizer is built in)."""
    return dict.fromkeys(VISION_OPTIMIZERS)


def build_vision_optimizer(name: str, model: nn.Module, cfg: VisionConfig) -> torch.optim.Optimizer:
    """The optimizer ``name`` (module docstring) for ``model``; raises ValueError for an unknown or
    unavailable name."""
    if name not in VISION_OPTIMIZERS:
        raise ValueError(f"unknown vision optimizer {name!r}; choose from {', '.join(VISION_OPTIMIZERS)}")
    why = vision_availability()[name]
    if why is not None:
        raise ValueError(f"vision optimizer {name!r} is unavailable: {why}")
    import coap_compile

    adamw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    low_rank = dict(
        rank=cfg.rank, rank_ratio=cfg.rank_ratio, update_interval=cfg.update_interval,
        reproject_factor=cfg.reproject_factor,
    )  # fmt: skip
    conv = {"conv_rank_ratio": cfg.conv_rank_ratio}
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **adamw)
    if name in ("coap", "coap-official"):
        basis = {"basis": "official"} if name == "coap-official" else {}
        return coap_compile.optimize(model, torch.optim.AdamW, **low_rank, **conv, **basis, **adamw)
    if name == "galore":
        return coap_compile.optimize(model, torch.optim.AdamW, projection="galore", **low_rank, **adamw)
    cls, kw, _ = adafactor_base(cfg.lr)
    if name == "adafactor":
        return cls(model.parameters(), **kw)
    return coap_compile.optimize(model, cls, **low_rank, **conv, **kw)


def plan_state_bytes(name: str, opt: torch.optim.Optimizer, cfg: VisionConfig) -> int:
    """The memory plan's total: the optimizer's own (COAP rows), or, for a plain optimizer, the planner's
    count of what that base itself keeps (``base_bytes``), on a meta-device copy of the model."""
    plan = getattr(opt, "memory_plan", None)
    if plan is not None:
        return int(plan().total_bytes)
    import coap_compile

    with torch.device("meta"):
        meta = UNet(cfg.unet_config())
    cls, kw = (torch.optim.AdamW, dict(lr=cfg.lr, weight_decay=cfg.weight_decay))
    if name == "adafactor":
        cls, kw, _ = adafactor_base(cfg.lr)
    group = [{"params": list(meta.parameters()), "project": False}]
    return int(coap_compile.optimize(group, cls, **kw).memory_plan().base_bytes)


def load_vision_data(cfg: VisionConfig) -> PatchSet:
    """The patches (raises :class:`~coap_lab.data.ImageDataError` naming a missing/unreadable image)."""
    return load_patches(
        size=cfg.patch_size, channels=cfg.channels, images=cfg.images, root=cfg.image_root, seed=0
    )


def _validation_problem(val: Tensor, num_timesteps: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(_VAL_SEED)
    t = torch.randint(0, num_timesteps, (val.shape[0],), generator=gen)
    return t, torch.randn(val.shape, generator=gen)


@torch.no_grad()
def validation_loss(model: nn.Module, val: Tensor, sched: DDPMSchedule, chunk: int = 64) -> float:
    """``mean((ε_θ(x_t, t) − ε)²)`` over every validation patch with fixed ``t`` and ``ε``."""
    t, noise = _validation_problem(val, sched.num_steps)
    dev = next(model.parameters()).device
    total = 0.0
    for i in range(0, val.shape[0], chunk):
        x0, tt, nn_ = val[i : i + chunk].to(dev), t[i : i + chunk].to(dev), noise[i : i + chunk].to(dev)
        pred = model(sched.q_sample(x0, tt, nn_), tt)
        total += float((pred - nn_).square().sum())
    return total / val.numel()


@dataclass
class VisionRun:
    """One (optimizer, seed) run. ``denoised``: ``(x₀, x_t, x̂₀)`` of the first validation patches (clean,
    noised to ``denoise_t``, one-step denoised; not saved in JSON)."""

    optimizer: str
    seed: int
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    opt_step_times: list[float] = field(default_factory=list)
    plan_bytes: int = 0
    real_bytes: int = 0
    projected: int = 0
    wall_s: float = 0.0
    denoised: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1]

    @property
    def final_train_loss(self) -> float:
        tail = self.train_loss[-max(1, len(self.train_loss) // 10) :]
        return statistics.fmean(tail)

    @property
    def median_step_ms(self) -> float:
        return 1e3 * statistics.median(self.step_times)

    @property
    def median_opt_step_ms(self) -> float:
        return 1e3 * statistics.median(self.opt_step_times)

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("denoised")
        d.update(
            final_val_loss=self.final_val_loss, final_train_loss=self.final_train_loss,
            median_step_ms=self.median_step_ms, median_opt_step_ms=self.median_opt_step_ms,
        )  # fmt: skip
        return d


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_vision_run(name: str, data: PatchSet, cfg: VisionConfig, *, progress: bool = True) -> VisionRun:
    """Train one UNet with optimizer ``name`` (module docstring) and return its curves and numbers."""
    t_start = time.perf_counter()
    device = torch.device(cfg.device)
    model = build_unet(cfg.unet_config(), seed=cfg.seed, device=device)
    opt = build_vision_optimizer(name, model, cfg)
    sched = DDPMSchedule(cfg.num_timesteps)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    train, val = data.train, data.val
    res = VisionRun(name, cfg.seed)
    projected = getattr(opt, "projected_parameters", None)
    res.projected = len(projected()) if projected is not None else 0
    with Progress(cfg.steps, f"{name} s{cfg.seed}", enabled=progress) as bar:
        for step in range(cfg.steps):
            _set_lr(opt, cfg.lr * lr_factor(step, cfg.steps, cfg.warmup, cfg.min_lr_ratio))
            t0 = time.perf_counter()
            x0 = train[torch.randint(0, train.shape[0], (cfg.batch_size,), generator=gen)].to(device)
            loss = ddpm_loss(model, x0, sched, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            res.step_times.append(t2 - t0)
            res.opt_step_times.append(t2 - t1)
            res.train_loss.append(float(loss.item()))
            if not math.isfinite(res.train_loss[-1]):
                raise FloatingPointError(
                    f"{name} (seed {cfg.seed}): the training loss became {res.train_loss[-1]} at step "
                    f"{step + 1}; the learning rate --lr {cfg.lr:g} may be too large"
                )
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                res.val_steps.append(step + 1)
                res.val_loss.append(validation_loss(model, val, sched))
            bar.update(loss=res.train_loss[-1], **({"val": res.val_loss[-1]} if res.val_loss else {}))
    res.real_bytes = measured_state_bytes(opt)
    res.plan_bytes = plan_state_bytes(name, opt, cfg)
    clean = val[torch.linspace(0, val.shape[0] - 1, min(cfg.samples, val.shape[0])).long()].to(device)
    gen_t = torch.Generator().manual_seed(_VAL_SEED + 1)
    res.denoised = (
        clean.cpu(),
        *(t.cpu() for t in denoise_one_step(model, clean, sched, cfg.denoise_t, generator=gen_t)),
    )
    res.wall_s = time.perf_counter() - t_start
    return res
