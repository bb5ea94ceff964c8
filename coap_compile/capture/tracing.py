"""Trace one :class:`~coap_compile.capture.adapter_base.UpdatePlan` into the graph contract (no adapter
choice and no cache: :mod:`.trace` is the front end built on this module).

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

**Threads.** A plan with ``patch_compiling`` is traced with ``torch.compiler.is_compiling()`` reading True
(torch's capturable path). :func:`forced_compiling` makes it read True *in the tracing thread only*: a
patch of the module attribute (``unittest.mock.patch``, before issue 21) was seen by every thread, so an
optimizer stepping in another thread while this one captured took torch's compile-time branches (6 of 16
concurrent pairs differed from the sequential run; ``tests/test_threads.py``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback

import torch
from torch import Tensor
from torch.func import functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from coap_compile.capture.adapter_base import UpdatePlan
from coap_compile.capture.graph_clean import clean_functional_graph
from coap_compile.errors import UnsupportedOptimizerError

__all__ = ["RESERVED_NAMES", "forced_compiling", "scalar_dtype", "trace_plan"]

#: Placeholder names the graph contract reserves (a state or hyperparameter may not use them).
RESERVED_NAMES = frozenset({"param", "grad", "step", "lr", "x", "k", "g", "t", "D"})


def scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the ``step``/``lr`` inputs (and of the new step): float64 for every parameter dtype.

    The 0-d scalar prologue (bias corrections ``1 − βᵗ``, ``min(lr, 1/√t)``, …) then runs in float64,
    as torch's eager path does with Python floats: in float32, ``1 − 0.999¹`` alone is off by 1.3e-5
    relative. 0-d float64 tensors do not promote the parameter-shaped tensors they multiply, so the
    update itself stays in the parameter dtype. The graph also runs with float32 ``step``/``lr``.
    """
    del dtype  # the same for every parameter dtype; kept as a parameter so callers state what they mean
    return torch.float64


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


_FORCED = threading.local()  # .depth: nesting of forced_compiling() in this thread
_PATCH_LOCK = threading.Lock()
_PATCH: list = []  # [torch's own is_compiling, number of threads inside forced_compiling()]


def _is_compiling_here() -> bool:
    """``torch.compiler.is_compiling`` while some thread is in :func:`forced_compiling`."""
    return getattr(_FORCED, "depth", 0) > 0 or _PATCH[0]()


@contextlib.contextmanager
def forced_compiling():
    """``torch.compiler.is_compiling()`` reads True in the calling thread, and unchanged in every other
    (module docstring, "Threads"). The module attribute is replaced by a thread-aware function while any
    thread is inside, and restored when the last one leaves."""
    with _PATCH_LOCK:
        if not _PATCH:
            _PATCH[:] = [torch.compiler.is_compiling, 0]
            torch.compiler.is_compiling = _is_compiling_here
        _PATCH[1] += 1
    _FORCED.depth = getattr(_FORCED, "depth", 0) + 1
    try:
        yield
    finally:
        _FORCED.depth -= 1
        with _PATCH_LOCK:
            _PATCH[1] -= 1
            if _PATCH[1] == 0:
                torch.compiler.is_compiling = _PATCH[0]
                _PATCH.clear()


def trace_plan(
    plan: UpdatePlan, shape: tuple[int, ...], dtype: torch.dtype, name: str
) -> torch.fx.GraphModule:
    """Trace, clean and re-trace ``plan.update`` at ``shape``; returns the contract graph (module docstring).

    ``name`` (the optimizer's qualified name) is what a failure's :class:`UnsupportedOptimizerError` names.
    """
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
    patch = forced_compiling() if plan.patch_compiling else contextlib.nullcontext()
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
