"""The step of :class:`~.optimizer.CoapOptimizer` (a mixin, so the optimizer module stays readable).

``step`` has two phases so that ``torch.compile`` of a training step traces the update without
recompiling:

1. :meth:`StepMixin._prepare` (always eager: :func:`.eager_only`): ``found_inf``, settings and gradient
   checks, the live scalars (every group's ``lr`` and float hyperparameters copied in place into one
   float64 vector per group, so a compiled update reading it sees new values without a recompile), the
   refresh schedule (every due refresh computed before any is committed: a step that raises for bad
   input writes nothing), and the work list: matrix groups that step as one (:mod:`.grouped`), then
   the remaining parameters one by one.
2. The update (traceable: no host reads, no branches on the step), which never reads
   ``param_groups``.

Eager fast paths, measured on the demo model (issue 14): unchanged hyperparameters skip the
``live_inputs`` derivation and the scalar copy (compared as Python floats); program lookups are
memoized on a frozen snapshot of the hyperparameters; the scalar vector's 0-d views are made once per
vector; a parameter whose state tensors already passed ``plan_refresh``'s layout checks and has no
refresh due this step skips it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..capture import live_inputs
from ..distributed import fsdp
from ..lowering.kernels import stored_kernel_plan
from ..projection.tucker import core_shape
from .eager_only import eager_only, prime
from .fullrank import ensure_full_state, full_update_
from .grouped import MatrixGroup, grouped_update_, ready
from .precision import resolve_precision
from .refresh import plan_refresh
from .tucker import plan_tucker_refresh, tucker_update_
from .update import projected_update_
from .validate import check_gradients

__all__ = ["StepMixin", "hyper_key"]


def hyper_key(hyper: dict) -> tuple:
    """A hashable snapshot of a group's base hyperparameters: equal keys give the same program and live
    inputs. ``lr`` is a live input of every program and is left out (a tensor lr changes in place);
    other tensors count by value (a tensor weight decay turning 0 changes the structure)."""

    def freeze(v: Any) -> Any:
        if isinstance(v, Tensor):
            return ("tensor", v.dtype, float(v)) if v.numel() == 1 else ("tensor", id(v))
        if isinstance(v, (tuple, list)):
            return (type(v).__name__, *map(freeze, v))
        return v if isinstance(v, (int, float, str, bool, type(None))) else ("obj", repr(v))

    return tuple((k, freeze(v)) for k, v in sorted(hyper.items()) if k != "lr")


class StepMixin:
    """``step`` and its helpers; the attributes it reads are set by ``CoapOptimizer._derive``."""

    #: While set (:meth:`_step_only`), a step reads and writes only these parameters; a value is a
    #: low-rank term added to ``X P`` (an accumulated ``Σ Xᵢ P``, :mod:`.inbackward`) or None.
    _scope: dict[Tensor, Tensor | None] | None = None

    # -- the step --------------------------------------------------------------------------------------
    def _check_grads(self) -> None:
        groups = self.param_groups
        if self._scope is not None:  # only the parameters being stepped (group indices kept)
            groups = [{"params": [p for p in g["params"] if p in self._scope]} for g in groups]
        check_gradients(groups, self._name, self._check_finite, self.comm_log)

    def _step_only(self, params: Iterable[Tensor], lowrank: dict[Tensor, Tensor] | None = None) -> None:
        """``step()`` restricted to ``params`` (in-backward updates, :mod:`.inbackward`): other parameters
        are not read, even when they hold gradients. ``lowrank[p]`` (``M×r``) is added to ``X P``.

        Scoped parameters run the per-matrix path even when they belong to a matrix group
        (:mod:`.grouped`: bit-identical on CPU, and their states are written in place, so the group's
        buffers stay their storage): a group steps as one only when all its members are ready together.
        """
        self._scope = {p: (lowrank or {}).get(p) for p in params}
        try:
            self.step()
        finally:
            self._scope = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, found_inf: Tensor | None = None):
        """One optimizer step. ``found_inf`` (GradScaler style): if nonzero the step is skipped.

        Two phases, so that ``torch.compile`` of a training step traces the update without recompiling:
        :meth:`_prepare` (not compiled: checks, live scalars, the refresh schedule, ``P`` refreshes
        written in place) and the update itself (traceable: no host reads, no branches on the step).
        Under ``torch.compile`` full-rank parameters run their captured update too (:mod:`.fullrank`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        compiling = torch.compiler.is_compiling()
        if not compiling:
            prime()  # Dynamo imported since: make _prepare's disabled wrapper before any trace
        if not self._prepare(found_inf, compiling):
            return loss
        # ``_work`` (built by _prepare) lists what to update; the compiled region never reads
        # ``param_groups`` (Dynamo would guard on every value in a group it touches, β₁ included, and
        # recompile whenever a scheduler changes one). The gradients are read before ``self.state``:
        # Dynamo then guards them as tensors of ``_work_params``, not through the state dict's keys
        # (weak references that a new gradient after ``zero_grad`` invalidates, recompiling each step).
        params, groups = self._work_params, self._work_groups
        grads = [p.grad for p in params]
        group_grads = [[p.grad for p in mg.members] for mg, _, _, _ in groups]
        for p, _g, (i, projected, scale, ema_beta) in zip(params, grads, self._work):
            state = self.state[p]
            if projected:
                self._projected_update(p, state, i, scale, ema_beta)
            elif p in self._captured_full:  # a storage precision: the captured update, load/store
                io = self._io(p)
                full_update_(self._local(p), io.state, self._captured_full[p], self._inputs(state, i), io)
            else:  # compiling: torch's layout, the captured update (fullrank module docstring)
                full_update_(p, state, self._full_programs[(i, p.dtype, p.ndim)], self._inputs(state, i))
        for (mg, runs, scale, ema_beta), g in zip(groups, group_grads):
            self._grouped_update(mg, runs, g, scale, ema_beta, compiling)
        self._locals = {}  # drop the FSDP2 local views (and their gradient references)
        if self._inner is not None and not compiling:
            if self._scope is None:
                self._inner.step()
            else:  # only the scoped full-rank parameters (the inner optimizer reads every p.grad)
                lists = [g["params"] for g in self._inner.param_groups]
                try:
                    for g in self._inner.param_groups:
                        g["params"] = [p for p in g["params"] if p in self._scope]
                    self._inner.step()
                finally:
                    for g, ps in zip(self._inner.param_groups, lists):
                        g["params"] = ps
        return loss

    def _inputs(self, state: dict, group_index: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(k, lr, hyperparameters)`` as 0-d float64 tensors (filled by :meth:`_fill_scalars`)."""
        k = state["step"].to(torch.float64) if "step" in state else torch.zeros((), dtype=torch.float64)
        return (k, *self._scalar_inputs(group_index))

    def _scalar_inputs(self, group_index: int) -> tuple[Tensor, list[Tensor]]:
        """``(lr, hyperparameters)``: 0-d views of the group's scalar vector. Eagerly the views are made
        once per vector (indexing is a dispatch per view and step); a traced step indexes in the graph."""
        v = self._scalars[group_index]
        if torch.compiler.is_compiling():
            return v[0], [v[j] for j in range(1, v.numel())]
        cached = self._scalar_views[group_index]
        if cached is None or cached[0] is not v:
            cached = (v, list(v.unbind(0)))
            self._scalar_views[group_index] = cached
        return cached[1][0], cached[1][1:]

    def _fill_scalars(self) -> None:
        """Copy every group's lr and live hyperparameters into its persistent float64 vector (in place, so
        a compiled update that reads the vector sees new values without a recompile)."""
        for i, group in enumerate(self.param_groups):
            base = self._base_hyperparams(group)
            key = hyper_key(base)
            memo = self._hyper_memo.get(i)
            if memo is None or memo[0] != key:
                memo = (key, live_inputs(self._base_cls, base))
                self._hyper_memo[i] = memo
            hypers = memo[1]
            lr = group["lr"]
            # lr=None: a base with its own relative step size (transformers' Adafactor, relative_step=True)
            values = [0.0 if lr is None else lr, *(h.read(group) for h in hypers)]
            floats = []
            for name, v in zip(("lr", *(h.where for h in hypers)), values):
                if isinstance(v, bool) or not isinstance(v, int | float | Tensor):
                    raise TypeError(f"{name} of param group {i} must be a number, got {v!r}")
                floats.append(float(v))
            if self._scalars[i].numel() != len(floats):
                self._scalars[i] = torch.zeros(len(floats), dtype=torch.float64)
                self._hyper_floats.pop(i, None)
            if self._hyper_floats.get(i) != floats:  # unchanged values: no tensor work at all
                self._scalars[i].copy_(torch.tensor(floats, dtype=torch.float64))
                self._hyper_floats[i] = floats

    @eager_only
    def _prepare(self, found_inf: Tensor | None, compiling: bool = False) -> bool:
        """Skip on ``found_inf``; validate settings and gradients; live scalars; refresh ``P`` where due.

        Nothing is written before every check has passed and every due refresh has been computed.
        ``compiling``: the update is being traced by ``torch.compile`` (the full-rank parameters then
        need their captured programs and their state created here).
        """
        if found_inf is not None and bool(found_inf.detach().cpu().any()):
            return False
        self._sync_settings()
        self._check_grads()
        scope = self._scope
        self._locals = {p: fsdp.local_param(p) for p in self._shards if p.grad is not None}
        due = [
            (p, i) for i, g in enumerate(self.param_groups) for p in g["params"]
            if p.grad is not None and self._plans[p].projected and (scope is None or p in scope)
        ]  # fmt: skip
        for key in dict.fromkeys(self._program_key(p, i) for p, i in due):
            self._compiled(*key)  # the current signature (re-compiles once on a change)
        self._fill_scalars()
        commits = []
        for p, i in due:
            group, dtype, plan = self.param_groups[i], self._state_dtype(p), self._plans[p]
            state, compiled = self.state[p], self._programs[self._program_key(p, i)]
            if plan.tucker:
                commit = plan_tucker_refresh(
                    self._io(p), p, plan.ranks, compiled, self._tucker_policies[i], dtype=dtype,
                    core=core_shape(p.shape, plan.ranks), inputs=self._inputs(state, i),
                    restore=group["restore_state"],
                )  # fmt: skip
            else:
                policy = self._policies[i]
                layout = tuple((key, id(v)) for key, v in state.items())
                if self._checked.get(p) == layout and not policy.refresh_kind(int(state["step"].item())):
                    continue  # the same tensors passed plan_refresh's layout checks; nothing due
                commit = plan_refresh(
                    self._io(p), self._local(p), plan.rank, compiled, policy, dtype=dtype,
                    proj_dtype=resolve_precision(group, p).proj_dtype, inputs=self._inputs(state, i),
                    restore=group["restore_state"], transposed=plan.transposed, rows_side=plan.rows_side,
                    shard=self._shards.get(p), comm=self.comm_log,
                )  # fmt: skip
                if commit is None:
                    self._checked[p] = layout
            if commit is not None:
                commits.append(commit)
        for commit in commits:
            commit()
        if self._inner is not None:  # hyperparameters (lr schedules) reach the full-rank base optimizer
            for i, j in self._inner_index.items():
                self._inner.param_groups[j].update(self._base_hyperparams(self.param_groups[i]))
        self._work, self._work_params, self._work_groups = [], [], []
        grouped: set[Tensor] = set()
        # Runs of members that step as one (everything else: per matrix, below; a scoped step runs every
        # parameter per matrix, see _step_only).
        for mg in self._groups if scope is None else ():
            runs = ready(mg, [self.state[p] for p in mg.members])
            if runs:
                group = self.param_groups[mg.index]
                scale, beta = float(group["scale"]), float(group["first_moment_beta"])
                self._work_groups.append((mg, tuple(runs), scale, beta))
                grouped.update(mg.members[k] for s, e in runs for k in range(s, e))
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None or p in grouped or (scope is not None and p not in scope):
                    continue
                projected = self._plans[p].projected
                if projected or compiling or p in self._captured_full:
                    scale, beta = float(group["scale"]), float(group["first_moment_beta"])
                    self._work.append((i, projected, scale, beta))
                    self._work_params.append(p)
                # Create every entry here (the base optimizer fills full-rank ones lazily), so the state
                # dict's size is fixed before the compiled update sees it: no recompile after step 1.
                state = self.state[p]
                if p in self._captured_full:
                    io = self._io(p)  # (an FSDP2 parameter's io wraps new states as DTensors)
                    ensure_full_state(io.state, self._captured_full[p], self._local(p), io)
                elif compiling and not self._plans[p].projected:
                    program = self._full_program(group, p.dtype, p.ndim)
                    self._full_programs[(i, p.dtype, p.ndim)] = program
                    ensure_full_state(state, program, p)
        for p, i in due:  # kernel epilogues registered outside any compiled region
            if self._use_kernels(p) and not self._plans[p].tucker:
                kp = self._kernel_plan(self._programs[self._program_key(p, i)], self.param_groups[i]["scale"])
                self._stored_plans[p] = None if kp is None else stored_kernel_plan(kp, self._io(p))
        return True

    def _projected_update(self, p: Tensor, state: dict, index: int, scale: float, ema_beta: float) -> None:
        dtype = self._state_dtype(p)
        compiled = self._programs[self._program_key(p, index)]
        plan = self._plans[p]
        if plan.tucker:
            tucker_update_(
                p, self._io(p), compiled, len(plan.ranks), dtype=dtype, inputs=self._inputs(state, index),
                scale=scale, ema_beta=ema_beta,
            )  # fmt: skip
            return
        use = self._use_kernels(p)
        splan = self._stored_plans.get(p) if use else None
        kernels = use and (splan is not None or self._fp32_states(p))  # K2 alone when the middle is eager
        projected_update_(
            self._local(p), self._io(p), compiled, self._policies[index], dtype=dtype,
            inputs=self._inputs(state, index), scale=scale, ema_beta=ema_beta,
            transposed=self._plans[p].transposed, kernels=kernels, kernel_plan=splan, backend=self._backend,
            input_precision=self._precision, x_extra=None if self._scope is None else self._scope.get(p),
        )  # fmt: skip

    def _grouped_update(
        self, mg: MatrixGroup, runs: tuple, grads: list, scale: float, ema_beta: float, compiling: bool
    ) -> None:
        dtype = mg.key[3]
        grouped_update_(
            mg, runs, grads, [self.state[p] for p in mg.members], self._programs[(mg.index, dtype, 2)],
            self._policies[mg.index], dtype=dtype, inputs=self._scalar_inputs(mg.index), scale=scale,
            ema_beta=ema_beta, compiling=compiling,
        )  # fmt: skip
