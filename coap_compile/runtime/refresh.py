"""Refreshes of ``P``, two-phase so that a step that raises leaves every state as it was.

Phase 1 (:func:`plan_refresh`, per projected parameter with a gradient) computes what the schedule
(:mod:`.schedule`) finds due at the parameter's completed-step count ``k`` without writing anything,
and returns a *commit* closure; phase 2 runs all commits. Actions:

* ``init`` (no state yet): ``P = policy.init(X)``, fresh low-rank base states, ``step = 0``;
* ``rebase`` (the state's rank, projection policy or storage precision no longer matches the group's
  settings, e.g. after ``group["rank"] = 4``): ``P_new = policy.init(X)`` at the new rank, first
  moments mapped ``M ← (M P_oldᵀ) P_new`` and second moments ``V ← ((√V P_oldᵀ) P_new)²`` (other states
  restart from their initial value, since their meaning under a change of basis is not known), each
  stored in the current precision;
* a policy refresh (``correlation``, ``svd``, ``resample``, ``select``): computed in float32 on copies
  of the policy's tensors, committed with ``copy_`` (so ``P`` keeps its identity for compiled code; a
  bf16 ``P`` is rounded to nearest there), then ``restore_state`` maps the moments into the new basis.

A change of the compiled signature that adds a low-rank state (``amsgrad`` switched on) creates it
from its initial value at commit; a state the new signature no longer has is dropped.

Phase 1 keeps the new ``P`` of every refreshing parameter alive until phase 2: transiently one extra
``N×r`` per refreshing matrix (the price of atomic refreshes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..compiler import CompiledBase
from ..projection import ProjectionPolicy
from .inits import lowrank_inits
from .layout import ParamLayout
from .precision import StateIO
from .schedule import Due, policy_keys, step_count
from .settings import EMA_KEY

__all__ = ["canonical_input", "plan_refresh"]

Commit = Callable[[], None]


def canonical_input(
    p: Tensor, compiled: CompiledBase, dtype, k_t, lr_t, hypers, *, transposed: bool | None = None
) -> tuple[Tensor, bool]:
    """The ``M×N`` view ``X`` of the projected quantity (``G``, or e.g. ``G + λW``; ``Gᵀ`` when
    ``transposed``, the plan's side; None: the canonical side, ``Gᵀ`` for a wide weight), and
    ``transposed``."""
    if transposed is None:
        transposed = p.shape[0] < p.shape[1]
    g = p.grad
    prologue = compiled.program.prologue
    if prologue is not None:
        g = prologue(p.to(dtype), g.to(dtype), k_t, lr_t, *hypers)
    return (g.t() if transposed else g), transposed


def _stored(io: StateIO, values: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, value in values.items():
        out.update(io.fresh(name, value))
    return out


def _policy_state(init: dict[str, Tensor], proj_dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.to(proj_dtype) if k == "proj" else v for k, v in init.items()}


def _working(state: dict, keys: tuple[str, ...], dtype: torch.dtype) -> dict[str, Tensor]:
    """Copies of the policy's tensors, ``P`` in the working dtype (a bf16 ``P`` computes in float32)."""
    return {k: state[k].to(dtype, copy=True) if k == "proj" else state[k].clone() for k in keys}


def _old_basis(state: dict, policy: ProjectionPolicy, keys: tuple[str, ...]) -> Tensor | None:
    """The basis the state's moments are expressed in, also after a change of ``projection``."""
    if set(keys) <= state.keys():
        return policy.basis(state)
    if "proj" in state:  # a dense policy's state
        return state["proj"]
    if "dct_index" in state:
        from ..projection.dct import DctPolicy

        return DctPolicy().basis(state)
    return None


def _load_any(state: dict, name: str) -> Tensor | None:
    from ..storage import load_any

    try:
        return load_any(state, name)
    except KeyError:
        return None


def _map_moments(program, state: dict, old_p: Tensor | None, new_p: Tensor, inits: dict[str, Tensor]) -> dict:
    """Moments of ``state`` (any stored precision) expressed in ``new_p`` (any rank), as float32; other
    states (and everything when the old basis is unknown) from ``inits``."""
    out = {}
    for name, init in inits.items():
        kind = "first_moment" if name == EMA_KEY else program.state_kinds.get(name, "other")
        old = _load_any(state, name)
        if old is None or kind == "other" or old_p is None:
            out[name] = init
            continue
        old = old.to(init.dtype)
        a, b = old_p.t().to(old.dtype), new_p.to(old.dtype)
        out[name] = (old @ a) @ b if kind == "first_moment" else ((old.clamp_min(0).sqrt() @ a) @ b).square()
    return out


def plan_refresh(layout: ParamLayout, p: Tensor, io: StateIO, due: Due, inputs, comm=None) -> Commit | None:
    """Phase 1 for one projected matrix: the commit of what :func:`.schedule.due` found (None: nothing).

    ``p`` is the local weight with its gradient (an FSDP2 weight's local rows:
    :func:`~coap_compile.distributed.fsdp.local_param`); the policy's refreshes run over ``layout.comm``
    (the rows side's aligned convention, collectives over the shard group); ``comm`` is that context
    (default ``layout.comm()``: no collective log)."""
    comm = layout.comm() if comm is None else comm
    if due.action == "init":
        return _plan_init(layout, p, io, inputs, comm)
    if due.action == "rebase":
        return _plan_rebase(layout, p, io, inputs, comm)
    if due.action in ("refresh", "fixup"):
        return _plan_refresh(layout, p, io, due, inputs, comm)
    return None


def _rows(layout: ParamLayout, p: Tensor) -> int:
    return p.shape[1] if layout.transposed else p.shape[0]  # M (local rows of a sharded weight)


def _x(layout: ParamLayout, p: Tensor, inputs) -> Tensor:
    return canonical_input(p, layout.program, layout.work_dtype, *inputs, transposed=layout.transposed)[0]


def _plan_init(layout: ParamLayout, p: Tensor, io: StateIO, inputs, comm) -> Commit:
    """``P = policy.init(X)``, fresh low-rank states, ``step = 0``."""
    state, dtype = io.state, layout.work_dtype
    x = _x(layout, p, inputs)
    new = {"step": torch.zeros((), dtype=torch.float32)}
    new.update(_policy_state(layout.policy.init_state(x.to(dtype), layout.rank, comm),
                             layout.precision.proj_dtype))  # fmt: skip
    new.update(_stored(io, lowrank_inits(layout.program, layout.policy, _rows(layout, p), layout.rank, dtype,
                                         p.device)))  # fmt: skip

    def commit_init() -> None:
        state.clear()
        state.update(new)

    return commit_init


def _plan_rebase(layout: ParamLayout, p: Tensor, io: StateIO, inputs, comm) -> Commit:
    """A new basis at the layout's rank (or, when only the storage precision changed, the same ``P``),
    the moments mapped into it and stored in the current precision."""
    state, dtype, policy, rank = io.state, layout.work_dtype, layout.policy, layout.rank
    keys = policy_keys(policy)
    x = _x(layout, p, inputs)
    init = policy.init_state(x.to(dtype), rank, comm)
    same_basis = set(keys) <= state.keys() and policy.state_shape(state)[1] == rank
    if same_basis:  # only the storage precision changed: keep P, convert the states
        init = _working(state, keys, dtype)
    mapped = _map_moments(
        layout.program.program, state, _old_basis(state, policy, keys), policy.basis(init),
        lowrank_inits(layout.program, policy, _rows(layout, p), rank, dtype, p.device),
    )  # fmt: skip
    rebased = {**_policy_state(init, layout.precision.proj_dtype), **_stored(io, mapped)}

    def commit_rebase() -> None:
        step = state["step"]
        state.clear()
        state.update({"step": step, **rebased})

    return commit_rebase


def _plan_refresh(layout: ParamLayout, p: Tensor, io: StateIO, due: Due, inputs, comm) -> Commit:
    """The policy's refresh on working copies (committed with ``copy_``), ``restore_state``'s moment map,
    and the states a new compiled signature adds or drops."""
    state, dtype, policy = io.state, layout.work_dtype, layout.policy
    program, keys, names = layout.program.program, policy_keys(policy), tuple(io.storages)
    refreshed: dict[str, Tensor] = {}
    changed = False
    if due.kind:
        x = _x(layout, p, inputs)
        first_name = program.first_moment or (EMA_KEY if EMA_KEY in names else None)
        first = io.load(first_name) if first_name else None
        refreshed = _working(state, keys, dtype)
        changed = policy.refresh(
            refreshed, x, step_count(state), first_moment=first, transposed=layout.transposed, comm=comm
        )
    restore = layout.settings.restore_state and changed
    rank_now = policy.state_shape(state)[1]

    def commit_refresh() -> None:
        old = policy.snapshot(_working(state, keys, dtype)) if restore else None
        for key, value in refreshed.items():
            state[key].copy_(value)
        if old is not None:
            _restore_moments(program, policy, io, old, _working(state, keys, dtype))
        for name in due.obsolete:
            del state[name]
        if due.extra:
            inits = lowrank_inits(layout.program, policy, _rows(layout, p), rank_now, dtype, p.device)
            state.update(_stored(io, {n: inits[n] for n in due.extra}))

    return commit_refresh


def _restore_moments(program, policy: ProjectionPolicy, io: StateIO, old: dict, current: dict) -> None:
    """``restore_state``: the first and second moments mapped from ``old``'s basis to ``current``'s."""
    kinds, names = program.state_kinds, tuple(io.storages)
    first = [n for n in program.state_names if kinds[n] == "first_moment"] + (
        [EMA_KEY] if EMA_KEY in names else []
    )
    second = [n for n in program.state_names if kinds[n] == "second_moment"]
    values = {n: io.load(n).clone() for n in (*first, *second)}
    policy.remap_moments(old, current, first=[values[n] for n in first], second=[values[n] for n in second])
    for n, v in values.items():
        io.store_(n, v)
