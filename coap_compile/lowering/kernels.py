"""Kernel lowering: run a projected update through the generated Triton kernels (custom ops).

Per projected weight and step, with ``t = k + 1``::

    c = scalars(t, lr, h)                      # hoisted scalars (h: live hypers), fp32 on W's device
    K1: X̃ = X P,  s' = f(X̃, s, c),  D = h(…)   # one matmul + epilogue (states updated in place)
    K2: W ← c_decay · W + scale · D Pᵀ          # one matmul + epilogue (in place)

The scalar prologue is an FX graph emitted from the epilogue's sympy scalars, so it is traceable by
``torch.compile`` and never reads a value back to the host. ``c`` (computed from the live scalars, which
are CPU tensors) goes to ``W``'s device with ``non_blocking=True``: a blocking host-to-device copy makes
PyTorch synchronize the stream after it, one device sync per parameter and step; the non-blocking copy
from pageable memory is staged by the driver before the call returns (safe to reuse the source).
Updates with reductions (Adafactor) have no epilogue: their low-rank
middle runs eagerly and only K2 is a kernel (:func:`reproject_update_`).

**State storage** (bf16 / int8 states, :mod:`coap_compile.kernels.variants`). The storage is part of the
lowering, the derived epilogue is unchanged: :func:`stored_kernel_plan` maps a parameter's state
description (a :class:`~coap_compile.runtime.precision.StateIO`, or anything with ``storages``, ``kinds``
and ``shapes``) to the storage mode of each state and registers the kernel variant once;
:func:`fused_update_stored_` then passes the state dict's tensors (values, codes, scales, rng) to the
same custom op. K1 loads bf16/int8 states into fp32 registers, runs the epilogue, stores them back with
the storage's rounding in the same kernel and the op advances each rng counter once, so the state dict
ends up as one eager ``io.load → update → io.store_`` leaves it (bit for bit where the float32 values
agree; see ``tests/test_kernels_storage.py`` for the measured agreement). When every state is fp32 the
stored plan has the plain epilogue's id and the state names as keys: the call is exactly
:func:`fused_update_`. Runtime use (computed outside the compiled region, e.g. next to the kernel plan in
the step's eager phase (``runtime/step.py``), and cached per parameter)::

    splan = stored_kernel_plan(kernel_plan(ep, scale), io)   # None: some state has no K1 (float64, …)
    fused_update_stored_(splan, p, g, proj, io.state, k + 1, lr, hypers,
                         transposed=…, backend=…, input_precision=…)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.fx
from torch import Tensor

from ..ir import LR, STEP, Epilogue
from ..kernels.variants import StateMode, mode_of
from ..passes.symbolic import Emitter

__all__ = [
    "KernelPlan",
    "StoredKernelPlan",
    "fused_update_",
    "fused_update_stored_",
    "grouped_update_stored_",
    "kernel_plan",
    "reproject_update_",
    "storage_modes",
    "stored_kernel_plan",
]

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

    c = plan.scalars(t, lr, *hypers).to(w.device, non_blocking=True)
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


@dataclass(frozen=True)
class StoredKernelPlan:
    """A :class:`KernelPlan` with its states' storage: ``kernel_id`` is the op id (the plan's own
    ``epilogue_id`` when every state is fp32), ``keys`` the state-dict keys passed to the op, in order
    (``exp_avg.q8``, ``exp_avg.absmax``, ``exp_avg.rng``, ``exp_avg_sq``, …), ``modes`` one per state."""

    plan: KernelPlan
    kernel_id: str
    keys: tuple[str, ...]
    modes: tuple[StateMode, ...]


class _StateDescription(Protocol):
    storages: Mapping[str, Any]
    kinds: Mapping[str, str]
    shapes: Mapping[str, tuple[int, ...]]


_STORED: dict[tuple[str, tuple[StateMode, ...]], StoredKernelPlan] = {}


def storage_modes(io: _StateDescription, names: Sequence[str]) -> tuple[StateMode, ...] | None:
    """The storage mode of each state ``names[i]`` of ``io`` (StateIO-like: ``storages``, ``kinds``,
    ``shapes``), or ``None`` when some state has no K1 storage (float64, an unknown storage class)."""
    modes = []
    for n in names:
        if n not in io.storages or n not in io.shapes:
            raise KeyError(f"state {n!r} has no storage/shape in the description (has {sorted(io.storages)})")
        mode = mode_of(io.storages[n], io.kinds.get(n, "other"), io.shapes[n])
        if mode is None:
            return None
        modes.append(mode)
    return tuple(modes)


def stored_kernel_plan(plan: KernelPlan, io: _StateDescription) -> StoredKernelPlan | None:
    """``plan`` with the storage of ``io``'s states (module docstring); ``None`` if K1 cannot read one of
    them. Cached per (epilogue id, modes): registering hashes sympy once, later calls are dict lookups."""
    modes = storage_modes(io, plan.epilogue.state_names)
    if modes is None:
        return None
    key = (plan.epilogue_id, modes)
    hit = _STORED.get(key)
    if hit is None or hit.plan is not plan:
        from ..kernels.ops import register_variant

        keys = tuple(k for n, m in zip(plan.epilogue.state_names, modes) for k in m.keys(n))
        hit = StoredKernelPlan(plan, register_variant(plan.epilogue, modes), keys, modes)
        _STORED[key] = hit
    return hit


def fused_update_stored_(
    splan: StoredKernelPlan,
    w: Tensor,
    g: Tensor,
    proj: Tensor,
    state: Mapping[str, Tensor],
    t: Tensor,
    lr: Tensor,
    hypers: list[Tensor],
    *,
    transposed: bool,
    backend: str,
    input_precision: str,
) -> None:
    """K1 + K2 on the stored states of ``state`` (the parameter's state dict), in place: values, codes,
    scales and rng counters end as one eager load → update → ``store_`` leaves them. ``proj`` float32."""
    from ..kernels.ops import fused_projected_update

    c = splan.plan.scalars(t, lr, *hypers).to(w.device, non_blocking=True)
    fused_projected_update(
        w,
        g,
        proj,
        [state[k] for k in splan.keys],
        c,
        splan.kernel_id,
        transposed=transposed,
        backend=backend,
        input_precision=input_precision,
    )


def grouped_update_stored_(
    splan: StoredKernelPlan,
    ws: Sequence[Tensor],
    gs: Sequence[Tensor],
    projs: Sequence[Tensor],
    states: Sequence[Mapping[str, Tensor]],
    t: Tensor,
    lr: Tensor,
    hypers: list[Tensor],
    *,
    transposed: Sequence[bool],
    backend: str,
    input_precision: str,
) -> None:
    """:func:`fused_update_stored_` for ``K`` weights with equal ``M×r`` states and equal step ``t``: one
    ``c``, one grouped K1 and one grouped K2 launch (``coap_compile::grouped_fused_projected_update``);
    every member ends bit-identical to :func:`fused_update_stored_` on it."""
    from ..kernels.ops import grouped_fused_projected_update

    c = splan.plan.scalars(t, lr, *hypers).to(ws[0].device, non_blocking=True)
    grouped_fused_projected_update(
        ws,
        gs,
        projs,
        [[st[k] for k in splan.keys] for st in states],
        c,
        splan.kernel_id,
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
        decay_t = decay.to(device=w.device, dtype=torch.float32, non_blocking=True).reshape(1)
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
