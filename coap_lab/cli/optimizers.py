"""The one place where the CLI and the benchmarks build optimizers, by name.

* ``adamw``: plain ``torch.optim.AdamW`` (the full-rank baseline).
* ``coap`` / ``galore`` / ``flora``: ``coap_compile.optimize(model, base_optim=torch.optim.AdamW,
  projection=<name>, ...)`` — the same AdamW rewritten with each projection policy;
* ``coap-normalized`` / ``coap-svd-only``: COAP with ``correlation="normalized"`` (a fixed-angle,
  scale-invariant correlation step) or ``"off"`` (low-cost SVD refreshes only); ``dct``: the DCT
  column-selection policy (indices only); ``coap-bf16`` / ``coap-int8``: COAP with bf16 / blockwise 8-bit
  states, every parameter's states included (``coap-int8-rows`` / ``coap-int8-tiles``: int8 with 1×bw row
  blocks / bh×bw tiles, :mod:`coap_compile.storage.int8`); ``coap-official`` / ``galore-official``:
  ``basis="official"`` (the official refresh: LAPACK's signs, null directions kept); ``coap-rotation``:
  ``basis="rotation"``;
* ``galore-torch`` / ``apollo-torch``: the external reference packages (``pip install
  'coap-compile[bench]'``), used only when importable; they project the same matrices as
  ``coap_compile.optimize`` would (:func:`projected_linear_weights`);
* ``adamw8bit-torchao``: torchao's full-rank ``AdamW8bit`` (blockwise 8-bit states, the 8-bit peer).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from coap_compile.projection import resolve_rank  # the official rank rule (one copy)

__all__ = [
    "EXTERNAL",
    "OPTIMIZER_NAMES",
    "BASELINES",
    "PROJECTED",
    "VARIANTS",
    "OptimizerSettings",
    "UnknownOptimizerError",
    "availability",
    "build_optimizer",
    "projected_linear_weights",
    "resolve_rank",
]

PROJECTED = ("coap", "galore", "flora")
#: coap_compile.optimize keyword arguments of every projected name (the policy and its options).
VARIANTS: dict[str, dict[str, object]] = {
    "coap": {"projection": "coap"},
    "galore": {"projection": "galore"},
    "flora": {"projection": "flora"},
    "coap-normalized": {"projection": "coap", "correlation": "normalized"},
    "coap-svd-only": {"projection": "coap", "correlation": "off"},
    "dct": {"projection": "dct"},
    "coap-bf16": {"projection": "coap", "state_precision": "bf16"},
    "coap-int8": {"projection": "coap", "state_precision": "int8"},
    # the two int8 block shapes, explicitly (issue 18: rows blocks are shard-local under FSDP2)
    "coap-int8-rows": {"projection": "coap", "state_precision": "int8", "quant_blocks": "rows"},
    "coap-int8-tiles": {"projection": "coap", "state_precision": "int8", "quant_blocks": "tiles"},
    # int8 states with a bf16 P on float32 weights: the per-rank memory goal of issue 18 (P is then the
    # largest term left); issue 19 measured a bf16 P moving the trajectory, so it is not the default
    "coap-int8-bf16p": {"projection": "coap", "state_precision": "int8", "projection_precision": "bf16"},
    "coap-per-matrix": {"projection": "coap", "grouped": False},  # the ungrouped update (runtime/grouped.py)
    # backend="inductor": the fused CPU lowering of load -> update -> store (coap_compile.lowering.inductor)
    "coap-inductor": {"projection": "coap", "backend": "inductor"},
    "coap-bf16-inductor": {"projection": "coap", "state_precision": "bf16", "backend": "inductor"},
    "coap-int8-inductor": {"projection": "coap", "state_precision": "int8", "backend": "inductor"},
    # basis="official": LAPACK's signs at every refresh, null directions kept (the official code, issue 19)
    "coap-official": {"projection": "coap", "basis": "official"},
    "coap-rotation": {"projection": "coap", "basis": "rotation"},
    "galore-official": {"projection": "galore", "basis": "official"},
}
EXTERNAL = {
    "galore-torch": "galore_torch",
    "apollo-torch": "apollo_torch",
    "adamw8bit-torchao": "torchao.optim",
}
#: torch.optim.AdamW with its defaults for the device, and with ``foreach=True``.
BASELINES = ("adamw", "adamw-foreach")
OPTIMIZER_NAMES = (*BASELINES, *VARIANTS, *EXTERNAL)


class UnknownOptimizerError(ValueError):
    """An optimizer name outside :data:`OPTIMIZER_NAMES`, or one whose package is not installed."""


@dataclass(frozen=True)
class OptimizerSettings:
    """Hyperparameters shared by every optimizer in a comparison (AdamW semantics).

    ``rank``/``rank_ratio``: one must be given for projected optimizers; ``rank_ratio`` wins
    (``r = max(⌊min(m, n) / ratio⌋, 1)``), otherwise ``r = min(rank, min(m, n))``.
    ``target_modules``: regular expressions searched in module names; the matching modules' 2-D weights
    are projected (None: every ``nn.Linear`` whose rank would be below its smaller dimension).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    rank: int | None = None
    rank_ratio: float | None = None
    update_interval: int = 32
    reproject_factor: int = 5
    scale: float = 1.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank}")
        if self.rank_ratio is not None and not self.rank_ratio >= 1:
            raise ValueError(f"rank ratio must be >= 1, got {self.rank_ratio}")
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")


def projected_linear_weights(
    model: nn.Module, rank: int | None, rank_ratio: float | None, target_modules: Sequence[str] | None = None
) -> dict[str, int]:
    """``{parameter name: rank}`` for the weights a projected optimizer compresses (written independently
    of ``coap_compile.optimize`` from its documented rule, so the two can be checked against each other).

    * ``target_modules`` None: the weight of every ``nn.Linear`` whose rank is strictly below its
      smaller dimension (a full-rank "projection" saves nothing);
    * ``target_modules`` given (regular expressions searched in module names): the 2-D weight of every
      matching module, with the rank clamped to the smaller dimension.

    Embedding weights (and a head tied to one) are never projected.
    """
    patterns = [re.compile(t) for t in target_modules] if target_modules is not None else None
    names = {id(p): n for n, p in reversed(list(model.named_parameters()))}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: dict[str, int] = {}
    for mod_name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or w.ndim != 2 or id(w) in embeddings or not w.requires_grad:
            continue
        r = resolve_rank(w.shape, rank, rank_ratio)
        if patterns is None:
            if isinstance(mod, nn.Linear) and r < min(w.shape):
                chosen[names[id(w)]] = r
        elif any(p.search(mod_name) for p in patterns):
            chosen[names[id(w)]] = r
    return chosen


def availability(names: Sequence[str] | None = None) -> dict[str, str | None]:
    """``{name: None if usable else the reason it is not}`` for every name in :data:`OPTIMIZER_NAMES`.

    External peers in ``names`` (all of them when ``None``) are imported to check them; the others are
    only looked up (``importlib.util.find_spec``), so a command that does not ask for galore-torch or
    apollo-torch never imports them (issue 14: +40 MiB when installed).
    """
    status: dict[str, str | None] = dict.fromkeys(BASELINES)
    try:
        import coap_compile

        ok = callable(getattr(coap_compile, "optimize", None))
        reason = None if ok else "coap_compile.optimize is not available in this build"
    except Exception as exc:  # an import error anywhere in the package makes all three unusable
        reason = f"coap_compile.optimize failed to import: {exc}"
    for name in VARIANTS:
        status[name] = reason
    for name, module in EXTERNAL.items():
        hint = "pip install 'coap-compile[bench]'"
        try:
            if names is None or name in names:
                importlib.import_module(module)
            elif importlib.util.find_spec(module.partition(".")[0]) is None:  # a parent would be imported
                raise ModuleNotFoundError(f"No module named {module!r}")
            status[name] = None
        except Exception as exc:
            status[name] = f"{name} is not installed ({type(exc).__name__}: {exc}); {hint}"
    return status


def _check_name(name: str) -> None:
    if name not in OPTIMIZER_NAMES:
        raise UnknownOptimizerError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZER_NAMES)}")


def _external(name: str, model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    """GaLore/APOLLO reference optimizers: one projected group per distinct rank, the rest plain AdamW;
    torchao's AdamW8bit on every parameter."""
    if name == "adamw8bit-torchao":
        from torchao.optim import AdamW8bit

        return AdamW8bit(model.parameters(), lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
    chosen = projected_linear_weights(model, s.rank, s.rank_ratio, s.target_modules)
    named = dict(model.named_parameters())
    regular = [p for n, p in named.items() if n not in chosen and p.requires_grad]
    groups: list[dict] = [{"params": regular}]
    interval = s.update_interval  # the refresh period, as for coap_compile's galore/flora policies
    for r in sorted(set(chosen.values())):
        params = [named[n] for n, rr in chosen.items() if rr == r]
        group = {
            "params": params,
            "rank": r,
            "update_proj_gap": interval,
            "scale": s.scale,
            "proj_type": "std",
        }
        if name == "apollo-torch":
            group.update(proj="random", scale_type="channel")
        groups.append(group)
    kwargs = {"lr": s.lr, "betas": s.betas, "eps": s.eps, "weight_decay": s.weight_decay}
    if name == "galore-torch":
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(groups, **kwargs)
    from apollo_torch import APOLLOAdamW

    return APOLLOAdamW(groups, **kwargs)


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    update_interval: int = 32,
    reproject_factor: int = 5,
    scale: float = 1.0,
    target_modules: Sequence[str] | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` for ``model`` (module docstring; :class:`OptimizerSettings`).

    Raises:
        UnknownOptimizerError: ``name`` is unknown or its implementation is not importable.
        ValueError: a bad hyperparameter, or a projected optimizer without ``rank`` or ``rank_ratio``.
    """
    _check_name(name)
    s = OptimizerSettings(
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        rank=rank,
        rank_ratio=rank_ratio,
        update_interval=update_interval,
        reproject_factor=reproject_factor,
        scale=scale,
        target_modules=tuple(target_modules) if target_modules is not None else None,
    )
    if name in BASELINES:
        return torch.optim.AdamW(
            model.parameters(), lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay,
            foreach=True if name == "adamw-foreach" else None,
        )  # fmt: skip
    if s.rank is None and s.rank_ratio is None:
        raise ValueError(f"optimizer {name!r} needs a rank or a rank ratio")
    reason = availability([name])[name]
    if reason is not None:
        raise UnknownOptimizerError(f"optimizer {name!r} is unavailable: {reason}")
    if name in EXTERNAL:
        return _external(name, model, s)
    import coap_compile

    return coap_compile.optimize(
        model,
        base_optim=torch.optim.AdamW,
        rank=s.rank,
        rank_ratio=s.rank_ratio,
        **VARIANTS[name],
        update_interval=s.update_interval,
        reproject_factor=s.reproject_factor,
        scale=s.scale,
        target_modules=list(s.target_modules) if s.target_modules is not None else None,
        lr=s.lr,
        betas=s.betas,
        eps=s.eps,
        weight_decay=s.weight_decay,
    )
