"""Split the captured update into ``p' = decay·p + Δ`` and prove it can run in the projected space.

Symbols: ``param`` (p), ``grad`` (g), one per state (``exp_avg`` …), ``k`` (completed steps), ``lr``,
one per live hyperparameter (``beta1``, ``eps``, ``weight_decay`` …: runtime inputs, so every proof
below holds for all of their values), and ``x``, the *projection point*: the value that gets
projected, ``X = G`` for most optimizers and ``X = G + λ·W`` for Adam with L2 weight decay. Opaque
nodes (reductions, …) are symbols ``o_<node>``.

For a candidate projection point (tried in topological order, starting with the gradient itself) the
update is *projectable* when, with the candidate pinned to ``x``:

1. no output depends on ``grad`` except through ``x``;
2. every new state is free of ``param`` (states can only live in the low-rank space if they never
   read the full weight);
3. ``p'`` is affine in ``param``: ``∂²p'/∂p² = 0``; then ``decay = ∂p'/∂p`` must be a scalar
   (depends on ``k``, ``lr`` and 0-d statistics of the weight only) and ``Δ = p'|_{p=0}`` is free of
   ``param`` — the proof that the update direction does not depend on the weight;
4. an opaque node that reads ``param`` is a 0-d *parameter statistic* (e.g. Adafactor's RMS(W)),
   computed on the full weight.

States are classified for COAP's correlation step and ``restore_state``:
``first_moment`` when ``s' = a·s + b·x`` and ``second_moment`` when ``s' = a·s + b·x²`` (scalar ``a``,
``b``); anything else is ``other``.

**Adapter hints** (``hints``, from :attr:`~coap_compile.capture.adapter_base.UpdatePlan.state_kinds`).
Some bases keep a first moment the classifier above cannot see: transformers' Adafactor averages its
clipped, preconditioned *update* ``u = f(x, second moments, …)``, not ``x``. An adapter may then hint
``{"exp_avg": "first_moment"}``. The hint is applied only where the classification is ``other`` and only
when the state is a linear recurrence ``s' = a·s + u`` in something: ``∂²s'/∂s² = 0``, ``a = ∂s'/∂s`` a
nonzero scalar, and neither ``a`` nor ``u = s'|_{s=0}`` reads ``s`` (also not through a reduction)
while ``u`` reads ``x``. That is exactly what the runtime relies on: the correlation step reads the
state as a direction in the projected space, and ``restore_state`` maps it linearly between bases
(``s`` is a linear coordinate of ``s Pᵀ``). A hint that does not hold, names no state, contradicts a
proven kind or asks for another kind is refused (:class:`UnsupportedOptimizerError` naming the state).

With symbolic hyperparameters the tests are identities in them: ``∂²p'/∂p² = 0``, ``∂Δ/∂p = 0`` and
the moment forms hold for every value of β, ε, λ, …, and ``decay``/``a``/``b`` are scalar expressions
of them. The one assumption is the reading of a *moment*: ``first_moment`` means ``s`` averages ``x``
when ``b ≠ 0`` (e.g. ``β₁ ∈ [0, 1)`` for Adam); with ``b = 0`` (β₁ = 1) the state never changes and
the correlation step reads a constant. Zero-ness of a gated hyperparameter (``weight_decay``,
``momentum``) is structural: a zero is the constant 0 in the graph, not a symbol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sympy
import torch.fx

from ..errors import UnsupportedOptimizerError
from .analysis import GraphFacts
from .symbolic import translate

__all__ = ["GRAD", "HINTABLE_KINDS", "K", "LR", "PARAM", "X", "Decomposition", "decompose", "state_symbol"]

PARAM, GRAD, X, K, LR = (sympy.Symbol(n) for n in ("param", "grad", "x", "k", "lr"))
SCALARS = frozenset({K, LR})  # plus the unit's hyperparameter symbols (Decomposition.scalars)
#: The state kinds an adapter may hint (see the module docstring).
HINTABLE_KINDS = frozenset({"first_moment"})


def state_symbol(name: str, new: bool = False) -> sympy.Symbol:
    return sympy.Symbol(f"{name}_new" if new else name)


@dataclass(frozen=True)
class Decomposition:
    """The derived form of one base update (all expressions in sympy)."""

    proj_point: str  # node name of the projection point
    x_expr: sympy.Expr  # the projected quantity in terms of grad, param, k, lr
    decay: sympy.Expr
    delta: sympy.Expr  # in terms of x, states, <state>_new, k, lr, opaque symbols
    new_states: dict[str, sympy.Expr]
    new_step: sympy.Expr
    exprs: dict[str, sympy.Expr]  # every node's expression with the projection point pinned to x
    param_stats: frozenset[str]  # opaque nodes that are 0-d statistics of the full weight
    state_kinds: dict[str, str]
    hypers: tuple[sympy.Symbol, ...] = ()  # live hyperparameter symbols, in placeholder order
    hinted: frozenset[str] = frozenset()  # states whose kind comes from a checked adapter hint

    @property
    def scalars(self) -> frozenset[sympy.Symbol]:
        """The per-step scalar symbols: ``k``, ``lr`` and the live hyperparameters."""
        return SCALARS | frozenset(self.hypers)

    @property
    def opaque_nodes(self) -> frozenset[str]:
        names = set()
        for e in (self.decay, self.delta, *self.new_states.values(), self.new_step):
            names |= {str(s)[2:] for s in e.free_symbols if str(s).startswith("o_")}
        return frozenset(names)


def _blend_scalar_piecewise(e: sympy.Expr, scalars: frozenset) -> sympy.Expr:
    """``Piecewise((a, cond), (b, True))`` with a scalar-only ``cond`` → ``c·a + (1−c)·b``, where
    ``c = Piecewise((1, cond), (0, True))`` is a scalar (hoisted to the host later)."""

    def blend(pw):
        (a, cond), (b, _) = pw.args
        if cond.free_symbols <= scalars:
            c = sympy.Piecewise((1, cond), (0, True))
            return c * a + (1 - c) * b
        return pw

    return e.replace(lambda s: isinstance(s, sympy.Piecewise) and len(s.args) == 2, blend)


def _classify_state(name: str, e: sympy.Expr, scalar_syms: set) -> str:
    s = state_symbol(name)
    if not (e.free_symbols - scalar_syms) <= {s, X} or X not in e.free_symbols:
        return "other"
    a = sympy.diff(e, s)
    if not a.free_symbols <= scalar_syms:
        return "other"
    rest = sympy.expand(e - a * s)
    b1 = sympy.diff(rest, X)
    if b1.free_symbols <= scalar_syms and sympy.expand(rest - b1 * X) == 0:
        return "first_moment"
    b2 = sympy.diff(rest, X, 2) / 2
    if b2.free_symbols <= scalar_syms and sympy.expand(rest - b2 * X**2) == 0:
        return "second_moment"
    return "other"


class _Reject(Exception):
    def __init__(self, node: str, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


class _BadHint(_Reject):
    """An adapter hint that does not hold: stops the search (no other projection point is tried)."""


def _recurrence_failure(name: str, e: sympy.Expr, scalar_syms: set, deps: dict[str, set]) -> str | None:
    """Why ``e`` (the new value of state ``name``) is not ``a·s + u`` (module docstring), or None."""
    s = state_symbol(name)
    if sympy.diff(e, s, 2) != 0:
        return "its new value is not affine in the state"
    a = sympy.diff(e, s)
    if a == 0:
        return "its new value does not read the state (no recurrence)"
    if not a.free_symbols <= scalar_syms or s in _expand_deps(a, deps):
        return f"its coefficient {a} is not a scalar"
    u = e.subs(s, 0)
    full = _expand_deps(u, deps)
    if s in full:
        return "the averaged term reads the state (through a reduction)"
    if X not in full:
        return "the averaged term does not read the projected quantity x"
    return None


def _apply_hints(
    kinds: dict[str, str], hints: Mapping[str, str], new_states: dict, scalar_syms: set, deps, state_outs
) -> frozenset[str]:
    """Apply the checked hints to ``kinds`` in place; returns the hinted states (raises :class:`_BadHint`)."""
    hinted = set()
    for name, kind in sorted(hints.items()):
        if name not in new_states:
            raise _BadHint(
                "output", f"state-kind hint for {name!r}, which is not a state ({sorted(new_states)})"
            )
        where = f"state-kind hint {name!r} -> {kind!r}"
        if kind not in HINTABLE_KINDS:
            raise _BadHint(state_outs[name], f"{where}: only {sorted(HINTABLE_KINDS)} can be hinted")
        if kinds[name] == kind:
            continue
        if kinds[name] != "other":
            raise _BadHint(state_outs[name], f"{where} contradicts its proven kind {kinds[name]!r}")
        why = _recurrence_failure(name, new_states[name], scalar_syms, deps)
        if why is not None:
            raise _BadHint(
                state_outs[name], f"{where} refused: state {name!r} is not a linear recurrence ({why})"
            )
        kinds[name] = kind
        hinted.add(name)
    return frozenset(hinted)


def _try_candidate(
    graph, facts: GraphFacts, cand: str, base_leaves, opaque_pred, val_ndim, hypers: tuple[sympy.Symbol, ...],
    hints: Mapping[str, str] | None = None,
) -> Decomposition:  # fmt: skip
    """The decomposition with node ``cand`` pinned to the projection point ``x``, or :class:`_Reject`.

    Checks 1–4 of the module docstring in this order: the opaque nodes (:func:`_parameter_statistics`),
    the new states (:func:`_state_updates`), then ``p' = decay·p + Δ`` (:func:`_weight_update`); the
    first failure is the rejection. The states are then classified and the adapter's hints applied."""
    scalars = SCALARS | frozenset(hypers)
    ex, ex_new, state_outs = _pinned_expressions(graph, facts, cand, base_leaves, opaque_pred)
    deps = _opaque_dependencies(graph, ex)
    param_stats = _parameter_statistics(deps, tuple(state_outs), val_ndim)
    new_states = _state_updates(graph, ex, state_outs, scalars, deps)
    decay, delta, scalar_like = _weight_update(
        graph, ex, ex_new[facts.outputs[0]], facts.outputs[0], scalars, deps, param_stats, val_ndim
    )
    scalar_syms = set(scalar_like)
    kinds = {name: _classify_state(name, e, scalar_syms) for name, e in new_states.items()}
    hinted = _apply_hints(kinds, hints or {}, new_states, scalar_syms, deps, state_outs)
    return Decomposition(
        proj_point=cand,
        x_expr=translate(graph, base_leaves, opaque_pred)[cand],
        decay=decay,
        delta=delta,
        new_states=new_states,
        new_step=ex[facts.outputs[-1]],
        exprs=ex,
        param_stats=frozenset(param_stats),
        state_kinds=kinds,
        hypers=hypers,
        hinted=hinted,
    )


def _pinned_expressions(
    graph, facts: GraphFacts, cand: str, base_leaves, opaque_pred
) -> tuple[dict[str, sympy.Expr], dict[str, sympy.Expr], dict[str, str]]:
    """``(ex, ex_new, state_outs)``: every node's expression with ``cand`` pinned to ``x``; the same with
    each new-state output (other than a placeholder or ``cand``) pinned to its symbol ``<state>_new``
    (so ``p'`` may read the new states, as Adam's ``p' = p − lr·m'/(√v' + ε)`` does); and each state's
    output node, by state name in placeholder order."""
    leaves = dict(base_leaves)
    leaves[cand] = X
    ex = translate(graph, leaves, opaque_pred)
    state_order = [r.split(":", 1)[1] for r in facts.roles.values() if r.startswith("state:")]
    state_outs = dict(zip(state_order, facts.outputs[1:-1]))
    leaves_new = dict(leaves)
    for name in state_order:
        out = state_outs[name]
        if facts.kinds.get(out) != "placeholder" and out != cand:
            leaves_new[out] = state_symbol(name, new=True)
    return ex, translate(graph, leaves_new, opaque_pred), state_outs


def _opaque_dependencies(graph, ex: dict[str, sympy.Expr]) -> dict[str, set]:
    """For each opaque node ``o_<name>`` of ``ex``: the leaf symbols it ultimately depends on (through its
    operands, opaque operands expanded recursively)."""
    deps: dict[str, set] = {}
    for node in graph.nodes:
        if ex.get(node.name) is not None and str(ex[node.name]) == f"o_{node.name}":
            syms: set = set()
            for a in node.all_input_nodes:
                syms |= _expand_deps(ex[a.name], deps)
            deps[node.name] = syms
    return deps


def _parameter_statistics(deps: dict[str, set], states: tuple[str, ...], val_ndim) -> set[str]:
    """The opaque nodes that are 0-d statistics of the full weight (check 4: they read ``param`` but not
    ``x`` or a state); an opaque node reading the raw gradient is rejected (check 1)."""
    param_stats = set()
    for name, syms in deps.items():
        if GRAD in syms:
            raise _Reject(name, "reads the raw gradient instead of the projected quantity")
        if PARAM in syms:
            if val_ndim(name) != 0 or syms & ({X} | {state_symbol(s) for s in states}):
                raise _Reject(
                    name, "combines the weight with the gradient or a state outside a 0-d statistic"
                )
            param_stats.add(name)
    return param_stats


def _check_free(e: sympy.Expr, deps: dict[str, set], out_name: str, what: str) -> None:
    """Check 1 for ``e``: it reads ``grad`` only through ``x`` (opaque nodes expanded)."""
    if GRAD in _expand_deps(e, deps):
        raise _Reject(out_name, f"{what} reads the gradient other than through the projected quantity")


def _state_updates(
    graph, ex: dict[str, sympy.Expr], state_outs: dict[str, str], scalars: frozenset, deps: dict[str, set]
) -> dict[str, sympy.Expr]:
    """Each state's new value ``s'`` (scalar-condition ``Piecewise`` blended), checked free of ``grad``
    (check 1) and of ``param`` (check 2: a state read elementwise from the weight cannot be low-rank)."""
    new_states = {}
    for name, out in state_outs.items():
        e = _blend_scalar_piecewise(ex[out], scalars)
        _check_free(e, deps, out, f"state {name!r}")
        if PARAM in e.free_symbols:
            raise _Reject(
                _first_param_mixer(graph, ex, out, scalars),
                f"state {name!r} depends elementwise on the weight, so it cannot live in the low-rank space",
            )
        new_states[name] = e
    return new_states


def _weight_update(
    graph, ex, p_expr: sympy.Expr, out: str, scalars: frozenset, deps: dict[str, set], param_stats: set[str],
    val_ndim,
) -> tuple[sympy.Expr, sympy.Expr, set]:  # fmt: skip
    """``(decay, Δ, scalar-like symbols)`` of the new weight ``p' = p_expr`` (check 3).

    ``∂²p'/∂p² = 0`` (affine in the weight); ``decay = ∂p'/∂p`` may read only scalar-like symbols: the
    per-step scalars, the parameter statistics and 0-d opaque nodes of scalars (and the weight);
    ``Δ = p'|_{p=0}`` must read ``grad`` only through ``x`` and not the weight at all."""
    p_new = _blend_scalar_piecewise(p_expr, scalars)
    if sympy.diff(p_new, PARAM, 2) != 0:
        raise _Reject(
            _first_param_mixer(graph, ex, out, scalars), "the new weight is not affine in the weight"
        )
    decay = sympy.diff(p_new, PARAM)
    scalar_like = (
        scalars
        | {sympy.Symbol(f"o_{n}") for n in param_stats}
        | {sympy.Symbol(f"o_{n}") for n in deps if val_ndim(n) == 0 and not (deps[n] - scalars - {PARAM})}
    )
    if not decay.free_symbols <= scalar_like:
        raise _Reject(out, f"the weight multiplier {decay} is not a scalar")
    delta = sympy.together(p_new.subs(PARAM, 0))
    _check_free(delta, deps, out, "the update")
    if PARAM in delta.free_symbols:
        raise _Reject(
            _first_param_mixer(graph, ex, out, scalars), "the update direction depends on the weight"
        )
    return decay, delta, scalar_like


def _expand_deps(e: sympy.Expr, deps: dict[str, set]) -> set:
    out = set()
    for s in e.free_symbols:
        name = str(s)
        if name.startswith("o_") and name[2:] in deps:
            out |= deps[name[2:]]
        else:
            out.add(s)
    return out


def _first_param_mixer(graph, ex, out_name: str, scalars: frozenset) -> str:
    """The earliest node whose expression mixes the weight with a non-scalar, non-weight symbol."""
    for node in graph.nodes:
        e = ex.get(node.name)
        if e is None or node.op != "call_function":
            continue
        if PARAM in e.free_symbols and (e.free_symbols - scalars - {PARAM}) and not str(e).startswith("o_"):
            return node.name
    return out_name


def decompose(
    unit_name: str, gm: torch.fx.GraphModule, facts: GraphFacts, hints: Mapping[str, str] | None = None
) -> Decomposition:
    """Find the projection point and the derived form; raise :class:`UnsupportedOptimizerError`.

    ``hints``: the adapter's state-kind hints (module docstring), checked before they are applied."""
    graph = gm.graph
    base_leaves, hypers = {}, []
    for n, role in facts.roles.items():
        if role.startswith("hyper:"):
            base_leaves[n] = sympy.Symbol(role[6:])
            hypers.append(base_leaves[n])
            continue
        base_leaves[n] = {"param": PARAM, "grad": GRAD, "step": K, "lr": LR}.get(role) or state_symbol(
            role[6:]
        )
    by_name = {n.name: n for n in graph.nodes}

    def opaque_pred(node: torch.fx.Node) -> bool:
        return facts.kinds[node.name] not in ("pointwise", "alias")

    def val_ndim(name: str) -> int:
        v = by_name[name].meta.get("val")
        return v.ndim if v is not None else -1

    grad = next(n for n, r in facts.roles.items() if r == "grad")
    cands = [grad] + [
        n.name
        for n in graph.nodes
        if n.name in facts.grad_path and facts.kinds[n.name] == "pointwise" and n.name not in facts.outputs
    ]
    first: _Reject | None = None
    for cand in cands:
        try:
            return _try_candidate(
                graph, facts, cand, base_leaves, opaque_pred, val_ndim, tuple(hypers), hints
            )
        except _BadHint as bad:
            raise UnsupportedOptimizerError(unit_name, bad.reason, node=bad.node) from None
        except _Reject as rej:
            first = first or rej
    assert first is not None
    raise UnsupportedOptimizerError(unit_name, first.reason, node=first.node)
