"""Kernel groups: the matrix groups of the kernel path, two Triton launches per group and step.

On the kernel path (``layout.kernels``: CUDA with ``backend="auto"``, or ``backend="triton"``) a matrix
group (:mod:`.grouped`: one param group, equal ``M×r`` states, weight dtype, device and state names; here
fp32, bf16 or int8 storage alike) steps each run of ready members as::

    c = scalars(k + 1, lr, h)                        (one vector: the run's step counts agree)
    X_k = G_k, or the prologue's G_k + λ W_k          (per member, as the per-matrix path)
    grouped K1:  X_k P_k, s_k' = f(…), D_k = h(…)     (ONE launch, grid axis 1 over the members)
    grouped K2:  W_k ← decay·W_k + scale·D_k P_kᵀ     (ONE launch)
    step_k ← step_k + 1                               (one _foreach_add_)

through ``coap_compile::grouped_fused_projected_update`` (:mod:`coap_compile.kernels.grouped`), so a
steady step launches two Triton kernels per distinct state shape and scratch chunk instead of two per
matrix (LLaMA-1B: 10 instead of 336 with the scratch cap below; ``tests/test_launch_count.py`` counts
them). Every member is bit-identical to the per-matrix kernel path (``grouped=False``;
``tests/test_grouped_kernels.py``): the same tile code on the same operands, the same ``c`` and, for
stochastic rounding, each member's own ``[seed, counter]``.

The states are not packed (unlike the eager groups' ``K×M×r`` buffers): each member keeps its own
tensors, which the kernels reach through per-member offsets, so checkpoints, ``state_dict()`` and the
storages are exactly the per-matrix path's. Refreshes stay per matrix (:mod:`.refresh`).

**Host time** (a GPU step's launches are asynchronous, so the host's Python work is what a steady step
costs beyond the kernels): 126 µs per matrix and step grouped against 438 µs per matrix (``grouped=False``),
56 matrices, launches stubbed out, 2-core EPYC under load (``benchmarks/kernel_host_overhead.py``,
``benchmarks/results/kernel_host_overhead.json``): one ``c``, one op dispatch and one validation pass per
run instead of per matrix.

**Transient memory** (not in the memory plan, which counts persistent state): ``D`` is one ``K×M×r`` fp32
scratch per launch instead of ``M×r`` per matrix. LLaMA-1B at r = 512: the 72 FFN matrices (M = 5461)
take 72·5461·512·4 B = 768 MiB during their launch pair (per matrix: 10.7 MiB), the 96 attention
matrices 384 MiB. Users of this library train models that barely fit, so a run is cut into chunks whose
scratch stays within :data:`SCRATCH_BYTES` (256 MiB; at least one member per chunk): two launches per
chunk. LLaMA-1B at r = 512 then launches 3 chunk pairs for the FFN shape (24 members, 256 MiB each) and 2
for the attention shape (64 members, 4 MiB each), 10 launches per steady step instead of 6 (about 20 µs
more at a few µs per launch, against a 5 ms step floor) for a third of the peak. Not yet measured on a
GPU; the caching allocator reuses the block every step.

A member runs per matrix (:func:`kernel_group_reason`, shown by ``explain()``) when its update has
reductions or weight statistics (Adafactor: eager middle + K2), keeps ``coap_exp_avg`` (K1 does not
update it), or has a state storage no K1 reads; and for one step (:func:`kernel_runs`) when it has no
gradient, its step count differs from its neighbours', or its state tensors or gradient differ in dtype,
shape or strides from the run's first member (a user assignment, a checkpoint of another layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..lowering.kernels import grouped_update_stored_, storage_modes
from .settings import EMA_KEY

__all__ = ["SCRATCH_BYTES", "describe", "kernel_group_reason", "kernel_group_update_", "kernel_runs"]

#: Most bytes of the fp32 ``D`` scratch one grouped launch pair may take (module docstring).
SCRATCH_BYTES = 256 * 1024 * 1024


def kernel_group_reason(layout: Any) -> str | None:
    """Why a kernel-path matrix cannot join a kernel group (None: it can; module docstring)."""
    program = layout.program.program
    if program.epilogue is None or program.decomposition.param_stats:
        return "kernel path with reductions or weight statistics: eager low-rank middle + K2 per matrix"
    if EMA_KEY in layout.states.storages:
        return "kernel path keeping coap_exp_avg (K1 does not update it): per matrix"
    if storage_modes(layout.states, program.epilogue.state_names) is None:
        return "kernel path with a state storage no K1 reads: per matrix"
    return None


def _signature(p: Tensor, state: dict, plan: Any, counters: Any) -> tuple | None:
    """What the members of a run must share (None: the member runs per matrix this step)."""
    if p.grad is None or plan is None or "step" not in state or any(k not in state for k in plan.keys):
        return None
    tensors = tuple((t.dtype, t.shape, t.stride(), t.device) for t in (state[k] for k in plan.keys))
    return (plan.kernel_id, counters.count(p, state), p.grad.dtype, tensors)


def kernel_runs(layout: Any, states: Sequence[dict], counters: Any, plans: dict) -> list[tuple[int, int]]:
    """The runs ``[s, e)`` of consecutive members that step as one (module docstring): equal
    :func:`_signature` (kernel, host-side step count, gradient dtype, state tensor layouts), cut so that
    one run's ``D`` scratch stays within :data:`SCRATCH_BYTES`; ``plans[p]``
    is the member's :class:`~coap_compile.lowering.kernels.StoredKernelPlan` of this step."""
    sigs = [_signature(p, st, plans.get(p), counters) for p, st in zip(layout.members, states)]
    runs: list[tuple[int, int]] = []
    start = None
    for k, sig in enumerate(sigs):
        if start is not None and sig != sigs[start]:
            runs.append((start, k))
            start = None
        if start is None and sig is not None:
            start = k
    if start is not None:
        runs.append((start, len(sigs)))
    per = max(1, SCRATCH_BYTES // (layout.rows * layout.rank * 4))  # members whose D fits the scratch cap
    return [(c, min(c + per, e)) for s, e in runs for c in range(s, e, per)]


def kernel_group_update_(
    layout: Any,
    runs: Sequence[tuple[int, int]],
    grads: Sequence[Tensor | None],
    states: Sequence[dict],
    plans: dict,
    scalars: Any,
) -> None:
    """One step of the members in ``runs`` (module docstring), in place. ``grads`` were read before the
    states (the compiled-region contract); ``scalars``: the runner's :class:`~.scalars.LiveScalars`."""
    program, policy, dtype = layout.program.program, layout.policy, layout.dtype
    backend, input_precision = layout.kernels
    for s, e in runs:
        k_t, lr_t, hypers = scalars.inputs(layout.index, states[s])
        ws, gs, projs = layout.members[s:e], [], []
        for p, g, st in zip(ws, grads[s:e], states[s:e]):
            proj = policy.basis(st)
            projs.append(proj if proj.dtype == dtype else proj.to(dtype))
            if program.prologue is not None:
                g = program.prologue(p.to(dtype), g.to(dtype), k_t, lr_t, *hypers)
            gs.append(g)
        grouped_update_stored_(
            plans[ws[0]], ws, gs, projs, states[s:e], k_t + 1, lr_t, hypers,
            transposed=layout.transposed[s:e], backend=backend, input_precision=input_precision,
        )  # fmt: skip
        torch._foreach_add_([st["step"] for st in states[s:e]], 1.0)


def describe(layout: Any) -> str:
    """``explain()``'s line for a kernel group."""
    backend, precision = layout.kernels
    return (
        f"  param group {layout.index}: {len(layout.members)} matrices, states {layout.rows}x{layout.rank} "
        f"on {layout.members[0].device}: kernel path (backend={backend!r}, input_precision={precision!r}): "
        "one grouped K1 + one grouped K2 launch per run of ready members (kernels/grouped.py)"
    )
