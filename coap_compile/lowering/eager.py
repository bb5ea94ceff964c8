"""The eager lowering: run the rewritten low-rank graph with torch ops, then reproject.

For one projected parameter (canonical orientation, ``X̃ = X P`` already computed)::

    (decay, D, s', k') = lowrank(W, X̃, s, k, lr, h)  # the rewritten base update on M×r (h: live hypers)
    W ← decay · W + scale · D Pᵀ                       # full space, in P's dtype, stored as W's dtype

Scalars are computed in float64 on 0-d tensors (``k``, ``lr`` and the hyperparameters are passed as
float64), which keeps bias corrections as accurate as torch's own Python-float arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..passes.rewrite import ProjectedProgram

__all__ = ["apply_reprojection_", "run_lowrank"]


def run_lowrank(
    program: ProjectedProgram,
    param: Tensor,
    x_proj: Tensor,
    states: Sequence[Tensor],
    step: Tensor,
    lr: Tensor,
    hypers: Sequence[Tensor] = (),
) -> tuple[Tensor | float, Tensor, list[Tensor], Tensor]:
    """Execute ``program.lowrank``; returns ``(decay, D, new_states, new_step)``."""
    decay, delta, *rest = program.lowrank(param, x_proj, *states, step, lr, *hypers)
    return decay, delta, list(rest[:-1]), rest[-1]


def apply_reprojection_(
    w_view: Tensor, decay: Tensor | float, delta: Tensor, proj: Tensor, scale: float
) -> None:
    """``W ← decay·W + scale·D Pᵀ`` in place (``w_view`` may be a transposed view of the weight).

    Eagerly this is one ``addmm_`` (``beta = decay``: a single pass over ``W``); inside ``torch.compile`` it
    stays ``mul_`` + ``add_`` on a 0-d ``decay`` tensor (no host read), which Inductor fuses.
    """
    delta = delta.to(proj.dtype)
    if w_view.dtype != proj.dtype:  # low-precision weight: combine in P's dtype, round once
        w32 = w_view.to(proj.dtype)
        _decay_add_(w32, decay, delta, proj, scale)
        w_view.copy_(w32)
    else:
        _decay_add_(w_view, decay, delta, proj, scale)


def _decay_add_(w: Tensor, decay: Tensor | float, delta: Tensor, proj: Tensor, scale: float) -> None:
    if torch.compiler.is_dynamo_compiling():  # Dynamo traces this thread
        w.mul_(decay).add_(delta @ proj.t(), alpha=scale)
    else:
        w.addmm_(delta, proj.t(), beta=float(decay), alpha=scale)
