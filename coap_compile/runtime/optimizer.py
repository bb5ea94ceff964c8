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
* *Checkpoints.* ``state_dict()`` is tensors only; ``load_state_dict`` checks the checkpoint against
  this optimizer first and refuses a mismatch, unchanged (:mod:`.checkpoint`).

Differences from the official COAP code, on purpose: states and ``P`` are float32 (float64 for
float64 weights) whatever the weight dtype; ``P`` is stored ``N×r`` for both sides; no persistent
``P.grad`` buffer; the base arithmetic is the real torch optimizer's (not HF's legacy AdamW); bases
without a first moment (RMSprop, Adafactor) get a low-rank EMA ``coap_exp_avg`` of ``X̃`` (rate
``first_moment_beta``) for the correlation step, counted in the memory plan.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..capture import CapturedUpdate, init_states
from ..capture.trace import adapter_for
from ..compiler import CompiledBase
from ..distributed import fsdp
from ..lowering.kernels import KernelPlan, StoredKernelPlan
from ..projection import ProjectionPolicy, get_policy
from ..projection.tucker import core_shape
from . import checkpoint, sharding
from .eager_only import prime
from .grouped import MatrixGroup, build_groups, explain_groups
from .precision import resolve_precision, state_storage, validate_precision
from .programs import ProgramsMixin
from .selection import ParamPlan, canonical_dims, plan_param
from .settings import (
    CORRELATIONS,
    EMA_KEY,
    PRECISIONS,
    PROJECTION_KEYS,
    check_conv_rank_ratio,
    check_projection_side,
    make_policy,
    make_tucker_policy,
    settings_key,
    validate_group,
    validate_projection_args,
)
from .stepping import StepMixin
from .tucker import tucker_inits

__all__ = ["CoapOptimizer"]


class CoapOptimizer(ProgramsMixin, StepMixin, torch.optim.Optimizer):
    """COAP form of ``base_optim`` (see the module docstring). Build it with :func:`coap_compile.optimize`.

    Args:
        params: parameters or parameter groups (a group may set any base hyperparameter and the COAP keys
            ``rank, rank_ratio, projection, update_interval, reproject_factor, scale, restore_state,
            first_moment_beta, correlation, project``, validated like the keyword arguments).
        base_optim: the ``torch.optim.Optimizer`` subclass whose update is compiled.
        rank / rank_ratio: ``r = min(rank, min(m, n))``, or ``max(⌊min(m, n) / rank_ratio⌋, 1)``.
        projection: ``"coap"`` (default), ``"galore"``, ``"flora"``, or a ProjectionPolicy instance. For
            galore/flora ``update_interval`` is the refresh period (``update_gap`` / ``resample_every``).
        update_interval / reproject_factor: COAP's ``T_u`` and ``λ`` (correlation step every ``T_u`` steps,
            low-cost SVD every ``T_u·λ``).
        scale: multiplies the back-projected update only.
        restore_state: map the first/second moments into the new basis when ``P`` changes.
        first_moment_beta: EMA rate of ``coap_exp_avg`` for bases without a first moment.
        correlation: COAP's correlation step between low-cost SVDs: ``"paper"`` (the official clipped
            gradient step), ``"normalized"`` (a scale-invariant step of a fixed angle, P kept orthonormal)
            or ``"off"`` (SVD refreshes only); see :mod:`coap_compile.projection.correlation`.
        state_precision / projection_precision / quant_block_size: how states and ``P`` are stored
            (``"auto"``, ``"fp32"``, ``"bf16"``, ``"int8"``; rules and measurements in :mod:`.precision`).
        conv_rank_ratio: Tucker-project 4-D convolution weights with more than 9216 elements at the
            official ranks for ``ρ`` (:mod:`.selection`, :mod:`.tucker`); None keeps them full-rank.
        projection_side: ``"auto"`` (``X = G`` for tall/square weights, ``Gᵀ`` for wide ones; FSDP2
            weights always ``X = G``) or ``"rows"`` (``X = G`` for every weight, with the rows side's basis
            convention: the single-process reference of an FSDP2 run; :mod:`coap_compile.distributed.fsdp`).
        conv_policy: a :class:`~coap_compile.projection.tucker.TuckerPolicy` instance for those weights
            (default: one with the group's ``update_interval``/``reproject_factor``/``restore_state``).
        backend: ``"auto"`` (Triton kernels for CUDA tensors when available), ``"eager"`` or ``"triton"``.
        check_finite: refuse (raise) a step whose gradients contain inf/NaN, before modifying anything.
        grouped: update projected matrices with equal low-rank state shapes together (one elementwise
            pass over stacked states; bit-identical to ``grouped=False`` on CPU; what falls back to the
            per-matrix path, the layout and the measurements: :mod:`.grouped`).
        input_precision: ``tl.dot`` precision of the kernels' matmuls: ``"ieee"`` (default, float32
            accuracy, no tensor cores), ``"tf32x3"`` (≈ float32 accuracy on tensor cores) or ``"tf32"``
            (fastest, ≈1e-3 relative error per product; Adam's early sign-like steps amplify it).
        param_names: ``id(param) -> name`` for messages and the memory plan.
        **base_kwargs: the base optimizer's own arguments (``lr``, ``betas``, ``weight_decay`` …).
    """

    def __init__(
        self,
        params: Iterable,
        base_optim: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        rank: int | None = 256,
        rank_ratio: float | None = None,
        projection: str | ProjectionPolicy = "coap",
        update_interval: int = 32,
        reproject_factor: int = 5,
        scale: float = 1.0,
        restore_state: bool = False,
        first_moment_beta: float = 0.9,
        correlation: str = "paper",
        state_precision: str = "auto",
        projection_precision: str = "auto",
        quant_block_size: int = 256,
        conv_rank_ratio: float | None = None,
        projection_side: str = "auto",
        conv_policy: Any = None,
        backend: str = "auto",
        check_finite: bool = True,
        grouped: bool = True,
        input_precision: str = "ieee",
        param_names: dict[int, str] | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optim, type) and issubclass(base_optim, torch.optim.Optimizer)):
            raise TypeError(f"base_optim must be a torch.optim.Optimizer subclass, got {base_optim!r}")
        validate_projection_args(
            rank, rank_ratio, projection, update_interval, reproject_factor, scale, first_moment_beta, backend
        )
        probe = base_optim([torch.zeros(2, requires_grad=True)], **base_kwargs)  # base validates its own args
        validate_precision(state_precision, projection_precision, quant_block_size)
        check_conv_rank_ratio(conv_rank_ratio)
        check_projection_side(projection_side)
        if correlation not in CORRELATIONS:
            raise ValueError(f"correlation must be one of {CORRELATIONS}, got {correlation!r}")
        if input_precision not in PRECISIONS:
            raise ValueError(f"input_precision must be one of {PRECISIONS}, got {input_precision!r}")
        if not isinstance(grouped, bool):
            raise TypeError(f"grouped must be a bool, got {grouped!r} ({type(grouped).__name__})")
        self._base_cls = base_optim
        self._base_kwargs = dict(base_kwargs)
        self._policy_instance = projection if isinstance(projection, ProjectionPolicy) else None
        if self._policy_instance is None:
            get_policy(projection)  # unknown names fail here, naming the value
        self._backend = backend
        self._precision = input_precision
        self._check_finite = check_finite
        self._grouped = grouped
        self._names = dict(param_names or {})
        self._conv_policy = conv_policy
        self._events: list[str] = []
        #: A :class:`~coap_compile.distributed.CommLog` records the FSDP2 collectives (None: not recorded).
        self.comm_log = None
        defaults = dict(probe.defaults)
        defaults.update(
            rank=rank,
            rank_ratio=rank_ratio,
            update_interval=update_interval,
            reproject_factor=reproject_factor,
            scale=float(scale),
            restore_state=bool(restore_state),
            first_moment_beta=float(first_moment_beta),
            correlation=correlation,
            state_precision=state_precision,
            projection_precision=projection_precision,
            quant_block_size=quant_block_size,
            conv_rank_ratio=conv_rank_ratio,
            projection_side=projection_side,
            projection=projection if isinstance(projection, str) else projection.name,
        )
        super().__init__(params, defaults)
        self._derive()

    # -- structure (everything here is derived from param_groups) --------------------------------------
    def _name(self, p: Tensor) -> str:
        return self._names.get(id(p), f"param[{tuple(p.shape)}]")

    def _base_hyperparams(self, group: dict) -> dict:
        return {k: v for k, v in group.items() if k != "params" and k not in PROJECTION_KEYS}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            validate_group(self.param_groups[index], index, getattr(self, "_policy_instance", None))
            for p in self.param_groups[index]["params"]:
                if p.is_complex():
                    raise ValueError(
                        f"parameter {self._name(p)!r} is complex ({p.dtype}); COAP supports real "
                        "floating-point parameters only"
                    )
            if hasattr(self, "_plans"):  # after construction: re-derive everything
                self._derive()
        except Exception:
            self.param_groups.pop()
            if hasattr(self, "_plans"):
                self._derive()
            raise

    def _derive(self) -> None:
        """Plans, policies, programs, state storages and the inner base optimizer, from ``param_groups``."""
        groups = self.param_groups
        self._plans: dict[Tensor, ParamPlan] = {p: plan_param(p, g) for g in groups for p in g["params"]}
        self._policies = [make_policy(g, self._policy_instance) for g in self.param_groups]
        self._tucker_policies = [make_tucker_policy(g, self._conv_policy) for g in self.param_groups]
        self._keys = [settings_key(g) for g in self.param_groups]
        self._programs: dict[tuple[int, torch.dtype, int], CompiledBase] = {}
        self._kernel_plans: dict[tuple[str, float], KernelPlan] = {}
        self._stored_plans: dict[Tensor, StoredKernelPlan | None] = {}
        self._full_programs: dict[tuple[int, torch.dtype, int], CompiledBase | CapturedUpdate] = {}
        self._work: list[tuple[int, bool, float, float]] = []
        self._work_params: list[Tensor] = []
        self._scalars: list[Tensor] = [torch.zeros(0, dtype=torch.float64) for _ in self.param_groups]
        self._io_specs: dict[Tensor, tuple] = {}
        self._captured_full: dict[Tensor, CompiledBase | CapturedUpdate] = {}  # full-rank, derived update
        self._checked: dict[Tensor, tuple] = {}  # state layouts plan_refresh found needing nothing
        self._hyper_floats: dict[int, list[float]] = {}  # group -> the values now in _scalars[group]
        self._hyper_memo: dict[int, tuple] = {}  # group -> (hyperparameter key, live inputs)
        self._program_memo: dict[tuple, tuple] = {}  # program key -> (hyperparameter key, program)
        self._scalar_views: list[tuple[Tensor, list[Tensor]] | None] = [None] * len(self.param_groups)
        self._shards: dict[Tensor, fsdp.ShardSpec] = {}  # FSDP2 (DTensor) parameters COAP updates itself
        self._locals: dict[Tensor, Tensor] = {}  # their local views during a step (fsdp.local_param)
        seed = 0
        for i, g in enumerate(self.param_groups):
            for p in g["params"]:
                self._derive_storage(p, g, i, seed)  # compiles now: unsupported bases fail early
                seed += 1
        inner_groups, self._inner_index = [], {}
        for i, g in enumerate(self.param_groups):
            full = [p for p in g["params"] if not self._plans[p].projected and p not in self._captured_full]
            if full:
                self._inner_index[i] = len(inner_groups)
                inner_groups.append({**self._base_hyperparams(g), "params": full})
        self._inner = self._base_cls(inner_groups, **self._base_kwargs) if inner_groups else None
        if self._inner is not None:
            self._inner.state = self.state
        self._work_groups: list[tuple[MatrixGroup, tuple, float, float]] = []  # (group, runs, scale, β)
        build_groups(self)
        prime()  # torch._dynamo already imported: _prepare's eager-only wrapper before any trace

    def _derive_storage(self, p: Tensor, group: dict, index: int, seed: int) -> None:
        """Which storage each state of ``p`` uses (:mod:`.precision`), and its program."""
        prec = resolve_precision(group, p)
        where = f"parameter {self._name(p)!r} (param group {index})"
        plan = self._plans[p]
        if plan.projected and fsdp.is_dtensor(p):
            sharding.derive_projected(self, p, index, plan, prec.states, where)
        if plan.tucker:
            compiled = self._compiled(index, self._state_dtype(p), 4)
            program = compiled.program
            kinds = dict(program.state_kinds)
            core = core_shape(p.shape, plan.ranks)
            inits = tucker_inits(compiled, self._tucker_policies[index], core, prec.work_dtype, "meta")
            kinds.setdefault(EMA_KEY, "first_moment")
            shapes = {n: tuple(t.shape) for n, t in inits.items()}
            storages = {n: state_storage(prec, n, shapes[n], kinds[n], where) for n in shapes}
            self._io_specs[p] = (storages, kinds, seed, shapes)
            return
        if plan.projected:
            compiled = self._compiled(index, self._state_dtype(p))
            program = compiled.program
            kinds = dict(program.state_kinds)
            names = list(program.state_names)
            if program.first_moment is None and self._policies[index].needs_first_moment:
                names.append(EMA_KEY)
                kinds[EMA_KEY] = "first_moment"
            rows = canonical_dims(fsdp.local(p).shape, plan.transposed)[0]  # M (this rank's, when sharded)
            inits = compiled.init_lowrank_states(rows, plan.rank, prec.work_dtype, "meta")
            shapes = {n: tuple(t.shape) for n, t in inits.items()}
            shapes[EMA_KEY] = (rows, plan.rank)
            storages = {n: state_storage(prec, n, shapes[n], kinds[n], where) for n in names}
            self._io_specs[p] = (storages, kinds, seed, {n: shapes[n] for n in names})
            return
        explicit = group.get("state_precision", "auto") != "auto"
        native = adapter_for(self._base_cls).native_full_rank
        if native and (not explicit or (prec.states == "fp32" and p.dtype in (torch.float32, torch.float64))):
            return  # torch's own optimizer (its states in the weight dtype, its exact arithmetic)
        program = self._full_program(group, prec.work_dtype if explicit else p.dtype, p.ndim)
        captured = program.captured if isinstance(program, CompiledBase) else program
        kinds = dict(program.program.state_kinds) if isinstance(program, CompiledBase) else {}
        like = torch.empty(p.shape, dtype=captured.dtype, device="meta")
        shapes = {n: tuple(t.shape) for n, t in init_states(captured, like).items()}
        storages = {n: state_storage(prec, n, shapes[n], kinds.get(n, "other"), where) for n in shapes}
        if fsdp.is_dtensor(p):  # its own update on the local shard: only if elementwise
            sharding.derive_full_rank(self, p, program, prec.states, where)
        self._io_specs[p] = (storages, kinds, seed, shapes)
        self._captured_full[p] = program

    def projected_parameters(self) -> list[Tensor]:
        return [p for p, plan in self._plans.items() if plan.projected]

    def _sync_settings(self) -> None:
        """Re-validate and re-derive when a group's COAP settings changed since the last derivation."""
        changed = [i for i, g in enumerate(self.param_groups) if settings_key(g) != self._keys[i]]
        if len(self._keys) != len(self.param_groups):
            changed = list(range(len(self.param_groups)))
        for i in changed:
            validate_group(self.param_groups[i], i, self._policy_instance)
            for p in self.param_groups[i]["params"]:
                new = plan_param(p, self.param_groups[i])
                if self.state.get(p):
                    sharding.check_side(self, p, i, self._plans.get(p, new), new)
                if self.state.get(p) and new.projected != self._plans.get(p, new).projected:
                    raise ValueError(
                        f"parameter {self._name(p)!r} (param group {i}) already has "
                        f"{'low-rank' if not new.projected else 'full-rank'} optimizer state; its group "
                        "settings now make it "
                        f"{'projected' if new.projected else 'full-rank'}, which would discard that state. "
                        "Move it between projected and full-rank before its first step only"
                    )
        if changed:
            self._derive()

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
            checkpoint.setstate(self, config)
            self._derive()

    # -- reporting -------------------------------------------------------------------------------------
    def memory_plan(self):
        """Exact optimizer-state bytes per parameter, planned from shapes (works on the meta device)."""
        from .memory import plan_memory

        return plan_memory(self)

    def explain(self) -> str:
        """What was captured, the roles, the derived low-rank update and the memory plan."""
        from ..explanation import explain_optimizer

        marker = "\nmemory plan (optimizer-state bytes):"
        return explain_optimizer(self).replace(marker, "\n" + explain_groups(self) + "\n" + marker, 1)
