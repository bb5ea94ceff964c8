"""Shared pieces of the capture adapters: the :class:`UpdatePlan` contract, the :class:`Adapter` base
(hyperparameter normalization, signature-drift checks) and the canonical tracing shapes.

An adapter turns a (normalized) hyperparameter dict into an :class:`UpdatePlan`: a positional-only
update function ``(param, grad, *states, step, lr) -> (param', *states', step')`` that may mutate its
inputs (the tracer functionalizes it), the state names in placeholder order and the fresh-state factory.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from coap_compile.errors import UnsupportedOptimizerError

__all__ = [
    "NON_MATH_KEYS",
    "Adapter",
    "InitFn",
    "UpdateFn",
    "UpdatePlan",
    "alternate_shape",
    "canonical_shape",
    "class_defaults",
    "normalize_value",
    "qualified_name",
    "zeros_states",
]

# Param-group entries that never change the math (or are runtime inputs, like ``lr``).
NON_MATH_KEYS = frozenset(
    {"params", "lr", "initial_lr", "foreach", "fused", "capturable", "differentiable", "param_names"}
)

_CANONICAL = (5, 3, 4, 2, 6, 7, 8, 9)  # distinct small dims: a baked-in size would be easy to spot


def canonical_shape(ndim: int) -> tuple[int, ...]:
    """The shape a graph is traced at: ``()``, ``(5,)``, ``(5, 3)``, ``(5, 3, 4)``, …"""
    if not 0 <= ndim <= len(_CANONICAL):
        raise ValueError(f"ndim must be in [0, {len(_CANONICAL)}], got {ndim}")
    return _CANONICAL[:ndim]


def alternate_shape(ndim: int) -> tuple[int, ...]:
    """A second shape, different in every dim (and in numel), used to check shape-genericity."""
    return tuple(d + 2 for d in canonical_shape(ndim))


UpdateFn = Callable[..., tuple[Tensor, ...]]
InitFn = Callable[[Tensor], dict[str, Tensor]]


@dataclass(frozen=True)
class UpdatePlan:
    """What the tracer needs for one (optimizer, hyperparameters, dtype, ndim) signature.

    Attributes:
        state_names: the base optimizer's state keys, in placeholder order (``step`` excluded).
        update: ``(param, grad, *states, step, lr) -> (param', *states', step')``; may mutate inputs.
        init: ``like -> {name: fresh state}`` (must work on the meta device).
        patch_compiling: trace with ``torch.compiler.is_compiling() → True`` (capturable path on CPU).
        verify_shape_generic: trace a second time at another shape and require an identical graph.
    """

    state_names: tuple[str, ...]
    update: UpdateFn
    init: InitFn
    patch_compiling: bool = False
    verify_shape_generic: bool = False


def qualified_name(cls: type) -> str:
    """``torch.optim.AdamW`` for public torch classes, ``module.QualName`` otherwise."""
    if getattr(torch.optim, cls.__name__, None) is cls:
        return f"torch.optim.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.cache
def class_defaults(cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """The class's ``defaults`` dict, read from a throwaway one-parameter instance."""
    try:
        return dict(cls([torch.zeros(2)], lr=0.01).defaults)
    except Exception as exc:
        raise UnsupportedOptimizerError(
            qualified_name(cls), f"cannot construct a one-parameter instance: {type(exc).__name__}: {exc}"
        ) from exc


def normalize_value(v: Any) -> Any:
    """Hashable, exact form of a hyperparameter: 1-element tensors → float, ints → float, tuples kept."""
    if isinstance(v, Tensor):
        return float(v.detach().reshape(()).item())
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, list | tuple):
        return tuple(normalize_value(x) for x in v)
    return v


def zeros_states(like: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """``{name: zeros_like(like)}`` for each name (any device, including meta)."""
    return {n: torch.zeros_like(like, memory_format=torch.preserve_format) for n in names}


class Adapter:
    """Base: hyperparameter normalization and the signature checks shared by all known adapters.

    Subclasses set ``cls``, ``math_keys`` (the class's math hyperparameters, i.e. its ``defaults``
    minus :data:`NON_MATH_KEYS`) and, when they call a private torch function, ``function_path``
    (``"module.name"``, resolved at every use so a monkeypatch is seen) and ``signature`` (its exact
    parameter names), and implement :meth:`plan`.
    """

    cls: type[torch.optim.Optimizer]
    math_keys: frozenset[str]
    function_path: str | None = None
    signature: tuple[str, ...] = ()

    @property
    def function(self) -> Callable[..., Any]:
        """The private torch function named by ``function_path``."""
        if self.function_path is None:
            raise AttributeError(f"{type(self).__name__} calls no torch function")
        module, attr = self.function_path.rsplit(".", 1)
        return getattr(importlib.import_module(module), attr)

    @property
    def optimizer(self) -> str:
        return qualified_name(self.cls)

    def check_signature(self) -> None:
        """Fail loudly when torch's hyperparameters or private update function changed."""
        keys = frozenset(class_defaults(self.cls)) - NON_MATH_KEYS
        if keys != self.math_keys:
            raise UnsupportedOptimizerError(
                self.optimizer,
                f"its hyperparameters changed (expected {sorted(self.math_keys)}, found {sorted(keys)}); "
                "the capture adapter must be updated",
            )
        if self.function_path is not None:
            found = tuple(inspect.signature(self.function).parameters)
            if found != self.signature:
                raise UnsupportedOptimizerError(
                    self.optimizer,
                    f"signature of {self.function_path} changed "
                    f"(expected {self.signature}, found {found}); the capture adapter must be updated",
                )

    def normalize(self, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
        defaults = class_defaults(self.cls)
        return {k: normalize_value(hyperparams.get(k, defaults[k])) for k in sorted(self.math_keys)}

    def plan(self, hp: Mapping[str, Any], dtype: torch.dtype, ndim: int) -> UpdatePlan:
        raise NotImplementedError
