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
   ``differentiable=False`` are forced when the class has them, and ``torch.compiler.is_compiling`` is
   patched so that torch's capturable / ``_get_value`` paths keep the step a tensor.
3. **Shape check.** The graph is traced at two shapes and must be identical (see ``trace._build``).
"""

from __future__ import annotations

import inspect
import unittest.mock
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from coap_compile.capture.adapter_base import (
    NON_MATH_KEYS,
    Adapter,
    UpdateFn,
    UpdatePlan,
    canonical_shape,
    class_defaults,
    normalize_value,
)
from coap_compile.errors import UnsupportedOptimizerError

__all__ = ["GenericAdapter"]

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


class GenericAdapter(Adapter):
    """Adapter for any ``torch.optim.Optimizer`` subclass, via its public ``step()``."""

    def __init__(self, cls: type[torch.optim.Optimizer]):
        self.cls = cls
        self.math_keys = frozenset(class_defaults(cls)) - NON_MATH_KEYS

    def check_signature(self) -> None:
        params = inspect.signature(self.cls.step).parameters
        closure = params.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise UnsupportedOptimizerError(
                self.optimizer, "step() requires a closure (it re-evaluates the loss)"
            )

    def normalize(self, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
        defaults = class_defaults(self.cls)
        out = {}
        for k in sorted(self.math_keys):
            v = hyperparams.get(k, defaults[k])
            out[k] = v if isinstance(v, int) and not isinstance(v, bool) else normalize_value(v)
        return out

    def _ctor_kwargs(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        defaults = class_defaults(self.cls)
        return {**hp, **{k: v for k, v in _FORCED_FLAGS.items() if k in defaults}}

    def _discover(self, hp: Mapping[str, Any], dtype: torch.dtype, ndim: int, lr: float) -> tuple[dict, dict]:
        """One real step; returns ``(first values, final state)`` of the dummy parameter."""
        shape = canonical_shape(ndim)
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        try:
            opt = self.cls([p], lr=lr, **self._ctor_kwargs(hp))
            recorded: defaultdict[Tensor, _FirstValues] = defaultdict(_FirstValues)
            for q, st in opt.state.items():
                for k, v in st.items():
                    recorded[q][k] = v
            opt.state = recorded
            p.grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            with unittest.mock.patch("torch.compiler.is_compiling", return_value=True):
                opt.step()
        except UnsupportedOptimizerError:
            raise
        except Exception as exc:
            raise UnsupportedOptimizerError(
                self.optimizer, f"a real step on a dummy parameter failed: {type(exc).__name__}: {exc}"
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
                    f"state {key!r} is {_describe(value)}; only parameter-shaped tensors of the parameter's "
                    f"dtype and a 0-d 'step' are supported (parameter: {tuple(like.shape)}, {like.dtype})",
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

    def plan(self, hp: Mapping[str, Any], dtype: torch.dtype, ndim: int) -> UpdatePlan:
        self.check_signature()
        like = torch.zeros(canonical_shape(ndim), dtype=dtype)
        first, final = self._discover(hp, dtype, ndim, lr=1e-2)
        names, fills = self._state_layout(first, final, like)
        first2, final2 = self._discover(hp, dtype, ndim, lr=3e-2)
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
        update = self._update_fn(hp, dtype, names, has_step)

        def init(like: Tensor) -> dict[str, Tensor]:
            return {k: torch.full_like(like, fills[k], memory_format=torch.preserve_format) for k in names}

        return UpdatePlan(names, update, init, patch_compiling=True, verify_shape_generic=True)

    def _update_fn(
        self, hp: Mapping[str, Any], dtype: torch.dtype, names: tuple[str, ...], has_step: bool
    ) -> UpdateFn:
        """``update(p, g, *states, step, lr)`` running ``step()`` of a pre-built one-parameter instance."""
        opt = self.cls([torch.zeros(2, dtype=dtype)], lr=1e-2, **self._ctor_kwargs(hp))
        group = opt.param_groups[0]

        def update(p: Tensor, g: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
            *states, step, lr = rest
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
