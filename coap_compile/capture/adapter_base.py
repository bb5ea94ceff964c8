"""Shared pieces of the capture adapters: the :class:`UpdatePlan` contract, the :class:`Adapter` base
(hyperparameter normalization, live/structural split, signature-drift checks) and the canonical
tracing shapes.

An adapter turns a (normalized) hyperparameter dict into an :class:`UpdatePlan`: a positional-only
update function ``(param, grad, *states, step, lr, *hypers) -> (param', *states', step')`` that may
mutate its inputs (the tracer functionalizes it), the state names in placeholder order and the
fresh-state factory.

**Live and structural hyperparameters.** A float hyperparameter (β₁, β₂, ε, weight decay, momentum,
α, dampening, Adafactor's ``beta2_decay``/``d``/``eps`` …) is a *live* input: a 0-d float64 tensor
placeholder of the captured graph (a :class:`HyperInput`), read from ``param_groups`` at every step,
so changing it never re-traces, never re-runs the passes and never recompiles a kernel. What selects
a code path is *structural* and part of the signature (the cache key): booleans (amsgrad, maximize,
nesterov, centered, decoupled decay), ``None`` (Adafactor's ``eps1``), and for the hyperparameters an
adapter lists in ``gates`` whether the value is zero (``weight_decay = 0`` drops Adam's L2 prologue,
``momentum = 0`` drops SGD's and RMSprop's momentum buffer). A gated hyperparameter that is zero is
baked into the graph as the constant 0 and is not an input; making it nonzero changes the signature,
which re-compiles once.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from coap_compile.errors import UnsupportedOptimizerError

__all__ = [
    "LIVE",
    "NON_MATH_KEYS",
    "Adapter",
    "HyperInput",
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


#: Marker that replaces a live hyperparameter's value in a signature.
LIVE = "<live>"


@dataclass(frozen=True)
class HyperInput:
    """A live hyperparameter: placeholder ``name`` reads ``group[key]`` (element ``index`` of a tuple)."""

    name: str
    key: str
    index: int | None = None

    def read(self, group: Mapping[str, Any]) -> Any:
        v = group[self.key]
        return v if self.index is None else v[self.index]

    @property
    def where(self) -> str:
        """The param-group entry in the user's terms: ``betas[0]``, ``eps``."""
        return self.key if self.index is None else f"{self.key}[{self.index}]"


def mark_live(hp: Mapping[str, Any], live: Sequence[HyperInput]) -> dict[str, Any]:
    """``hp`` with the value of every live input replaced by :data:`LIVE` (the structural form)."""
    out = dict(hp)
    for h in live:
        if h.index is None:
            out[h.key] = LIVE
        else:
            v = list(out[h.key])
            v[h.index] = LIVE
            out[h.key] = tuple(v)
    return out


def is_float_value(v: Any) -> bool:
    """A value a live input can carry: a real number or a one-element tensor (not a bool)."""
    if isinstance(v, Tensor):
        return v.numel() == 1 and v.dtype.is_floating_point
    return isinstance(v, int | float) and not isinstance(v, bool)


UpdateFn = Callable[..., tuple[Tensor, ...]]
InitFn = Callable[[Tensor], dict[str, Tensor]]


@dataclass(frozen=True)
class UpdatePlan:
    """What the tracer needs for one (optimizer, hyperparameters, dtype, ndim) signature.

    Attributes:
        state_names: the base optimizer's state keys, in placeholder order (``step`` excluded).
        update: ``(param, grad, *states, step, lr, *hypers) -> (param', *states', step')``; may mutate
            inputs. ``hypers`` are 0-d float64 tensors, one per entry of ``hypers`` below.
        init: ``like -> {name: fresh state}`` (must work on the meta device).
        patch_compiling: trace with ``torch.compiler.is_compiling() → True`` (capturable path on CPU).
        verify_shape_generic: trace a second time at another shape and require an identical graph.
        state_kinds: optional hints ``{state name: "first_moment"}`` for states the compiler's own
            classifier cannot recognise (transformers' Adafactor keeps an EMA of its *update*, not of
            the gradient). Decompose applies a hint only where its classification is ``other`` and only
            after proving ``s' = a·s + b·u`` (scalar ``a``, ``b``; ``u`` free of ``s``, reading the
            projected quantity); it refuses a hint that does not hold, naming the state.
    """

    state_names: tuple[str, ...]
    update: UpdateFn
    init: InitFn
    patch_compiling: bool = False
    verify_shape_generic: bool = False
    hypers: tuple[HyperInput, ...] = ()
    state_kinds: Mapping[str, str] = field(default_factory=dict)


def qualified_name(cls: type) -> str:
    """``torch.optim.AdamW`` for public torch classes, ``module.QualName`` otherwise."""
    if getattr(torch.optim, cls.__name__, None) is cls:
        return f"torch.optim.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _ctor_args(cls: type[torch.optim.Optimizer], hyperparams: Mapping[str, Any]) -> tuple:
    """The entries of ``hyperparams`` that ``cls``'s constructor accepts, as a hashable tuple."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return ()
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = {n for n in params if n not in ("self", "params")}
    out = []
    for k, v in hyperparams.items():
        if k == "params" or not (k in names or takes_kwargs) or isinstance(v, Tensor):
            continue
        try:
            hash(v)
        except TypeError:
            continue
        out.append((k, v))
    return tuple(sorted(out, key=lambda kv: kv[0]))


def class_defaults(cls: type[torch.optim.Optimizer], hyperparams: Mapping[str, Any] | None = None) -> dict:
    """``defaults`` of a throwaway one-parameter instance built with the user's arguments.

    ``hyperparams`` (a param group, or the user's keyword arguments) supplies the constructor
    arguments, so a class whose defaults conflict with a bare ``lr`` (transformers' Adafactor refuses
    ``lr`` with its default ``relative_step=True``) is built as the user built it.
    """
    return dict(_class_defaults(cls, _ctor_args(cls, hyperparams or {})))


@functools.cache
def _class_defaults(cls: type[torch.optim.Optimizer], args: tuple) -> dict[str, Any]:
    kwargs = dict(args)
    if "lr" not in kwargs:
        kwargs["lr"] = 0.01
    try:
        return dict(cls([torch.zeros(2)], **kwargs).defaults)
    except Exception as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UnsupportedOptimizerError(
            qualified_name(cls),
            f"cannot construct a one-parameter instance {cls.__name__}([p], {shown}): "
            f"{type(exc).__name__}: {exc}",
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
    #: candidate live inputs, in placeholder order (see the module docstring)
    hypers: tuple[HyperInput, ...] = ()
    #: names of the hypers whose zero-ness selects a code path (structural)
    gates: frozenset[str] = frozenset()
    #: whether the base's own ``step()`` keeps tensor-only state in the captured layout, so full-rank
    #: parameters can run it (False: e.g. transformers' Adafactor keeps an int ``step`` and an ``RMS``
    #: float; its full-rank parameters then run their compiled update instead)
    native_full_rank: bool = True

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

    def live_inputs(self, hp: Mapping[str, Any]) -> tuple[HyperInput, ...]:
        """The live inputs for normalized ``hp``: every candidate carrying a number, except a gated
        one that is zero (baked as the constant 0)."""
        out = []
        for h in self.hypers:
            v = h.read(hp)
            if not is_float_value(v) or (h.name in self.gates and float(v) == 0.0):
                continue
            out.append(h)
        return tuple(out)

    def structure(self, hp: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[HyperInput, ...]]:
        """``(structural hp, live inputs)``: the signature part of ``hp`` and what is read per step."""
        live = self.live_inputs(hp)
        return mark_live(hp, live), live

    def plan(
        self, hp: Mapping[str, Any], dtype: torch.dtype, ndim: int, live: tuple[HyperInput, ...] = ()
    ) -> UpdatePlan:
        """The update for structural ``hp`` (live entries hold :data:`LIVE`) with inputs ``live``."""
        raise NotImplementedError
