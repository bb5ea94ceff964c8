"""IR verification (after every pass) and the random-point equivalence check of the derived form.

Invariants of the captured graph (see ``README.md``): it lints; it is functional (no in-place or
``out=`` ops, no ``copy_`` tail); every placeholder has a ``role``; the output is the tuple
``(param', *states', step')``; every ``call_function`` node carries ``meta["val"]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UnsupportedOptimizerError
from .base import CompilationUnit, PassError

__all__ = ["check_equivalence", "verify_unit"]

_ROLES = {"param", "grad", "state", "step", "lr", "hyper"}


def verify_unit(unit: CompilationUnit) -> None:
    graph = unit.graph
    try:
        graph.lint()
    except Exception as exc:  # lint raises plain RuntimeError/AssertionError
        raise PassError(f"graph does not lint: {exc}") from exc
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    roles = [n.meta.get("role") for n in phs]
    n_hyper = len(roles) - 4 - len(unit.state_names)
    expect = ["param", "grad"] + ["state"] * len(unit.state_names) + ["step", "lr"] + ["hyper"] * n_hyper
    if n_hyper < 0 or roles != expect:
        raise PassError(f"placeholders must be (param, grad, *states, step, lr, *hypers), got {roles}")
    out = next(n for n in graph.nodes if n.op == "output")
    if not isinstance(out.args[0], (tuple, list)) or len(out.args[0]) != len(unit.state_names) + 2:
        raise PassError("output must be (param', *states', step')")
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            raise PassError(f"node {node.name} ({node.target}) mutates its input; the IR must be functional")
        if "val" not in node.meta:
            raise PassError(f"node {node.name} has no meta['val']")


def _hyper_trial(value: float, t: int, gen: torch.Generator) -> float:
    """A trial value for a live hyperparameter: the value itself first, then random values of the same
    kind: ``v^a`` (a ∈ [0.5, 1.5), stays in (0, 1), like a β) for ``v`` in (0, 1); ``v·[0.5, 2)``
    otherwise; a zero becomes a small positive number (``[0, 0.1)``)."""
    if t == 0:
        return value
    u = float(torch.rand((), generator=gen, dtype=torch.float64))
    if 0.0 < value < 1.0:
        return value ** (0.5 + u)
    if value == 0.0:
        return 0.1 * u
    return value * (0.5 + 1.5 * u)


def check_equivalence(
    unit: CompilationUnit, program, make_states: Callable[[torch.Tensor], list[torch.Tensor]], trials: int = 3
) -> float:
    """Run the captured graph and the derived (prologue + lowrank, identity projection) form at random
    points in float64 and return the worst relative error; raise if it exceeds 1e-9.

    The live hyperparameters take their compile-time values (``unit.facts["hyper_values"]``) in the
    first trial and random values of the same kind in the others, so the derived form is checked as a
    function of them, not at one point.
    """
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    base_hypers = list(unit.facts.get("hyper_values", ()))
    for t in range(trials):
        shape = {1: (9,), 2: (7, 4), 3: (5, 4, 3), 4: (5, 4, 3, 2)}[unit.facts.get("ndim", 2)]
        p = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        states = [
            s.double() + torch.rand(s.shape, generator=gen, dtype=torch.float64) for s in make_states(p)
        ]
        step = torch.tensor(float([0, 3, 997][t % 3]), dtype=torch.float64)
        lr = torch.tensor([1e-3, 3e-2, 0.5][t % 3], dtype=torch.float64)
        hv = [torch.tensor(_hyper_trial(float(v), t, gen), dtype=torch.float64) for v in base_hypers]
        ref_p, *rest = unit.graph_module(p, g, *states, step, lr, *hv)
        ref_states, ref_step = rest[:-1], rest[-1]
        x = g if program.prologue is None else program.prologue(p, g, step, lr, *hv)
        decay, delta, *rest = program.lowrank(p, x, *states, step, lr, *hv)
        new_states, new_step = rest[:-1], rest[-1]
        got_p = decay * p + delta
        pairs = [(got_p, ref_p), *zip(new_states, ref_states), (torch.as_tensor(new_step), ref_step)]
        for got, ref in pairs:
            got = torch.as_tensor(got, dtype=torch.float64).expand_as(ref)
            err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            worst = max(worst, err)
    if not worst <= 1e-9:
        raise UnsupportedOptimizerError(
            unit.optimizer, f"derived form disagrees with the captured graph (relative error {worst:.2e})"
        )
    return worst
