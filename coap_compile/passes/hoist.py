"""Scalar hoisting and CSE: turn a :class:`Decomposition` into a kernel :class:`~coap_compile.ir.Epilogue`.

Every maximal sub-expression whose free symbols are only ``k``, ``lr`` and the live hyperparameters
(bias corrections ``1 − β₁ᵗ``, step sizes, the decay ``1 − lr·λ``, step-0 indicators) becomes a fresh
scalar ``c_i`` computed once per step on the host. For a flattened ``Add``/``Mul`` the scalar
operands are grouped first, so ``m·lr·√(1−β₂ᵗ)/(1−β₁ᵗ)`` hoists to ``m·c4``. The remaining
elementwise code is run through ``sympy.cse``. The result for AdamW is six scalars (``1−β₁``, ``β₂``,
``1−β₂``, ``−ε√(1−β₂ᵗ)``, ``lr√(1−β₂ᵗ)/(1−β₁ᵗ)``, ``1−lr·λ``) and a three-line body
``m' = m − c0 (m − g); v' = c1 v + c2 g²; D = c4 m' / (c3 − √v')``.

Only updates with no opaque (reduction) symbol get an epilogue; others return None and run their
low-rank middle with the eager lowering.
"""

from __future__ import annotations

import sympy

from ..ir import LR, STEP, Epilogue, G
from .decompose import Decomposition, K, X, state_symbol

__all__ = ["build_epilogue", "hoist"]

_SCALARS = frozenset({STEP, LR})


def hoist(
    exprs: list[sympy.Expr], table: dict[sympy.Expr, sympy.Symbol], scalars: frozenset = _SCALARS
) -> list[sympy.Expr]:
    """Replace maximal sub-expressions over ``scalars`` only with symbols ``c<i>`` recorded in ``table``."""

    def name_for(e):
        if e not in table:
            table[e] = sympy.Symbol(f"c{len(table)}")
        return table[e]

    def is_scalar(e):
        return bool(e.free_symbols) and e.free_symbols <= scalars

    def walk(e):
        if e.is_Atom:
            return name_for(e) if is_scalar(e) else e
        if is_scalar(e):
            return name_for(e)
        if isinstance(e, (sympy.Add, sympy.Mul)):
            sc = [a for a in e.args if is_scalar(a)]
            rest = [walk(a) for a in e.args if not is_scalar(a)]
            if sc:
                rest.append(name_for(e.func(*sc)))
            return e.func(*rest)
        return e.func(*[walk(a) for a in e.args])

    return [walk(e) for e in exprs]


def build_epilogue(dec: Decomposition, state_names: tuple[str, ...]) -> Epilogue | None:
    """The kernel epilogue for ``dec``, or None when the update has cross-element reductions."""
    if dec.opaque_nodes:
        return None
    scalars = _SCALARS | frozenset(dec.hypers)
    sub = {X: G, K: STEP - 1}
    new_states = [dec.new_states[n].subs(sub) for n in state_names]
    delta = dec.delta.subs(sub)
    decay = dec.decay.subs(sub)
    table: dict[sympy.Expr, sympy.Symbol] = {}
    *new_states, delta, decay = hoist([*new_states, delta, decay], table, scalars)
    body: list[tuple[sympy.Symbol, sympy.Expr]] = []
    reps, reduced = sympy.cse(new_states, symbols=sympy.numbered_symbols("t"), optimizations="basic")
    body += reps
    targets = []
    for name, e in zip(state_names, reduced):
        target = state_symbol(name, new=True)
        body.append((target, e))
        targets.append(target)
    reps, (delta_r,) = sympy.cse([delta], symbols=sympy.numbered_symbols("u"), optimizations="basic")
    body += reps
    update = sympy.Symbol("D")
    body.append((update, delta_r))
    return Epilogue(
        state_names=tuple(state_names),
        scalars=tuple((sym, e) for e, sym in table.items()),
        body=tuple(body),
        new_states=tuple(targets),
        update=update,
        decay=decay,
        scale=1.0,
        hypers=tuple(str(h) for h in dec.hypers),
    )
