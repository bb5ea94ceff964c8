"""Capture → passes → projected program, cached per signature.

One signature is ``(base optimizer class, structural hyperparameters, dtype)``: capture traces the base
update once per signature (``capture`` caches too), and the pass pipeline runs once per signature. Live
hyperparameters (β₁, ε, weight decay, …) are inputs of the compiled program, so a new value is never
a new signature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from .capture import CapturedUpdate, capture, hyper_values, init_states
from .passes.base import CompilationUnit
from .passes.pipeline import compile_update
from .passes.rewrite import ProjectedProgram

__all__ = ["CompiledBase", "compile_base", "compile_count"]

_CACHE: dict[tuple, CompiledBase] = {}
_COUNT = 0


@dataclass(frozen=True)
class CompiledBase:
    """A base optimizer compiled for projected parameters (plus what produced it, for ``explain``)."""

    captured: CapturedUpdate
    program: ProjectedProgram
    unit: CompilationUnit

    def init_lowrank_states(
        self, rows: int, rank: int, dtype: torch.dtype, device
    ) -> dict[str, torch.Tensor]:
        """Fresh base states for a virtual ``rows × rank`` parameter (the low-rank state shapes)."""
        return self.init_core_states((rows, rank), dtype, device)

    def init_core_states(self, shape, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        """Fresh base states for a virtual parameter of the projected ``shape`` (a Tucker core, …)."""
        like = torch.empty(tuple(shape), dtype=dtype, device=device)
        return init_states(self.captured, like)


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {}, return_output_node=False)
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


def compile_base(
    base: type[torch.optim.Optimizer], hyperparams: Mapping[str, Any], dtype: torch.dtype, ndim: int = 2
) -> CompiledBase:
    """Compile ``base`` with ``hyperparams`` (a param-group dict; ``lr`` and flags are ignored) for
    projected parameters whose low-rank states have ``dtype`` and ``ndim`` dimensions (2: the ``M×r``
    states of a matrix; 4: the core of a Tucker-projected convolution weight)."""
    global _COUNT
    captured = capture(base, hyperparams, dtype=dtype, ndim=ndim)
    key = (captured.optimizer, captured.hyperparams, dtype, ndim)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit

    def make_states(like: torch.Tensor) -> list[torch.Tensor]:
        st = init_states(captured, like)
        return [st[n] for n in captured.state_names]

    program, unit = compile_update(
        captured.optimizer,
        _copy_graph_module(captured.graph_module),
        captured.state_names,
        make_states,
        hyper_values=[float(v) for v in hyper_values(captured, _with_defaults(base, hyperparams))],
        state_kinds=dict(captured.state_kinds),  # adapter hints (e.g. transformers' Adafactor exp_avg)
        ndim=ndim,
    )
    _COUNT += 1
    _CACHE[key] = CompiledBase(captured, program, unit)
    return _CACHE[key]


def _with_defaults(base: type, hyperparams: Mapping[str, Any]) -> dict:
    from .capture.adapter_base import class_defaults

    return {**class_defaults(base, hyperparams), **hyperparams}


def compile_count() -> int:
    """How many times the pass pipeline has run in this process (for recompile tests)."""
    return _COUNT
