"""Tucker-projected 4-D (convolution) weights: the same compiled base update on a Tucker core.

For ``W ∈ ℝ^{C_out×C_in×kh×kw}`` with factors ``U0`` (``C_out×r0``) and ``U1`` (``C_in×r1``, absent for
single-mode kernels), :mod:`coap_compile.projection.tucker`::

    X̃ = X ×₀ U0ᵀ ×₁ U1ᵀ                              (the core: r0×r1×kh×kw; X = G or G + λW)
    (decay, D, s', k') = lowrank(W, X̃, s, k, lr, h)   (the base update compiled for 4-D, unchanged)
    W ← decay · W + scale · (D ×₀ U0 ×₁ U1)

The rewrite is the matrix one with a multilinear projection: the derived epilogue is the same program,
compiled at ``ndim = 4`` (``compile_base(..., ndim=4)``), its states living in the core's shape. The
contractions and the elementwise middle run as torch ops on every device (the eager lowering; there
is no Tucker kernel), which ``explain()`` says.

Refreshes follow the matrix module (:mod:`.refresh`): two-phase (computed, then committed), the
policy's schedule (HOOI init, warm HOOI sweep every ``T_u·λ``, the correlation step on the factors
every ``T_u``), ``restore_state`` mapping the moments between bases, and a re-base (new factors at the
new ranks, moments mapped) when the group's ``conv_rank_ratio`` changes the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..compiler import CompiledBase
from ..projection.tucker import core_shape, tucker_project, tucker_project_back
from .inits import tucker_inits
from .precision import StateIO
from .schedule import factor_keys, step_count
from .settings import EMA_KEY

__all__ = ["plan_tucker_refresh", "tucker_update_"]


def _input(p: Tensor, compiled: CompiledBase, dtype, inputs) -> Tensor:
    k_t, lr_t, hypers = inputs
    prologue = compiled.program.prologue
    g = p.grad.to(dtype)
    return g if prologue is None else prologue(p.to(dtype), g, k_t, lr_t, *hypers)


def _stored(io: StateIO, values: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, value in values.items():
        out.update(io.fresh(name, value))
    return out


def _remap(old: Sequence[Tensor], new: Sequence[Tensor], value: Tensor, kind: str) -> Tensor:
    """A core-shaped moment in the factors ``new`` (any ranks): first moments linearly, second through √."""
    if kind == "first_moment":
        return tucker_project(tucker_project_back(value, old), new)
    return tucker_project(tucker_project_back(value.clamp_min(0).sqrt(), old), new).square()


def plan_tucker_refresh(layout, p: Tensor, io: StateIO, due, inputs, comm=None) -> Callable[[], None] | None:
    """Phase 1 for one Tucker-projected weight (module docstring): the commit of what
    :func:`.schedule.due` found, or None."""
    if due.action == "init":
        return _plan_init(layout, p, io, inputs)
    if due.action == "rebase":
        return _plan_rebase(layout, p, io, inputs)
    if due.action == "refresh":
        return _plan_refresh(layout, p, io, due, inputs)
    return None


def _kinds(layout, names) -> dict[str, str]:
    program = layout.program.program
    return {n: ("first_moment" if n == EMA_KEY else program.state_kinds.get(n, "other")) for n in names}


def _plan_init(layout, p: Tensor, io: StateIO, inputs) -> Callable[[], None]:
    state, compiled, dtype = io.state, layout.program, layout.work_dtype
    new = {"step": torch.zeros((), dtype=torch.float32)}
    new.update(layout.policy.init_state(_input(p, compiled, dtype, inputs), layout.ranks))
    core = core_shape(p.shape, layout.ranks)
    new.update(_stored(io, tucker_inits(compiled, layout.policy, core, dtype, p.device)))

    def commit_init() -> None:
        state.clear()
        state.update(new)

    return commit_init


def _plan_rebase(layout, p: Tensor, io: StateIO, inputs) -> Callable[[], None]:
    """New factors at the layout's ranks, the moments mapped into them."""
    state, compiled, dtype, policy = io.state, layout.program, layout.work_dtype, layout.policy
    keys = factor_keys(len(layout.ranks))
    kinds = _kinds(layout, tuple(io.storages))
    new_factors = policy.init_state(_input(p, compiled, dtype, inputs), layout.ranks)
    old = [state[k] for k in sorted(k for k in state if k.startswith("proj"))]
    inits = tucker_inits(compiled, policy, core_shape(p.shape, layout.ranks), dtype, p.device)
    mapped = {}
    for n, init in inits.items():
        ok = io.keys_of(n) and kinds[n] != "other" and len(old) == len(keys)
        mapped[n] = _remap(old, [new_factors[k] for k in keys], io.load(n), kinds[n]) if ok else init
    rebased = {**new_factors, **_stored(io, mapped)}

    def commit_rebase() -> None:
        step = state["step"]
        state.clear()
        state.update({"step": step, **rebased})

    return commit_rebase


def _plan_refresh(layout, p: Tensor, io: StateIO, due, inputs) -> Callable[[], None]:
    """The policy's refresh on copies of the factors, committed with ``copy_`` (moments remapped with
    ``restore_state``)."""
    state, compiled, dtype, policy = io.state, layout.program, layout.work_dtype, layout.policy
    program, names = compiled.program, tuple(io.storages)
    keys = factor_keys(len(layout.ranks))
    kinds = _kinds(layout, names)
    first_name = program.first_moment or (EMA_KEY if EMA_KEY in names else None)
    refreshed = {key: state[key].clone() for key in keys}
    first = io.load(first_name) if first_name else None
    changed = policy.refresh(
        refreshed, _input(p, compiled, dtype, inputs), step_count(state), first_moment=first
    )
    restore = layout.settings.restore_state

    def commit_refresh() -> None:
        old = [state[key].clone() for key in keys] if restore and changed else None
        for key, value in refreshed.items():
            state[key].copy_(value)
        if old is not None:
            new = [state[key] for key in keys]
            for n in names:
                if kinds[n] != "other":
                    io.store_(n, _remap(old, new, io.load(n), kinds[n]))

    return commit_refresh


def tucker_update_(layout, p: Tensor, io: StateIO, inputs) -> None:
    """One step of one Tucker-projected weight (module docstring), in place; the weight is written
    before the states, as for matrices."""
    compiled, dtype, n_modes = layout.program, layout.work_dtype, len(layout.ranks)
    scale, ema_beta = float(layout.settings.scale), float(layout.settings.first_moment_beta)
    program, state = compiled.program, io.state
    k_t, lr_t, hypers = inputs
    factors = [state[key] for key in factor_keys(n_modes)]
    x_core = tucker_project(_input(p, compiled, dtype, inputs), factors)
    stat_param = p if not program.decomposition.param_stats else p.to(dtype)
    decay, delta, *rest = program.lowrank(
        stat_param, x_core, *[io.load(n) for n in program.state_names], k_t, lr_t, *hypers
    )
    new_states, new_step = rest[:-1], rest[-1]
    update = tucker_project_back(delta, factors).mul_(scale)
    if p.dtype == update.dtype:
        p.mul_(decay).add_(update)
    else:  # a low-precision weight: combine in float32, round once
        p.copy_(p.to(update.dtype).mul_(decay).add_(update))
    for name, value in zip(program.state_names, new_states):
        io.store_(name, value)
    state["step"].copy_(new_step)
    if EMA_KEY in io.storages:
        io.store_(EMA_KEY, torch.lerp(io.load(EMA_KEY), x_core, 1.0 - ema_beta))
