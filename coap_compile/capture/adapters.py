"""Per-optimizer adapters for the known ``torch.optim`` classes (see :mod:`.adapter_base`).

* Adam / AdamW and RMSprop call torch's own ``_single_tensor_*`` function with ``capturable=True``,
  so the traced graph is torch's math; their private signatures are checked with
  :func:`inspect.signature` so that a drift fails loudly instead of silently changing the math.
* SGD is a branch-free port (torch's first step takes a Python branch, see :func:`_sgd_update`).
* Adafactor is the tensor-only port in :mod:`coap_compile.capture.adafactor_port`.

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
from coap_compile.capture.adapter_base import Adapter, UpdatePlan
from coap_compile.capture.adapter_base import zeros_states as _zeros

__all__ = ["ADAPTERS", "AdafactorAdapter", "AdamAdapter", "RMSpropAdapter", "SGDAdapter", "check_signatures"]


class AdamAdapter(Adapter):
    """Adam / AdamW through ``torch.optim.adam._single_tensor_adam(capturable=True)``.

    ``g = ±grad (+ λ·W for L2)``; ``W ← W(1 − lr·λ)`` (decoupled); ``m ← lerp(m, g, 1−β₁)``;
    ``v ← β₂v + (1−β₂)g²``; ``v̂max ← max(v̂max, v)`` (amsgrad);
    ``W ← W − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`` with ``t = step + 1``.
    """

    cls = torch.optim.Adam
    math_keys = frozenset({"betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"})
    signature = (
        "params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "grad_scale",
        "found_inf", "amsgrad", "has_complex", "beta1", "beta2", "lr", "weight_decay", "eps", "maximize",
        "capturable", "differentiable", "decoupled_weight_decay",
    )  # fmt: skip

    def __init__(self, cls: type[torch.optim.Optimizer] = torch.optim.Adam):
        self.cls = cls

    function_path = "torch.optim.adam._single_tensor_adam"

    def plan(self, hp: Mapping[str, Any], dtype: torch.dtype, ndim: int) -> UpdatePlan:
        self.check_signature()
        amsgrad = bool(hp["amsgrad"])
        names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        fn = self.function
        beta1, beta2 = hp["betas"]
        kwargs = dict(
            amsgrad=amsgrad, has_complex=False, beta1=beta1, beta2=beta2, weight_decay=hp["weight_decay"],
            eps=hp["eps"], maximize=bool(hp["maximize"]), capturable=True, differentiable=False,
            decoupled_weight_decay=bool(hp["decoupled_weight_decay"]),
        )  # fmt: skip

        def update(p: Tensor, g: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
            *states, step, lr = rest
            vmax = [states[2]] if amsgrad else []
            fn([p], [g], [states[0]], [states[1]], vmax, [step], None, None, lr=lr, **kwargs)
            return (p, *states, step)

        return UpdatePlan(names, update, functools.partial(_zeros, names=names), patch_compiling=True)


class RMSpropAdapter(Adapter):
    """RMSprop through ``torch.optim.rmsprop._single_tensor_rmsprop(capturable=True)``.

    ``g = ±grad (+ λ·W)``; ``s ← αs + (1−α)g²``; centered: ``ḡ ← lerp(ḡ, g, 1−α)``, ``a = √(s − ḡ²) + ε``
    else ``a = √s + ε``; momentum μ > 0: ``b ← μb + g/a``, ``W ← W − lr·b``; else ``W ← W − lr·g/a``.
    """

    cls = torch.optim.RMSprop
    math_keys = frozenset({"alpha", "eps", "weight_decay", "momentum", "centered", "maximize"})
    signature = (
        "params", "grads", "square_avgs", "grad_avgs", "momentum_buffer_list", "state_steps", "lr",
        "alpha", "eps", "weight_decay", "momentum", "centered", "maximize", "differentiable", "capturable",
        "has_complex",
    )  # fmt: skip

    function_path = "torch.optim.rmsprop._single_tensor_rmsprop"

    def plan(self, hp: Mapping[str, Any], dtype: torch.dtype, ndim: int) -> UpdatePlan:
        self.check_signature()
        has_mom, centered = hp["momentum"] > 0, bool(hp["centered"])
        names = (
            ("square_avg",) + (("momentum_buffer",) if has_mom else ()) + (("grad_avg",) if centered else ())
        )
        fn = self.function
        kwargs = dict(
            alpha=hp["alpha"], eps=hp["eps"], weight_decay=hp["weight_decay"], momentum=hp["momentum"],
            centered=centered, maximize=bool(hp["maximize"]), differentiable=False, capturable=True,
            has_complex=False,
        )  # fmt: skip

        def update(p: Tensor, g: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
            *states, step, lr = rest
            by_name = dict(zip(names, states))
            mom = [by_name["momentum_buffer"]] if has_mom else []
            gavg = [by_name["grad_avg"]] if centered else []
            fn([p], [g], [by_name["square_avg"]], gavg, mom, [step], lr=lr, **kwargs)
            return (p, *states, step)

        return UpdatePlan(names, update, functools.partial(_zeros, names=names), patch_compiling=True)


def _sgd_update(
    p: Tensor, g: Tensor, *rest: Tensor, momentum: float, dampening: float, weight_decay: float,
    nesterov: bool, maximize: bool,
) -> tuple[Tensor, ...]:  # fmt: skip
    """Branch-free SGD. With ``k = step`` (completed steps) and ``s = min(k, 1)`` (0 on the first step)::

        g ← ±grad (+ λ·W)
        b ← (μ·s)·b + (1 − d·s)·g        (= g on the first step, torch's ``buf = clone(g)``;
                                            = μb + (1−d)g afterwards)
        u = g + μ·b  (nesterov)  or  b
        W ← W − lr·u

    Without momentum there is no state and ``u = g``. The 0-d factors ``μ·s`` and ``1 − d·s`` depend
    on the step only, so the same graph serves the first and all later steps.
    """
    *states, step, lr = rest
    grad = g.neg() if maximize else g
    if weight_decay != 0:
        grad = grad.add(p, alpha=weight_decay)
    if momentum != 0:
        started = step.clamp(max=1)
        buf = states[0] * (started * momentum)
        buf = buf + grad * (1 - started * dampening) if dampening != 0 else buf + grad
        direction = grad.add(buf, alpha=momentum) if nesterov else buf
        new_states: tuple[Tensor, ...] = (buf,)
    else:
        direction, new_states = grad, ()
    return (p - direction * lr, *new_states, step + 1)


class SGDAdapter(Adapter):
    """SGD as the branch-free port :func:`_sgd_update` (state ``momentum_buffer`` only when μ ≠ 0)."""

    cls = torch.optim.SGD
    math_keys = frozenset({"momentum", "dampening", "weight_decay", "nesterov", "maximize"})

    def plan(self, hp: Mapping[str, Any], dtype: torch.dtype, ndim: int) -> UpdatePlan:
        self.check_signature()
        names = ("momentum_buffer",) if hp["momentum"] != 0 else ()
        update = functools.partial(
            _sgd_update, momentum=hp["momentum"], dampening=hp["dampening"], weight_decay=hp["weight_decay"],
            nesterov=bool(hp["nesterov"]), maximize=bool(hp["maximize"]),
        )  # fmt: skip
        return UpdatePlan(names, update, functools.partial(_zeros, names=names))


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

    def plan(self, hp: Mapping[str, Any], dtype: torch.dtype, ndim: int) -> UpdatePlan:
        self.check_signature()
        eps1, eps2 = hp["eps"]
        kwargs = dict(
            d=hp["d"], beta2_decay=hp["beta2_decay"], weight_decay=hp["weight_decay"], eps1=eps1, eps2=eps2,
            maximize=bool(hp["maximize"]),
        )  # fmt: skip
        if ndim >= 2:
            fn = functools.partial(adafactor_port.adafactor_factored_update, **kwargs)
            names: tuple[str, ...] = ("row_var", "col_var")
        else:
            fn = functools.partial(adafactor_port.adafactor_unfactored_update, **kwargs)
            names = ("variance",)
        return UpdatePlan(names, lambda *a: fn(*a), _adafactor_init)


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
