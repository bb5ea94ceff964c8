"""Refreshes of ``P``, two-phase so that a step that raises leaves every state as it was.

Phase 1 (:func:`plan_refresh`, per projected parameter with a gradient) computes what the schedule
asks for at the parameter's completed-step count ``k`` without writing anything, and returns a
*commit* closure; phase 2 runs all commits. Kinds:

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
from ..distributed import fsdp
from ..distributed.comm import CommLog
from ..projection import ProjectionPolicy
from .precision import StateIO
from .settings import EMA_KEY

__all__ = ["canonical_input", "lowrank_inits", "plan_refresh", "policy_keys"]

Commit = Callable[[], None]


def policy_keys(policy: ProjectionPolicy) -> tuple[str, ...]:
    """The state entries a policy owns (``proj``, Flora's ``seed``, DCT's ``dct_index`` …)."""
    return tuple(policy.state_layout(1, 1, torch.float32))


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


def lowrank_inits(compiled: CompiledBase, policy, rows: int, rank: int, dtype, device) -> dict[str, Tensor]:
    """Initial values (float32/64) of the low-rank states, ``coap_exp_avg`` included when needed."""
    states = compiled.init_lowrank_states(rows, rank, dtype, device)
    if compiled.program.first_moment is None and policy.needs_first_moment:
        states[EMA_KEY] = torch.zeros((rows, rank), dtype=dtype, device=device)
    return states


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


def plan_refresh(
    io: StateIO,
    p: Tensor,
    rank: int,
    compiled: CompiledBase,
    policy: ProjectionPolicy,
    *,
    dtype: torch.dtype,
    proj_dtype: torch.dtype,
    inputs: tuple[Tensor, Tensor, list[Tensor]],
    restore: bool,
    transposed: bool | None = None,
    rows_side: bool = False,
    shard: fsdp.ShardSpec | None = None,
    comm: CommLog | None = None,
) -> Commit | None:
    """Phase 1 for one projected parameter; returns its commit (None when nothing is due).

    ``p`` is the local weight (an FSDP2 weight's local rows:
    :func:`~coap_compile.distributed.fsdp.local_param`), ``transposed`` the plan's side; ``rows_side``
    refreshes run through :mod:`coap_compile.distributed.fsdp` (its basis convention; collectives over
    ``shard.group``)."""
    state, program = io.state, compiled.program
    k = int(state["step"].item()) if "step" in state else 0
    if transposed is None:  # the canonical side (the plan's for projection_side="auto")
        transposed = p.shape[0] < p.shape[1]
    rows = p.shape[1] if transposed else p.shape[0]  # M (local rows of a sharded weight)

    def fresh_basis(x: Tensor) -> dict[str, Tensor]:
        if rows_side:
            return fsdp.init_basis(policy, x.to(dtype), rank, shard, comm)
        return policy.init_state(x.to(dtype), rank)

    if not state:
        x, _ = canonical_input(p, compiled, dtype, *inputs, transposed=transposed)
        new = {"step": torch.zeros((), dtype=torch.float32)}
        new.update(_policy_state(fresh_basis(x), proj_dtype))
        new.update(_stored(io, lowrank_inits(compiled, policy, rows, rank, dtype, p.device)))

        def commit_init() -> None:
            state.clear()
            state.update(new)

        return commit_init
    keys = policy_keys(policy)
    names = tuple(io.storages)
    proj_ok = "proj" not in keys or state.get("proj", torch.empty(0)).dtype == proj_dtype
    if (
        not set(keys) <= state.keys()
        or policy.state_shape(state)[1] != rank
        or not proj_ok
        or any(io.keys_of(n) and not io.matches(n) for n in names)
    ):
        x, _ = canonical_input(p, compiled, dtype, *inputs, transposed=transposed)
        init = fresh_basis(x)
        same_basis = set(keys) <= state.keys() and policy.state_shape(state)[1] == rank
        if same_basis:  # only the storage precision changed: keep P, convert the states
            init = _working(state, keys, dtype)
        mapped = _map_moments(
            program, state, _old_basis(state, policy, keys), policy.basis(init),
            lowrank_inits(compiled, policy, rows, rank, dtype, p.device),
        )  # fmt: skip
        rebased = {**_policy_state(init, proj_dtype), **_stored(io, mapped)}

        def commit_rebase() -> None:
            step = state["step"]
            state.clear()
            state.update({"step": step, **rebased})

        return commit_rebase
    present = {n for n in names if io.keys_of(n)}
    extra = set(names) - present
    owned = {"step", *keys} | {k_ for n in present for k_ in io.keys_of(n)}
    obsolete = set(state) - owned
    kind = policy.refresh_kind(k)
    if not (kind or extra or obsolete):
        return None
    refreshed: dict[str, Tensor] = {}
    changed = False
    if kind:
        x, _ = canonical_input(p, compiled, dtype, *inputs, transposed=transposed)
        first_name = program.first_moment or (EMA_KEY if EMA_KEY in names else None)
        first = io.load(first_name) if first_name else None
        refreshed = _working(state, keys, dtype)
        if rows_side:
            changed = fsdp.refresh_basis(policy, refreshed, x, k, first_moment=first, spec=shard, comm=comm)
        else:
            changed = policy.refresh(refreshed, x, k, first_moment=first, transposed=transposed)
    rank_now = policy.state_shape(state)[1]

    def commit_refresh() -> None:
        old = policy.snapshot(_working(state, keys, dtype)) if restore and changed else None
        for key, value in refreshed.items():
            state[key].copy_(value)
        if old is not None:
            kinds = program.state_kinds
            first = [n for n in program.state_names if kinds[n] == "first_moment"] + (
                [EMA_KEY] if EMA_KEY in names else []
            )
            second = [n for n in program.state_names if kinds[n] == "second_moment"]
            values = {n: io.load(n).clone() for n in (*first, *second)}
            current = _working(state, keys, dtype)
            policy.remap_moments(
                old, current, first=[values[n] for n in first], second=[values[n] for n in second]
            )
            for n, v in values.items():
                io.store_(n, v)
        for name in obsolete:
            del state[name]
        if extra:
            inits = lowrank_inits(compiled, policy, rows, rank_now, dtype, p.device)
            state.update(_stored(io, {n: inits[n] for n in extra}))

    return commit_refresh
