"""Capture one parameter's update of a base optimizer as a functional, shape-generic aten FX graph.

The update function of an :class:`~coap_compile.capture.adapters.UpdatePlan` (which may mutate its
inputs) is traced with ``make_fx(functionalize(f, remove="mutations_and_views"), tracing_mode="fake")``
at a small canonical shape with distinct dims (5×3 for 2-D), then cleaned:

1. profiler ``record_function`` nodes are dropped;
2. the ``copy_(input, new)`` write-back tail is dropped (the wrapper *returns* the new values);
3. host scalars ``s = _local_scalar_dense(t)`` (``.item()`` on a 0-d tensor, e.g. ``value=-lr``) used as
   ``alpha``/``value`` or as a scalar operand are replaced by tensor arithmetic on ``t``;
4. anything still mutable or not an aten op raises :class:`UnsupportedOptimizerError`;
5. the graph is re-traced (fresh ``meta["val"]``) and its placeholders are renamed and tagged.

Graph contract: placeholders ``(param, grad, *states, step, lr, *hypers)`` with ``meta["role"]`` in
``{"param", "grad", "state", "step", "lr", "hyper"}`` (plus ``meta["state_name"]`` /
``meta["hyper_name"]``); ``step`` is the number of completed steps (0 on the first update), ``lr`` and
each live hyperparameter (β₁, ε, …, see :mod:`.adapter_base`) a 0-d tensor, all float64
(:func:`scalar_dtype`); the output is the tuple ``(new_param, *new_states, step + 1)``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import traceback
import unittest.mock
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functionalize
from torch.fx.experimental.proxy_tensor import make_fx

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
from coap_compile.capture.graph_clean import clean_functional_graph
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
    "probe_trace",
    "run_captured",
    "scalar_dtype",
]

#: Placeholder names the graph contract reserves (a state or hyperparameter may not use them).
RESERVED_NAMES = frozenset({"param", "grad", "step", "lr", "x", "k", "g", "t", "D"})


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


def scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the ``step``/``lr`` inputs (and of the new step): float64 for every parameter dtype.

    The 0-d scalar prologue (bias corrections ``1 − βᵗ``, ``min(lr, 1/√t)``, …) then runs in float64,
    as torch's eager path does with Python floats: in float32, ``1 − 0.999¹`` alone is off by 1.3e-5
    relative. 0-d float64 tensors do not promote the parameter-shaped tensors they multiply, so the
    update itself stays in the parameter dtype. The graph also runs with float32 ``step``/``lr``.
    """
    del dtype  # the same for every parameter dtype; kept as a parameter so callers state what they mean
    return torch.float64


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


# ---------------------------------------------------------------------------------------------- tracing


def _example_inputs(plan: UpdatePlan, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
    like = torch.zeros(shape, dtype=dtype)
    states = plan.init(like)
    sdt = scalar_dtype(dtype)
    return (
        like,
        torch.zeros_like(like),
        *(states[n] for n in plan.state_names),
        torch.zeros((), dtype=sdt),
        torch.full((), 1e-3, dtype=sdt),
        *(torch.full((), 0.5, dtype=sdt) for _ in plan.hypers),  # values are irrelevant (fake tracing)
    )


def _failure_reason(exc: BaseException) -> str:
    """``Type: first line`` plus the innermost frame outside torch internals (torch.optim counts as user)."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(here)
        and (not f.filename.startswith(torch_dir) or f"{os.sep}optim{os.sep}" in f.filename)
    ]
    text = str(exc).strip().splitlines()
    reason = f"tracing failed: {type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    if "data-dependent" in str(exc) or "_local_scalar_dense" in str(exc):
        reason += " (Python control flow or a Python scalar computed from a tensor value, e.g. `.item()`)"
    if frames:
        f = frames[-1]
        reason += f"; at {os.path.basename(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"
    return reason


def _trace(plan: UpdatePlan, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> torch.fx.GraphModule:
    """Trace, clean and re-trace ``plan.update`` at ``shape``; returns the contract graph."""
    example = _example_inputs(plan, shape, dtype)
    ns = len(plan.state_names)
    clash = (set(plan.state_names) | {h.name for h in plan.hypers}) & RESERVED_NAMES
    names = [*plan.state_names, *(h.name for h in plan.hypers)]
    if clash or len(set(names)) != len(names):
        raise UnsupportedOptimizerError(
            name, f"state/hyperparameter names {names} clash with each other or with {sorted(RESERVED_NAMES)}"
        )

    def update(*args: Tensor) -> tuple[Tensor, ...]:
        # New values are stored in their input's dtype, as torch's in-place updates do (this only
        # adds a cast when all operands are 0-d, where float64 step/lr would otherwise promote).
        out = plan.update(*args)
        refs = (args[0], *args[2 : 2 + ns], args[2 + ns])
        return tuple(o.to(r.dtype) if isinstance(o, Tensor) else o for o, r in zip(out, refs))

    fn = functionalize(lambda *a: update(*a), remove="mutations_and_views")
    patch = (
        unittest.mock.patch("torch.compiler.is_compiling", return_value=True)
        if plan.patch_compiling
        else contextlib.nullcontext()
    )
    try:
        with patch:
            raw = make_fx(fn, tracing_mode="fake")(*example)
    except UnsupportedOptimizerError:
        raise
    except Exception as exc:
        raise UnsupportedOptimizerError(name, _failure_reason(exc)) from exc
    roles = ["param", "grad"] + ["state"] * ns + ["step", "lr"] + ["hyper"] * len(plan.hypers)
    clean_functional_graph(raw, roles, name)
    fresh = make_fx(raw, tracing_mode="fake")(*example)
    return _tag(fresh, plan.state_names, tuple(h.name for h in plan.hypers), example, name)


def _tag(
    gm: torch.fx.GraphModule,
    state_names: tuple[str, ...],
    hyper_names: tuple[str, ...],
    example: tuple[Tensor, ...],
    name: str,
) -> torch.fx.GraphModule:
    """Copy ``gm`` with named placeholders carrying ``meta["role"]``; check the output signature."""
    names = ["param", "grad", *state_names, "step", "lr", *hyper_names]
    roles = ["param", "grad"] + ["state"] * len(state_names) + ["step", "lr"] + ["hyper"] * len(hyper_names)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        new = graph.placeholder(names[i])
        new.meta = dict(node.meta, role=roles[i])
        if roles[i] == "state":
            new.meta["state_name"] = names[i]
        if roles[i] == "hyper":
            new.meta["hyper_name"] = names[i]
        env[node] = new
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    out = graph.find_nodes(op="output")[0]
    flat = out.args[0]
    expect = [0, *range(2, 2 + len(state_names)), 2 + len(state_names)]  # param, states, step
    if not isinstance(flat, list | tuple) or len(flat) != len(expect):
        raise UnsupportedOptimizerError(name, f"update returned {flat!r}, expected {len(expect)} tensors")
    for node, i in zip(flat, expect):
        val, ref = node.meta.get("val"), example[i]
        if val is None or tuple(val.shape) != tuple(ref.shape) or val.dtype != ref.dtype:
            raise UnsupportedOptimizerError(
                name, f"new {names[i]} is {getattr(val, 'shape', None)}/{getattr(val, 'dtype', None)}, "
                f"expected {tuple(ref.shape)}/{ref.dtype}", node=node.name,
            )  # fmt: skip
    graph.lint()
    return torch.fx.GraphModule(gm, graph)


def _first_difference(a: str, b: str) -> str:
    for la, lb in zip(a.splitlines(), b.splitlines()):
        if la != lb:
            return f"{la.strip()!r} vs {lb.strip()!r}"
    return "graphs differ in length"


def _plan(adapter: Adapter, struct, live, values, dtype, ndim) -> UpdatePlan:
    if isinstance(adapter, GenericAdapter):
        return adapter.plan(struct, dtype, ndim, live, values=values)
    return adapter.plan(struct, dtype, ndim, live)


def probe_trace(adapter: Adapter, struct: dict, live: tuple[HyperInput, ...], values: dict) -> None:
    """Trace once at the canonical 2-D float32 shape (raises :class:`UnsupportedOptimizerError`); used
    by the generic route to find which hyperparameters can be live."""
    plan = _plan(adapter, struct, live, values, torch.float32, 2)
    _trace(plan, canonical_shape(2), torch.float32, adapter.optimizer)


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
                f"the traced update depends on the parameter's shape (graphs traced at "
                f"{canonical_shape(ndim)} and {alternate_shape(ndim)} differ: "
                f"{_first_difference(gm.code, alt.code)})",
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
