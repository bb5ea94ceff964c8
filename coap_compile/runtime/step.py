"""The step of :class:`~.optimizer.CoapOptimizer`: named phases over the plan's layouts.

``step()`` has two parts so that ``torch.compile`` of a training step traces the update without
recompiling:

1. :meth:`StepRunner.prepare` (always eager: :func:`.eager_only`), in phases:

   * **validate**: ``found_inf`` (skip the step), settings (the plan is rebuilt when ``param_groups``
     changed: :mod:`.plan`; under FSDP2 the settings that decide collectives are checked equal across
     each shard group at a plan's first step: :mod:`coap_compile.distributed.agreement`), gradients
     (layout, shape, dtype, device, finiteness: :mod:`.validate`);
   * **schedule**: what is due for each projected parameter with a gradient (:mod:`.schedule`), and the
     live scalars (:mod:`.scalars`);
   * **refresh**: every due refresh computed, then all committed (:mod:`.refresh`, :mod:`.tucker`): a
     step that raises for bad input writes nothing;
   * **work list**: matrix groups that step as one (:mod:`.grouped`; on the kernel path
     :mod:`.grouped_kernels`: two grouped launches per group and scratch chunk), full-rank groups
     (:mod:`.fullgroup`), then the remaining parameters.

2. :meth:`StepRunner.update` (traceable: no host reads, no branches on the step, never reads
   ``param_groups``): one updater per kind (:mod:`.update` matrices, :mod:`.grouped`, :mod:`.tucker`,
   :mod:`.fullrank`), then torch's own optimizer for the TORCH-kind parameters.

Both phases of an eager step run with one intra-op thread when every matrix of the plan is small and on the
CPU (:mod:`.threads`: OpenMP fork/join per small op collapses when another process takes a core).

The runner holds what a step mutates besides the optimizer's ``state``: the scalar vectors, the matrix
groups' buffers, the schedule's cache of state layouts found needing nothing (a parameter whose state
tensors passed the checks and has no refresh due skips :func:`.schedule.due`'s checks), registered kernel
epilogues, and torch's inner optimizer for full-rank parameters. It is rebuilt with the plan.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from ..distributed import fsdp
from ..distributed.agreement import check_settings_agree
from ..distributed.basis import gathered_basis
from ..lowering.kernels import KernelPlan, kernel_plan, stored_kernel_plan
from .chunks import chunk_batch, grouped_chunks
from .counters import StepCounters
from .fullgroup import full_group_update_
from .fullrank import ensure_full_state, full_update_, restored_full_state
from .grouped import GroupBuffers, ready
from .grouped_kernels import kernel_group_update_, kernel_runs
from .layout import Kind, full_program
from .plan import RuntimePlan
from .refresh import plan_refresh
from .scalars import LiveScalars, base_hyperparams
from .schedule import NOTHING_DUE, due
from .threads import intra_op_threads, run_members, step_threads
from .tucker import plan_tucker_refresh, tucker_update_
from .update import projected_update_
from .validate import check_gradients

__all__ = ["StepRunner"]


class StepRunner:
    """The mutable machinery of one optimizer's steps for one plan (module docstring)."""

    def __init__(self, opt: Any, plan: RuntimePlan) -> None:
        config = opt.config
        self.plan = plan
        self.scalars = LiveScalars(config.base, len(opt.param_groups))
        self.buffers = {id(mg): GroupBuffers() for mg in (*plan.matrix_groups, *plan.full_groups)}
        self.checked: dict[Tensor, tuple] = {}
        self.counters = StepCounters()
        self.traced = False  # the last update ran inside a compiled region
        self.kernel_plans: dict[tuple, KernelPlan | None] = {}
        self.stored_plans: dict[Tensor, Any] = {}
        self.full_programs: dict[tuple, Any] = {}
        self.scope: dict[Tensor, Tensor | None] | None = None
        self.locals: dict[Tensor, Tensor] = {}
        self.work: list[tuple[Tensor, Any]] = []
        self.work_groups: list[tuple[Any, tuple]] = []
        self.work_full: list[tuple[Any, tuple]] = []  # full-rank groups (.fullgroup) ready as one
        self.agreed = False  # the collective settings checked across the shard groups (once per plan)
        self.full_checked: set[Tensor] = set()  # full-rank parameters whose state has this plan's layout
        self.threads = step_threads(plan.layouts)  # intra-op threads of an eager CPU step (.threads)
        inner_groups, self.inner_index = [], {}
        for i, g in enumerate(opt.param_groups):
            full = [p for p in g["params"] if plan.layouts[p].kind is Kind.TORCH]
            if full:
                self.inner_index[i] = len(inner_groups)
                inner_groups.append({**base_hyperparams(g), "params": full})
        self.inner = config.base(inner_groups, **config.base_kwargs) if inner_groups else None
        if self.inner is not None:
            self.inner.state = opt.state

    def local(self, p: Tensor) -> Tensor:
        """``p``, or an FSDP2 weight's local rows with their gradient (made in :meth:`prepare`)."""
        return self.locals.get(p, p)

    def in_scope(self, p: Tensor) -> bool:
        return self.scope is None or p in self.scope

    # -- phase 1 ---------------------------------------------------------------------------------------
    def prepare(
        self, opt: Any, keys: list[tuple], compiling: bool = False, check_finite: bool = True
    ) -> None:
        """The eager phases after the settings check (module docstring): validate the gradients, schedule,
        refresh, build the work list. ``keys`` are the groups' :func:`.scalars.hyper_key`; ``compiling``:
        the update is being traced (full-rank parameters then need their captured programs and their state
        created here); ``check_finite=False``: the caller gave ``found_inf`` (no second finiteness read).
        A small CPU step runs single-threaded (:mod:`.threads`)."""
        with intra_op_threads(self.threads):
            self._prepare(opt, keys, compiling, check_finite)

    def _prepare(self, opt: Any, keys: list[tuple], compiling: bool, check_finite: bool) -> None:
        self.counters.settle(traced=self.traced)  # a traced update's counters: accepted now
        if not self.agreed:
            self._agree(opt)
        self._validate(opt, check_finite)
        due_now = self._schedule(opt, keys)
        self._refresh(opt, due_now)
        if self.inner is not None:  # hyperparameters (lr schedules) reach the full-rank base optimizer
            for i, j in self.inner_index.items():
                self.inner.param_groups[j].update(base_hyperparams(opt.param_groups[i]))
        for p, _ in due_now:  # kernel epilogues registered outside any compiled region
            self._register_kernels(opt, p)
        self._work_list(opt, compiling)  # (kernel groups read this step's stored plans)

    def _agree(self, opt: Any) -> None:
        """The collective settings of the DTensor parameters (those left to torch's own optimizer too: a
        different ``state_precision`` or ``project`` moves one between kinds) equal across each shard
        group (one digest all-gather per group, :mod:`coap_compile.distributed.agreement`), before
        anything is modified."""
        sharded = [(p, lay) for p, lay in self.plan.layouts.items() if fsdp.is_dtensor(p)]
        entries = [(lay.name, lay.collective_settings(), fsdp.shard_group(p)) for p, lay in sharded]
        device = sharded[0][0].device if sharded else "cpu"
        check_settings_agree(entries, opt.comm_log, device)
        self.agreed = True

    def _validate(self, opt: Any, check_finite: bool) -> None:
        groups = opt.param_groups
        if self.scope is not None:  # only the parameters being stepped (group indices kept)
            groups = [{"params": [p for p in g["params"] if p in self.scope]} for g in groups]
        check = check_finite and opt.config.options.check_finite
        check_gradients(groups, opt.param_name, check, opt.comm_log)
        self.locals = {
            p: fsdp.local_param(p)
            for p, lay in self.plan.layouts.items()
            if lay.shard is not None and p.grad is not None
        }

    def _schedule(self, opt: Any, keys: list[tuple]) -> list[tuple[Tensor, Any]]:
        """``(p, due)`` for every projected parameter with a gradient in scope; fills the live scalars."""
        self.scalars.fill(opt.param_groups, keys)
        out = []
        for p, lay in self.plan.layouts.items():
            if p.grad is None or not lay.projected or not self.in_scope(p):
                continue
            state = opt.state[p]
            k = self.counters.count(p, state)  # host-side: no read in a steady step (.counters)
            layout_key = tuple((name, id(v)) for name, v in state.items())
            if self.checked.get(p) == layout_key and not lay.policy.refresh_kind(k):
                out.append((p, NOTHING_DUE))  # the same tensors passed the checks; nothing due
                continue
            d = due(lay, state, opt.state_io(p), k)
            if not d.action and lay.kind is Kind.MATRIX:
                self.checked[p] = layout_key
            out.append((p, d))
        return out

    def _refresh(self, opt: Any, due_now: list[tuple[Tensor, Any]]) -> None:
        """Compute every due refresh and full-rank layout change, then commit them all (nothing written if
        one raises)."""
        commits = self._full_rank_conversions(opt)
        for p, d in due_now:
            if not d.action:
                continue
            lay = self.plan.layouts[p]
            inputs = self.scalars.inputs(lay.group, opt.state[p])
            plan_fn = plan_tucker_refresh if lay.kind is Kind.TUCKER else plan_refresh
            with self.basis(opt, p, lay):  # a sharded P gathered while the refresh computes
                commit = plan_fn(lay, self.local(p), opt.state_io(p), d, inputs, lay.comm(opt.comm_log))
            if commit is not None:
                commits.append(functools.partial(self._commit, opt, p, lay, commit))
        for commit in commits:
            commit()

    def basis(self, opt: Any, p: Tensor, lay: Any):
        """The context in which ``opt.state[p]["proj"]`` is the full ``P``: an FSDP2 weight's sharded ``P``
        gathered, stored back as its slice afterwards (:mod:`coap_compile.distributed.basis`)."""
        if lay.shard is None or lay.kind is not Kind.MATRIX:
            return contextlib.nullcontext()
        sharded = lay.settings.projection_sharding == "sharded"
        return gathered_basis(opt.state[p], lay.shard, sharded, opt.comm_log)

    def _commit(self, opt: Any, p: Tensor, lay: Any, commit: Any) -> None:
        with self.basis(opt, p, lay):  # gathered again: no old P held while other refreshes compute
            commit()

    def _full_rank_conversions(self, opt: Any) -> list:
        """Commits moving full-rank states into this plan's layout (a ``state_precision`` edit:
        :func:`.fullrank.restored_full_state`), each checked once per plan."""
        commits = []
        for p, lay in self.plan.layouts.items():
            if lay.projected or p in self.full_checked or not self.in_scope(p):
                continue
            io = opt.state_io(p) if lay.kind is Kind.DERIVED else None
            new = restored_full_state(opt.state[p], p, io) if lay.shard is None else None
            if lay.shard is not None and any(io.keys_of(n) and not io.matches(n) for n in io.storages):
                raise ValueError(
                    f"{lay.where}: state_precision={lay.settings.state_precision!r} changes the storage of "
                    "its FSDP2-sharded full-rank states; choose state_precision before its first step"
                )
            if new is not None:
                commits.append(functools.partial(_replace, opt.state[p], new))
            self.full_checked.add(p)
        return commits

    def _work_list(self, opt: Any, compiling: bool) -> None:
        """What :meth:`update` steps: runs of matrix groups ready as one (not in a scoped step), then
        every other parameter with a gradient; full-rank states created here (the compiled region then
        sees a state dict of fixed size: no recompile after step 1)."""
        self.work, self.work_groups = [], []
        grouped: set[Tensor] = set()
        counters = self.counters
        for mg in self.plan.matrix_groups if self.scope is None else ():
            states = [opt.state[p] for p in mg.members]
            if mg.kernels is not None:  # the kernel path: grouped K1/K2 launches (.grouped_kernels)
                runs = kernel_runs(mg, states, counters, self.stored_plans)
            else:
                runs = ready(mg, self.buffers[id(mg)], states, counters)
            if runs:
                self.work_groups.append((mg, tuple(runs)))
                grouped.update(mg.members[k] for s, e in runs for k in range(s, e))
        self.work_full = []
        for fg in self.plan.full_groups if self.scope is None and not compiling else ():
            for p in fg.members:
                if p.grad is not None:
                    io = opt.state_io(p)
                    ensure_full_state(io.state, fg.program, p, io)
            runs = ready(fg, self.buffers[id(fg)], [opt.state[p] for p in fg.members], counters)
            if runs:
                self.work_full.append((fg, tuple(runs)))
                grouped.update(fg.members[k] for s, e in runs for k in range(s, e))
        for p in grouped:
            counters.expect(p, opt.state[p], counters.count(p, opt.state[p]))
        for p, lay in self.plan.layouts.items():
            if p.grad is None or p in grouped or not self.in_scope(p):
                continue
            if lay.projected or compiling or lay.kind is Kind.DERIVED:
                self.work.append((p, lay))
            state = opt.state[p]
            if lay.projected:  # the update advances its counter (an init committed step = 0)
                counters.expect(p, state, counters.count(p, state))
            if lay.kind is Kind.DERIVED:
                io = opt.state_io(p)  # (an FSDP2 parameter's io wraps new states as DTensors)
                ensure_full_state(io.state, lay.program, self.local(p), io)
            elif compiling and lay.kind is Kind.TORCH:
                key = (lay.group, p.dtype, p.ndim)
                program = full_program(
                    opt.config.base, base_hyperparams(opt.param_groups[lay.group]), p.dtype, p.ndim
                )
                self.full_programs[key] = program
                ensure_full_state(state, program, p)

    def _register_kernels(self, opt: Any, p: Tensor) -> None:
        """``p``'s stored kernel plan, once per plan: it depends only on the layout (epilogue, scale,
        storages), which the plan fixes. (Re-deriving it every step cost ≈ 1 ms of host time per matrix and
        step: ``Epilogue.key()`` prints sympy; 1,481 vs 438 µs per matrix per step with the launches stubbed
        out, ``benchmarks/results/kernel_host_overhead.json``.)"""
        lay = self.plan.layouts[p]
        if p in self.stored_plans or lay.kernels is None or lay.kind is not Kind.MATRIX:
            return
        ep = lay.program.program.epilogue
        kp = None
        if ep is not None:
            key = (ep.key(), float(lay.settings.scale))
            if key not in self.kernel_plans:
                self.kernel_plans[key] = kernel_plan(ep, lay.settings.scale)
            kp = self.kernel_plans[key]
        self.stored_plans[p] = None if kp is None else stored_kernel_plan(kp, opt.state_io(p))

    # -- phase 2 ---------------------------------------------------------------------------------------
    def update(self, opt: Any, compiling: bool) -> None:
        """The traceable update of everything :meth:`prepare` listed (module docstring). The gradients
        are read before ``opt.state``: Dynamo then guards them as tensors of the work list, not through
        the state dict's keys (weak references that a new gradient after ``zero_grad`` invalidates).
        Eagerly, a small CPU step runs single-threaded (:mod:`.threads`)."""
        if compiling:
            self._update(opt, compiling)
            return
        with intra_op_threads(self.threads):
            self._update(opt, compiling)

    def _update(self, opt: Any, compiling: bool) -> None:
        grads = [p.grad for p, _ in self.work]
        group_grads = [[p.grad for p in mg.members] for mg, _ in self.work_groups]
        full_grads = [[p.grad for p in fg.members] for fg, _ in self.work_full]
        for (p, lay), _g in zip(self.work, grads):
            state = opt.state[p]
            inputs = self.scalars.inputs(lay.group, state)
            if lay.kind is Kind.MATRIX:
                extra = None if self.scope is None else self.scope.get(p)
                with self.basis(opt, p, lay):  # a sharded P: gathered for this update, freed after
                    projected_update_(lay, self.local(p), opt.state_io(p), inputs,
                                      kernel_plan=self.stored_plans.get(p) if lay.kernels else None,
                                      x_extra=extra, comm=opt.comm_log)  # fmt: skip
            elif lay.kind is Kind.TUCKER:
                tucker_update_(lay, p, opt.state_io(p), inputs)
            elif lay.kind is Kind.DERIVED:  # a storage precision: the captured update, load/store
                io = opt.state_io(p)
                full_update_(self.local(p), io.state, lay.program, inputs, io)
            else:  # compiling: torch's layout, the captured update (fullrank module docstring)
                full_update_(p, state, self.full_programs[(lay.group, p.dtype, p.ndim)], inputs)
        chunks = []  # every group's chunks: independent, one ordered batch for the member pool (.chunks)
        for (mg, runs), g in zip(self.work_groups, group_grads):
            if mg.kernels is not None:
                states = [opt.state[p] for p in mg.members]
                kernel_group_update_(mg, runs, g, states, self.stored_plans, self.scalars)
                continue
            chunks += grouped_chunks(
                mg, self.buffers[id(mg)], runs, g, [opt.state[p] for p in mg.members],
                self.scalars.group_inputs(mg.index), compiling=compiling,
            )  # fmt: skip
        run_members(chunk_batch(chunks))  # (.threads; traced: in order)
        for (fg, runs), g in zip(self.work_full, full_grads):
            full_group_update_(fg, self.buffers[id(fg)], runs, g, self.scalars.group_inputs(fg.index))
        self.locals = {}  # drop the FSDP2 local views (and their gradient references)
        self.traced = compiling
        if not compiling:
            self.counters.settle(traced=True)  # completed: the written counters advanced by one
        if self.inner is not None and not compiling:
            self._inner_step()

    def _inner_step(self) -> None:
        if self.scope is None:
            self.inner.step()
            return
        lists = [g["params"] for g in self.inner.param_groups]  # only the scoped full-rank parameters
        try:
            for g in self.inner.param_groups:
                g["params"] = [p for p in g["params"] if p in self.scope]
            self.inner.step()
        finally:
            for g, ps in zip(self.inner.param_groups, lists):
                g["params"] = ps


def scoped(params: Iterable[Tensor], lowrank: dict[Tensor, Tensor] | None) -> dict[Tensor, Tensor | None]:
    """The scope of a restricted step: each parameter and its low-rank term (or None)."""
    return {p: (lowrank or {}).get(p) for p in params}


def _replace(state: dict, new: dict) -> None:
    state.clear()
    state.update(new)
