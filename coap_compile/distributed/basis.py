"""``P`` of an FSDP2 weight sharded by rows: stored as a slice, gathered for the step that needs it.

**Layout.** The weight ``W`` (``m×n``) is ``Shard(0)`` on its mesh; ``P`` (``n×r``, the rows side of
:mod:`.fsdp`) is stored as a DTensor with the *weight's* mesh and placements (``(Shard(0),)``, or
``(Replicate(), Shard(0))`` under HSDP) whose rows are ``P``'s ``n`` rows cut like ``torch.chunk``:
rank ``k`` of the shard group holds ``P[o_k : o_k + n_k]`` with ``n_k = len(torch.chunk(range(n), W)[k])``
(``⌈n/W⌉`` for the first ranks, the last ones shorter or empty). DCP saves, loads and reshards it as
it does the ``m×r`` moments (2 → 4 and 4 → 2 ranks are tested).

**Use.** Whatever needs the whole ``P`` (the projected update ``X̃ = X P``, ``W ← W + D Pᵀ``; a refresh)
runs inside :func:`gathered_basis`, which swaps ``state["proj"]`` for the gathered full ``P`` (one
``all_gather`` of the ``⌈n/W⌉×r`` slices, zero-padded to equal size, over the shard group) and, on
exit, writes the rows of this rank back into the stored slice (in place: the DTensor keeps its
identity, so the schedule's cache of checked state layouts stays valid) and drops the gathered copy.
A ``P`` that is new or of a new shape (init, rebase) is stored as a new slice; under
``projection_sharding="replicated"`` the full ``P`` stays a plain tensor (the layout of issue 10).
Inside the context the policies and the update are the single-process code on a replicated ``P``, so
the sharded run is bit-identical to the replicated one (the gather copies bits; the refresh
collectives are unchanged: ``P'`` is computed in full from all-reduced values, then sliced).

**Traffic and peak** (per step and weight, float32, ``s = 4``): the update gathers ``P`` once:
each rank sends ``s·⌈n/W⌉·r`` and receives ``s·(W−1)·⌈n/W⌉·r``; FSDP2 itself all-gathers the weight
(``s·m·n`` received per forward, again per backward with ``reshard_after_forward``) and reduce-scatters
its gradient (``s·m·n``), so the ``P`` gather is ``r/(2m)`` to ``r/(3m)`` of FSDP2's own volume for that
weight (1/8 to 1/12 at LLaMA-1B's ``r/m = 1/4``). A refresh step gathers once more (before computing,
again before committing, so no old ``P`` is held while the other weights' refreshes compute). The
transient is one gathered ``n×r`` at a time during the update; during a refresh step the new ``P`` of
every refreshing weight is held in full until the commit (the atomicity copy of
:mod:`coap_compile.runtime.refresh`, which the replicated layout paid as well). Not done: refreshes that
produce only the slice (a reduce-scatter of the correlation gradient, a column-sharded SVD of ``B``)
would save, on refresh steps only, the all-reduce's second half and the commit's re-gather, and would no
longer be bit-identical to the replicated layout.

**Replicated or sharded** (``projection_sharding``, a param-group key, agreed across ranks). Measured
(``benchmarks/fsdp_basis.py`` → ``benchmarks/results/fsdp_basis_timing.json``: 4 × ``Linear(512, 512)``,
``rank_ratio=4``, AdamW, gloo on a 2-core VM under load 12–13), sharded / replicated, medians of 38
steps: ``opt.step()`` alone 29.9 / 15.5 ms at W = 2 and 85.2 / 30.2 ms at W = 4 (oversubscribed);
forward + backward + step 121.5 / 114.0 and 416 / 356 ms (an earlier run: 0.94× and 0.98×, so between
noise and +17 %); state per rank 0.75× and 0.50× of replicated. Rule: sharded is the default at every
``W`` (the per-rank memory is what COAP is for, and only this layout keeps it below AdamW as ``W`` grows);
replicated saves the gather and its transient where step time matters more than memory, most usefully
at small ``W`` where it costs only ``(1 − 1/W)·n·r`` more elements per weight.

**Overlap** of the next weight's gather with the current update is not implemented: on gloo with 2
shared CPU cores it cannot be measured meaningfully (the collective and the compute compete for the same
cores); the hook would be an async ``all_gather`` issued for weight ``i+1`` before weight ``i``'s update
(in :meth:`~coap_compile.runtime.step.StepRunner.basis`), waited at weight ``i+1`` (transient: two
gathered ``P``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from .comm import CommLog, all_gather, group_size
from .fsdp import ShardSpec, is_dtensor

__all__ = ["basis_spec", "gather_basis", "gathered_basis", "p_gather_bytes"]


def basis_spec(spec: ShardSpec, n: int) -> ShardSpec:
    """The sharding of a weight's ``P`` (``n`` rows) on the weight's mesh: ``torch.chunk`` rows of ``n``."""
    mesh = spec.mesh
    dim = mesh.ndim - 1
    world, rank = mesh.size(dim), mesh.get_local_rank(dim)
    chunk = -(-n // world)
    start, stop = min(rank * chunk, n), min((rank + 1) * chunk, n)
    return ShardSpec(mesh, spec.placements, spec.group, n, start, stop - start)


def gather_basis(local_rows: Tensor, spec: ShardSpec, log: CommLog | None = None) -> Tensor:
    """The full ``P`` (``n×r``, a plain tensor) from every rank's slice: one all-gather of the slices
    zero-padded to ``⌈n/W⌉`` rows (label ``"p_gather"``); on a one-rank group the stored slice itself."""
    world = group_size(spec.group)
    if world == 1:
        return local_rows  # the whole P already: no collective, no copy
    chunk = -(-spec.rows // world)
    padded = local_rows.new_zeros((chunk, *local_rows.shape[1:]))
    padded[: local_rows.shape[0]] = local_rows
    return all_gather(padded, spec.group, log, "p_gather")[: spec.rows]


def p_gather_bytes(n: int, rank: int, world: int, itemsize: int = 4) -> int:
    """Bytes this rank passes to the ``P`` all-gather of one weight (its padded slice)."""
    return itemsize * -(-n // world) * rank


@contextmanager
def gathered_basis(state: dict, spec: ShardSpec, sharded: bool, log: CommLog | None = None) -> Iterator[None]:
    """Within the block ``state["proj"]`` is the full plain ``P``; afterwards it is stored sharded
    (``sharded``) or plain (module docstring). ``state`` is the raw state dict; ``spec`` the weight's
    :class:`~.fsdp.ShardSpec`. A state without ``P`` (before the init) gets it stored on exit."""
    stored = state.get("proj")
    gathered = None
    if stored is not None and is_dtensor(stored):
        pspec = basis_spec(spec, int(stored.shape[0]))
        gathered = gather_basis(stored.to_local(), pspec, log)
        state["proj"] = gathered
    try:
        yield
    finally:
        _store(state, spec, sharded, stored, gathered)


def _store(state: dict, spec: ShardSpec, sharded: bool, stored, gathered) -> None:
    full = state.get("proj")
    if full is None or is_dtensor(full):
        return
    if not sharded:
        return  # replicated: the plain full P stays (a DTensor one was gathered above)
    pspec = basis_spec(spec, int(full.shape[0]))
    rows = full[pspec.row_offset : pspec.row_offset + pspec.local_rows]
    if (
        stored is not None
        and is_dtensor(stored)
        and tuple(stored.shape) == tuple(full.shape)
        and (stored.dtype == full.dtype)
    ):
        target = stored.to_local()
        if target.data_ptr() != rows.data_ptr():  # (one rank: the "gathered" P is the stored one)
            target.copy_(rows)  # the same DTensor object: cached layouts stay valid
        state["proj"] = stored
        return
    state["proj"] = pspec.wrap(rows.clone())
