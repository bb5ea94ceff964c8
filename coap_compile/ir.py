"""The lowered form of a projected update, shared by the rewrite pass and the backends.

The rewrite pass (``coap_compile.passes``) turns a base optimizer's per-parameter update into

    X̃ = X P                                  (projection; X is the canonical M×N gradient view)
    s_i' = f_i(X̃, s, c)                       (low-rank states, elementwise, M×r)
    D    = h(X̃, s, s', c)                     (normalized low-rank update, M×r)
    W   ← decay · W + scale · D Pᵀ             (reprojection, full space)

where ``c = (c_0, …, c_{k-1})`` are *hoisted scalars*: 0-d quantities that depend only on the step
counter, the learning rate and the live hyperparameters (β₁, ε, …, symbols named in
``Epilogue.hypers``), computed once per step on the host side as a float32 vector and passed to
kernels by pointer (so a new step, lr or hyperparameter value never recompiles anything).

:class:`Epilogue` is that elementwise middle part as straight-line sympy code. Symbol names are fixed:

* ``g``            the projected-gradient element (``acc`` of the ``X @ P`` matmul);
* state names      (e.g. ``exp_avg``) the old value of each low-rank state;
* ``c0, c1, …``    hoisted scalars; ``step``, ``lr`` and the hyperparameter symbols appear only inside
  :attr:`Epilogue.scalars`.

Only updates without cross-element reductions have an :class:`Epilogue` (AdamW, Adam, RMSprop, SGD);
updates with reductions (Adafactor) run their low-rank middle part eagerly between the two matmuls.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import sympy
import torch
from torch import Tensor

__all__ = ["Epilogue", "evaluate_epilogue", "evaluate_scalars"]

G = sympy.Symbol("g")
STEP = sympy.Symbol("step")
LR = sympy.Symbol("lr")


@dataclass(frozen=True)
class Epilogue:
    """Straight-line elementwise code for the low-rank update of one base optimizer.

    Attributes:
        state_names: the low-rank states, in kernel-argument order.
        scalars: ``(c_i, expr)`` pairs; ``expr`` uses only ``step`` (the 1-based step number of the
            update being applied), ``lr``, the symbols of ``hypers`` and numbers. Evaluated on the
            host, see :func:`evaluate_scalars`.
        body: ordered ``(target, expr)`` assignments; an ``expr`` uses ``g``, state symbols, scalar
            symbols and earlier targets. Operations are ``+ * /``, powers with exponent ``2, -1, 1/2,
            -1/2``, ``Abs``, ``Max``/``Min`` and ``sign`` only.
        new_states: for each state (same order as ``state_names``), the target holding its new value.
        update: the target holding ``D``.
        decay: the scalar symbol (or the number 1) multiplying ``W`` before the update is added.
        scale: the constant multiplying ``D Pᵀ`` (COAP's ``scale`` times the sign the base applies).
        hypers: names of the live hyperparameter symbols, in the order their values are passed.
    """

    state_names: tuple[str, ...]
    scalars: tuple[tuple[sympy.Symbol, sympy.Expr], ...]
    body: tuple[tuple[sympy.Symbol, sympy.Expr], ...]
    new_states: tuple[sympy.Symbol, ...]
    update: sympy.Symbol
    decay: sympy.Expr
    scale: float
    hypers: tuple[str, ...] = ()

    @property
    def scalar_symbols(self) -> tuple[sympy.Symbol, ...]:
        return tuple(s for s, _ in self.scalars)

    @property
    def scalar_args(self) -> tuple[sympy.Symbol, ...]:
        """The inputs of the scalar expressions: ``step``, ``lr``, then the hyperparameters."""
        return (STEP, LR, *(sympy.Symbol(h) for h in self.hypers))

    def key(self) -> str:
        """A stable text form (used to hash generated kernels)."""
        parts = [",".join(self.state_names), ",".join(self.hypers)]
        parts += [f"{s}={sympy.srepr(e)}" for s, e in self.scalars]
        parts += [f"{s}={sympy.srepr(e)}" for s, e in self.body]
        parts += [
            ",".join(map(str, self.new_states)),
            str(self.update),
            sympy.srepr(self.decay),
            repr(self.scale),
        ]
        return ";".join(parts)


def _fold(op):
    """n-ary Max/Min over tensors and numbers; numbers take the first tensor's dtype and device."""

    def f(*args):
        like = next((a for a in args if isinstance(a, Tensor)), torch.zeros((), dtype=torch.float64))
        vals = [
            a if isinstance(a, Tensor) else torch.as_tensor(float(a), dtype=like.dtype, device=like.device)
            for a in args
        ]
        out = vals[0]
        for v in vals[1:]:
            out = op(out, v)
        return out

    return f


class _TorchSign(sympy.Function):
    """``sign`` for lambdify: sympy prints ``sign`` as ``math.copysign``, which fails on tensors."""


_TORCH_FUNCS = {
    "sqrt": torch.sqrt,
    "Abs": torch.abs,
    "_TorchSign": torch.sign,
    "Max": _fold(torch.maximum),
    "Min": _fold(torch.minimum),
    "exp": torch.exp,
    "log": torch.log,
}


@functools.lru_cache(maxsize=512)
def _lambdify(args: tuple[sympy.Symbol, ...], expr: sympy.Expr):
    expr = expr.replace(sympy.sign, _TorchSign)
    return sympy.lambdify(args, expr, modules=[_TORCH_FUNCS, "math"])


def evaluate_scalars(ep: Epilogue, step: Tensor, lr: Tensor, hypers: Sequence[Tensor] = ()) -> Tensor:
    """The hoisted scalars ``c`` as a float32 vector, computed in float64 from 0-d ``step``, ``lr`` and
    the live hyperparameters (in ``ep.hypers`` order)."""
    if len(hypers) != len(ep.hypers):
        raise ValueError(f"the epilogue reads hyperparameters {ep.hypers}, got {len(hypers)} values")
    args = (step.double(), lr.double(), *(torch.as_tensor(h).double() for h in hypers))
    vals = []
    for _, expr in ep.scalars:
        v = _lambdify(ep.scalar_args, expr)(*args)
        vals.append(torch.as_tensor(v, dtype=torch.float64, device=step.device))
    if not vals:
        return torch.zeros(0, dtype=torch.float32, device=step.device)
    return torch.stack(vals).float()


def evaluate_epilogue(
    ep: Epilogue, g: Tensor, states: Sequence[Tensor], c: Tensor
) -> tuple[list[Tensor], Tensor]:
    """Run the epilogue with torch ops (the oracle for generated kernels). Returns (new states, D)."""
    env: dict[str, object] = {"g": g}
    env.update(zip(ep.state_names, states))
    env.update({str(s): c[i] for i, s in enumerate(ep.scalar_symbols)})
    for target, expr in ep.body:
        syms = tuple(sorted(expr.free_symbols, key=str))
        val = _lambdify(syms, expr)(*[env[str(s)] for s in syms])
        env[str(target)] = val if isinstance(val, Tensor) else torch.full_like(g, float(val))
    return [env[str(s)] for s in ep.new_states], env[str(ep.update)]
