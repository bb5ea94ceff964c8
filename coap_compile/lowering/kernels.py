"""Kernel lowering: run a projected update through the generated Triton kernels (custom ops).

Per projected weight and step, with ``t = k + 1``::

    c = scalars(t, lr, h)                      # hoisted scalars (h: live hypers), fp32 on W's device
    K1: X̃ = X P,  s' = f(X̃, s, c),  D = h(…)   # one matmul + epilogue (states updated in place)
    K2: W ← c_decay · W + scale · D Pᵀ          # one matmul + epilogue (in place)

The scalar prologue is an FX graph emitted from the epilogue's sympy scalars, so it is traceable by
``torch.compile`` and never reads a value back to the host. Updates with reductions (Adafactor) have
no epilogue: their low-rank middle runs eagerly and only K2 is a kernel (:func:`reproject_update_`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor

from ..ir import LR, STEP, Epilogue
from ..passes.symbolic import Emitter

__all__ = ["KernelPlan", "kernel_plan", "reproject_update_"]

aten = torch.ops.aten


def scalar_module(ep: Epilogue) -> torch.fx.GraphModule:
    """``(t, lr, *hypers) -> c``: the hoisted scalars as one float32 vector (empty scalars give a
    length-1 dummy vector)."""
    graph = torch.fx.Graph()
    env = {STEP: graph.placeholder("t"), LR: graph.placeholder("lr")}
    env.update({sym: graph.placeholder(str(sym)) for sym in ep.scalar_args[2:]})
    emit = Emitter(graph, env)
    vals = [emit.as_tensor_node(emit(e)) for _, e in ep.scalars]
    if not vals:
        vals = [graph.call_function(aten.scalar_tensor.default, (0.0,))]
    stacked = graph.call_function(aten.stack.default, (vals,))
    out = graph.call_function(aten._to_copy.default, (stacked,), {"dtype": torch.float32})
    graph.output(out)
    graph.lint()
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@dataclass(frozen=True)
class KernelPlan:
    """An epilogue registered with the custom ops (``scale`` folded in) and its scalar prologue."""

    epilogue: Epilogue
    epilogue_id: str
    scalars: torch.fx.GraphModule


def kernel_plan(ep: Epilogue, scale: float) -> KernelPlan:
    from ..kernels.ops import register_epilogue

    ep = dataclasses.replace(ep, scale=float(scale))
    return KernelPlan(ep, register_epilogue(ep), scalar_module(ep))


def fused_update_(
    plan: KernelPlan,
    w: Tensor,
    g: Tensor,
    proj: Tensor,
    states: list[Tensor],
    t: Tensor,
    lr: Tensor,
    hypers: list[Tensor],
    *,
    transposed: bool,
    backend: str,
    input_precision: str,
) -> None:
    from ..kernels.ops import fused_projected_update

    c = plan.scalars(t, lr, *hypers).to(w.device)
    fused_projected_update(
        w,
        g,
        proj,
        states,
        c,
        plan.epilogue_id,
        transposed=transposed,
        backend=backend,
        input_precision=input_precision,
    )


def reproject_update_(
    w: Tensor,
    delta: Tensor,
    proj: Tensor,
    decay,
    scale: float,
    *,
    transposed: bool,
    backend: str,
    input_precision: str,
) -> None:
    """K2 alone: ``W ← decay·W + scale·D Pᵀ`` (for updates whose low-rank middle ran eagerly)."""
    from ..kernels.ops import project_back_update

    if isinstance(decay, Tensor):
        decay_t = decay.to(device=w.device, dtype=torch.float32).reshape(1)
    elif decay == 1.0:
        decay_t = None
    else:
        decay_t = torch.tensor([float(decay)], dtype=torch.float32, device=w.device)
    project_back_update(
        w,
        delta,
        proj,
        decay_t,
        float(scale),
        transposed=transposed,
        backend=backend,
        input_precision=input_precision,
    )
