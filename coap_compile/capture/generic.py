"""The generic capture route: trace ``step()`` of a one-parameter instance of any optimizer class.

1. **Discovery.** A real step on a small real dummy parameter (canonical shape, requested dtype,
   seeded values) records the state the class creates: ``state[p]`` is wrapped so that the *first*
   value assigned to each key is kept. Accepted: a 0-d ``step`` starting at 0 and parameter-shaped,
   parameter-dtype tensors whose first value is a constant fill that does not depend on ``lr``
   (checked with a second discovery at another ``lr``). Anything else raises
   :class:`UnsupportedOptimizerError` naming the key.
2. **Trace.** ``update(p, g, *states, step, lr)`` points a pre-built instance at ``p`` (``group["params"]
   = [p]``, ``group["lr"] = lr``, ``p.grad = g``), pre-fills ``state[p]`` with the state inputs and
   ``step``, calls ``opt.step()`` and returns ``(p, *state values, step')``; ``step' = state["step"]``
   if the class keeps one, else ``step + 1``. The instance is built outside the trace because
   constructors validate ``lr`` with Python comparisons. ``foreach=False``, ``capturable=True``,
   ``differentiable=False`` are forced when the class has them, and ``torch.compiler.is_compiling`` reads
   True in the tracing thread only (:func:`~.tracing.forced_compiling`) so that torch's capturable /
   ``_get_value`` paths keep the step a tensor.
3. **Shape check.** The graph is traced at two shapes and must be identical (see ``trace._build``).
4. **Live hyperparameters.** Every float-valued entry (and float element of a tuple entry, such as
   ``betas[0]``) is a candidate live input: the traced ``step()`` reads it as a 0-d tensor from
   ``group``. A class may branch on a value in Python (``if weight_decay != 0``), which a traced
   tensor cannot answer; such a candidate is *baked* instead: its value becomes part of the
   signature, so changing it re-captures (still correct, never stale, but not free). The live set is
   decided once per class and structure: all candidates if that traces, else those that trace when
   added one at a time; :func:`coap_compile.explain` lists both.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from coap_compile.capture.adapter_base import (
    LIVE,
    NON_MATH_KEYS,
    Adapter,
    HyperInput,
    UpdateFn,
    UpdatePlan,
    canonical_shape,
    class_defaults,
    is_float_value,
    mark_live,
    normalize_value,
)
from coap_compile.capture.tracing import forced_compiling, trace_plan
from coap_compile.errors import UnsupportedOptimizerError

__all__ = ["GenericAdapter"]


def _ident(key: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in key) or "h"


def _live_float(v: Any) -> bool:
    return is_float_value(v) and not isinstance(v, Tensor)


def _has_live(v: Any) -> bool:
    return v == LIVE if not isinstance(v, tuple) else any(x == LIVE for x in v)


_FORCED_FLAGS = {"foreach": False, "capturable": True, "differentiable": False, "fused": False}


class _FirstValues(dict):
    """A state dict that remembers a clone of the first value assigned to each key."""

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self.first:
            self.first[key] = value.detach().clone() if isinstance(value, Tensor) else value
        super().__setitem__(key, value)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v


def _describe(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"a tensor of shape {tuple(v.shape)} and dtype {v.dtype}"
    return f"a {type(v).__name__}"


def _relative(v: Any, like: Tensor) -> str:
    """A state described against the parameter (not by the probe parameter's own shape)."""
    if not isinstance(v, Tensor):
        return f"a {type(v).__name__}"
    if v.dim() == 0:
        return f"a 0-d tensor (one {v.dtype} number per parameter)"
    if v.shape != like.shape:
        return f"a {v.dim()}-d tensor of another shape than the parameter (a factored or reduced state)"
    return f"a parameter-shaped tensor of dtype {v.dtype}, not the parameter's {like.dtype}"


class GenericAdapter(Adapter):
    """Adapter for any ``torch.optim.Optimizer`` subclass, via its public ``step()``."""

    def __init__(self, cls: type[torch.optim.Optimizer]):
        self.cls = cls
        self._defaults: dict[str, Any] | None = None
        self._live_sets: dict[tuple, tuple[HyperInput, ...]] = {}

    def _class_defaults(self, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
        return class_defaults(self.cls, hyperparams)

    @property
    def math_keys(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset(self._defaults or class_defaults(self.cls)) - NON_MATH_KEYS

    def check_signature(self) -> None:
        params = inspect.signature(self.cls.step).parameters
        closure = params.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise UnsupportedOptimizerError(
                self.optimizer, "step() requires a closure (it re-evaluates the loss)"
            )

    def normalize(self, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
        defaults = self._defaults = self._class_defaults(hyperparams)
        out = {}
        for k in sorted(frozenset(defaults) - NON_MATH_KEYS):
            v = hyperparams.get(k, defaults[k])
            out[k] = v if isinstance(v, int) and not isinstance(v, bool) else normalize_value(v)
        return out

    def _candidates(self, hp: Mapping[str, Any]) -> tuple[HyperInput, ...]:
        """Float entries and float tuple elements, named ``key`` / ``key_i`` (identifier-safe)."""
        out = []
        for k, v in hp.items():
            if isinstance(v, tuple):
                out += [HyperInput(f"{_ident(k)}_{i}", k, i) for i, x in enumerate(v) if _live_float(x)]
            elif _live_float(v):
                out.append(HyperInput(_ident(k), k))
        return tuple(out)

    def structure(self, hp: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[HyperInput, ...]]:
        cands = self._candidates(hp)
        zero = tuple(float(h.read(hp)) == 0.0 for h in cands)
        key = (tuple(sorted(mark_live(hp, cands).items())), zero)
        live = self._live_sets.get(key)
        if live is None:
            live = self._live_sets[key] = self._choose_live(hp, cands)
        return mark_live(hp, live), live

    def _choose_live(self, hp: Mapping[str, Any], cands: tuple[HyperInput, ...]) -> tuple[HyperInput, ...]:
        """All candidates if ``step()`` traces with them as tensors, else a greedy subset (docstring)."""

        def traces(live: tuple[HyperInput, ...]) -> bool:
            try:
                self._probe(mark_live(hp, live), live, hp)
            except UnsupportedOptimizerError:
                return False
            return True

        cands = tuple(h for h in cands if float(h.read(hp)) != 0.0)  # zeros stay baked (branches)
        if not cands or traces(cands):
            return cands
        chosen: tuple[HyperInput, ...] = ()
        for h in cands:
            if traces((*chosen, h)):
                chosen = (*chosen, h)
        return chosen

    def _probe(self, struct: dict[str, Any], live: tuple[HyperInput, ...], values: Mapping[str, Any]) -> None:
        """Trace once at the canonical 2-D float32 shape (raises :class:`UnsupportedOptimizerError`)."""
        plan = self.plan(struct, torch.float32, 2, live, values=values)
        trace_plan(plan, canonical_shape(2), torch.float32, self.optimizer)

    def _ctor_kwargs(self, hp: Mapping[str, Any], values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Constructor arguments: ``hp`` with live markers replaced by ``values`` (the capture-time
        numbers; the traced step overwrites them with tensors) and the forced flags."""
        defaults = self._defaults or class_defaults(self.cls)
        src = values if values is not None else hp
        kw = {k: (src[k] if _has_live(v) else v) for k, v in hp.items()}
        return {**kw, **{k: v for k, v in _FORCED_FLAGS.items() if k in defaults}}

    def _discover(
        self, ctor: Mapping[str, Any], dtype: torch.dtype, ndim: int, lr: float
    ) -> tuple[dict, dict]:
        """One real step; returns ``(first values, final state)`` of the dummy parameter."""
        shape = canonical_shape(ndim)
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        try:
            opt = self.cls([p], **{**ctor, "lr": lr})
            recorded: defaultdict[Tensor, _FirstValues] = defaultdict(_FirstValues)
            for q, st in opt.state.items():
                for k, v in st.items():
                    recorded[q][k] = v
            opt.state = recorded
            p.grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            with forced_compiling():
                opt.step()
        except UnsupportedOptimizerError:
            raise
        except Exception as exc:
            raise UnsupportedOptimizerError(
                self.optimizer, f"its step on a probe parameter failed: {type(exc).__name__}: {exc}"
            ) from exc
        st = recorded[p]
        return st.first, dict(st)

    def _state_layout(
        self, first: dict, final: dict, like: Tensor
    ) -> tuple[tuple[str, ...], dict[str, float]]:
        names, fills = [], {}
        for key, value in final.items():
            if key == "step":
                v0 = first.get("step")
                if not (
                    isinstance(value, Tensor) and value.dim() == 0 and isinstance(v0, Tensor) and v0 == 0
                ):
                    raise UnsupportedOptimizerError(
                        self.optimizer,
                        f"state 'step' is {_describe(value)} (expected a 0-d tensor starting at 0)",
                    )
                continue
            ok = isinstance(value, Tensor) and value.shape == like.shape and value.dtype == like.dtype
            if not ok:
                raise UnsupportedOptimizerError(
                    self.optimizer,
                    f"its per-parameter state {key!r} is {_relative(value, like)}; only states shaped and "
                    "typed like the parameter, and a 0-d 'step', are supported",
                )
            v0 = first.get(key)
            flat = v0.reshape(-1) if isinstance(v0, Tensor) else None
            if flat is None or v0.shape != like.shape or not bool((flat == flat[0]).all()):
                raise UnsupportedOptimizerError(
                    self.optimizer,
                    f"the initial value of state {key!r} is not a constant fill (it is first assigned from "
                    "data, e.g. a copy of the gradient), so it cannot be created by init_states",
                )
            names.append(key)
            fills[key] = float(flat[0].item()) if flat.numel() else 0.0
        return tuple(names), fills

    def plan(self, hp, dtype, ndim, live=(), values: Mapping[str, Any] | None = None) -> UpdatePlan:
        self.check_signature()
        like = torch.zeros(canonical_shape(ndim), dtype=dtype)
        ctor = self._ctor_kwargs(hp, values)
        first, final = self._discover(ctor, dtype, ndim, lr=1e-2)
        names, fills = self._state_layout(first, final, like)
        first2, final2 = self._discover(ctor, dtype, ndim, lr=3e-2)
        names2, fills2 = self._state_layout(first2, final2, like)
        if names2 != names:
            raise UnsupportedOptimizerError(self.optimizer, f"state keys depend on lr ({names} vs {names2})")
        for k in names:
            if fills2[k] != fills[k]:
                raise UnsupportedOptimizerError(
                    self.optimizer,
                    f"the initial value of state {k!r} depends on lr ({fills[k]} vs {fills2[k]})",
                )
        has_step = "step" in final
        update = self._update_fn(ctor, dtype, names, has_step, live)

        def init(like: Tensor) -> dict[str, Tensor]:
            return {k: torch.full_like(like, fills[k], memory_format=torch.preserve_format) for k in names}

        return UpdatePlan(
            names, update, init, patch_compiling=True, verify_shape_generic=True, hypers=tuple(live)
        )

    def _update_fn(
        self,
        ctor: Mapping[str, Any],
        dtype: torch.dtype,
        names: tuple[str, ...],
        has_step: bool,
        live: tuple[HyperInput, ...],
    ) -> UpdateFn:
        """``update(p, g, *states, step, lr, *hypers)`` running ``step()`` of a pre-built one-parameter
        instance whose group entries of the live hyperparameters are set to the input tensors."""
        opt = self.cls([torch.zeros(2, dtype=dtype)], **{**ctor, "lr": 1e-2})
        group = opt.param_groups[0]
        n = len(names)

        def update(p: Tensor, g: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
            states, (step, lr), hv = rest[:n], rest[n : n + 2], rest[n + 2 :]
            for h, v in zip(live, hv):
                if h.index is None:
                    group[h.key] = v
                else:
                    entry = list(group[h.key])
                    entry[h.index] = v
                    group[h.key] = tuple(entry)
            group["params"] = [p]
            group["lr"] = lr
            opt.state = defaultdict(dict)
            st = opt.state[p]
            if has_step:
                st["step"] = step
            st.update(zip(names, states))
            p.grad = g
            try:
                opt.step()
            finally:
                group["params"] = []
                opt.state = defaultdict(dict)
            new_step = st["step"] if has_step else step + 1
            return (p, *(st[n] for n in names), new_step)

        return update
