"""``CoapOptimizer``: a ``torch.optim.Optimizer`` running a compiled base optimizer in COAP form.

For a projected weight ``W`` (canonical orientation ``X = G`` or ``Gᵀ``, ``M ≥ N``, rank ``r``) one
step is, with ``k`` the completed steps::

    k = 0:                       P ← policy.init(X)              (randomized SVD for COAP)
    k > 0, policy schedule:      P ← policy.refresh(P, X, M)     (correlation step / low-cost SVD)
    X̃ = X P                                                      (M×r)
    (decay, D, s') = lowrank(X̃, s, k, lr)                        (the compiled base update)
    W ← decay · W + scale · D Pᵀ

Parameters that are not projected run the *unmodified* base optimizer (an inner instance of the base
class sharing this optimizer's ``state`` dict; its hyperparameters are synchronised from
``param_groups`` before every step, so LR schedulers work). The state is tensors only.

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

from ..compiler import CompiledBase, compile_base
from ..errors import NonFiniteGradientError
from ..lowering.eager import apply_reprojection_, run_lowrank
from ..lowering.kernels import KernelPlan, fused_update_, kernel_plan, reproject_update_
from ..projection import ProjectionPolicy, canonical, get_policy, restore_moments
from .selection import ParamPlan, plan_param
from .settings import EMA_KEY, PRECISIONS, PROJECTION_KEYS, make_policy, validate_projection_args

__all__ = ["CoapOptimizer"]


class CoapOptimizer(torch.optim.Optimizer):
    """COAP form of ``base_optim`` (see the module docstring). Build it with :func:`coap_compile.optimize`.

    Args:
        params: parameters or parameter groups (a group may set any base hyperparameter and the COAP keys
            ``rank, rank_ratio, projection, update_interval, reproject_factor, scale, restore_state,
            first_moment_beta, project``).
        base_optim: the ``torch.optim.Optimizer`` subclass whose update is compiled.
        rank / rank_ratio: ``r = min(rank, min(m, n))``, or ``max(⌊min(m, n) / rank_ratio⌋, 1)``.
        projection: ``"coap"`` (default), ``"galore"``, ``"flora"``, or a ProjectionPolicy instance. For
            galore/flora ``update_interval`` is the refresh period (``update_gap`` / ``resample_every``).
        update_interval / reproject_factor: COAP's ``T_u`` and ``λ`` (correlation step every ``T_u`` steps,
            low-cost SVD every ``T_u·λ``).
        scale: multiplies the back-projected update only.
        restore_state: map the first/second moments into the new basis when ``P`` changes.
        first_moment_beta: EMA rate of ``coap_exp_avg`` for bases without a first moment.
        backend: ``"auto"`` (Triton kernels for CUDA tensors when available), ``"eager"`` or ``"triton"``.
        check_finite: refuse (raise) a step whose gradients contain inf/NaN, before modifying anything.
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
        backend: str = "auto",
        check_finite: bool = True,
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
        self._base_cls = base_optim
        self._base_kwargs = dict(base_kwargs)
        self._policy_instance = projection if isinstance(projection, ProjectionPolicy) else None
        if self._policy_instance is None:
            get_policy(projection)  # unknown names fail here, naming the value
        self._backend = backend
        if input_precision not in PRECISIONS:
            raise ValueError(f"input_precision must be one of {PRECISIONS}, got {input_precision!r}")
        self._precision = input_precision
        self._check_finite = check_finite
        self._names = dict(param_names or {})
        self._inner: torch.optim.Optimizer | None = None
        self._plans: dict[Tensor, ParamPlan] = {}
        defaults = dict(probe.defaults)
        defaults.update(
            rank=rank,
            rank_ratio=rank_ratio,
            update_interval=update_interval,
            reproject_factor=reproject_factor,
            scale=float(scale),
            restore_state=bool(restore_state),
            first_moment_beta=float(first_moment_beta),
            projection=projection if isinstance(projection, str) else projection.name,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(
                        f"parameter {self._name(p)!r} is complex ({p.dtype}); COAP supports real "
                        "floating-point parameters only"
                    )
        self._rebuild()

    # -- structure ---------------------------------------------------------------------------------
    def _name(self, p: Tensor) -> str:
        return self._names.get(id(p), f"param[{tuple(p.shape)}]")

    def _base_hyperparams(self, group: dict) -> dict:
        return {k: v for k, v in group.items() if k != "params" and k not in PROJECTION_KEYS}

    def _rebuild(self) -> None:
        """Derive plans, policies, programs and the inner base optimizer from ``param_groups``."""
        self._plans = {p: plan_param(p, g) for g in self.param_groups for p in g["params"]}
        self._policies = [make_policy(g, self._policy_instance) for g in self.param_groups]
        self._programs: dict[tuple[int, torch.dtype], CompiledBase] = {}
        self._kernel_plans: dict[tuple[int, torch.dtype], KernelPlan] = {}
        for i, g in enumerate(self.param_groups):
            for p in g["params"]:
                if self._plans[p].projected:
                    self._compiled(i, self._state_dtype(p))  # compile now: unsupported bases fail early
        inner_groups, self._inner_index = [], {}
        for i, g in enumerate(self.param_groups):
            full = [p for p in g["params"] if not self._plans[p].projected]
            if full:
                self._inner_index[i] = len(inner_groups)
                inner_groups.append({**self._base_hyperparams(g), "params": full})
        self._inner = self._base_cls(inner_groups, **self._base_kwargs) if inner_groups else None
        if self._inner is not None:
            self._inner.state = self.state

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_policies"):  # after construction: re-derive everything
            self._rebuild()

    @staticmethod
    def _state_dtype(p: Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _compiled(self, group_index: int, dtype: torch.dtype) -> CompiledBase:
        key = (group_index, dtype)
        if key not in self._programs:
            hyper = self._base_hyperparams(self.param_groups[group_index])
            self._programs[key] = compile_base(self._base_cls, hyper, dtype)
        return self._programs[key]

    def _kernel_plan(self, group_index: int, dtype: torch.dtype) -> KernelPlan | None:
        """The registered kernel epilogue for a group (built outside any compiled region)."""
        ep = self._compiled(group_index, dtype).program.epilogue
        scale = self.param_groups[group_index]["scale"]
        key = (group_index, dtype)
        plan = self._kernel_plans.get(key)
        if ep is not None and (plan is None or plan.epilogue.scale != scale):
            plan = self._kernel_plans[key] = kernel_plan(ep, scale)
        return plan

    def _use_kernels(self, p: Tensor) -> bool:
        if p.dtype not in (torch.float32, torch.bfloat16) or self._backend == "eager":
            return False
        return self._backend == "triton" or p.is_cuda

    def projected_parameters(self) -> list[Tensor]:
        return [p for p, plan in self._plans.items() if plan.projected]

    # -- checkpoints -------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts every floating state to the parameter's dtype on load; low-rank states and ``P``
        keep their saved dtype here (float32 for bf16 weights)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        self._rebuild()
        ids = [p for g in self.param_groups for p in g["params"]]
        for idx, p in enumerate(ids):
            if self._plans[p].projected and idx in saved:
                for key, value in saved[idx].items():
                    if isinstance(value, Tensor) and key != "step":
                        self.state[p][key] = value.detach().to(device=p.device, copy=True)

    # -- the step ----------------------------------------------------------------------------------
    def _check_grads(self) -> None:
        grads, owners = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(
                        f"parameter {self._name(p)!r} has a sparse gradient; COAP needs dense gradients"
                    )
                grads.append(p.grad)
                owners.append(p)
        if not self._check_finite or not grads:
            return
        # One reduction pass per gradient and no boolean temporaries: min and max are finite iff every
        # element is (NaN propagates through aminmax).
        ok = torch.stack([torch.isfinite(torch.stack(torch.aminmax(g))).all().cpu() for g in grads])
        if not bool(ok.all()):
            bad = owners[int((~ok).nonzero()[0])]
            raise NonFiniteGradientError(
                f"the gradient of parameter {self._name(bad)!r} (shape {tuple(bad.shape)}) contains inf or "
                "NaN; "
                "nothing was modified. Pass found_inf= (GradScaler style) to skip such steps instead, or "
                "check_finite=False to disable this check"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, found_inf: Tensor | None = None):
        """One optimizer step. ``found_inf`` (GradScaler style): if nonzero the step is skipped.

        Two phases, so that ``torch.compile`` of a training step traces the update without recompiling:
        :meth:`_prepare` (not compiled: checks, the refresh schedule, ``P`` refreshes written in place)
        and the update itself (traceable: no host reads, no branches on the step).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._prepare(found_inf):
            return loss
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None and self._plans[p].projected:
                    self._projected_update(p, group, i)
        if self._inner is not None:
            self._inner.step()
        return loss

    @torch.compiler.disable
    def _prepare(self, found_inf: Tensor | None) -> bool:
        """Skip on ``found_inf``, validate gradients, then initialise/refresh ``P`` where scheduled."""
        if found_inf is not None and bool(found_inf.detach().cpu().any()):
            return False
        self._check_grads()
        if self._inner is not None:  # hyperparameters (lr schedules) reach the full-rank base optimizer
            for i, j in self._inner_index.items():
                self._inner.param_groups[j].update(self._base_hyperparams(self.param_groups[i]))
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                # Create every entry here (the base optimizer fills full-rank ones lazily), so the state
                # dict's size is fixed before the compiled update sees it: no recompile after step 1.
                self.state[p]
                if self._plans[p].projected:
                    self._refresh(p, group, i)
                    if self._use_kernels(p):
                        self._kernel_plan(i, self._state_dtype(p))
        return True

    def _canonical_input(self, p: Tensor, program, k_t: Tensor, lr_t: Tensor) -> tuple[Tensor, bool]:
        g = p.grad
        if program.prologue is not None:
            dtype = self._state_dtype(p)
            g = program.prologue(p.to(dtype), g.to(dtype), k_t, lr_t)
        return canonical(g)

    @staticmethod
    def _scalars(state: dict, group: dict) -> tuple[Tensor, Tensor]:
        lr = group["lr"]
        lr_t = (
            lr.detach().to("cpu", torch.float64)
            if isinstance(lr, Tensor)
            else torch.tensor(lr, dtype=torch.float64)
        )
        return state["step"].to(torch.float64), lr_t

    def _refresh(self, p: Tensor, group: dict, index: int) -> None:
        """Create the state at ``k = 0``; apply the policy's refresh when its schedule says so."""
        dtype = self._state_dtype(p)
        compiled = self._compiled(index, dtype)
        program = compiled.program
        policy = self._policies[index]
        state = self.state[p]
        k = int(state["step"].item()) if "step" in state else 0
        kind = policy.refresh_kind(k) if state else "init"
        if not kind:
            return
        if kind == "init":
            state.clear()
            state["step"] = torch.zeros((), dtype=torch.float32)
        x, transposed = self._canonical_input(p, program, *self._scalars(state, group))
        rank = self._plans[p].rank
        ema = program.first_moment is None and policy.needs_first_moment
        if kind == "init":
            state.update(policy.init_state(x.to(dtype), rank))
            state.update(compiled.init_lowrank_states(x.shape[0], rank, dtype, p.device))
            if ema:
                state[EMA_KEY] = torch.zeros((x.shape[0], rank), dtype=dtype, device=p.device)
            return
        first = state[program.first_moment] if program.first_moment else state.get(EMA_KEY)
        old = state["proj"].clone() if group["restore_state"] else None
        changed = policy.refresh(state, x, k, first_moment=first, transposed=transposed)
        if old is not None and changed:
            kinds = program.state_kinds
            restore_moments(
                old,
                state["proj"],
                first=[state[n] for n in program.state_names if kinds[n] == "first_moment"]
                + ([state[EMA_KEY]] if ema else []),
                second=[state[n] for n in program.state_names if kinds[n] == "second_moment"],
            )

    def _projected_update(self, p: Tensor, group: dict, index: int) -> None:
        """``X̃ = X P``; the compiled low-rank update; ``W ← decay·W + scale·D Pᵀ`` (traceable)."""
        dtype = self._state_dtype(p)
        program = self._compiled(index, dtype).program
        policy = self._policies[index]
        state = self.state[p]
        k_t, lr_t = self._scalars(state, group)
        kernels = self._use_kernels(p)
        if kernels and program.epilogue is not None and EMA_KEY not in state:
            # K1 (X P + state update + D) and K2 (W ← decay·W + scale·D Pᵀ), both generated.
            g = (
                p.grad
                if program.prologue is None
                else program.prologue(p.to(dtype), p.grad.to(dtype), k_t, lr_t)
            )
            fused_update_(
                self._kernel_plans[(index, dtype)],
                p,
                g,
                state["proj"],
                [state[n] for n in program.state_names],
                k_t + 1,
                lr_t,
                transposed=self._plans[p].transposed,
                backend=self._backend,
                input_precision=self._precision,
            )
            state["step"].add_(1.0)
            return
        x, transposed = self._canonical_input(p, program, k_t, lr_t)
        w = p.t() if transposed else p
        x_proj = policy.project(state, x)
        stat_param = p if not program.decomposition.param_stats else p.to(dtype)
        decay, delta, new_states, new_step = run_lowrank(
            program, stat_param, x_proj, [state[n] for n in program.state_names], k_t, lr_t
        )
        for name, value in zip(program.state_names, new_states):
            state[name].copy_(value)
        state["step"].copy_(new_step)
        if kernels:  # low-rank middle ran eagerly (reductions); the reprojection is the K2 kernel
            reproject_update_(
                p,
                delta,
                state["proj"],
                decay,
                group["scale"],
                transposed=transposed,
                backend=self._backend,
                input_precision=self._precision,
            )
        else:
            apply_reprojection_(w, decay, delta, state["proj"], group["scale"])
        if EMA_KEY in state:
            state[EMA_KEY].lerp_(x_proj, 1.0 - group["first_moment_beta"])

    # -- reporting ---------------------------------------------------------------------------------
    def memory_plan(self):
        """Exact optimizer-state bytes per parameter, planned from shapes (works on the meta device)."""
        from .memory import plan_memory

        return plan_memory(self)

    def explain(self) -> str:
        """What was captured, the roles, the derived low-rank update and the memory plan."""
        from ..explain import explain_optimizer

        return explain_optimizer(self)
