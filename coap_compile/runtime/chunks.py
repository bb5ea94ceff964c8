"""The grouped update's chunks as tasks of one ordered batch on the member pool.

A matrix group's members that step as one (:func:`.grouped.ready`) are cut into *chunks*
(:func:`.grouped.chunk_members`: cache-sized slices eagerly, the whole run for a fused loop). One
chunk ``[s, e)`` of ``K`` members computes, then writes::

    project   X̃[k] = X_k P_k                        (k = 1…K: one GEMM each, into a K×M×r buffer)
    middle    (decay, D, k', s') = lowrank(X̃, s)    (the elementwise pass: eager ops or one fused loop)
    weight    W_k ← decay · W_k + scale · D_k P_kᵀ   (one addmm_ each)
    commit    s ← s',  step ← k'                     (only after every weight of the chunk)

Everything a chunk writes is its own (members, weights, state slices, step counters), so chunks are
independent, and everything fallible (allocations, the compiled loop) runs before its first write.

**The batch** (:func:`chunk_batch`). An eager chunk is one task (its parts in a row, its member GEMMs on
the pool when it is alone in its batch). A fused run on the member pool is split into its parts, ordered
by :class:`~.threads.Task` dependencies: each ``project`` is a task, ``middle`` waits for its chunk's
projections, each ``weight`` for its ``middle``, ``commit`` for its weights. Runs are listed largest
first, projections and loops before every run's writes; a thread takes the first task whose
dependencies have finished. So while one thread runs the largest run's loop, the other projects,
loops and writes the smaller runs, and both share the largest run's member GEMMs: with the whole run
as one task, the smaller run's thread sat idle through the larger's GEMMs. A chunk's weights *open*
its unit: after an error, the opened chunks still finish (weights and states) and no other task
starts, so every chunk is written completely or not at all.

**Measured** (demo LM, ``backend="inductor"``, 2-core Xeon, 2 threads, ``opt.step()`` medians of 8
interleaved rounds of 10 steps in one process, two runs; whole-run tasks against parts):

* fp32 states: 13.66 → 12.43 ms and 13.55 → 12.16 ms;
* bf16: 16.89 → 14.42 and 16.43 → 14.44 ms;
* int8: 26.45 → 25.27 and 25.70 → 24.05 ms (the eager fp32 step beside them: 16.76 and 17.61 ms).

Before this, the larger run's task held its member GEMMs in one thread: the fused fp32 step summed
19.3 ms of chunk time over two threads but took 12.8 ms of batch wall time. A first version ran the
parts in four barrier-separated batches (all projections, all loops, all ``D Pᵀ``, all commits): int8's
two loops (≈ 6 and 11 ms) then left one thread idle for the difference. Also tried: halving every fused
run of an even number of members (one more loop, the same signature), int8 23.05 / 24.76 and 22.89 /
23.68 ms, fp32 unchanged: within this VM's noise, not kept.

Serially (one thread, or the pool unavailable) a fused run stays one task, so only one run's
temporaries (``X̃``, the new states, ``D``) are alive at a time; split on the pool, every fused run's
buffer of ``X̃`` is allocated when the batch is built and its temporaries live until its commit (with
whole-run tasks: at most one run per thread). Groups are few (one per distinct ``M×r``), and the pool
runs only for small steps (:func:`~.threads.step_threads`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor

from ..lowering.eager import apply_reprojection_
from ..lowering.inductor import elementwise
from ..lowering.scalarsplit import split_scalars
from .grouped import GroupBuffers, MatrixGroup, chunk_members
from .threads import Task, member_threads, run_members

__all__ = ["Chunk", "chunk_batch", "grouped_chunks"]


def grouped_chunks(
    layout: MatrixGroup,
    group: GroupBuffers,
    runs: Sequence[tuple[int, int]],
    grads: Sequence[Tensor | None],
    states: Sequence[dict],
    scalars: tuple[Tensor, list[Tensor]],
    *,
    compiling: bool,
) -> list[Chunk]:
    """This step's chunks of the members in ``runs`` (module docstring). ``scalars`` are the group's
    ``(lr, h)``; ``grads`` were read before the states (the compiled-region contract)."""
    lr_t, hypers = scalars
    itemsize = torch.empty((), dtype=layout.dtype).element_size()
    # fused: one compiled loop over the run (no multi-pass cache effect to chunk for)
    chunk = chunk_members(layout, itemsize, layout.members[0].device, compiling or layout.fused)
    program = layout.program.program
    out = []
    for first, end in runs:
        k_t = group.steps[first].to(torch.float64)
        hoisted = (  # the run's per-step scalars, once for all its chunks (lowering.scalarsplit)
            None if compiling else split_scalars(program.lowrank, len(program.state_names)).scalars(
                k_t, lr_t, *hypers)
        )  # fmt: skip
        inputs = (k_t, lr_t, hypers)
        out += [
            Chunk(layout, group, s, min(s + chunk, end), grads, states, inputs, hoisted, compiling)
            for s in range(first, end, chunk)
        ]
    return out


def chunk_batch(chunks: Sequence[Chunk]) -> list:
    """The ordered batch of ``chunks`` for :func:`~.threads.run_members` (module docstring): eager chunks
    as whole tasks first, then fused runs in parts when the member pool would run them (serially a run's
    parts in a row keep one run's temporaries alive, not every run's)."""
    split = member_threads() > 1
    whole = [c for c in chunks if not (split and c.fused)]
    parts = sorted((c for c in chunks if split and c.fused), key=lambda c: -c.size)
    batch: list = [c.run for c in whole]  # plain callables: a batch of whole chunks runs unordered
    middles = []
    for c in parts:
        first = len(batch)
        c.prepare()
        batch += [Task(partial(c.project, k)) for k in range(c.members)]
        batch.append(Task(c.middle, after=tuple(range(first, len(batch)))))
        middles.append(len(batch) - 1)
    for c, middle in zip(parts, middles):
        first = len(batch)
        batch += [Task(partial(c.weight, k), (middle,), unit=id(c), opens=True) for k in range(c.members)]
        batch.append(Task(c.commit, tuple(range(first, len(batch))), unit=id(c)))
    return batch


class Chunk:
    """Members ``[start, end)`` of a run: the parts of one chunk's update (module docstring), each keeping
    what it computed for the next. ``compiling``: inside a traced step (``X̃`` is then a stack of
    products, which Inductor writes in place, and nothing is read back to the host)."""

    def __init__(self, layout, group, start, end, grads, states, inputs, hoisted, compiling) -> None:
        self.layout, self.group, self.start, self.end = layout, group, start, end
        self.grads, self.inputs, self.hoisted, self.compiling = grads, inputs, hoisted, compiling
        self.states = states
        self.projs: list[Tensor] = []
        self.x_proj: Tensor | None = None
        self.parts: dict[str, Tensor] = {}
        self.decay: Tensor | float | None = None
        self.delta = self.new_step = None
        self.new_parts: dict[str, Tensor] = {}

    @property
    def members(self) -> int:
        return self.end - self.start

    @property
    def fused(self) -> bool:
        """Whether the elementwise pass is one compiled loop (:mod:`coap_compile.lowering.inductor`)."""
        return self.layout.fused and not self.compiling

    @property
    def size(self) -> int:
        """Elements of one low-rank state of the chunk (``K·M·r``)."""
        return self.members * self.layout.rows * self.layout.rank

    def x_of(self, k: int) -> Tensor:
        """Member ``k``'s projected quantity ``X`` in canonical orientation (the prologue's, if any)."""
        layout, i = self.layout, self.start + k
        program, dtype = layout.program.program, layout.dtype
        k_t, lr_t, hypers = self.inputs
        p, g = layout.members[i], self.grads[i]
        x = g if program.prologue is None else program.prologue(p.to(dtype), g.to(dtype), k_t, lr_t, *hypers)
        return (x.t() if layout.transposed[i] else x).to(dtype)

    def prepare(self, buffer: bool = True) -> None:
        """The chunk's bases ``P`` in the work dtype and (``buffer``) its ``K×M×r`` buffer of ``X̃``, before
        its first part runs (a whole chunk: in its task, so only running chunks hold them)."""
        dtype = self.layout.dtype
        bases = map(self.layout.policy.basis, self.states[self.start : self.end])
        self.projs = [p if p.dtype == dtype else p.to(dtype) for p in bases]
        if buffer:
            shape = (self.members, self.layout.rows, self.layout.rank)
            self.x_proj = torch.empty(shape, dtype=dtype, device=self.grads[self.start].device)

    def project(self, k: int) -> None:
        """``X̃[k] = X_k P_k`` into the chunk's buffer."""
        torch.mm(self.x_of(k), self.projs[k], out=self.x_proj[k])

    def middle(self) -> None:
        """The elementwise pass: ``(decay, D, k', new parts)`` from ``X̃`` and the stacked states; writes
        nothing."""
        layout = self.layout
        program = layout.program.program
        if self.compiling:
            self.x_proj = torch.stack([self.x_of(k) @ proj for k, proj in enumerate(self.projs)])
        self.parts = {key: self.group.buffers[key][self.start : self.end] for key in layout.keys}
        by_name = {spec.name: spec for spec in layout.specs}
        specs = tuple(by_name[n] for n in program.state_names)
        decay, self.delta, self.new_step, self.new_parts = elementwise(
            self.fused, program, specs, layout.ema, None if layout.fused else layout.members[self.start],
            self.x_proj, self.parts, self.inputs, self.hoisted,
        )  # fmt: skip
        if not self.compiling and isinstance(decay, Tensor):
            decay = float(decay)  # one host read per chunk (apply_reprojection_ would read it per member)
        self.decay = decay

    def weight(self, k: int) -> None:
        """``W_k ← decay · W_k + scale · D_k P_kᵀ`` (one ``addmm_``)."""
        layout, i = self.layout, self.start + k
        p = layout.members[i].t() if layout.transposed[i] else layout.members[i]
        apply_reprojection_(p, self.decay, self.delta[k], self.projs[k], layout.scale)

    def commit(self) -> None:
        """The states and step counters, only after every weight of the chunk (update.py's contract)."""
        for key, value in self.new_parts.items():
            self.parts[key].copy_(value)
        self.group.steps[self.start : self.end].copy_(self.new_step)

    def run(self) -> None:
        """The whole chunk in one task; its member GEMMs in parallel when it is alone in its batch
        (:func:`~.threads.run_members`)."""
        members = range(self.members)
        self.prepare(buffer=not self.compiling)
        if not self.compiling:
            run_members([partial(self.project, k) for k in members])
        self.middle()
        run_members([partial(self.weight, k) for k in members])
        self.commit()
