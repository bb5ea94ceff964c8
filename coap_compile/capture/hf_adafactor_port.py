"""A tensor-only, traceable port of ``transformers.optimization.Adafactor``'s per-parameter update.

transformers' ``Adafactor.step`` keeps a Python ``int`` ``step`` and a 0-d ``RMS`` in its state and
combines them with ``math.pow``, ``math.sqrt`` and Python ``min``/``max``, so it cannot be captured as is.
This port computes the same update as a pure function of tensors, positional-only::

    (param, grad, *states, step, lr, *hyper) -> (param', *states', step + 1)

``states`` are ``exp_avg`` (when ``beta1`` is not None), then ``exp_avg_sq_row``, ``exp_avg_sq_col``
(``ndim ≥ 2``, transformers' shapes ``shape[:-1]`` and ``shape[:-2] + shape[-1:]``) or ``exp_avg_sq``
(``ndim ≤ 1``); ``step`` is the 0-d float64 count of *completed* steps (0 on the first update); ``lr`` is
0-d float64 (ignored when ``relative_step``, as transformers ignores the group lr then); ``hyper`` are 0-d
float64 tensors (or Python floats, see below) in the order of :func:`hyper_names`: ``beta1`` (only when
not None), ``decay_rate``, ``eps1``, ``eps2``, ``clip_threshold``, ``weight_decay``. Structural flags
(``beta1 is None``, ``scale_parameter``, ``relative_step``, ``warmup_init``) are Python constants and
``factored`` is ``param.ndim ≥ 2``. No ``.item()``, no numel constant, no Python branch on a value.

Math (``t = step + 1``; ``RMS(x) = √mean(x²)``; ``ε₁, ε₂ = eps``; ``d = clip_threshold``)::

    ρ_t    = lr                         or, relative_step: min(1e-6·t if warmup_init else 1e-2, 1/√t)
    α_t    = ρ_t · max(ε₂, RMS(W))      (scale_parameter; else α_t = ρ_t; W before this step)
    β₂ₜ    = 1 − t^decay_rate           (0 at t = 1)
    u      = G² + ε₁
    factored:   R ← β₂ₜ R + (1−β₂ₜ) mean_{-1}(u),   C ← β₂ₜ C + (1−β₂ₜ) mean_{-2}(u)
                U = rsqrt(R / mean_{-1}(R))[…, None] · rsqrt(C)[…, None, :] · G
    otherwise:  V ← β₂ₜ V + (1−β₂ₜ) u,   U = rsqrt(V) · G
    U      ← α_t · U / max(1, RMS(U)/d)
    beta1:      M ← β₁ M + (1−β₁) U,   U ← M
    W      ← W − λ α_t W − U             (λ = weight_decay, decay applied to W before subtracting U)

Half-precision parameters follow transformers: the gradient is upcast to float32, the states are
float32 (:func:`init` creates them so), the arithmetic runs on a float32 copy of ``W`` and the result
is rounded back.

State mapping. transformers' ``step`` (int, completed steps) is the port's ``step`` tensor (float64,
exact up to 2⁵³). transformers' ``RMS`` is not carried: it is overwritten with ``RMS(W)`` at every
step before it is read, so it holds no information across steps; the port recomputes it.
:func:`from_hf_state` / :func:`to_hf_state` convert (``RMS`` is written as ``RMS(W)`` of the given
weight, which transformers overwrites again before use).

Numerical differences (term by term the same math): ``RMS`` as ``√mean(x²)`` instead of
``‖x‖/√numel`` (no shape constant in the graph); the EMAs as ``β·s + (1−β)·x`` instead of the fused
``mul_``/``add_(alpha=)``; ``α_t`` in float64 where transformers forms it from a float32 0-d ``RMS``.
A live (tensor) weight decay is always applied as ``W − (λ α_t) W``: exactly ``W`` when ``λ = 0``
(transformers skips it with a Python ``if``). Any ``hyper`` may instead be a Python float, a constant
baked into the graph (for an adapter that treats a value as structural, e.g. ``weight_decay = 0.0``,
which then skips the term as transformers does). Measured errors: tests/test_hf_adafactor_port.py.

**First moment and COAP** (the analysis the compiler relies on). transformers' ``exp_avg`` is an EMA
of the *update* ``U = α_t · clip(V̂^{-1/2} ⊙ G)``, not of the gradient, so it is not "first-moment
like" in the sense ``s' = a·s + b·x`` of ``passes/decompose.py`` (``U`` is a nonlinear function of
``x``: rsqrt of the factored second moment, an RMS clip). It can still be compressed: in the projected
update every quantity ``U`` depends on is available in the low-rank space — ``x̃ = X P`` (``m×r``), the
low-rank factors ``R`` (``m``) and ``C`` (``r``) of ``x̃²``, ``RMS(Ũ)`` over the ``m×r`` update — plus
0-d scalars (``t``, ``lr``, ``RMS(W)`` of the full weight, a parameter statistic). Hence
``M̃' = β₁ M̃ + (1−β₁) Ũ(x̃, R̃, C̃, t, lr, RMS(W))`` is a closed recurrence in ``m×r`` and
``W' = (1 − λ α_t) W − scale · M̃' Pᵀ`` (``Δ`` free of ``W`` apart from the 0-d ``RMS(W)``). This is
exactly the official COAP-Adafactor (spec §8): second moment, clipping and the EMA all in projected
space. It is *not* the projection of transformers' full-rank moment (``Ũ ≠ U P``: the normalisation
and the clip do not commute with ``P``), so COAP-Adafactor is a different optimizer from
Adafactor-then-project, as with every projected adaptive method. Consequences for the compiler:
(1) the classifier must accept ``s' = a·s + b·f`` with ``f`` any function of the projected quantities
(``f`` = the update) as the state the correlation step reads — COAP's cosine is scale invariant per
fibre, so the ``α_t`` factor inside ``M`` does not matter, but the sign and direction do, and ``M`` has
the direction of the clipped, preconditioned update; (2) ``restore_state`` may map ``M`` linearly
between bases (it is a linear coordinate of ``M̃ Pᵀ``), while ``R``/``C`` are not mapped (as in the
official code); (3) with ``scale_parameter`` the decay and ``Δ`` read the 0-d ``RMS(W)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "HYPER_NAMES",
    "check_hf_hyperparams",
    "from_hf_state",
    "hf_adafactor_update",
    "hyper_names",
    "hyper_tensors",
    "init",
    "make_update",
    "state_names",
    "to_hf_state",
]

#: Every float hyperparameter, in input order (``beta1`` is left out when it is None).
HYPER_NAMES: tuple[str, ...] = ("beta1", "decay_rate", "eps1", "eps2", "clip_threshold", "weight_decay")
_HALF = (torch.float16, torch.bfloat16)


def hyper_names(use_first_moment: bool) -> tuple[str, ...]:
    """The names of the ``hyper`` inputs, in order."""
    return HYPER_NAMES if use_first_moment else HYPER_NAMES[1:]


def state_names(*, use_first_moment: bool, factored: bool) -> tuple[str, ...]:
    """transformers' state keys (``step``/``RMS`` excluded), in input order."""
    second = ("exp_avg_sq_row", "exp_avg_sq_col") if factored else ("exp_avg_sq",)
    return (("exp_avg",) if use_first_moment else ()) + second


def init(like: Tensor, *, use_first_moment: bool) -> dict[str, Tensor]:
    """Fresh zero states for a parameter like ``like`` (float32 for half params; any device, meta too)."""
    dtype = torch.float32 if like.dtype in _HALF else like.dtype
    shape = tuple(like.shape)
    out: dict[str, Tensor] = {}
    if use_first_moment:
        out["exp_avg"] = like.new_zeros(shape, dtype=dtype)
    if like.dim() >= 2:
        out["exp_avg_sq_row"] = like.new_zeros(shape[:-1], dtype=dtype)
        out["exp_avg_sq_col"] = like.new_zeros(shape[:-2] + shape[-1:], dtype=dtype)
    else:
        out["exp_avg_sq"] = like.new_zeros(shape, dtype=dtype)
    return out


def check_hf_hyperparams(hp: Mapping[str, Any]) -> None:
    """Refuse settings transformers rejects or fails on, naming the value (ValueError/TypeError)."""
    lr, rel, warm = hp.get("lr"), bool(hp.get("relative_step", True)), bool(hp.get("warmup_init", False))
    if lr is not None and rel:
        raise ValueError(f"lr={lr!r} cannot be combined with relative_step=True (transformers refuses it)")
    if warm and not rel:
        raise ValueError("warmup_init=True requires relative_step=True (transformers refuses it)")
    if lr is None and not rel:
        raise ValueError(
            "lr=None with relative_step=False: give an lr "
            "(transformers fails with a TypeError at the first step)"
        )
    eps = hp.get("eps", (1e-30, 1e-3))
    if not isinstance(eps, list | tuple) or len(eps) != 2 or any(e is None for e in eps):
        raise TypeError(f"eps must be a pair of floats (eps1, eps2), got {eps!r}")
    beta1 = hp.get("beta1")
    if beta1 is not None and not 0 <= float(beta1) < 1:
        raise ValueError(f"beta1 must be None or in [0, 1), got {beta1!r}")


def hyper_tensors(hp: Mapping[str, Any], *, device: torch.device | str = "cpu") -> tuple[Tensor, ...]:
    """The ``hyper`` inputs (0-d float64) from a transformers-style param group."""
    eps1, eps2 = hp.get("eps", (1e-30, 1e-3))
    values = {
        "beta1": hp.get("beta1"),
        "decay_rate": hp.get("decay_rate", -0.8),
        "eps1": eps1,
        "eps2": eps2,
        "clip_threshold": hp.get("clip_threshold", 1.0),
        "weight_decay": hp.get("weight_decay", 0.0),
    }
    names = hyper_names(values["beta1"] is not None)
    return tuple(torch.tensor(float(values[n]), dtype=torch.float64, device=device) for n in names)


def _rms(x: Tensor) -> Tensor:
    return x.mul(x).mean().sqrt()


def hf_adafactor_update(
    param: Tensor,
    grad: Tensor,
    /,
    *rest: Tensor,
    use_first_moment: bool,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
) -> tuple[Tensor, ...]:
    """One transformers-Adafactor step (module docstring); pure: nothing is modified in place."""
    factored = param.dim() >= 2
    n_states = len(state_names(use_first_moment=use_first_moment, factored=factored))
    n_hyper = len(hyper_names(use_first_moment))
    if len(rest) != n_states + 2 + n_hyper:
        raise TypeError(
            f"expected {n_states} states, step, lr and {n_hyper} hyperparameters, got {len(rest)}"
        )
    states, (step, lr), hyper = rest[:n_states], rest[n_states : n_states + 2], rest[n_states + 2 :]
    if use_first_moment:
        beta1, decay_rate, eps1, eps2, clip, wd = hyper
    else:
        beta1, (decay_rate, eps1, eps2, clip, wd) = None, hyper
    g = grad.float() if grad.dtype in _HALF else grad
    w = param.float() if param.dtype in _HALF else param
    t = step + 1
    if relative_step:
        rho = torch.minimum(t * 1e-6, t.rsqrt()) if warmup_init else t.rsqrt().clamp(max=1e-2)
    else:
        rho = lr
    if scale_parameter:
        rms_w = _rms(w)
        alpha = rho * (torch.maximum(eps2, rms_w) if isinstance(eps2, Tensor) else rms_w.clamp(min=eps2))
    else:
        alpha = rho
    beta2t = 1 - t.pow(decay_rate)
    u = g * g + eps1
    if factored:
        row, col = states[-2], states[-1]
        row = row * beta2t + u.mean(dim=-1) * (1 - beta2t)
        col = col * beta2t + u.mean(dim=-2) * (1 - beta2t)
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
        update = r_factor * col.unsqueeze(-2).rsqrt() * g
        new_second: tuple[Tensor, ...] = (row, col)
    else:
        var = states[-1] * beta2t + u * (1 - beta2t)
        update = var.rsqrt() * g
        new_second = (var,)
    update = update / (_rms(update) / clip).clamp(min=1.0)
    update = update * alpha
    new_first: tuple[Tensor, ...] = ()
    if use_first_moment:
        update = states[0] * beta1 + update * (1 - beta1)
        new_first = (update,)
    if isinstance(wd, Tensor) or wd != 0:
        w = w + w * (-(wd * alpha))
    w = w - update
    return (w.to(param.dtype), *new_first, *new_second, t)


def make_update(
    *, use_first_moment: bool, scale_parameter: bool, relative_step: bool, warmup_init: bool
) -> Callable[..., tuple[Tensor, ...]]:
    """:func:`hf_adafactor_update` with the structural flags bound (positional-only, for tracing)."""
    if warmup_init and not relative_step:
        raise ValueError("warmup_init=True requires relative_step=True")
    flags = dict(
        use_first_moment=bool(use_first_moment),
        scale_parameter=bool(scale_parameter),
        relative_step=bool(relative_step),
        warmup_init=bool(warmup_init),
    )

    def update(*args: Tensor) -> tuple[Tensor, ...]:
        return hf_adafactor_update(*args, **flags)

    return update


def from_hf_state(state: Mapping[str, Any], *, use_first_moment: bool, factored: bool) -> dict[str, Tensor]:
    """transformers' per-parameter state → the port's (``step`` as 0-d float64; ``RMS`` dropped)."""
    out = {n: state[n] for n in state_names(use_first_moment=use_first_moment, factored=factored)}
    out["step"] = torch.tensor(float(state["step"]), dtype=torch.float64)
    return out


def to_hf_state(states: Mapping[str, Tensor], param: Tensor) -> dict[str, Any]:
    """The port's state → transformers' (``step`` int, ``RMS = RMS(param)``; see module docstring)."""
    out: dict[str, Any] = {n: v for n, v in states.items() if n != "step"}
    out["step"] = int(states["step"].item())
    out["RMS"] = _rms(param.detach().float() if param.dtype in _HALF else param.detach())
    return out
