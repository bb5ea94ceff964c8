"""How one logical float32 optimizer state is stored: the :class:`StateStorage` interface and registry.

A *state* is one logical float32 tensor (``exp_avg`` of an M×r projected weight, ``exp_avg_sq`` of a
bias, …). A storage keeps it as a ``dict[str, Tensor]`` of plain tensors whose keys all start with the
state's name, so a parameter's state dict stays tensors only (``torch.load(weights_only=True)`` works):

=========  ==========================================  ===================================================
precision  keys for state ``s`` of logical shape ``S``  bytes (:meth:`StateStorage.nbytes`)
=========  ==========================================  ===================================================
``fp32``   ``s``: float32 ``S``                        ``4·|S|`` (``8·|S|`` with ``dtype=torch.float64``)
``bf16``   ``s``: bfloat16 ``S``; with stochastic      ``2·|S|`` (+ 16 for ``s.rng``)
           rounding also ``s.rng``: int64 ``(2,)``
``int8``   ``s.q8``: int8 (signed map) or uint8        ``|S| + 4·⌈R/bh⌉·⌈C/bw⌉`` (+ 16 for ``s.rng``;
           (unsigned map) codes of shape ``S``;        layout in :mod:`.int8`); tensors with fewer than
           ``s.absmax``: float32 ``(⌈R/bh⌉, ⌈C/bw⌉)``;  ``min_numel`` elements stay ``s``: float32
           with stochastic rounding ``s.rng``           (``4·|S|``)
=========  ==========================================  ===================================================

The layout is self-describing: :func:`load_any` reads any precision from its keys and dtypes, which is
what checkpoint conversion (:func:`convert_state`) uses. Every storage computes in float32 (``fp32``
may be asked for float64, the project's float64-weight convention).

**Key scheme, from the registry.** Each storage class declares its own key suffixes (class attributes):
``value_suffix`` (the key of the values or codes: ``""`` for the state's own name, ``".q8"`` for int8),
``companion_suffixes`` (bookkeeping keys of the state: int8 scales ``".absmax"``, rounding streams
``".rng"``) and ``replicated_suffixes`` (the companions not laid out by the state's rows: the ``".rng"``
stream, which FSDP2 keeps whole while values, codes and scales are row-sharded), and a classmethod
``owns(stored, name)`` that says from the keys and dtypes whether its layout holds state ``name``. The
functions below derive everything from the registered classes, so no module outside ``storage`` needs
the suffixes: :func:`stored_precision` / :func:`load_any` / :func:`convert_state` dispatch through the
owning class; :func:`logical_name` (``exp_avg.q8``, ``exp_avg.absmax``, ``exp_avg.rng`` → ``exp_avg``),
:func:`is_companion`, :func:`is_replicated_key` and :func:`logical_layout` (``{logical name: shape}``)
read a state dict key by key.

The interface (one instance per configuration; the instances are stateless, all state is in the dict):

* ``zeros(name, shape, device, kind, *, seed=0) -> dict``: a fresh all-zero state;
* ``load(stored, name) -> Tensor``: the float32 value (``fp32`` returns the stored tensor itself, not a
  copy; treat it as read-only or write it back with ``store_``);
* ``store_(stored, name, value)``: round/quantize ``value`` *into the existing tensors* (no reallocation;
  the same tensor objects before and after);
* ``nbytes(shape, kind) -> int``: exact bytes of ``zeros(...)`` (closed form, shapes only: meta-safe);
* ``validate(stored, name, shape, kind)``: ValueError unless ``stored`` holds the state as ``zeros`` lays
  it out (keys, dtypes, shapes, companions, finite values): what checkpoint loading checks.

``kind`` is the compiler's classification of the state (``passes.decompose``): ``"first_moment"``
(``s' = a·s + b·x``, signed), ``"second_moment"`` (``s' = a·s + b·x²``, non-negative) or ``"other"``.
``int8`` picks its code map from it and refuses ``"other"`` (its error bound assumes an EMA whose
values share a block scale sensibly); ``fp32``/``bf16`` accept every kind.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "KINDS",
    "FP32Storage",
    "StateStorage",
    "check_kind",
    "convert_state",
    "get_storage",
    "is_companion",
    "is_replicated_key",
    "load_any",
    "logical_layout",
    "logical_name",
    "numel",
    "register_storage",
    "storage_class_of",
    "storage_names",
    "stored_precision",
]

#: the state kinds of ``passes.decompose._classify_state``.
KINDS = ("first_moment", "second_moment", "other")

_REGISTRY: dict[str, type[StateStorage]] = {}
#: what the key-scheme functions derive from the registry (cleared by :func:`register_storage`).
_DERIVED: dict[str, tuple] = {}


def numel(shape: Sequence[int]) -> int:
    """Number of elements of ``shape`` (1 for ``()``)."""
    return math.prod(int(d) for d in shape)


def check_kind(kind: Any) -> str:
    """``kind`` if it is one of :data:`KINDS`, else a ValueError naming it."""
    if kind not in KINDS:
        raise ValueError(f"state kind must be one of {KINDS}, got {kind!r}")
    return kind


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
        raise ValueError(f"shape must be a sequence of non-negative ints, got {shape!r}")
    return dims


def _check_value(name: str, value: Tensor, like: Tensor) -> None:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(
            f"value stored into state {name!r} must be a floating-point tensor, got {value!r:.60}"
        )
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(
            f"value stored into state {name!r} has shape {tuple(value.shape)}, "
            f"the state is {tuple(like.shape)}"
        )


def _get(stored: dict[str, Tensor], key: str, precision: str) -> Tensor:
    if key in stored:
        return stored[key]
    have = sorted(k for k in stored if k.split(".")[0] == key.split(".")[0])
    found = f"; it is stored as {stored_precision(stored, key.split('.')[0])}" if have else ""
    raise KeyError(f"{precision} state {key.split('.')[0]!r} needs key {key!r}, found keys {have}{found}")


class StateStorage(ABC):
    """One storage precision (see the module docstring for the interface and key scheme)."""

    #: the registry name (``"fp32"``, ``"bf16"``, ``"int8"``).
    name: ClassVar[str]
    #: suffix of the key holding the state's values (or codes): ``""`` is the state's own name.
    value_suffix: ClassVar[str] = ""
    #: dtypes the value key may have in this layout (what the default :meth:`owns` checks).
    value_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()
    #: suffixes of the state's bookkeeping keys besides its values (scales, rounding streams).
    companion_suffixes: ClassVar[tuple[str, ...]] = ()
    #: the companions not laid out by the state's rows (one per state, e.g. a rounding stream), which a
    #: row-sharded state keeps whole (replicated); a subset of :attr:`companion_suffixes`.
    replicated_suffixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def owns(cls, stored: dict[str, Tensor], name: str) -> bool:
        """Whether this class's layout holds state ``name`` in ``stored`` (from its keys and dtypes).

        Default: the value key ``name + value_suffix`` is a tensor of one of :attr:`value_dtypes`. The
        registry asks the classes with a suffixed value key first (:func:`storage_class_of`)."""
        t = stored.get(name + cls.value_suffix)
        return isinstance(t, Tensor) and t.dtype in cls.value_dtypes

    @classmethod
    def load_owned(cls, stored: dict[str, Tensor], name: str) -> Tensor:
        """The float32 value of state ``name``, which this class :meth:`owns` in ``stored``, whatever
        configuration of the class wrote it (the default instance's :meth:`load`)."""
        return cls().load(stored, name)

    @abstractmethod
    def zeros(
        self, name: str, shape: Sequence[int], device: torch.device | str | None = None,
        kind: str = "other", *, seed: int = 0,
    ) -> dict[str, Tensor]:  # fmt: skip
        """A fresh all-zero state ``name`` of logical shape ``shape``."""

    @abstractmethod
    def load(self, stored: dict[str, Tensor], name: str) -> Tensor:
        """The float32 value of state ``name``."""

    @abstractmethod
    def store_(self, stored: dict[str, Tensor], name: str, value: Tensor, *, start: int = 0) -> None:
        """Write ``value`` into the existing tensors of state ``name`` (rounded/quantized). ``start``:
        the stochastic-rounding index of ``value``'s first element (its global row-major index when
        ``value`` is a row shard of a larger state, so a shard draws the whole state's bits; 0 otherwise)."""

    @abstractmethod
    def nbytes(self, shape: Sequence[int], kind: str = "other") -> int:
        """Exact bytes of :meth:`zeros` for ``shape`` (closed form)."""

    def keys(self, name: str, shape: Sequence[int], kind: str = "other") -> tuple[str, ...]:
        """The keys :meth:`zeros` creates for ``name`` (from shapes only)."""
        return tuple(self.zeros(name, shape, "meta", kind))

    def validate(
        self, stored: dict[str, Tensor], name: str, shape: Sequence[int], kind: str = "other"
    ) -> None:
        """Raise ``ValueError`` (naming the key and what this storage expects) unless ``stored`` holds
        state ``name`` of logical ``shape`` exactly as :meth:`zeros` lays it out: every key present (values
        or codes, and companions such as int8 scales and rounding streams), no other key of the state,
        each with the expected dtype and shape, floating tensors finite. Checkpoint loading calls it
        before anything changes (:mod:`coap_compile.runtime.checkpoint`); formats add their own rules."""
        want = self.zeros(name, shape, "meta", kind)
        have = [k for k in stored if k == name or k.startswith(name + ".")]
        extra = sorted(set(have) - set(want))
        if extra:
            raise ValueError(
                f"keys {extra} are not part of {self.name} state {name!r} (expected {sorted(want)})"
            )
        for key, like in want.items():
            t = stored.get(key)
            if not isinstance(t, Tensor):
                raise ValueError(f"{self.name} state {name!r} needs key {key!r}, found keys {sorted(have)}")
            if t.dtype != like.dtype or tuple(t.shape) != tuple(like.shape):
                raise ValueError(
                    f"{key!r} is {t.dtype} {tuple(t.shape)}; {self.name} storage expects {like.dtype} "
                    f"{tuple(like.shape)}"
                )
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{key!r} holds inf/NaN")

    def from_value(
        self, name: str, value: Tensor, kind: str = "other", *, seed: int = 0, start: int = 0
    ) -> dict[str, Tensor]:
        """A new state holding ``value`` (``zeros`` + ``store_``): one rounding/quantization of ``value``
        (``start``: as for :meth:`store_`)."""
        stored = self.zeros(name, tuple(value.shape), value.device, kind, seed=seed)
        if start:
            self.store_(stored, name, value, start=start)
        else:
            self.store_(stored, name, value)
        return stored

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_suffixes(cls: type[StateStorage]) -> None:
    """The key suffixes ``cls`` declares are well-formed and keep one role across the registry."""
    value, companions, replicated = cls.value_suffix, cls.companion_suffixes, cls.replicated_suffixes
    if not isinstance(value, str) or (value and not value.startswith(".")):
        raise TypeError(f"{cls.__name__}.value_suffix must be '' or a str starting with '.', got {value!r}")
    for attr, suffixes in (("companion_suffixes", companions), ("replicated_suffixes", replicated)):
        if not isinstance(suffixes, tuple) or not all(
            isinstance(x, str) and x[1:] and x[0] == "." for x in suffixes
        ):
            raise TypeError(
                f"{cls.__name__}.{attr} must be a tuple of str starting with '.', got {suffixes!r}"
            )
    if not set(replicated) <= set(companions):
        raise ValueError(f"{cls.__name__}.replicated_suffixes {replicated} are not all companion_suffixes")
    values = {value} | {c.value_suffix for c in _REGISTRY.values() if c.name != cls.name}
    bookkeeping = set(companions).union(
        *(c.companion_suffixes for c in _REGISTRY.values() if c.name != cls.name)
    )
    if values & bookkeeping:
        raise ValueError(
            f"{cls.__name__}: key suffixes {sorted(values & bookkeeping)} would name values and bookkeeping"
        )
    for other in _REGISTRY.values():
        both = set(companions) & set(other.companion_suffixes)
        if other.name != cls.name and any(
            (x in replicated) != (x in other.replicated_suffixes) for x in both
        ):
            raise ValueError(
                f"{cls.__name__} and {other.__name__} disagree on which of {sorted(both)} is replicated"
            )


def register_storage(cls: type[StateStorage]) -> type[StateStorage]:
    """Class decorator: register ``cls`` under ``cls.name`` (a second class with the same name is refused).

    Its key suffixes join the registry's key scheme (:func:`logical_name` and friends)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}.name must be a non-empty str, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a state storage named {name!r} is already registered ({_REGISTRY[name].__name__})")
    _check_suffixes(cls)
    _REGISTRY[name] = cls
    _DERIVED.clear()
    return cls


def storage_names() -> tuple[str, ...]:
    """The registered precision names (``("fp32", "bf16", "int8")``)."""
    return tuple(_REGISTRY)


def get_storage(precision: str | StateStorage, **options: Any) -> StateStorage:
    """The storage for ``precision`` (``"fp32"``, ``"bf16"``, ``"int8"``), built with ``options``.

    Options: ``fp32``: ``dtype`` (float32 or float64); ``bf16``: ``rounding`` (``"nearest"`` or
    ``"stochastic"``, the default); ``int8``: ``quant_block_size`` (256), ``second_moment_map``
    (``"unsigned"``), ``rounding`` (``"stochastic"``), ``min_numel`` (4096), ``style`` (``"decade"``),
    ``blocks`` (``"tiles"`` or ``"rows"``).
    An instance is returned as is (``options`` must then be empty).
    """
    if isinstance(precision, StateStorage):
        if options:
            raise TypeError(f"options {sorted(options)} given with a StateStorage instance {precision!r}")
        return precision
    if precision not in _REGISTRY:
        raise ValueError(f"state precision must be one of {storage_names()}, got {precision!r}")
    return _REGISTRY[precision](**options)


def storage_class_of(stored: dict[str, Tensor], name: str) -> type[StateStorage]:
    """The registered class whose layout holds state ``name`` in ``stored`` (:meth:`StateStorage.owns`).

    Classes with a suffixed value key (int8's ``name.q8``) are asked first, then the others in
    registration order; a KeyError when ``stored`` has no such state, a ValueError when its tensor has a
    dtype no storage uses."""
    if "owners" not in _DERIVED:  # suffixed value keys first; a stable sort keeps registration order
        _DERIVED["owners"] = tuple(sorted(_REGISTRY.values(), key=lambda c: not c.value_suffix))
    for cls in _DERIVED["owners"]:
        if cls.owns(stored, name):
            return cls
    t = stored.get(name)
    if isinstance(t, Tensor):
        dtypes = "/".join(
            dict.fromkeys(str(d).removeprefix("torch.") for c in _REGISTRY.values() for d in c.value_dtypes)
        )
        raise ValueError(f"state {name!r} has dtype {t.dtype}; stored states are {dtypes}")
    raise KeyError(f"no state {name!r} in the stored keys {sorted(stored)}")


def stored_precision(stored: dict[str, Tensor], name: str) -> str:
    """Which precision's layout holds state ``name`` in ``stored`` (from its keys and dtypes)."""
    return storage_class_of(stored, name).name


def load_any(stored: dict[str, Tensor], name: str) -> Tensor:
    """The float32 value of state ``name`` whatever precision stored it (float64 stays float64)."""
    return storage_class_of(stored, name).load_owned(stored, name)


def convert_state(
    stored: dict[str, Tensor], name: str, target: str | StateStorage, kind: str = "other", *, seed: int = 0
) -> dict[str, Tensor]:
    """State ``name`` re-stored in ``target``'s layout (new tensors; ``stored`` is not modified).

    Exactness: anything → ``fp32`` is exact (dequantized values are float32 numbers); ``fp32`` → ``bf16``
    or ``int8`` is one rounding/quantization, exactly what one ``store_`` of a step does; ``int8`` →
    ``fp32`` → ``int8`` (same block size and map) and ``bf16`` → ``fp32`` → ``bf16`` give back the same
    codes/bits (tested). A ``bf16`` stochastic-rounding target starts a new stream: ``seed``, counter 0.
    """
    dst = get_storage(target)
    value = load_any(stored, name)
    if isinstance(dst, FP32Storage):
        return {name: value.to(dst.dtype, copy=True)}
    return dst.from_value(name, value.float(), kind, seed=seed)


def _suffixes(attr: str) -> tuple[str, ...]:
    """The registered classes' ``attr`` suffixes (``"value_suffix"``: the non-empty ones), longest first."""
    if attr not in _DERIVED:
        found: set[str] = set()
        for cls in _REGISTRY.values():
            v = getattr(cls, attr)
            found.update((v,) if isinstance(v, str) else v)
        _DERIVED[attr] = tuple(sorted(found - {""}, key=lambda x: (-len(x), x)))
    return _DERIVED[attr]


def logical_name(key: str) -> str:
    """The logical state a state-dict key belongs to: ``exp_avg.q8`` (codes), ``exp_avg.absmax`` (scales)
    and ``exp_avg.rng`` (rounding stream) are ``exp_avg``; any other key (``exp_avg``, ``step``, ``proj``)
    is its own name."""
    for suffix in _suffixes("value_suffix") + _suffixes("companion_suffixes"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def is_companion(key: str) -> bool:
    """Whether ``key`` is bookkeeping of a logical state (scales, rounding stream), not values or codes."""
    return key.endswith(_suffixes("companion_suffixes"))


def is_replicated_key(key: str) -> bool:
    """Whether ``key`` is per-state bookkeeping not laid out by the state's rows (the ``.rng`` stream), which
    stays whole when the state's values, codes and scales are row-sharded (FSDP2)."""
    return key.endswith(_suffixes("replicated_suffixes"))


def logical_layout(state: dict[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """A state dict's logical names and shapes, whatever precision stored them: ``exp_avg.q8`` (int8
    codes, at the logical shape) is ``exp_avg``, companions (scales, rounding streams) are left out; a
    non-tensor value (e.g. a Python ``step``) maps to None."""
    out: dict[str, tuple[int, ...] | None] = {}
    for k, v in state.items():
        if is_companion(k):
            continue
        out[logical_name(k)] = tuple(v.shape) if isinstance(v, Tensor) else None
    return out


@register_storage
class FP32Storage(StateStorage):
    """Full precision: the state is one float32 tensor under its own name (float64 if asked).

    Args:
        dtype: ``torch.float32`` (default) or ``torch.float64`` (the project's float64-weight path).
    """

    name = "fp32"
    value_dtypes = (torch.float32, torch.float64)

    @classmethod
    def load_owned(cls, stored, name):
        return stored[name]  # float64 stays float64, not a copy

    def __init__(self, dtype: torch.dtype = torch.float32):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"fp32 storage dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self.dtype = dtype

    def zeros(self, name, shape, device=None, kind="other", *, seed=0):
        check_kind(kind)
        return {name: torch.zeros(_check_shape(shape), dtype=self.dtype, device=device)}

    def load(self, stored, name):
        t = _get(stored, name, "fp32")
        if t.dtype != self.dtype:
            raise ValueError(f"fp32 state {name!r} has dtype {t.dtype}, this storage holds {self.dtype}")
        return t

    def store_(self, stored, name, value, *, start=0):
        t = _get(stored, name, "fp32")
        _check_value(name, value, t)
        if value is not t:
            t.copy_(value)

    def nbytes(self, shape, kind="other"):
        check_kind(kind)
        return numel(_check_shape(shape)) * (4 if self.dtype == torch.float32 else 8)

    def __repr__(self) -> str:
        return f"FP32Storage(dtype={self.dtype})"
