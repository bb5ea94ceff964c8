"""Capture front end: choose the adapter for a base optimizer class, trace its update once per signature
(:mod:`.tracing` does the tracing and documents the graph contract), cache it, and run it.

:func:`capture` returns a :class:`CapturedUpdate`: one parameter's update of a base optimizer as a
functional, shape-generic aten FX graph ``(param, grad, *states, step, lr, *hypers) ->
(new_param, *new_states, step + 1)``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from coap_compile.capture.adapter_base import (
    Adapter,
    HyperInput,
    UpdatePlan,
    alternate_shape,
    canonical_shape,
    is_float_value,
)
from coap_compile.capture.adapters import ADAPTERS
from coap_compile.capture.generic import GenericAdapter
from coap_compile.capture.tracing import scalar_dtype
from coap_compile.capture.tracing import trace_plan as _trace
from coap_compile.errors import UnsupportedOptimizerError

__all__ = [
    "CapturedUpdate",
    "adapter_for",
    "alternate_shape",
    "canonical_shape",
    "capture",
    "capture_count",
    "clear_capture_cache",
    "hyper_values",
    "init_states",
    "live_inputs",
    "run_captured",
    "scalar_dtype",
]


@dataclass(frozen=True)
class CapturedUpdate:
    """One base optimizer's per-parameter update as a functional aten graph (see module docstring).

    Attributes:
        optimizer: qualified class name, e.g. ``"torch.optim.AdamW"``.
        graph_module: ``(param, grad, *states, step, lr) -> (new_param, *new_states, step + 1)``; no
            in-place ops, no write-back tail, ``meta["val"]`` on every node, roles on placeholders.
        state_names: the base optimizer's state keys in placeholder order (``step`` excluded).
        hyperparams: the structural signature, sorted by name: the normalized math hyperparameters
            with every live value replaced by ``LIVE`` (what is baked into the graph is the rest).
        dtype, ndim: the parameter dtype and rank the graph was captured for (any sizes).
        hypers: the live inputs, in placeholder order (read from the param group at every step).
        state_kinds: the adapter's state-kind hints (:attr:`UpdatePlan.state_kinds`) as sorted
            ``(state name, kind)`` pairs (hashable); checked and applied by the Decompose pass.
    """

    optimizer: str
    graph_module: torch.fx.GraphModule
    state_names: tuple[str, ...]
    hyperparams: tuple[tuple[str, object], ...]
    dtype: torch.dtype
    ndim: int
    hypers: tuple[HyperInput, ...] = ()
    state_kinds: tuple[tuple[str, str], ...] = ()


def adapter_for(cls: type[torch.optim.Optimizer]) -> Adapter:
    """The known adapter for exactly ``cls``, else the generic ``step()`` tracer (one per class).

    ``transformers.optimization.Adafactor`` gets :class:`~.hf_adapter.HFAdafactorAdapter`; transformers
    is imported only when ``cls`` itself comes from ``transformers.optimization`` (``import
    coap_compile`` never imports it), and only that exact class is adapted (a subclass may override
    ``step``, so it takes the generic route like any other class).
    """
    return ADAPTERS.get(cls) or _hf_adapter(cls) or _generic(cls)


@functools.cache
def _hf_adapter(cls: type[torch.optim.Optimizer]) -> Adapter | None:
    if getattr(cls, "__module__", None) != "transformers.optimization" or cls.__name__ != "Adafactor":
        return None
    from coap_compile.capture.hf_adapter import HFAdafactorAdapter, hf_adafactor_class

    hf = hf_adafactor_class()
    return HFAdafactorAdapter(hf) if cls is hf and issubclass(cls, torch.optim.Optimizer) else None


@functools.cache
def _generic(cls: type[torch.optim.Optimizer]) -> GenericAdapter:
    return GenericAdapter(cls)


# ------------------------------------------------------------------------------------------ building


def _first_difference(a: str, b: str) -> str:
    for la, lb in zip(a.splitlines(), b.splitlines()):
        if la != lb:
            return f"{la.strip()!r} vs {lb.strip()!r}"
    return "graphs differ in length"


def _plan(adapter: Adapter, struct, live, values, dtype, ndim) -> UpdatePlan:
    if isinstance(adapter, GenericAdapter):
        return adapter.plan(struct, dtype, ndim, live, values=values)
    return adapter.plan(struct, dtype, ndim, live)


def _build(
    adapter: Adapter, struct: dict, live: tuple[HyperInput, ...], values: dict, dtype: torch.dtype, ndim: int
) -> CapturedUpdate:
    name = adapter.optimizer
    plan = _plan(adapter, struct, live, values, dtype, ndim)
    gm = _trace(plan, canonical_shape(ndim), dtype, name)
    if plan.verify_shape_generic and ndim > 0:
        alt = _trace(plan, alternate_shape(ndim), dtype, name)
        if alt.code != gm.code:
            raise UnsupportedOptimizerError(
                name,
                "the base optimizer's update depends on the parameter's shape (its graphs traced on two "
                f"probe parameters differ: {_first_difference(gm.code, alt.code)})",
            )
    gm.meta["coap_init_states"] = plan.init
    unknown = sorted(set(plan.state_kinds) - set(plan.state_names))
    if unknown:
        raise UnsupportedOptimizerError(
            name, f"state-kind hints name {unknown}, which are not states of the update {plan.state_names}"
        )
    kinds = tuple(sorted(plan.state_kinds.items()))
    return CapturedUpdate(name, gm, plan.state_names, tuple(sorted(struct.items())), dtype, ndim, live, kinds)


# ------------------------------------------------------------------------------------------- public API

_LOCK = threading.RLock()
_CACHE: dict[tuple[Any, ...], CapturedUpdate] = {}
_COUNT = 0


def capture(
    base: type[torch.optim.Optimizer] | torch.optim.Optimizer,
    hyperparams: Mapping[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    ndim: int = 2,
) -> CapturedUpdate:
    """Capture ``base``'s update for one parameter of ``dtype`` and ``ndim`` (cached).

    ``hyperparams`` is a param-group-like mapping: ``lr`` and non-math flags (foreach, fused,
    capturable, differentiable, …) are ignored, keys the class does not define are ignored, and
    missing keys take the class's ``defaults``. One trace per (class, structural signature, dtype,
    ndim); ``step``, ``lr`` and the live hyperparameters are graph inputs, so changing them never
    re-captures.
    """
    global _COUNT
    cls = base if isinstance(base, type) else type(base)
    if not issubclass(cls, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer class or instance, got {base!r}")
    canonical_shape(ndim)  # validates ndim
    adapter = adapter_for(cls)
    with _LOCK:
        hp = adapter.normalize(hyperparams)
        struct, live = adapter.structure(hp)
        key = (cls, tuple(sorted(struct.items())), dtype, ndim)
        hit = _CACHE.get(key)
        if hit is None:
            hit = _build(adapter, struct, live, hp, dtype, ndim)
            _CACHE[key] = hit
            _COUNT += 1
        return hit


def live_inputs(base: type[torch.optim.Optimizer], hyperparams: Mapping[str, Any]) -> tuple[HyperInput, ...]:
    """The live hyperparameters of ``base`` under ``hyperparams`` (what :func:`capture` makes inputs),
    without capturing anything (the generic route may trace once to decide)."""
    adapter = adapter_for(base)
    with _LOCK:
        return adapter.structure(adapter.normalize(hyperparams))[1]


def capture_count() -> int:
    """How many traces :func:`capture` has performed in this process (monotone; cache hits excluded)."""
    return _COUNT


def clear_capture_cache() -> None:
    """Forget every cached capture (the next :func:`capture` of a signature traces again)."""
    with _LOCK:
        _CACHE.clear()


def init_states(captured: CapturedUpdate, like: Tensor) -> dict[str, Tensor]:
    """The base optimizer's fresh state for a parameter shaped/typed like ``like`` (no ``step``).

    Works on any device, including ``meta``.
    """
    if like.dim() != captured.ndim:
        raise ValueError(
            f"{captured.optimizer} was captured for ndim={captured.ndim}, got shape {tuple(like.shape)}"
        )
    states = captured.graph_module.meta["coap_init_states"](like)
    return {n: states[n] for n in captured.state_names}


def hyper_values(
    captured: CapturedUpdate, group: Mapping[str, Any], device: torch.device | str = "cpu"
) -> list[Tensor]:
    """The live hyperparameters of ``group`` as 0-d float64 tensors, in placeholder order."""
    out = []
    for h in captured.hypers:
        v = h.read(group)
        if not is_float_value(v):
            raise TypeError(f"hyperparameter {h.where} of {captured.optimizer} must be a number, got {v!r}")
        t = v.detach().reshape(()) if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64)
        out.append(t.to(device=device, dtype=torch.float64))
    return out


def run_captured(
    captured: CapturedUpdate,
    param: Tensor,
    grad: Tensor,
    states: Sequence[Tensor],
    step: Tensor,
    lr: Tensor,
    hypers: Sequence[Tensor] | Mapping[str, Any] = (),
) -> tuple[Tensor, list[Tensor], Tensor]:
    """Execute the graph: returns ``(new_param, new_states, new_step)``; inputs are not modified.

    ``hypers``: the live hyperparameters as 0-d tensors in placeholder order, or a param-group-like
    mapping to read them from (see :func:`hyper_values`).
    """
    if len(states) != len(captured.state_names):
        raise ValueError(f"expected states {captured.state_names}, got {len(states)} tensors")
    if isinstance(hypers, Mapping):
        hypers = hyper_values(captured, hypers, device=step.device)
    if len(hypers) != len(captured.hypers):
        raise ValueError(
            f"expected live hyperparameters {[h.name for h in captured.hypers]}, got {len(hypers)} tensors"
        )
    out = captured.graph_module(param, grad, *states, step, lr, *hypers)
    return out[0], list(out[1:-1]), out[-1]
