"""The projected update of one weight (traceable: no host reads, no branches on values).

With the live scalars ``(k, lr, h)`` (completed steps, learning rate, hyperparameters, 0-d float64)::

    X̃ = X P                                           (X = G or the prologue's G + λW; P in float32)
    s = load(states)                                   (float32 views; dequantized for bf16/int8)
    (decay, D, s', k') = lowrank(W, X̃, s, k, lr, h)   (the compiled base update, M×r, unchanged)
    W ← decay · W + scale · D Pᵀ                        (full space)
    store(s'),  step ← k',  coap_exp_avg ← lerp(·, X̃, 1 − β)   (only after W, see below)

The state storage (:mod:`.precision`) wraps the derived update without changing it. Everything is
computed before the first write, and the weight is written before the states, so a failure inside
this parameter's update (an exception from the kernels or the allocator) leaves its states and step
counter unchanged. On CUDA (``backend`` permitting) elementwise bases run as the generated kernels K1
(``X P`` + state update + ``D``) and K2 (``W ← decay·W + scale·D Pᵀ``); bases with reductions run their
low-rank middle eagerly and K2 as a kernel.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ..lowering.eager import apply_reprojection_, run_lowrank
from ..lowering.inductor import elementwise, uses_param
from ..lowering.kernels import StoredKernelPlan, fused_update_stored_, reproject_update_
from ..lowering.stacked import StackedSpec, stacked_spec
from .layout import ParamLayout
from .precision import StateIO
from .refresh import canonical_input
from .settings import EMA_KEY

__all__ = ["projected_update_"]

_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def projected_update_(
    layout: ParamLayout,
    p: Tensor,
    io: StateIO,
    inputs: tuple[Tensor, Tensor, list[Tensor]],
    *,
    kernel_plan: StoredKernelPlan | None = None,
    x_extra: Tensor | None = None,
    comm=None,
) -> None:
    """One step of one projected weight (module docstring), in place: ``p`` (the local weight with its
    gradient), its states through ``io``, the live scalars ``(k, lr, h)``. ``kernel_plan`` is the
    registered K1 epilogue when the layout runs the kernels. ``x_extra`` (``M×r``, optional) is added to
    ``X P`` (gradient accumulation in projected form, :mod:`.inbackward`); the fused K1 path is then
    skipped (it computes ``X P`` itself): the low-rank middle runs eagerly, K2 as usual. ``comm``: the
    optimizer's :class:`~coap_compile.distributed.CommLog` (or None), which records the all-reduces of an
    FSDP2 weight's row reductions (:mod:`coap_compile.distributed.reductions`)."""
    compiled, policy, dtype = layout.program, layout.policy, layout.work_dtype
    transposed, scale = layout.transposed, float(layout.settings.scale)
    ema_beta = float(layout.settings.first_moment_beta)
    kernels = layout.kernels is not None and (kernel_plan is not None or layout.states.all_fp32)
    backend, input_precision = layout.kernels or ("eager", "ieee")
    program = compiled.program
    state = io.state
    k_t, lr_t, hypers = inputs
    proj = policy.basis(state)  # P itself (dense policies) or the gathered DCT columns
    if proj.dtype != dtype:  # P stored in bf16: products in float32
        proj = proj.to(dtype)
    if kernels and kernel_plan is not None and EMA_KEY not in state and x_extra is None:
        g = p.grad
        if program.prologue is not None:
            g = program.prologue(p.to(dtype), p.grad.to(dtype), k_t, lr_t, *hypers)
        fused_update_stored_(  # K1 reads/writes fp32, bf16 or int8 states in registers (kernels.stored)
            kernel_plan, p, g, proj, state, k_t + 1, lr_t, hypers,
            transposed=transposed, backend=backend, input_precision=input_precision,
        )  # fmt: skip
        state["step"].add_(1.0)
        return
    x, transposed = canonical_input(p, compiled, dtype, k_t, lr_t, hypers, transposed=transposed)
    w = p.t() if transposed else p
    x_proj = x.to(proj.dtype) @ proj
    if x_extra is not None:
        x_proj = x_proj + x_extra
    specs = _fused_specs(layout, state, p.device) if layout.lowering == "inductor" else None
    if specs is not None and not torch.compiler.is_compiling():
        # the fused CPU lowering (lowering.inductor): this matrix as a group of one
        parts = {key: state[key].unsqueeze(0) for spec in specs for key in spec.keys}
        by_name = {spec.name: spec for spec in specs}
        ema = (by_name[EMA_KEY], ema_beta) if EMA_KEY in by_name else None
        decay, delta, new_step, new = elementwise(
            True, program, tuple(by_name[n] for n in program.state_names), ema, None, x_proj.unsqueeze(0),
            parts, inputs,
        )  # fmt: skip
        apply_reprojection_(w, float(decay) if isinstance(decay, Tensor) else decay, delta[0], proj, scale)
        for key, value in new.items():  # states only after the weight
            parts[key].copy_(value)
        state["step"].copy_(new_step.reshape(()))
        return
    stat_param = p if not program.decomposition.param_stats else p.to(dtype)
    olds = [io.load(n) for n in program.state_names]
    reductions = layout.row_reductions
    if reductions:  # FSDP2: the reductions over the rows are all-reduced (distributed.reductions)
        decay, delta, *rest = reductions.run(
            program.lowrank, stat_param, x_proj, *olds, k_t, lr_t, *hypers, comm=comm
        )
        new_states, new_step = list(rest[:-1]), rest[-1]
    else:
        decay, delta, new_states, new_step = run_lowrank(program, stat_param, x_proj, olds, k_t, lr_t, hypers)
    if kernels:  # low-rank middle ran eagerly (reductions); the reprojection is the K2 kernel
        reproject_update_(
            p, delta, proj, decay, scale,
            transposed=transposed, backend=backend, input_precision=input_precision,
        )  # fmt: skip
    else:
        apply_reprojection_(w, decay, delta, proj, scale)
    for name, value in zip(program.state_names, new_states):
        io.store_(name, value)
    state["step"].copy_(new_step)
    if EMA_KEY in io.storages:
        io.store_(EMA_KEY, torch.lerp(io.load(EMA_KEY), x_proj, 1.0 - ema_beta))


def _fused_specs(layout: ParamLayout, state: dict, device) -> tuple[StackedSpec, ...] | None:
    """The stacked specs of ``layout``'s states when its update can run fused (None: eagerly), checked
    against the state's tensors (a checkpoint written with another int8 block size runs eagerly)."""
    if layout.shard is not None or uses_param(layout.program.program):
        return None
    specs = _SPECS.get(layout)
    if specs is None:
        st = layout.states
        specs = tuple(
            stacked_spec(n, st.storages[n], st.kinds.get(n, "other"), st.shapes[n], device)
            for n in st.storages
        )
        _SPECS[layout] = specs
    return specs if all(spec.matches(state) for spec in specs) else None
