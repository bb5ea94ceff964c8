"""Grouped update: projected matrices with the same low-rank state shape updated together.

A *matrix group* is every projected weight of one param group whose low-rank states have the same
shape ``M×r`` (``M = max(m, n)``), the same dtype and device, and that runs the same compiled program
eagerly with fp32 storage. For its ``K`` members, one step is::

    X̃_k = X_k P_k                      (k = 1…K: one GEMM each, written into the k-th slice of X̃ (K×M×r))
    (decay, D, s', k') = lowrank(X̃, s, k, lr, h)   (ONE elementwise pass over the stacked K×M×r states)
    W_k ← decay · W_k + scale · D_k P_kᵀ            (one addmm_ each: the decay rides in the GEMM's β)
    s ← s',  step ← k',  coap_exp_avg ← lerp(·, X̃, 1 − β)     (one copy per state for the whole group)

**Storage layout.** The group owns one contiguous ``K×M×r`` buffer per low-rank state (and a ``K``
vector of step counters); each member's ``state[name]`` *is* the ``k``-th view of it, so the stacked
program reads and writes the states in place and no stacking copy happens per step. ``P`` (and every
policy tensor: Flora's seed, DCT's indices) stays a per-parameter tensor, since the GEMMs are per
member. ``state_dict()`` therefore holds the same per-parameter tensors (names, shapes, dtypes) as the
per-matrix path, tensors only; ``torch.save`` writes a group's shared storage once (same bytes), and
loading copies every tensor (:mod:`.checkpoint`), so checkpoints are interchangeable between
``grouped=True`` and ``grouped=False``. Whenever a member's entry is not its view any more (first step,
a re-base after a rank/precision change, a loaded checkpoint, ``deepcopy``/unpickling, a user
assignment), :func:`pack_` copies it into the buffer (allocating it the first time: transiently the
group's states twice) before the step. Byte counts are unchanged; a per-parameter byte count must
count ``numel · element_size`` of each view (its ``untyped_storage()`` is the group's).

**Bit-identity.** Every member's result is bit-identical to the per-matrix path on CPU
(``tests/test_grouped.py`` checks ``torch.equal`` on weights and states for AdamW, Adam with L2
decay (prologue), SGD-momentum, RMSprop (``coap_exp_avg``), COAP/GaLore/Flora/DCT policies, mixed
orientations, across refreshes): the GEMMs are the same calls on the same operands, and the derived
program is elementwise (every op is a correctly rounded IEEE operation per element, applied with the
same 0-d scalars, so stacking cannot change a bit).

**Measured design choices** (2-core AMD EPYC, torch 2.13 CPU, 1 thread, medians of 60 interleaved
repetitions, ``thread_time``):

* ``X P``: per-member GEMMs (``torch.mm(..., out=X̃[k])``) rather than ``torch.bmm(torch.stack(X), P)``:
  stacking copies every gradient (and transposes the ``m < n`` ones): 17×(256×256, r 64) 2.09 vs
  1.97 ms, 8×(688×256) 2.63 vs 2.83 ms, 4 transposed (256×688) 1.16 vs 1.81 ms; only at 16×(64×64,
  r 16) is ``bmm`` faster (0.048 vs 0.086 ms, 2.4 µs per matrix). Per-member GEMMs also let members
  of different orientation and width ``N`` share a group (only ``M×r`` must agree) and keep ``P``
  unstacked.
* ``D Pᵀ``: per-member ``addmm_(beta=decay)`` rather than ``bmm`` + ``_foreach_mul_``/``_foreach_add_``:
  the latter adds two passes over every weight (17×256×256: 2.17 vs 2.52 ms; 4 transposed 1.27 vs
  2.27 ms) and is bit-identical to ``addmm_`` only when ``scale`` is a power of two (with
  ``scale = 0.3`` 84 % of the entries differ by an ulp: the BLAS applies ``alpha`` inside the GEMM).
* **Chunks as tasks** (:mod:`.chunks`). The step runs every group's chunks as one batch on the member
  pool of a small CPU step (:mod:`.threads`: dynamic hand-out, each task on one thread, the same bits):
  an eager chunk as one task, a fused run as its parts (per-member GEMMs, the loop, per-member
  ``D Pᵀ``, the state copies, ordered by dependencies); a chunk alone in its batch spreads its
  per-member GEMMs there instead. Demo LM, 2-core Xeon: 20.8 ms per step against 27.7 ms without the
  pool (``benchmarks/results/member_pool/``).
* Refreshes stay per matrix (:mod:`.refresh`): they are rare (every ``T_u`` steps), and batched QR/SVD
  on CPU loops over LAPACK calls per matrix anyway.

**Storage precisions** (issue 20). bf16/int8 states join groups like fp32 ones: every *physical* key
is stacked (``exp_avg.q8``/``.absmax``/``.rng`` for int8, ``exp_avg``/``exp_avg.rng`` for bf16) and the
elementwise pass loads and stores them through :mod:`coap_compile.lowering.stacked`, where each member
keeps its own rounding stream (its ``[seed, counter]`` row) and its own int8 blocks, so every member's
codes, scales, bits and counters equal the per-matrix path's (``tests/test_grouped_storage.py``:
``torch.equal``). Members must share the storage configuration (part of the group key).
With ``backend="inductor"`` the pass (load → derived update → store) runs as one compiled loop over
the whole run of members (:mod:`coap_compile.lowering.inductor`; no chunking: the fused loop has no
multi-pass cache effect, and one signature per group keeps compiles few).

**What falls back to the per-matrix path** (each member then runs :func:`~.update.projected_update_`): a group
of one; on the kernel path (CUDA with ``backend="auto"``, or ``backend="triton"``), only what
:func:`.grouped_kernels.kernel_group_reason` names (its groups, ``MatrixGroup.kernels`` set, run one grouped
K1 and one grouped K2 launch per run instead, fp32/bf16/int8 states alike: :mod:`.grouped_kernels`);
bases whose derived update has reductions or weight statistics (Adafactor: the captured graph's reductions
name dimensions of one matrix, so they keep per-matrix semantics); Tucker-projected 4-D weights (their
projection is a pair of mode products per member, not the ``X P`` / ``D Pᵀ`` GEMM pair this module batches
around, and convolution weights of one shape are few per model: the per-member contraction dominates, the
elementwise pass on a ``r₀×r₁×kh×kw`` core is small); members whose stored layout differs from the group's
(a checkpoint written with another ``quant_block_size``); and, for one step, a group in which some member
has no gradient or the members' step counts differ (e.g. a layer frozen for a while).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..lowering.inductor import uses_param
from ..lowering.stacked import StackedSpec, stacked_spec
from .grouped_kernels import describe, kernel_group_reason
from .selection import canonical_dims
from .settings import EMA_KEY

__all__ = [
    "CHUNK_BYTES",
    "GroupBuffers",
    "MatrixGroup",
    "build_groups",
    "chunk_members",
    "explain_groups",
    "pack_",
    "per_matrix_reason",
    "ready",
]

#: Bytes of one state slice per elementwise pass on CPU (measured knee, module docstring).
CHUNK_BYTES = 512 * 1024


@dataclass(frozen=True, eq=False)
class MatrixGroup:
    """``K ≥ 2`` projected matrices of param group ``index`` sharing ``rows × rank`` states (docstring):
    the group's layout, rebuilt with the parameters' layouts. ``names`` are the packed low-rank states
    (the program's, then ``coap_exp_avg`` if kept); ``key`` is what members share."""

    index: int
    members: tuple[Tensor, ...]
    transposed: tuple[bool, ...]
    rows: int
    rank: int
    names: tuple[str, ...]
    dtype: torch.dtype
    program: Any
    policy: Any
    scale: float
    ema_beta: float
    key: tuple = ()
    kernels: tuple[str, str] | None = None
    specs: tuple[StackedSpec, ...] = ()
    fused: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        """The packed physical keys of every state (``exp_avg``, ``exp_avg.q8``, ``exp_avg.rng``, …)."""
        return tuple(k for spec in self.specs for k in spec.keys)

    @property
    def ema(self) -> tuple[StackedSpec, float] | None:
        """The stacked ``coap_exp_avg`` and its coefficient, if the policy keeps one."""
        spec = next((s for s in self.specs if s.name == EMA_KEY), None)
        return None if spec is None else (spec, self.ema_beta)


@dataclass(eq=False)
class GroupBuffers:
    """The storage of one :class:`MatrixGroup`: ``buffers[name]`` is ``K×M×r``, ``steps`` the ``K`` step
    counters, ``views[name][k]`` member ``k``'s entry (``"step"`` included); allocated by :func:`pack_`
    at the first grouped step, dropped (re-packed on the next step) when the layouts are rebuilt."""

    buffers: dict[str, Tensor] = field(default_factory=dict)
    steps: Tensor | None = None
    views: dict[str, list[Tensor]] = field(default_factory=dict)


def per_matrix_reason(layout, grouped: bool) -> str | None:
    """Why the parameter of ``layout`` cannot join a matrix group (None: it can)."""
    from .layout import Kind

    if not layout.projected:
        return "full rank"
    if layout.kind is Kind.TUCKER:
        return "Tucker-projected 4-D weight"
    if not grouped:
        return "grouped=False"
    if layout.shard is not None:
        return "FSDP2-sharded: DTensor states, refreshes over the shard group"
    if layout.kernels is not None:
        return kernel_group_reason(layout)  # any storage: grouped K1/K2 launches (.grouped_kernels)
    program = layout.program.program
    if program.epilogue is None or program.decomposition.param_stats:
        return "reductions or weight statistics in the derived update: per-matrix semantics"
    return None


def build_groups(layouts: dict[Tensor, Any], grouped: bool) -> tuple[MatrixGroup, ...]:
    """Matrix groups (≥ 2 members, in parameter order) from the layouts: members share param group,
    ``M``, rank, state and weight dtype, device and state names."""
    by_key: dict[tuple, list[Tensor]] = {}
    for p, lay in layouts.items():
        if per_matrix_reason(lay, grouped) is None:
            names = tuple(lay.states.storages)
            rows = canonical_dims(p.shape, lay.transposed)[0]  # M (projection_side="rows": m)
            stores = tuple(
                (n, repr(s), lay.states.kinds.get(n, "other")) for n, s in lay.states.storages.items()
            )
            key = (
                lay.group, rows, lay.rank, lay.work_dtype, p.dtype, p.device, names, stores, lay.lowering,
                lay.kernels,
            )  # fmt: skip
            by_key.setdefault(key, []).append(p)
    out = []
    for key, members in by_key.items():
        if len(members) < 2:
            continue  # a group of one is the per-matrix path
        first = layouts[members[0]]
        transposed = tuple(layouts[p].transposed for p in members)
        sp = first.states
        specs = tuple(
            stacked_spec(n, sp.storages[n], sp.kinds.get(n, "other"), sp.shapes[n], key[5]) for n in key[6]
        )
        fused = first.lowering == "inductor" and not uses_param(first.program.program)
        out.append(MatrixGroup(
            key[0], tuple(members), transposed, key[1], key[2], key[6], key[3], first.program, first.policy,
            float(first.settings.scale), float(first.settings.first_moment_beta), key, first.kernels, specs,
            fused,
        ))  # fmt: skip
    return tuple(out)


def explain_groups(groups: Sequence[MatrixGroup], alone: dict[str, int], grouped: bool) -> str:
    """The grouped-update section of ``explain()``: the groups, and why the other matrices (``alone``:
    reason → count) run alone."""
    n = len(groups)
    lines = [f"grouped update: {n} group{'s' if n != 1 else ''} (grouped={grouped}; runtime/grouped.py)"]
    for mg in groups:
        if mg.kernels is not None:
            lines.append(describe(mg))
            continue
        device = mg.members[0].device
        chunk = chunk_members(mg, torch.empty((), dtype=mg.dtype).element_size(), device, False)
        precisions = "/".join(dict.fromkeys(spec.precision for spec in mg.specs))
        passes = (
            "one fused Inductor loop per run of members" if mg.fused
            else f"one elementwise pass per {min(chunk, len(mg.members))} members"
        )  # fmt: skip
        lines.append(
            f"  param group {mg.index}: {len(mg.members)} matrices, states {mg.rows}x{mg.rank} {precisions} "
            f"({mg.dtype} compute) on {device}: X P and D P^T per member (torch.mm / addmm_, on CUDA too), "
            f"{passes}"
        )
    lines += [f"  per matrix: {c} ({reason})" for reason, c in sorted(alone.items())]
    return "\n".join(lines)


def _repack(group: GroupBuffers, name: str, current: list[Tensor], states: Sequence[dict]) -> bool:
    like = current[0]
    if any(c.shape != like.shape or c.dtype != like.dtype or c.device != like.device for c in current):
        return False
    buf = group.steps if name == "step" else group.buffers.get(name)
    views = group.views.get(name)
    if (
        buf is None
        or views is None
        or buf.shape[1:] != like.shape
        or buf.dtype != like.dtype
        or (buf.device != like.device)
    ):
        buf = torch.stack(current)  # one copy: first step, or the states changed shape/dtype/device
        views = list(buf.unbind(0))
        if name == "step":
            group.steps = buf
        else:
            group.buffers[name] = buf
        group.views[name] = views
        for st, v in zip(states, views):
            st[name] = v
        return True
    for st, c, v in zip(states, current, views):
        if c is not v:
            v.copy_(c)
            st[name] = v
    return True


def pack_(layout: MatrixGroup, group: GroupBuffers, states: Sequence[dict]) -> bool:
    """Make every member's packed entries views of the group's buffers (copying entries that are not);
    False if some member lacks one (its first step has not happened yet), leaving everything as is."""
    names = (*layout.keys, "step")
    if any(n not in st for st in states for n in names):
        return False
    if any(not spec.matches(st) for st in states for spec in layout.specs):
        return False  # e.g. a checkpoint written with another quant_block_size: per matrix
    for name in names:
        current = [st[name] for st in states]
        views = group.views.get(name)
        if views is not None and all(c is v for c, v in zip(current, views)):
            continue
        if not _repack(group, name, current, states):
            return False
    return True


def ready(
    layout: MatrixGroup, group: GroupBuffers, states: Sequence[dict], counters
) -> list[tuple[int, int]]:
    """The runs ``[s, e)`` of members that step as one this step: maximal ranges of consecutive members
    that have a gradient and equal step counts (their bias corrections are one set of scalars), taken
    from ``counters`` (:class:`.counters.StepCounters`: host-side, no read in a steady step).
    Empty when the states are not packed yet (the first step initializes them per matrix)."""
    if not pack_(layout, group, states):
        return []
    ks = [counters.count(p, st) if p.grad is not None else -1 for p, st in zip(layout.members, states)]
    runs: list[tuple[int, int]] = []
    start = None
    for k, p in enumerate(layout.members):
        if start is not None and (p.grad is None or ks[k] != ks[start]):
            runs.append((start, k))
            start = None
        if start is None and p.grad is not None:
            start = k
    if start is not None:
        runs.append((start, len(layout.members)))
    return runs


def chunk_members(layout: MatrixGroup, itemsize: int, device: torch.device, compiling: bool) -> int:
    """Members per elementwise pass: on CPU as many as keep one state slice within :data:`CHUNK_BYTES`
    (module docstring: a pass over cache-sized slices is 2-4× faster than one over the whole group);
    the whole group on other devices and in a traced step (Inductor fuses the pass into one loop)."""
    if compiling or device.type != "cpu":
        return len(layout.members)
    return max(1, CHUNK_BYTES // (layout.rows * layout.rank * itemsize))
