"""Refreshes of ``P``, two-phase so that a step that raises leaves every state as it was.

Phase 1 (:func:`plan_refresh`, per projected parameter with a gradient) computes what the schedule
asks for at the parameter's completed-step count ``k`` without writing anything, and returns a
*commit* closure; phase 2 runs all commits. Kinds:

* ``init`` (no state yet): ``P = policy.init(X)``, fresh low-rank base states, ``step = 0``;
* ``rebase`` (the state's rank or projection policy no longer matches the group's settings, e.g.
  after ``group["rank"] = 4``): ``P_new = policy.init(X)`` at the new rank, first moments mapped
  ``M ← (M P_oldᵀ) P_new`` and second moments ``V ← ((√V P_oldᵀ) P_new)²`` (other states restart
  from their initial value, since their meaning under a change of basis is not known);
* a policy refresh (``correlation``, ``svd``, ``resample``): computed on copies of the policy's
  tensors, committed with ``copy_`` (so ``P`` keeps its identity for compiled code), then
  ``restore_state`` maps the moments into the new basis.

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
from ..projection import ProjectionPolicy, canonical
from .settings import EMA_KEY

__all__ = ["canonical_input", "plan_refresh", "policy_keys"]

Commit = Callable[[], None]


def policy_keys(policy: ProjectionPolicy) -> tuple[str, ...]:
    """The state entries a policy owns (``proj``, Flora's ``seed``, DCT's ``dct_index`` …)."""
    return tuple(policy.state_layout(1, 1, torch.float32))


def canonical_input(p: Tensor, compiled: CompiledBase, dtype, k_t, lr_t, hypers) -> tuple[Tensor, bool]:
    """The canonical ``M×N`` view of the projected quantity ``X`` (``G``, or e.g. ``G + λW``)."""
    g = p.grad
    prologue = compiled.program.prologue
    if prologue is not None:
        g = prologue(p.to(dtype), g.to(dtype), k_t, lr_t, *hypers)
    return canonical(g)


def _fresh_lowrank(compiled: CompiledBase, policy, rows: int, rank: int, dtype, device) -> dict[str, Tensor]:
    states = compiled.init_lowrank_states(rows, rank, dtype, device)
    if compiled.program.first_moment is None and policy.needs_first_moment:
        states[EMA_KEY] = torch.zeros((rows, rank), dtype=dtype, device=device)
    return states


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


def _map_moments(program, state: dict, old_p: Tensor | None, new_p: Tensor, fresh: dict[str, Tensor]) -> dict:
    """Moments of ``state`` expressed in ``new_p`` (any rank); other states (and everything when the old
    basis is unknown) from ``fresh``."""
    out = {}
    for name, init in fresh.items():
        kind = "first_moment" if name == EMA_KEY else program.state_kinds.get(name, "other")
        old = state.get(name)
        if old is None or kind == "other" or old_p is None:
            out[name] = init
            continue
        a, b = old_p.t().to(old.dtype), new_p.to(old.dtype)
        out[name] = (old @ a) @ b if kind == "first_moment" else ((old.sqrt() @ a) @ b).square()
    return out


def plan_refresh(
    state: dict,
    p: Tensor,
    rank: int,
    compiled: CompiledBase,
    policy: ProjectionPolicy,
    *,
    dtype: torch.dtype,
    inputs: tuple[Tensor, Tensor, list[Tensor]],
    restore: bool,
) -> Commit | None:
    """Phase 1 for one projected parameter; returns its commit (None when nothing is due)."""
    program = compiled.program
    k = int(state["step"].item()) if "step" in state else 0
    if not state:
        x, _ = canonical_input(p, compiled, dtype, *inputs)
        new = {"step": torch.zeros((), dtype=torch.float32)}
        new.update(policy.init_state(x.to(dtype), rank))
        new.update(_fresh_lowrank(compiled, policy, x.shape[0], rank, dtype, p.device))

        def commit_init() -> None:
            state.clear()
            state.update(new)

        return commit_init
    fresh_names = set(_fresh_lowrank(compiled, policy, 1, 1, dtype, "meta"))
    keys = policy_keys(policy)
    if not set(keys) <= state.keys() or policy.state_shape(state)[1] != rank:
        x, _ = canonical_input(p, compiled, dtype, *inputs)
        init = policy.init_state(x.to(dtype), rank)
        mapped = _map_moments(
            program, state, _old_basis(state, policy, keys), policy.basis(init),
            _fresh_lowrank(compiled, policy, x.shape[0], rank, dtype, p.device),
        )  # fmt: skip

        def commit_rebase() -> None:
            step = state["step"]
            state.clear()
            state.update({"step": step, **init, **mapped})

        return commit_rebase
    extra = fresh_names - state.keys()
    obsolete = {n for n in state.keys() - fresh_names if n != "step"} - set(keys)
    kind = policy.refresh_kind(k)
    if not (kind or extra or obsolete):
        return None
    refreshed: dict[str, Tensor] = {}
    changed = False
    if kind:
        x, transposed = canonical_input(p, compiled, dtype, *inputs)
        first = state[program.first_moment] if program.first_moment else state.get(EMA_KEY)
        refreshed = {key: state[key].clone() for key in keys}
        changed = policy.refresh(refreshed, x, k, first_moment=first, transposed=transposed)
    rank_now = policy.state_shape(state)[1]

    def commit_refresh() -> None:
        old = policy.snapshot(state) if restore and changed else None
        for key, value in refreshed.items():
            state[key].copy_(value)
        if old is not None:
            kinds = program.state_kinds
            policy.remap_moments(
                old,
                state,
                first=[state[n] for n in program.state_names if kinds[n] == "first_moment"]
                + ([state[EMA_KEY]] if EMA_KEY in state else []),
                second=[state[n] for n in program.state_names if kinds[n] == "second_moment"],
            )
        for name in obsolete:
            del state[name]
        if extra:  # M = max(m, n): the canonical row count
            fresh = _fresh_lowrank(compiled, policy, max(p.shape), rank_now, dtype, p.device)
            state.update({n: fresh[n] for n in extra})

    return commit_refresh
