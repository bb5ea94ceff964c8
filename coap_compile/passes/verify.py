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

_ROLES = {"param", "grad", "state", "step", "lr"}


def verify_unit(unit: CompilationUnit) -> None:
    graph = unit.graph
    try:
        graph.lint()
    except Exception as exc:  # lint raises plain RuntimeError/AssertionError
        raise PassError(f"graph does not lint: {exc}") from exc
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    if [n.meta.get("role") for n in phs] != ["param", "grad"] + ["state"] * len(unit.state_names) + [
        "step",
        "lr",
    ]:
        raise PassError(
            f"placeholders must be (param, grad, *states, step, lr), got {[n.meta.get('role') for n in phs]}"
        )
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


def check_equivalence(
    unit: CompilationUnit, program, make_states: Callable[[torch.Tensor], list[torch.Tensor]], trials: int = 3
) -> float:
    """Run the captured graph and the derived (prologue + lowrank, identity projection) form at random
    points in float64 and return the worst relative error; raise if it exceeds 1e-9."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for t in range(trials):
        shape = (7, 4) if unit.facts.get("ndim", 2) == 2 else (9,)
        p = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        states = [
            s.double() + torch.rand(s.shape, generator=gen, dtype=torch.float64) for s in make_states(p)
        ]
        step = torch.tensor(float([0, 3, 997][t % 3]), dtype=torch.float64)
        lr = torch.tensor([1e-3, 3e-2, 0.5][t % 3], dtype=torch.float64)
        ref_p, *rest = unit.graph_module(p, g, *states, step, lr)
        ref_states, ref_step = rest[:-1], rest[-1]
        x = g if program.prologue is None else program.prologue(p, g, step, lr)
        decay, delta, *rest = program.lowrank(p, x, *states, step, lr)
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
