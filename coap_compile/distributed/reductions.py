"""Reductions over the sharded rows of a derived low-rank program: factored bases under FSDP2 (issue 18).

A base whose update reduces over the weight (``torch.optim.Adafactor``, transformers' ``Adafactor``)
has reductions in its rewritten low-rank program ``lowrank(W, X̃, s, k, lr, h)``
(:mod:`coap_compile.passes.rewrite`). On an FSDP2 shard every rank holds ``M_k`` of the ``M`` rows of
``W`` (``m×n``), ``X̃`` (``M×r``) and of the row states (Adafactor's row factor; the column factor is
replicated). A reduction whose reduced dims include the row dim is then a partial result; it becomes

    mean_{rows,…}(t) = all_reduce_sum( Σ_local t ) / (M · Π other reduced sizes)      sum: without "/"
    amax_{rows,…}(t) = all_reduce_max( amax_local t )

and every other op is left as it is. What the bases need, per step and weight: the column statistics of
the ``M×r`` second moment (``r`` floats: ``mean(X̃², dim=-2)``), the mean of the row factor (1 float),
the update RMS of the clipping (1 float) and the weight RMS of the relative step (1 float; it reads ``W``,
sharded the same way): ``4·(r + 3)`` bytes of all-reduce per weight and step, against FSDP2's own
all-gather + reduce-scatter of ``m·n`` elements. Reductions over other dims (row means over ``r``) stay
local. Every rank runs the same graph, so every rank issues the same all-reduces in the same order (an
empty shard contributes zeros); the results are replicated, so the column factor stays identical on
every rank.

**Which dims are rows** is found by running the program's shapes twice (meta tensors, ``M_k`` = 5 and
7): a dim whose size differs between the runs follows the rows. An op that takes a row-sharded input
must be pointwise (``torch.Tag.pointwise``), an ``unsqueeze``, or one of the reductions above;
anything else (a matmul or reshape over the rows, a cumulative op) is refused at construction,
naming the op (:class:`RowReductionError`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
from torch import Tensor
from torch.fx.passes.shape_prop import ShapeProp

from .comm import CommLog, all_reduce

__all__ = ["RowReduction", "RowReductionError", "RowReductions", "plan_row_reductions"]

_aten = torch.ops.aten
#: reductions handled over the rows: op → (combine, mean)
_REDUCTIONS = {
    _aten.mean.default: ("sum", True), _aten.mean.dim: ("sum", True),
    _aten.sum.default: ("sum", False), _aten.sum.dim_IntList: ("sum", False),
    _aten.amax.default: ("max", False),
}  # fmt: skip
_VIEWS = {_aten.unsqueeze.default, _aten.unsqueeze_copy.default}
_PROBE_ROWS = (5, 7)


class RowReductionError(ValueError):
    """The program mixes the sharded rows in a way other than the supported reductions."""


@dataclass(frozen=True)
class RowReduction:
    """One reduction over the rows: its node, how partial results combine, the input's row dim."""

    node: str
    combine: str  # "sum" or "max"
    mean: bool
    row_dim: int  # of the reduction's input


def _dims(node: torch.fx.Node, ndim: int) -> tuple[int, ...]:
    """The dims a reduction node reduces (all of them for the ``.default`` overloads)."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return tuple(range(ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return tuple(sorted(d % ndim for d in dims))


def _shapes(gm: torch.fx.GraphModule, inputs: Sequence[Tensor]) -> dict[str, tuple[int, ...]]:
    ShapeProp(gm).propagate(*inputs)
    out = {}
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            out[node.name] = tuple(tm.shape)
    return out


def plan_row_reductions(
    lowrank: torch.fx.GraphModule, row_inputs: Sequence[str], make_inputs: Any
) -> tuple[RowReduction, ...]:
    """The reductions of ``lowrank`` over the rows of its ``row_inputs`` placeholders (module docstring).

    ``make_inputs(rows)`` returns the program's example inputs (meta tensors) for ``rows`` local rows.
    Raises :class:`RowReductionError` naming the op that mixes rows otherwise."""
    gm = copy.deepcopy(lowrank)  # a copy whose node metadata we may write
    a, b = (_shapes(gm, make_inputs(rows)) for rows in _PROBE_ROWS)
    del row_inputs  # the rows are found from the shapes (the inputs that change are the row inputs)

    def row_dims(name: str) -> tuple[int, ...]:
        sa, sb = a.get(name), b.get(name)
        if sa is None or sb is None or len(sa) != len(sb):
            return ()
        return tuple(i for i, (x, y) in enumerate(zip(sa, sb)) if x != y)

    plan = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        sharded = [inp for inp in node.all_input_nodes if row_dims(inp.name)]
        if not sharded:
            continue
        if node.target in _REDUCTIONS:
            src = node.args[0]
            rdims = row_dims(src.name)
            if len(rdims) != 1:
                raise RowReductionError(f"{node.target} reads a value with {len(rdims)} row dims")
            reduced = _dims(node, len(a[src.name]))
            if rdims[0] in reduced:
                combine, mean = _REDUCTIONS[node.target]
                plan.append(RowReduction(node.name, combine, mean, rdims[0]))
            continue
        if node.target in _VIEWS:
            continue
        tags = getattr(node.target, "tags", ())
        if torch.Tag.pointwise in tags:
            continue
        raise RowReductionError(
            f"the op {node.target} of the derived update reads the row-sharded value {sharded[0].name!r} "
            "and is neither pointwise nor a supported reduction (mean, sum, amax)"
        )
    return tuple(plan)


class RowReductions:
    """Runs a low-rank program on a row shard with its reductions over the rows all-reduced."""

    def __init__(self, plan: Sequence[RowReduction], rows: int, group: dist.ProcessGroup | None) -> None:
        self.plan = {r.node: r for r in plan}
        self.rows, self.group = rows, group

    def __bool__(self) -> bool:
        return bool(self.plan)

    def run(self, lowrank: torch.fx.GraphModule, *args: Any, comm: CommLog | None = None) -> Any:
        return _Interpreter(lowrank, self, comm).run(*args)

    def reduce(self, red: RowReduction, node: torch.fx.Node, src: Tensor, comm: CommLog | None) -> Tensor:
        """The reduction of ``node`` over every rank's rows of ``src``."""
        ndim = src.ndim
        dims = _dims(node, ndim)
        keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        if red.combine == "max":
            part = src.amax(dim=dims, keepdim=keep).contiguous()
            return all_reduce(part, self.group, comm, f"row_{node.name}", op="max")
        part = src.sum(dim=dims, keepdim=keep, dtype=src.dtype).contiguous()
        all_reduce(part, self.group, comm, f"row_{node.name}")
        if not red.mean:
            return part
        count = self.rows * math.prod(src.shape[d] for d in dims if d != red.row_dim)
        return part / count


class _Interpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, reds: RowReductions, comm: CommLog | None) -> None:
        super().__init__(gm)
        self.reds, self.comm = reds, comm

    def run_node(self, n: torch.fx.Node) -> Any:
        red = self.reds.plan.get(n.name)
        if red is None:
            return super().run_node(n)
        return self.reds.reduce(red, n, self.env[n.args[0]], self.comm)
