"""The default pipeline — the only place the pass order is decided.

``Normalize → Analyse → Decompose → BuildEpilogue → Rewrite → CheckEquivalence``

Each pass declares the facts it needs and provides; the :class:`~.base.PassManager` verifies the IR
after every pass (``verify.verify_unit``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..errors import UnsupportedOptimizerError
from .analysis import analyse
from .base import CompilationUnit, Pass, PassManager, PassResult
from .decompose import decompose
from .hoist import build_epilogue
from .rewrite import ProjectedProgram, build_program
from .verify import check_equivalence, verify_unit

__all__ = ["DEFAULT_PIPELINE", "compile_update"]

_ALIASES = {
    torch.ops.aten.clone.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.lift_fresh_copy.default,
}


class Normalize(Pass):
    """Drop value-preserving aliases (clone/detach) and dead code."""

    ensures = frozenset({"normalized"})

    def run(self, unit):
        modified = False
        for node in list(unit.graph.nodes):
            if (
                node.op == "call_function"
                and node.target in _ALIASES
                and not node.kwargs.get("memory_format")
            ):
                node.replace_all_uses_with(node.args[0])
                unit.graph.erase_node(node)
                modified = True
        modified |= unit.graph.eliminate_dead_code()
        unit.graph_module.recompile()
        unit.facts["normalized"] = True
        return PassResult(unit, modified)


class Analyse(Pass):
    """networkx view: roles, node kinds, grad → update path, pointwise regions, phases."""

    requires = frozenset({"normalized"})
    ensures = frozenset({"graph_facts", "nx"})

    def run(self, unit):
        g, facts = analyse(unit.graph_module)
        for name, kind in facts.kinds.items():
            if kind == "host_sync":
                raise UnsupportedOptimizerError(
                    unit.optimizer,
                    "the update reads a tensor value on the host (.item()); use a tensor-only formulation",
                    node=name,
                )
        unit.facts["nx"], unit.facts["graph_facts"] = g, facts
        return PassResult(unit, False)


class Decompose(Pass):
    """sympy: projection point, ``p' = decay·p + Δ`` with Δ independent of p, state kinds."""

    requires = frozenset({"graph_facts"})
    ensures = frozenset({"decomposition"})

    def run(self, unit):
        hints = unit.facts.get("state_kind_hints")  # optional: the adapter's checked hints (decompose.py)
        unit.facts["decomposition"] = decompose(
            unit.optimizer, unit.graph_module, unit.facts["graph_facts"], hints
        )
        return PassResult(unit, False)


class BuildEpilogue(Pass):
    """Hoist step/lr-only scalars, CSE the elementwise body (None if the update has reductions)."""

    requires = frozenset({"decomposition"})
    ensures = frozenset({"epilogue"})

    def run(self, unit):
        unit.facts["epilogue"] = build_epilogue(unit.facts["decomposition"], unit.state_names)
        return PassResult(unit, False)


class Rewrite(Pass):
    """Emit the prologue and the low-rank update graph."""

    requires = frozenset({"decomposition", "epilogue", "graph_facts"})
    ensures = frozenset({"program"})

    def run(self, unit):
        facts = unit.facts["graph_facts"]
        unit.facts["program"] = build_program(
            unit.optimizer,
            unit.graph_module,
            unit.facts["decomposition"],
            unit.state_names,
            unit.facts["epilogue"],
            facts.n_phases,
        )
        return PassResult(unit, False)


class CheckEquivalence(Pass):
    """The derived form equals the captured graph at random float64 points."""

    requires = frozenset({"program", "make_states"})
    ensures = frozenset({"equivalence_error"})

    def run(self, unit):
        unit.facts["equivalence_error"] = check_equivalence(
            unit, unit.facts["program"], unit.facts["make_states"]
        )
        return PassResult(unit, False)


DEFAULT_PIPELINE: tuple[type[Pass], ...] = (
    Normalize,
    Analyse,
    Decompose,
    BuildEpilogue,
    Rewrite,
    CheckEquivalence,
)


def compile_update(
    optimizer: str,
    graph_module: torch.fx.GraphModule,
    state_names: tuple[str, ...],
    make_states: Callable[[torch.Tensor], list[torch.Tensor]],
    *,
    ndim: int = 2,
    hyper_values: list[float] | None = None,
    state_kinds: Mapping[str, str] | None = None,
) -> tuple[ProjectedProgram, CompilationUnit]:
    """Run the default pipeline on a captured update and return the projected program.

    ``hyper_values``: values of the live hyperparameters (placeholder order) around which
    CheckEquivalence draws its random trial values. ``state_kinds``: the adapter's state-kind hints
    (fact ``state_kind_hints``; Decompose checks them before applying them).
    """
    facts = {"make_states": make_states, "ndim": ndim, "hyper_values": list(hyper_values or [])}
    if state_kinds:
        facts["state_kind_hints"] = dict(state_kinds)
    unit = CompilationUnit(optimizer, graph_module, tuple(state_names), facts=facts)
    unit = PassManager([p() for p in DEFAULT_PIPELINE], verify_unit).run(unit)
    return unit.facts["program"], unit
