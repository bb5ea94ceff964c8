"""Per-optimizer adapters for the known ``torch.optim`` classes (see :mod:`.adapter_base`).

* Adam / AdamW call torch's own ``_single_tensor_adam`` with ``capturable=True``, so the traced graph
  is torch's math; its private signature is checked with :func:`inspect.signature` so that a drift
  fails loudly instead of silently changing the math.
* RMSprop and SGD are branch-free tensor-only ports (torch branches in Python on ``momentum > 0``,
  ``weight_decay != 0`` and SGD's first step), tested against torch's functions.
* Adafactor is the tensor-only port in :mod:`coap_compile.capture.adafactor_port`.

Every float hyperparameter is a live 0-d tensor input (see :mod:`.adapter_base`).

Only the exact classes are adapted (a subclass may override ``step``); anything else goes through
:mod:`coap_compile.capture.generic`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from coap_compile.capture import adafactor_port
from coap_compile.capture.adapter_base import Adapter, HyperInput, UpdatePlan
from coap_compile.capture.adapter_base import zeros_states as _zeros

__all__ = ["ADAPTERS", "AdafactorAdapter", "AdamAdapter", "RMSpropAdapter", "SGDAdapter", "check_signatures"]


def _unpack(rest: tuple[Tensor, ...], n_states: int, live: tuple[HyperInput, ...]):
    """``(states, step, lr, {hyper name: 0-d tensor})`` from the update's trailing inputs."""
    states, (step, lr), hv = rest[:n_states], rest[n_states : n_states + 2], rest[n_states + 2 :]
    return list(states), step, lr, dict(zip((h.name for h in live), hv))


def _value(hp: Mapping[str, Any], hv: dict[str, Tensor], h: HyperInput) -> Tensor | float:
    """The live tensor for ``h``, or its (structural, e.g. gated zero) constant."""
    return hv[h.name] if h.name in hv else h.read(hp)


class AdamAdapter(Adapter):
    """Adam / AdamW through ``torch.optim.adam._single_tensor_adam(capturable=True)``.

    ``g = ±grad (+ λ·W for L2)``; ``W ← W(1 − lr·λ)`` (decoupled); ``m ← lerp(m, g, 1−β₁)``;
    ``v ← β₂v + (1−β₂)g²``; ``v̂max ← max(v̂max, v)`` (amsgrad);
    ``W ← W − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`` with ``t = step + 1``.

    β₁, β₂ and ε are passed to torch's function as 0-d tensors (it accepts tensor betas). torch decides
    ``if weight_decay != 0`` with a Python branch, which a tensor cannot answer, so the adapter applies
    the three lines before it (``−grad`` for maximize, then the decoupled factor or the L2 term) with
    the live λ and calls torch's function with ``weight_decay=0``, ``maximize=False``; the rest of the
    update is torch's own code.
    """

    cls = torch.optim.Adam
    math_keys = frozenset({"betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"})
    signature = (
        "params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "grad_scale",
        "found_inf", "amsgrad", "has_complex", "beta1", "beta2", "lr", "weight_decay", "eps", "maximize",
        "capturable", "differentiable", "decoupled_weight_decay",
    )  # fmt: skip
    hypers = (
        HyperInput("beta1", "betas", 0),
        HyperInput("beta2", "betas", 1),
        HyperInput("eps", "eps"),
        HyperInput("weight_decay", "weight_decay"),
    )
    gates = frozenset({"weight_decay"})

    def __init__(self, cls: type[torch.optim.Optimizer] = torch.optim.Adam):
        self.cls = cls

    function_path = "torch.optim.adam._single_tensor_adam"

    def plan(self, hp, dtype, ndim, live=()) -> UpdatePlan:
        self.check_signature()
        amsgrad, maximize = bool(hp["amsgrad"]), bool(hp["maximize"])
        decoupled = bool(hp["decoupled_weight_decay"])
        names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        fn = self.function
        b1, b2, eps, wd = self.hypers

        def update(p: Tensor, g: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
            states, step, lr, hv = _unpack(rest, len(names), live)
            grad = g.neg() if maximize else g
            decay = _value(hp, hv, wd)
            if wd.name in hv:
                if decoupled:
                    p.mul_(1 - lr * decay)
                else:
                    grad = grad + p * decay
            vmax = [states[2]] if amsgrad else []
            fn(
                [p], [grad], [states[0]], [states[1]], vmax, [step], None, None, amsgrad=amsgrad,
                has_complex=False, beta1=_value(hp, hv, b1), beta2=_value(hp, hv, b2), lr=lr,
                weight_decay=0.0, eps=_value(hp, hv, eps), maximize=False, capturable=True,
                differentiable=False, decoupled_weight_decay=decoupled,
            )  # fmt: skip
            return (p, *states, step)

        return UpdatePlan(
            names, update, functools.partial(_zeros, names=names), patch_compiling=True, hypers=live
        )


def _rmsprop_update(
    p: Tensor, g: Tensor, *rest: Tensor, hp: Mapping[str, Any], live: tuple[HyperInput, ...],
    names: tuple[str, ...],
) -> tuple[Tensor, ...]:  # fmt: skip
    """RMSprop, term by term as ``torch.optim.rmsprop._single_tensor_rmsprop``::

        g ← ±grad (+ λ·W)
        s ← α·s + (1−α)·g²
        a = √(s − ḡ²) + ε  with  ḡ ← lerp(ḡ, g, 1−α)   (centered)     else   a = √s + ε
        μ > 0:  b ← μ·b + g/a,   W ← W − lr·b           else   W ← W − lr·g/a

    A port rather than a call because torch branches on ``momentum > 0`` and ``weight_decay != 0`` in
    Python; both are structural here (gates) and the values are live tensors.
    """
    states, step, lr, hv = _unpack(rest, len(names), live)
    by_name = dict(zip(names, states))
    alpha, eps, wd, mom = (_value(hp, hv, h) for h in RMSpropAdapter.hypers)
    grad = g.neg() if hp["maximize"] else g
    if "weight_decay" in hv:
        grad = grad + p * wd
    sq = by_name["square_avg"] * alpha + grad * grad * (1 - alpha)
    new = {"square_avg": sq}
    if hp["centered"]:
        gavg = torch.lerp(by_name["grad_avg"], grad, 1 - alpha)
        new["grad_avg"] = gavg
        avg = (sq - gavg * gavg).sqrt() + eps
    else:
        avg = sq.sqrt() + eps
    if "momentum" in hv:
        buf = by_name["momentum_buffer"] * mom + grad / avg
        new["momentum_buffer"] = buf
        p = p - buf * lr
    else:
        p = p - (grad / avg) * lr
    return (p, *(new[n] for n in names), step + 1)


class RMSpropAdapter(Adapter):
    """RMSprop as the tensor-only port :func:`_rmsprop_update` (checked against torch's function)."""

    cls = torch.optim.RMSprop
    math_keys = frozenset({"alpha", "eps", "weight_decay", "momentum", "centered", "maximize"})
    hypers = (
        HyperInput("alpha", "alpha"),
        HyperInput("eps", "eps"),
        HyperInput("weight_decay", "weight_decay"),
        HyperInput("momentum", "momentum"),
    )
    gates = frozenset({"weight_decay", "momentum"})

    def plan(self, hp, dtype, ndim, live=()) -> UpdatePlan:
        self.check_signature()
        has_mom = any(h.name == "momentum" for h in live)
        names = (
            ("square_avg",)
            + (("momentum_buffer",) if has_mom else ())
            + (("grad_avg",) if hp["centered"] else ())
        )
        update = functools.partial(_rmsprop_update, hp=dict(hp), live=live, names=names)
        return UpdatePlan(names, update, functools.partial(_zeros, names=names), hypers=live)


def _sgd_update(
    p: Tensor, g: Tensor, *rest: Tensor, hp: Mapping[str, Any], live: tuple[HyperInput, ...],
    names: tuple[str, ...],
) -> tuple[Tensor, ...]:  # fmt: skip
    """Branch-free SGD. With ``k = step`` (completed steps) and ``s = min(k, 1)`` (0 on the first step)::

        g ← ±grad (+ λ·W)
        b ← (μ·s)·b + (1 − d·s)·g        (= g on the first step, torch's ``buf = clone(g)``;
                                            = μb + (1−d)g afterwards)
        u = g + μ·b  (nesterov)  or  b
        W ← W − lr·u

    Without momentum there is no state and ``u = g``. The 0-d factors ``μ·s`` and ``1 − d·s`` depend
    on the step and the live μ, d only, so the same graph serves the first and all later steps.
    """
    states, step, lr, hv = _unpack(rest, len(names), live)
    mom, damp, wd = (_value(hp, hv, h) for h in SGDAdapter.hypers)
    grad = g.neg() if hp["maximize"] else g
    if "weight_decay" in hv:
        grad = grad + p * wd
    if names:
        started = step.clamp(max=1)
        buf = states[0] * (started * mom) + grad * (1 - started * damp)
        direction = grad + buf * mom if hp["nesterov"] else buf
        new_states: tuple[Tensor, ...] = (buf,)
    else:
        direction, new_states = grad, ()
    return (p - direction * lr, *new_states, step + 1)


class SGDAdapter(Adapter):
    """SGD as the branch-free port :func:`_sgd_update` (state ``momentum_buffer`` only when μ ≠ 0)."""

    cls = torch.optim.SGD
    math_keys = frozenset({"momentum", "dampening", "weight_decay", "nesterov", "maximize"})
    hypers = (
        HyperInput("momentum", "momentum"),
        HyperInput("dampening", "dampening"),
        HyperInput("weight_decay", "weight_decay"),
    )
    gates = frozenset({"momentum", "weight_decay"})

    def plan(self, hp, dtype, ndim, live=()) -> UpdatePlan:
        self.check_signature()
        names = ("momentum_buffer",) if any(h.name == "momentum" for h in live) else ()
        update = functools.partial(_sgd_update, hp=dict(hp), live=live, names=names)
        return UpdatePlan(names, update, functools.partial(_zeros, names=names), hypers=live)


def _adafactor_init(like: Tensor) -> dict[str, Tensor]:
    """torch's layout: ``row_var`` …×m×1 and ``col_var`` …×1×n for ndim ≥ 2, else ``variance``."""
    if like.dim() < 2:
        return _zeros(like, ("variance",))
    row, col = list(like.shape), list(like.shape)
    row[-1], col[-2] = 1, 1
    return {"row_var": like.new_zeros(row), "col_var": like.new_zeros(col)}


class AdafactorAdapter(Adapter):
    """Adafactor as the tensor-only port in :mod:`coap_compile.capture.adafactor_port`."""

    cls = torch.optim.Adafactor
    math_keys = frozenset({"beta2_decay", "eps", "d", "weight_decay", "maximize"})
    hypers = (
        HyperInput("d", "d"),
        HyperInput("beta2_decay", "beta2_decay"),
        HyperInput("weight_decay", "weight_decay"),
        HyperInput("eps1", "eps", 0),
        HyperInput("eps2", "eps", 1),
    )
    gates = frozenset({"weight_decay"})

    def plan(self, hp, dtype, ndim, live=()) -> UpdatePlan:
        self.check_signature()
        names: tuple[str, ...] = ("row_var", "col_var") if ndim >= 2 else ("variance",)
        fn = (
            adafactor_port.adafactor_factored_update
            if ndim >= 2
            else adafactor_port.adafactor_unfactored_update
        )

        def update(p: Tensor, g: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
            states, step, lr, hv = _unpack(rest, len(names), live)
            kw = {h.name: _value(hp, hv, h) for h in self.hypers}
            return fn(p, g, *states, step, lr, maximize=bool(hp["maximize"]), **kw)

        return UpdatePlan(names, update, _adafactor_init, hypers=live)


ADAPTERS: dict[type[torch.optim.Optimizer], Adapter] = {
    torch.optim.Adam: AdamAdapter(torch.optim.Adam),
    torch.optim.AdamW: AdamAdapter(torch.optim.AdamW),
    torch.optim.RMSprop: RMSpropAdapter(),
    torch.optim.SGD: SGDAdapter(),
    torch.optim.Adafactor: AdafactorAdapter(),
}


def check_signatures() -> None:
    """Run every adapter's drift check (raises :class:`UnsupportedOptimizerError` on the first drift)."""
    for adapter in ADAPTERS.values():
        adapter.check_signature()
