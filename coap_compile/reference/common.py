"""Shared machinery of the eager reference optimizers: parameter selection, projection, refresh, state I/O.

For a projected 2-D parameter ``W`` with gradient ``G``, each step runs (canonical orientation, see
:mod:`coap_compile.projection.base`; ``X = G`` or ``Gᵀ`` so that ``X`` is ``M×N`` with ``M ≥ N``)::

    k = state["step"]                                   (completed steps)
    k == 0:  state |= policy.init_state(X, r); create the low-rank base states (M×r)
    else:    if policy.refresh_kind(k): policy.refresh(state, X, k, first_moment=…, transposed=…)
             (+ restore_moments(P_old, P_new, …) when restore_state)
    X̃ = X P                                            (M×r, float32; float64 for float64 params)
    base update on X̃ → D (M×r);   W_view += −α · scale · D Pᵀ     (W_view = W or Wᵀ)

Everything else (1-D, 0-D, ≥3-D parameters, and matrices that are not projected) runs the plain base
update on the full tensor. Per-parameter state holds tensors only, so ``torch.load(weights_only=True)``
works; :meth:`ProjectedOptimizer.load_state_dict` keeps each saved tensor's dtype (torch would cast
``P``, the int64 Flora seed and the float32 low-rank moments to a bf16 parameter's dtype).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from ..projection.base import ProjectionPolicy, canonical, resolve_rank
from ..projection.linalg import check_positive_int
from ..projection.registry import POLICIES, get_policy

__all__ = ["LowRank", "ProjectedOptimizer", "check_number", "projection_defaults"]


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``float(value)`` if it is a real number in the given interval, else raise naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {name}={value!r} of type {type(value).__name__}")
    v = float(value)
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high or v != v:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {name}={value!r}")
    return v


def projection_defaults(
    rank: int | None,
    rank_ratio: float | None,
    projection: str | ProjectionPolicy,
    update_interval: int,
    reproject_factor: int,
    scale: float,
    restore_state: bool,
) -> dict[str, Any]:
    """The projection keys of a param group (``project=None``: decided per parameter, see ``_rank``)."""
    return {
        "rank": rank,
        "rank_ratio": rank_ratio,
        "projection": projection,
        "update_interval": update_interval,
        "reproject_factor": reproject_factor,
        "scale": scale,
        "restore_state": restore_state,
        "project": None,
    }


def _policy_kwargs(name: str, group: dict[str, Any]) -> dict[str, Any]:
    """Map the optimizer's ``update_interval`` to each named policy's refresh-period argument."""
    if name == "coap":
        return {"update_interval": group["update_interval"], "reproject_factor": group["reproject_factor"]}
    if name == "galore":
        return {"update_gap": group["update_interval"]}
    if name == "flora":
        return {"resample_every": group["update_interval"]}
    if name == "dct":
        return {"update_interval": group["update_interval"]}
    return {}


@dataclass
class LowRank:
    """A projected gradient ``X̃ = X P`` plus what is needed to map an update back."""

    grad: Tensor  # M×r
    policy: ProjectionPolicy
    state: dict[str, Tensor]
    transposed: bool

    def apply_back(self, param: Tensor, d: Tensor, scale: float, alpha: float) -> None:
        """``W_view += alpha · scale · D Pᵀ`` in place (``W_view`` = ``W`` or ``Wᵀ``)."""
        view = param.t() if self.transposed else param
        back = self.policy.project_back(self.state, d)
        if scale != 1.0:
            back = back * scale
        view.add_(back, alpha=alpha)


class ProjectedOptimizer(torch.optim.Optimizer):
    """Base class of the reference optimizers. Subclasses implement the base update.

    Subclass hooks: ``_init_state`` (base states for a full tensor or an ``M×r`` projected one),
    ``_first_moment`` (the tensor a COAP correlation step reads), ``_restore_targets`` (first and
    second moments mapped by ``restore_state``) and ``_update`` (one base step).
    """

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self._policy_cache: dict[tuple[Any, ...], ProjectionPolicy] = {}
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------- validation
    def _check_hparams(self, group: dict[str, Any]) -> None:
        """Base-optimizer hyperparameter checks (lr, betas, …); overridden by subclasses."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` (fills defaults) followed by validation; a bad group is removed."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        self._check_hparams(group)
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError(
                    f"complex parameters are not supported: params has a tensor of dtype={p.dtype}, "
                    f"shape={tuple(p.shape)}"
                )
        if group["rank"] is not None:
            check_positive_int("rank", group["rank"])
        if group["rank_ratio"] is not None:
            check_number("rank_ratio", group["rank_ratio"], low=0.0, low_open=True)
        check_positive_int("update_interval", group["update_interval"])
        check_positive_int("reproject_factor", group["reproject_factor"])
        check_number("scale", group["scale"], low=0.0, low_open=True)
        if group["project"] not in (None, True, False):
            raise TypeError(f"project must be None, True or False, got project={group['project']!r}")
        self._policy(group)  # validates the projection name
        needs_rank = group["project"] is None and any(p.ndim == 2 for p in group["params"])
        if needs_rank and group["rank"] is None and group["rank_ratio"] is None:
            raise ValueError(
                "a param group with matrices needs a rank: got rank=None and rank_ratio=None "
                "(give one of them, or set project=False in the group)"
            )

    def _policy(self, group: dict[str, Any]) -> ProjectionPolicy:
        proj = group["projection"]
        if isinstance(proj, ProjectionPolicy):
            return proj
        if not isinstance(proj, str) or proj not in POLICIES:
            raise ValueError(f"unknown projection: projection={proj!r}; expected one of {sorted(POLICIES)}")
        if proj == "fixed":
            raise ValueError(
                "projection='fixed' needs an instance: pass projection=FixedProjection(make_proj)"
            )
        kwargs = _policy_kwargs(proj, group)
        key = (proj, *sorted(kwargs.items()))
        if key not in self._policy_cache:
            self._policy_cache[key] = get_policy(proj, **kwargs)
        return self._policy_cache[key]

    @staticmethod
    def _rank(group: dict[str, Any], p: Tensor) -> int | None:
        """The projection rank of ``p``, or None if it runs the plain base update."""
        project, rank, ratio = group["project"], group["rank"], group["rank_ratio"]
        if p.ndim != 2 or project is False:
            return None
        if project is True:
            return resolve_rank(p.shape, rank if rank is not None else min(p.shape), ratio)
        if ratio is not None:
            return resolve_rank(p.shape, None, ratio)
        return rank if min(p.shape) > rank else None

    # ------------------------------------------------------------------------------------ stepping
    def _init_state(self, state: dict[str, Tensor], like: Tensor, policy: ProjectionPolicy | None) -> None:
        raise NotImplementedError

    def _first_moment(self, state: dict[str, Tensor]) -> Tensor | None:
        raise NotImplementedError

    def _restore_targets(self, state: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        raise NotImplementedError

    def _update(self, group: dict[str, Any], p: Tensor, grad: Tensor, low: LowRank | None) -> None:
        raise NotImplementedError

    def _prepare(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> LowRank | None:
        """Create the state on the first step, refresh ``P`` on schedule, and project the gradient."""
        state = self.state[p]
        policy = self._policy(group)
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            rank = self._rank(group, p)
            if rank is None:
                self._init_state(state, grad, None)
                return None
            x, _ = canonical(grad)
            state.update(policy.init_state(x, rank))  # refresh_kind(0) == "init"
            dtype = policy.basis(state).dtype
            self._init_state(state, x.new_empty(x.shape[0], rank, dtype=dtype), policy)
        if not set(policy.state_layout(1, 1, torch.float32)) <= state.keys():
            return None  # a full-rank parameter (no projection state)
        x, transposed = canonical(grad)
        k = int(state["step"].item())
        if policy.refresh_kind(k) not in ("", "init"):
            restore = bool(group["restore_state"] or getattr(policy, "restore_state", False))
            old = policy.snapshot(state) if restore else None
            first_moment = self._first_moment(state)
            changed = policy.refresh(state, x, k, first_moment=first_moment, transposed=transposed)
            if changed and old is not None:
                first, second = self._restore_targets(state)
                policy.remap_moments(old, state, first=first, second=second)
        return LowRank(policy.project(state, x), policy, state, transposed)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(
                        f"sparse gradients are not supported: a parameter of shape {tuple(p.shape)} "
                        f"has grad.layout={p.grad.layout}"
                    )
                self._update(group, p, p.grad, self._prepare(group, p, p.grad))
        return loss

    # ------------------------------------------------------------------------------- serialization
    def state_dict(self) -> dict[str, Any]:
        """As torch's, with policy instances in param groups replaced by their registry name."""
        sd = super().state_dict()
        for g in sd["param_groups"]:
            if isinstance(g["projection"], ProjectionPolicy):
                g["projection"] = g["projection"].name
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but every state tensor keeps its saved dtype (only moved to the param's device;
        ``"step"`` stays where it was saved) and a live policy instance in a group is kept."""
        live = [g["projection"] for g in self.param_groups]
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            if pid in saved_state:
                self.state[p] = {k: _load_value(k, v, p) for k, v in saved_state[pid].items()}
        for g, proj in zip(self.param_groups, live):
            if isinstance(proj, ProjectionPolicy):
                g["projection"] = proj


def _load_value(key: str, value: Any, param: Tensor) -> Any:
    if not isinstance(value, Tensor):
        return value
    return value.clone() if key == "step" else value.to(device=param.device, copy=True)
