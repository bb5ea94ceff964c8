"""``CoapOptimizer``: a ``torch.optim.Optimizer`` running a compiled base optimizer in COAP form.

For a projected weight ``W`` (canonical orientation ``X = G`` or ``Gᵀ``, ``M ≥ N``, rank ``r``) one
step is, with ``k`` the completed steps::

    k = 0:                       P ← policy.init(X)              (randomized SVD for COAP)
    k > 0, policy schedule:      P ← policy.refresh(P, X, M)     (correlation step / low-cost SVD)
    X̃ = X P                                                      (M×r)
    (decay, D, s') = lowrank(X̃, s, k, lr, h)                     (the compiled base update)
    W ← decay · W + scale · D Pᵀ

Parameters that are not projected run the *unmodified* base optimizer (an inner instance of the base
class sharing this optimizer's ``state`` dict). The state is tensors only.

**The drop-in contract** (as ``torch.optim`` optimizers behave):

* *Live hyperparameters.* Every value is read from ``param_groups`` at every step. Float
  hyperparameters of the base (β, ε, weight decay, momentum, α, dampening, Adafactor's
  ``beta2_decay``/``d``/``eps``) are runtime inputs ``h`` of the compiled program: changing one
  (``OneCycleLR(cycle_momentum=True)`` cycles ``betas[0]`` every step) takes effect on the next
  step for projected and full-rank parameters alike, without re-capturing, re-running the passes or
  recompiling a kernel. Structural settings (amsgrad, maximize, nesterov, centered, decoupled decay,
  a zero/nonzero weight decay or momentum) select the compiled program: a change re-compiles once
  and is listed by :meth:`explain`. COAP's keys (``rank``, ``projection``, ``update_interval`` …) are
  re-validated and the plans re-derived when they change; a rank or policy change re-bases ``P`` on
  the next step (see :mod:`.refresh`).
* *Atomic steps.* Gradients (shape, dtype, device, layout, finiteness) and settings are validated
  before anything is written, and refreshes are computed before any is committed, so a step that
  raises for bad input changes nothing. A failure raised while a later parameter is being updated
  (out of memory, a kernel error) leaves earlier parameters updated, as torch's optimizers do: undoing
  them would need a copy of every weight; the failing parameter itself is left unchanged
  (:mod:`.update`). In a grouped update (:mod:`.grouped`) the unit is a chunk of a matrix group: it is
  computed completely (``X P``, the elementwise pass) before its first write.
* *Copies.* ``copy.deepcopy``, ``pickle`` and ``torch.save(opt)`` give an optimizer that continues
  bit-identically; everything derived is rebuilt in ``__setstate__``.

**Structure** (data flow, README "How it works")::

    param_groups ──► CoapSettings per group (settings) ──► RuntimePlan (plan): one frozen ParamLayout per
    parameter (layout: kind, side, rank, policy, program, state storage, shard, matrix group)
         │                                                  │
         └── step(): validate ─► schedule (schedule.due) ─► refresh (refresh/tucker) ─► update per kind
             (step.StepRunner: update.projected_update_, chunks.grouped_chunks, tucker.tucker_update_,
             fullrank.full_update_, torch's own optimizer for the TORCH kind)

Other modules read the structure through the public interface: :attr:`CoapOptimizer.plan`,
:meth:`~CoapOptimizer.layout`, :meth:`~CoapOptimizer.state_io`, :meth:`~CoapOptimizer.live_inputs`,
:meth:`~CoapOptimizer.sync_plan`, :meth:`~CoapOptimizer.step_subset`, :attr:`~CoapOptimizer.config`.
* *Checkpoints.* ``state_dict()`` is tensors only; ``load_state_dict`` checks the checkpoint against
  this optimizer first and refuses a mismatch, unchanged (:mod:`.checkpoint`).

Differences from the official COAP code, on purpose: states and ``P`` are float32 (float64 for
float64 weights) whatever the weight dtype; ``P`` is stored ``N×r`` for both sides; no persistent
``P.grad`` buffer; the base arithmetic is the real torch optimizer's (not HF's legacy AdamW); bases
without a first moment (RMSprop, Adafactor) get a low-rank EMA ``coap_exp_avg`` of ``X̃`` (rate
``first_moment_beta``) for the correlation step, counted in the memory plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..projection import ProjectionPolicy
from . import checkpoint
from .eager_only import eager_only, prime
from .hyper import check_base_hyperparams, lr_token
from .layout import Kind, ParamLayout
from .plan import OptimizerConfig, RuntimePlan, build_plan, program_changes
from .precision import StateIO
from .scalars import base_hyperparams, hyper_key
from .settings import DEFAULTS, CoapSettings, OptimizerOptions
from .step import StepRunner, scoped

__all__ = ["CoapOptimizer"]

_D = DEFAULTS
_O = OptimizerOptions()


class CoapOptimizer(torch.optim.Optimizer):
    """COAP form of ``base_optim`` (see the module docstring). Build it with :func:`coap_compile.optimize`.

    Args:
        params: parameters or parameter groups (a group may set any base hyperparameter and the COAP keys
            of :class:`~.settings.CoapSettings`, validated like the keyword arguments).
        base_optim: the ``torch.optim.Optimizer`` subclass whose update is compiled.
        rank, rank_ratio, update_interval, reproject_factor, scale, restore_state, first_moment_beta,
            correlation, state_precision, projection_precision, quant_block_size, quant_blocks,
            conv_rank_ratio, projection_side, projection_sharding: COAP's settings,
            :class:`~.settings.CoapSettings` (defaults and rules there).
        projection: a policy name, or a ProjectionPolicy instance (then every group uses it).
        conv_policy: a :class:`~coap_compile.projection.tucker.TuckerPolicy` instance for Tucker-projected
            weights (default: one with the group's ``update_interval``, ``reproject_factor``,
            ``restore_state``).
        backend, check_finite, grouped, input_precision: :class:`~.settings.OptimizerOptions`.
        param_names: ``id(param) -> name`` for messages and the memory plan.
        **base_kwargs: the base optimizer's own arguments (``lr``, ``betas``, ``weight_decay`` …).
    """

    _plan: RuntimePlan | None = None  # None until construction has derived the first plan

    def __init__(
        self,
        params: Iterable,
        base_optim: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        rank: int | None = _D.rank,
        rank_ratio: float | None = _D.rank_ratio,
        projection: str | ProjectionPolicy = _D.projection,
        update_interval: int = _D.update_interval,
        reproject_factor: int = _D.reproject_factor,
        scale: float = _D.scale,
        restore_state: bool = _D.restore_state,
        first_moment_beta: float = _D.first_moment_beta,
        correlation: str = _D.correlation,
        state_precision: str = _D.state_precision,
        projection_precision: str = _D.projection_precision,
        quant_block_size: int = _D.quant_block_size,
        quant_blocks: str = _D.quant_blocks,
        conv_rank_ratio: float | None = _D.conv_rank_ratio,
        projection_side: str = _D.projection_side,
        projection_sharding: str = _D.projection_sharding,
        basis: str = _D.basis,
        conv_policy: Any = None,
        backend: str = _O.backend,
        check_finite: bool = _O.check_finite,
        grouped: bool = _O.grouped,
        input_precision: str = _O.input_precision,
        param_names: dict[int, str] | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optim, type) and issubclass(base_optim, torch.optim.Optimizer)):
            raise TypeError(f"base_optim must be a torch.optim.Optimizer subclass, got {base_optim!r}")
        if not isinstance(projection, (str, ProjectionPolicy)):
            raise TypeError(f"projection must be a policy name or a ProjectionPolicy, got {projection!r}")
        instance = projection if isinstance(projection, ProjectionPolicy) else None
        settings = CoapSettings(
            rank=rank, rank_ratio=rank_ratio, projection=projection if instance is None else instance.name,
            update_interval=update_interval, reproject_factor=reproject_factor, scale=scale,
            restore_state=restore_state, first_moment_beta=first_moment_beta, correlation=correlation,
            state_precision=state_precision, projection_precision=projection_precision,
            quant_block_size=quant_block_size, quant_blocks=quant_blocks, conv_rank_ratio=conv_rank_ratio,
            projection_side=projection_side, projection_sharding=projection_sharding, basis=basis,
        )  # fmt: skip
        options = OptimizerOptions(backend, check_finite, grouped, input_precision)
        probe = base_optim([torch.zeros(2, requires_grad=True)], **base_kwargs)  # base validates its own args
        self._config = OptimizerConfig(
            base_optim, dict(base_kwargs), instance, conv_policy, options, dict(param_names or {})
        )
        self._events: list[str] = []
        #: A :class:`~coap_compile.distributed.CommLog` records the FSDP2 collectives (None: not recorded).
        self.comm_log = None
        super().__init__(params, {**probe.defaults, **settings.group_defaults()})
        self._install(build_plan(self._config, self.param_groups))

    # -- the public interface of the runtime (read by checkpoint, memory, explain, in-backward, …) --------
    @property
    def config(self) -> OptimizerConfig:
        """What the optimizer was built with (base class and arguments, policy instances, options)."""
        return self._config

    @property
    def plan(self) -> RuntimePlan:
        """The current structure: every parameter's :class:`~.layout.ParamLayout`, the matrix groups."""
        return self._plan

    @property
    def events(self) -> tuple[str, ...]:
        """Re-compilations so far (a structural hyperparameter selected another program)."""
        return tuple(self._events)

    @property
    def grouped_runs(self) -> tuple[tuple[Any, tuple[tuple[int, int], ...]], ...]:
        """The matrix groups of the last step and the runs of members that stepped as one
        (:mod:`.grouped`)."""
        return tuple(self._runner.work_groups)

    def layout(self, p: Tensor) -> ParamLayout:
        return self._plan.layouts[p]

    def param_name(self, p: Tensor) -> str:
        return self._config.name_of(p)

    def projected_parameters(self) -> list[Tensor]:
        return [p for p, lay in self._plan.layouts.items() if lay.projected]

    def state_io(self, p: Tensor) -> StateIO:
        """The load/store view of ``p``'s states (:mod:`.precision`; an FSDP2 weight's state through
        :class:`~coap_compile.distributed.fsdp.ShardedState`: local tensors in, DTensors stored)."""
        lay = self._plan.layouts[p]
        state = self.state[p]
        if lay.shard is not None:
            from ..distributed import fsdp

            state = fsdp.ShardedState(state, lay.shard, lay.states.row_names)
        return lay.states.io(state)

    def step_count(self, p: Tensor) -> int:
        """``p``'s completed steps (``state["step"]``), from the host-side counters: no host read while
        the step tensor is the one this optimizer last wrote (:mod:`.counters`)."""
        return self._runner.counters.count(p, self.state[p]) if p in self.state else 0

    def live_inputs(self, p: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(k, lr, hyperparameters)`` of ``p`` as its update reads them (0-d float64), filled now."""
        keys = [hyper_key(base_hyperparams(g)) for g in self.param_groups]
        self._runner.scalars.fill(self.param_groups, keys)
        return self._runner.scalars.inputs(self._plan.layouts[p].group, self.state[p])

    def sync_plan(self, keys: list[tuple] | None = None, *, force: bool = False) -> RuntimePlan:
        """Re-validate and rebuild the plan if ``param_groups`` changed: COAP keys or parameters, or base
        hyperparameters that select another compiled program (``keys``: the groups'
        :func:`~.scalars.hyper_key`, computed when not given); ``force`` rebuilds anyway. A bad edit
        raises, naming the setting and the group, and keeps the old plan."""
        old = self._plan
        if force or old.stale(self.param_groups):
            new = build_plan(self._config, self.param_groups)
            self._check_transitions(old, new)
            self._install(new)
            return new
        if keys is None:
            keys = [hyper_key(base_hyperparams(g)) for g in self.param_groups]
        for i, g in enumerate(self.param_groups):
            if keys[i] != self._hyper_seen[i]:
                lines = program_changes(old, self._config, i, g)
                if lines:
                    self._events += lines
                    self._install(build_plan(self._config, self.param_groups))
                    return self._plan
                self._hyper_seen[i] = keys[i]
        return self._plan

    def step_subset(self, params: Iterable[Tensor], lowrank: dict[Tensor, Tensor] | None = None) -> None:
        """``step()`` restricted to ``params`` (in-backward updates, :mod:`.inbackward`): other parameters
        are not read, even when they hold gradients. ``lowrank[p]`` (``M×r``) is added to ``X P``.

        Scoped parameters run the per-matrix path even when they belong to a matrix group
        (:mod:`.grouped`: bit-identical on CPU; their states are written in place, so the group's buffers
        stay their storage): a group steps as one only when all its members are ready together.
        """
        runner = self._runner
        runner.scope = scoped(params, lowrank)
        try:
            self.step()
        finally:
            runner.scope = None
            self._runner.scope = None

    # -- structure -------------------------------------------------------------------------------------
    def _install(self, plan: RuntimePlan) -> None:
        scope = self._runner.scope if self._plan is not None else None
        self._plan = plan
        self._hyper_seen = list(plan.hyper_keys)
        self._values_seen = [  # build_plan checked them
            (k, lr_token(g.get("lr"))) for k, g in zip(plan.hyper_keys, self.param_groups)
        ]
        self._runner = StepRunner(self, plan)
        self._runner.scope = scope
        prime()  # torch._dynamo already imported: _prepare's eager-only wrapper before any trace

    def _check_transitions(self, old: RuntimePlan, new: RuntimePlan) -> None:
        """A settings edit may not discard a parameter's low-rank state or move it to the other side."""
        for p, lay in new.layouts.items():
            before = old.layouts.get(p)
            if before is None or not self.state.get(p):
                continue
            where = f"parameter {self.param_name(p)!r} (param group {lay.group})"
            if lay.projected != before.projected:
                raise ValueError(
                    f"{where} already has {'low-rank' if not lay.projected else 'full-rank'} optimizer "
                    "state; "
                    f"its group settings now make it {'projected' if lay.projected else 'full-rank'}, which "
                    "would discard that state. Move it between projected and full-rank before its first "
                    "step only"
                )
            if lay.kind is Kind.MATRIX and before.kind is Kind.MATRIX and lay.transposed != before.transposed:
                raise ValueError(
                    f"{where} already has low-rank state on the {'columns' if before.transposed else 'rows'} "
                    f"side; projection_side={lay.settings.projection_side!r} would change its P's shape. "
                    "Choose "
                    "projection_side before the parameter's first step"
                )

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            CoapSettings.from_group(self.param_groups[index], index, self._config.policy_instance)
            for p in self.param_groups[index]["params"]:
                if p.is_complex():
                    raise ValueError(
                        f"parameter {self.param_name(p)!r} is complex ({p.dtype}); COAP supports real "
                        "floating-point parameters only"
                    )
            if self._plan is not None:  # after construction: derive the new structure
                self._install(build_plan(self._config, self.param_groups))
        except Exception:
            self.param_groups.pop()
            raise

    # -- the step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, found_inf: Tensor | None = None):
        """One optimizer step. ``found_inf`` (GradScaler style): if nonzero the step is skipped.

        Host syncs: a steady step reads one value back, the finiteness verdict of the gradients
        (``check_finite``); none with ``check_finite=False``. ``found_inf`` replaces that check (it *is*
        the verdict, computed by the caller from the same gradients): it is read once (``.any()`` on the
        host) and the gradients are not checked again. Not reading it would need every write of the
        step (weights, states, counters) masked on the device by ``found_inf``, and host-side step
        counters that cannot know whether the step happened; GradScaler itself reads ``found_inf``
        before calling ``step()``. The refresh schedule reads no counter (:mod:`.counters`).

        Two phases (:mod:`.step`): :meth:`_prepare` (never traced: checks, live scalars, the refresh
        schedule, refreshes written in place) and the update (traceable: no host reads, no branches on
        the step). Under ``torch.compile`` full-rank parameters run their captured update (:mod:`.fullrank`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Dynamo traces *this* thread (constant True in its trace, False eagerly). Not
        # torch.compiler.is_compiling(): a process-wide flag, True in every thread while any thread runs
        # a torch.compile session, so a concurrent eager step would take the traced path (issue 21).
        compiling = torch.compiler.is_dynamo_compiling()
        if not compiling:
            prime()  # Dynamo imported since: make _prepare's disabled wrapper before any trace
        if not self._prepare(found_inf, compiling):
            return loss
        self._runner.update(self, compiling)
        return loss

    @eager_only
    def _prepare(self, found_inf: Tensor | None, compiling: bool = False) -> bool:
        """Skip on ``found_inf``; the settings check (rebuilding the plan if needed); the runner's phases."""
        if found_inf is not None and bool(found_inf.detach().cpu().any()):  # the step's one host read
            return False
        keys = [hyper_key(base_hyperparams(g)) for g in self.param_groups]
        self._check_values(keys)
        self.sync_plan(keys)
        self._runner.prepare(self, keys, compiling, check_finite=found_inf is None)
        return True

    def _check_values(self, keys: list[tuple]) -> None:
        """The base hyperparameters of every group whose values changed since their last check (``keys``:
        the groups' :func:`~.scalars.hyper_key`), checked by the base class itself before anything is
        written (:mod:`.hyper`); ValueError/TypeError naming the group."""
        seen = self._values_seen
        if len(seen) != len(self.param_groups):
            seen[:] = [None] * len(self.param_groups)
        for i, g in enumerate(self.param_groups):
            key = (keys[i], lr_token(g.get("lr")))
            if key != seen[i]:
                check_base_hyperparams(self._config.base, g, i)
                seen[i] = key

    # -- checkpoints and copies ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return checkpoint.add_metadata(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the checkpoint against this optimizer (refusing a mismatch, unchanged), then load it.

        torch casts every floating state to the parameter's dtype on load; low-rank states and ``P``
        keep their saved dtype here (float32 for bf16 weights).
        """
        checkpoint.load(self, state_dict, super().load_state_dict)

    def __getstate__(self) -> dict[str, Any]:
        return checkpoint.getstate(self, super().__getstate__())

    def __setstate__(self, state: dict[str, Any]) -> None:
        config = state.pop("_coap_config", None)
        super().__setstate__(state)
        if config is not None:
            self._config, self._events = checkpoint.setstate(self, config)
            self.comm_log = None  # a CommLog records one session's collectives: not configuration
            self._plan = None
            self._install(build_plan(self._config, self.param_groups))

    # -- reporting -------------------------------------------------------------------------------------
    def memory_plan(self, *, world_size: int | None = None, rank: int = 0, strict: bool = True):
        """Exact optimizer-state bytes per parameter, planned from shapes (works on the meta device);
        ``world_size=W``: rank ``rank``'s bytes under FSDP2 on ``W`` ranks (:func:`.memory.plan_memory`;
        ``strict=False`` plans what FSDP2 refuses today by the same closed form)."""
        from .memory import plan_memory

        return plan_memory(self, world_size=world_size, rank=rank, strict=strict)

    def explain(self) -> str:
        """What was captured, the roles, the derived low-rank update, the grouped update, the memory plan."""
        from ..explanation import explain_optimizer

        return explain_optimizer(self)
