"""Rewrite: emit the projected update as executable FX graphs.

From a :class:`~.decompose.Decomposition` this builds

* ``prologue(param, grad, step, lr, *hypers) -> x``: the full-space quantity to project (None when
  ``x = grad``);
* ``lowrank(param, x̃, *states, step, lr, *hypers) -> (decay, D, *states', step')``: the base update
  running on the
  projected ``x̃`` (M×r) and low-rank states. ``param`` is read only by 0-d weight statistics (e.g.
  Adafactor's RMS(W)); reductions (row/column means, update RMS) run on the projected matrix.

The caller then applies ``W ← decay·W + scale · D Pᵀ`` in the full space (weight decay stays there).
Elementwise parts are emitted from the sympy form (after ``together``, so nothing divides by ``lr``);
opaque nodes (reductions) are copies of the captured nodes with their operands re-emitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx

from ..ir import Epilogue
from .decompose import GRAD, LR, PARAM, Decomposition, K, X, state_symbol
from .hoist import hoist
from .symbolic import Emitter, opaque_symbol

__all__ = ["ProjectedProgram", "build_program"]


@dataclass(frozen=True)
class ProjectedProgram:
    """The compiled, projected form of one base optimizer update.

    Attributes:
        optimizer: base optimizer name.
        state_names: low-rank state keys (base optimizer's names), in ``lowrank`` argument order.
        state_kinds: ``first_moment`` / ``second_moment`` / ``other`` per state.
        prologue: full-space projected quantity, or None when it is the gradient itself.
        lowrank: the low-rank update graph (see the module docstring).
        epilogue: kernel form (None when the update has reductions).
        decomposition: the sympy derivation (for :func:`coap_compile.explain`).
        n_phases: kernel phases found by the analysis (1 = fully elementwise).
    """

    optimizer: str
    state_names: tuple[str, ...]
    state_kinds: dict[str, str]
    prologue: torch.fx.GraphModule | None
    lowrank: torch.fx.GraphModule
    epilogue: Epilogue | None
    decomposition: Decomposition
    n_phases: int

    @property
    def first_moment(self) -> str | None:
        """The state COAP's correlation step reads (None: the runtime keeps its own EMA)."""
        return next((n for n in self.state_names if self.state_kinds[n] == "first_moment"), None)


def _module(graph: torch.fx.Graph) -> torch.fx.GraphModule:
    graph.eliminate_dead_code()
    graph.lint()
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def build_prologue(dec: Decomposition) -> torch.fx.GraphModule | None:
    if dec.x_expr == GRAD:
        return None
    graph = torch.fx.Graph()
    env = {s: graph.placeholder(str(s)) for s in (PARAM, GRAD, K, LR, *dec.hypers)}
    out = Emitter(graph, env)(dec.x_expr)
    graph.output(out)
    return _module(graph)


def build_lowrank(
    gm: torch.fx.GraphModule, dec: Decomposition, state_names: tuple[str, ...]
) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    env: dict[sympy.Symbol, torch.fx.Node] = {PARAM: graph.placeholder("param"), X: graph.placeholder("x")}
    for name in state_names:
        env[state_symbol(name)] = graph.placeholder(name)
    env[K] = graph.placeholder("step")
    env[LR] = graph.placeholder("lr")
    for h in dec.hypers:
        env[h] = graph.placeholder(str(h))
    emit = Emitter(graph, env)
    by_name = {n.name: n for n in gm.graph.nodes}
    needed = _opaque_closure(dec, by_name)
    for node in gm.graph.nodes:  # topological order
        if node.name not in needed:
            continue

        def value(arg):
            if not isinstance(arg, torch.fx.Node):
                return arg
            return emit(dec.exprs[arg.name])

        copy = graph.node_copy(node, value)
        copy.meta = {}
        emit.env[opaque_symbol(node)] = copy
    # Hoist step/lr-only (and other 0-d) sub-expressions so they are computed once as 0-d tensors.
    scalars = dec.scalars | {
        opaque_symbol(by_name[n]) for n in needed if getattr(by_name[n].meta.get("val"), "ndim", 1) == 0
    }
    table: dict[sympy.Expr, sympy.Symbol] = {}
    exprs = [dec.new_states[n] for n in state_names] + [dec.delta, dec.decay]
    *states_h, delta_h, decay_h = hoist(exprs, table, scalars)
    for e, sym in table.items():
        emit.env[sym] = emit.as_tensor_node(emit(e))
    new_nodes = [emit(e) for e in states_h]
    for name, node in zip(state_names, new_nodes):
        emit.env[state_symbol(name, new=True)] = node
    delta = emit(delta_h)
    decay = emit(decay_h)
    step = emit(dec.new_step)
    graph.output((decay, delta, *new_nodes, step))
    return _module(graph)


def _opaque_closure(dec: Decomposition, by_name) -> set[str]:
    """Opaque nodes the outputs need, including opaque nodes their operands need."""
    todo, seen = list(dec.opaque_nodes), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for inp in by_name[name].all_input_nodes:
            for s in dec.exprs[inp.name].free_symbols:
                if str(s).startswith("o_"):
                    todo.append(str(s)[2:])
    return seen


def build_program(
    optimizer: str, gm, dec: Decomposition, state_names, epilogue, n_phases
) -> ProjectedProgram:
    return ProjectedProgram(
        optimizer=optimizer,
        state_names=tuple(state_names),
        state_kinds=dict(dec.state_kinds),
        prologue=build_prologue(dec),
        lowrank=build_lowrank(gm, dec, tuple(state_names)),
        epilogue=epilogue,
        decomposition=dec,
        n_phases=n_phases,
    )
