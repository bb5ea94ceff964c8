"""Split a low-rank update graph into its per-step scalar part and its elementwise part.

``program.lowrank(param, x̃, *states, k, lr, *h)`` already computes every step/lr/hyperparameter-only
sub-expression once, as a 0-d tensor node (:mod:`coap_compile.passes.rewrite` hoists them), e.g. Adam's
``c = lr·√(1−β₂ᵏ⁺¹)/(1−β₁ᵏ⁺¹)``. Eagerly those nodes run once per call. Inside a compiled loop they do
not: Inductor inlines 0-d producers into the consumer's loop body, so ``pow``/``sqrt`` of the bias
corrections were evaluated once per 16-lane vector (measured on the demo LM's fp32 groups, 806 k state
elements, 1 thread, 2-core Xeon: the fused AdamW loop took 5.8 ns per element, against ~1 ns for its
24 bytes of traffic; the generated C++ had two ``std::pow`` and a ``std::sqrt`` inside the loop).

:func:`split_scalars` cuts the graph at the boundary::

    scalars(k, lr, *h) -> (c₁, …, c_j)                                   (eager: a few 0-d torch ops)
    body(param, x̃, *states, k, lr, *h, c₁, …, c_j) -> lowrank's outputs  (compiled: the loop)

where the ``c``'s are the scalar nodes (no path from ``param``, ``x̃`` or a state) that a non-scalar node or
the output reads. ``body`` reads each ``c`` as a 0-d input, so the loop only broadcasts loaded values.
The scalars are the same torch ops on the same 0-d operands as in the eager lowering, so they have the
eager lowering's bits (before, Inductor evaluated them in its own C++ order).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.fx

__all__ = ["ScalarSplit", "split_scalars"]


@dataclass(frozen=True)
class ScalarSplit:
    """``scalars(k, lr, *h) -> tuple`` and ``body(param, x̃, *states, k, lr, *h, *scalars)`` (docstring)."""

    scalars: torch.fx.GraphModule
    body: torch.fx.GraphModule
    count: int


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_scalars(lowrank: torch.fx.GraphModule, n_states: int) -> ScalarSplit:
    """The split of ``lowrank`` (cached per graph module); ``n_states`` low-rank states follow ``x``."""
    split = _SPLITS.get(lowrank)
    if split is None:
        split = _SPLITS[lowrank] = _split(lowrank, n_states)
    return split


def _split(lowrank: torch.fx.GraphModule, n_states: int) -> ScalarSplit:
    nodes = list(lowrank.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    scalar_inputs = set(placeholders[2 + n_states :])  # after param, x and the states: step, lr, *hypers
    scalar: set[torch.fx.Node] = set()
    for n in nodes:
        if n.op in ("call_function", "call_method", "get_attr") and all(
            a in scalar_inputs or a in scalar for a in n.all_input_nodes
        ):
            scalar.add(n)
    output = next(n for n in nodes if n.op == "output")
    boundary = [n for n in nodes if n in scalar and any(u not in scalar for u in n.users)]

    sgraph, env = torch.fx.Graph(), {}
    for p in placeholders[2 + n_states :]:
        env[p] = sgraph.placeholder(p.name)
    for n in nodes:
        if n in scalar:
            env[n] = sgraph.node_copy(n, lambda a: env[a])
    sgraph.output(tuple(env[n] for n in boundary))

    bgraph, benv = torch.fx.Graph(), {}
    for p in placeholders:
        benv[p] = bgraph.placeholder(p.name)
    for n in boundary:
        benv[n] = bgraph.placeholder(f"hoisted_{n.name}")
    for n in nodes:
        if n.op == "placeholder" or n in boundary:
            continue
        if n is output:
            bgraph.output(torch.fx.graph.map_arg(n.args[0], lambda a: benv[a]))
        elif n not in scalar:
            benv[n] = bgraph.node_copy(n, lambda a: benv[a])
    for g in (sgraph, bgraph):
        g.eliminate_dead_code()
        g.lint()
    root = lowrank  # get_attr targets (constants) resolve against the original module
    return ScalarSplit(torch.fx.GraphModule(root, sgraph), torch.fx.GraphModule(root, bgraph), len(boundary))
