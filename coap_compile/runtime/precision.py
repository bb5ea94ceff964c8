"""State precision: how each optimizer state of each parameter is stored (``fp32``, ``bf16``, ``int8``).

The storage formats themselves are :mod:`coap_compile.storage`; this module decides which one a state
gets and gives the update a per-parameter view (:class:`StateIO`) that loads a state as float32,
lets the compiled update run unchanged on it, and stores the result back (round / quantize), one
parameter at a time, so no full-precision copy of all states ever exists (peak extra memory: one
parameter's states).

**Rules** (``state_precision`` / ``projection_precision``, keyword arguments and param-group keys):

* ``state_precision="auto"`` (default): the weight's dtype, torch's convention: ``fp32`` for float32 and
  float64 weights (float64 weights keep float64 states), ``bf16`` for bfloat16/float16 weights.
  ``bf16`` rounds stochastically (a counter hash, checkpointed): with round-to-nearest, the
  ``(1−β₂)·g²`` increments of a second moment fall below half a bf16 ulp and it stalls (measured in
  :mod:`coap_compile.storage.bf16`: ``v`` freezes at 0.25 under constant ``g = 1``, Adam steps 1.6×
  too large; on online least squares stochastic rounding matches fp32's excess risk, round-to-nearest
  behaves like a 2.4× smaller learning rate).
* ``int8``: blockwise dynamic quantization (:mod:`coap_compile.storage.int8`, ``quant_block_size``
  elements per absmax scale, default 256, 2-D blocks that K1's tiles own whole): signed map for first
  moments, unsigned for second moments (Adam-direction error 1.95 % vs 2.52 % signed, measured). Only
  moment-like EMAs can be quantized: a state the compiler classifies as ``other`` (RMSprop's momentum
  buffer ``b ← μb + g/a``, Adamax's running max) with ≥ 4096 elements is refused, naming it; smaller
  states (Adafactor's row/column factors, norms, biases) stay fp32 (torchao's threshold too). The size
  is the state's *global* shape (an FSDP2 row shard's state has the precision of the whole state, on
  every mesh: :func:`state_storage`'s ``global_shape``). ``quant_blocks`` picks the block shape
  (``"rows"``, the default: 1×bw inside a row, the layout FSDP2 needs; ``"tiles"``: bh×bw). With row
  blocks, 1-D states (norms, biases, Adafactor's factors) stay fp32 at any size: a vector has no row,
  its contiguous blocks would straddle an FSDP2 shard boundary, and keeping them fp32 on one process
  too keeps one layout for every mesh (≤ 3 bytes per element of vectors: 3 MiB for LLaMA-7B's norms).
* ``projection_precision="auto"``: ``P`` follows the *weight* dtype, as the official code keeps it
  (spec §2): bf16 for bfloat16/float16 weights, the working dtype (float32, float64) otherwise, whatever the
  state precision. A bf16 ``P`` is rounded to nearest (it is recomputed, never accumulated) and every
  refresh and product computes in float32. Measured (issue 19): before, int8 states on float32 weights
  made ``P`` bf16, and over 50 steps int8 then differed from fp32 by 27 % with a bf16 ``P`` against
  3.5 % with a float32 ``P``: the bf16 rounding of ``P`` (≈ 4e-3 relative) moved the basis more than
  the paper's correlation steps do, and flipped signs at the refresh. ``P`` costs ``N·r`` elements, a
  fraction ``r/M``-ish of the moments, so float32 ``P`` adds 2 bytes per ``N·r``.
* ``step`` counters stay float32.

Full-rank parameters follow the same rule; with ``fp32`` they run torch's own optimizer, otherwise
their captured update with the same load/store view (:mod:`.fullrank`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from ..storage import FP32Storage, StateStorage, get_storage, stored_precision
from ..storage.base import numel
from ..storage.int8 import DEFAULT_BLOCKS

__all__ = [
    "PRECISION_KEYS",
    "Precision",
    "StateIO",
    "StateSpec",
    "row_states",
    "state_spec",
    "physical_precision",
    "resolve_precision",
    "state_storage",
]

PRECISION_KEYS = ("state_precision", "projection_precision", "quant_block_size", "quant_blocks")
#: int8 keeps smaller tensors in float32 (their scales would cost as much as they save).
INT8_MIN_NUMEL = 4096


@dataclass(frozen=True)
class Precision:
    """Resolved precisions of one parameter: ``states`` (fp32/bf16/int8), ``proj`` (``P``'s dtype)."""

    states: str
    proj_dtype: torch.dtype
    block: int
    work_dtype: torch.dtype  # float64 for float64 weights, float32 otherwise
    blocks: str = DEFAULT_BLOCKS  # int8 block shape (``quant_blocks``)


def resolve_precision(settings, p: Tensor) -> Precision:
    """The precisions of ``p`` under a group's :class:`~.settings.CoapSettings` (module docstring rules)."""
    work = torch.float64 if p.dtype == torch.float64 else torch.float32
    states = settings.state_precision
    if states == "auto":
        states = "bf16" if p.dtype in (torch.bfloat16, torch.float16) else "fp32"
    proj = settings.projection_precision
    if proj == "auto":
        proj = "bf16" if p.dtype in (torch.bfloat16, torch.float16) else "fp32"
    proj_dtype = work if proj == "fp32" else torch.bfloat16
    return Precision(states, proj_dtype, settings.quant_block_size, work, settings.quant_blocks)


#: ``min_numel`` of an int8 storage that keeps every state float32 (a small state by its global shape).
_KEEP_FP32 = 1 << 62


@functools.cache
def _storage(
    name: str, block: int, dtype: torch.dtype, blocks: str = DEFAULT_BLOCKS, small: bool = False
) -> StateStorage:
    if name == "fp32":
        return FP32Storage(dtype)
    if name == "int8":  # the size rule is decided by state_storage on the global shape
        keep = _KEEP_FP32 if small else 0
        return get_storage("int8", quant_block_size=block, min_numel=keep, blocks=blocks)
    return get_storage(name)


def state_storage(
    prec: Precision, name: str, shape, kind: str, where: str, global_shape=None
) -> StateStorage:
    """The storage of one state (module docstring rules); ``where`` names it in errors. ``global_shape``:
    the whole state's shape when ``shape`` is a row shard's (FSDP2): int8's "small states stay float32"
    is decided on it, so a state's precision never depends on the mesh (torchao issue #4912's trap)."""
    full = tuple(shape if global_shape is None else global_shape)
    # 1-D states stay float32 with row blocks: a vector has no row to block along, and its contiguous
    # blocks would straddle an FSDP2 shard boundary; "tiles" quantizes them in 1-D blocks of B (below)
    small = numel(full) < INT8_MIN_NUMEL or (prec.blocks == "rows" and len(full) < 2)
    if prec.states == "int8" and kind == "other":
        if not small:
            raise ValueError(
                f"state_precision='int8' quantizes moment-like EMA states only; {where} has state {name!r} "
                f"of shape {full} that the compiler classifies as 'other' (not s' = a·s + b·x or "
                "a·s + b·x²), so it cannot share a block scale safely: use state_precision='bf16' (or 'fp32')"
            )
        return _storage("fp32", prec.block, prec.work_dtype)
    return _storage(prec.states, prec.block, prec.work_dtype, prec.blocks, small and prec.states == "int8")


class StateIO:
    """A parameter's states seen as float32 (``load``) and written back rounded (``store_``).

    ``storages`` maps every logical state name to its storage, ``shapes`` to its logical shape; ``seed``
    seeds stochastic rounding; ``offsets``: the global row-major index of the first local element of each
    row state of an FSDP2 shard (its rounding index: a shard rounds with the bits of the whole state, so
    its bf16/int8 codes equal the single-process rows run's). For ``fp32`` storage ``load`` returns the
    stored tensor itself, so the fp32 path is unchanged.
    """

    __slots__ = ("kinds", "offsets", "seed", "shapes", "state", "storages")

    def __init__(
        self,
        state: dict,
        storages: dict[str, StateStorage],
        kinds: dict[str, str],
        seed: int,
        shapes: dict[str, tuple[int, ...]],
        offsets: dict[str, int] | None = None,
    ):
        self.state, self.storages, self.kinds, self.seed, self.shapes = state, storages, kinds, seed, shapes
        self.offsets = offsets or {}

    def load(self, name: str) -> Tensor:
        return self.storages[name].load(self.state, name)

    def store_(self, name: str, value: Tensor) -> None:
        start = self.offsets.get(name, 0)
        if start:
            self.storages[name].store_(self.state, name, value, start=start)
        else:
            self.storages[name].store_(self.state, name, value)

    def fresh(self, name: str, value: Tensor) -> dict[str, Tensor]:
        """The stored form of ``value`` for state ``name`` (new tensors, not yet in the state)."""
        kind, start = self.kinds.get(name, "other"), self.offsets.get(name, 0)
        if start:
            return self.storages[name].from_value(name, value, kind, seed=self.seed, start=start)
        return self.storages[name].from_value(name, value, kind, seed=self.seed)

    def keys_of(self, name: str) -> list[str]:
        """The physical keys state ``name`` occupies in the state dict now."""
        return [k for k in self.state if k == name or k.startswith(name + ".")]

    def matches(self, name: str) -> bool:
        """Whether ``name`` is stored as its storage stores it (False when it is missing or was stored in
        another precision, e.g. after a change of ``state_precision``)."""
        if not self.keys_of(name):
            return False
        expected = physical_precision(self.storages[name], self.shapes[name])
        return stored_precision(self.state, name) == expected


def physical_precision(storage: StateStorage, shape) -> str:
    """The layout ``storage`` uses for a state of ``shape`` (int8 keeps small states in float32)."""
    if storage.name == "int8" and not storage.quantized(shape):
        return "fp32"
    return storage.name


@dataclass(frozen=True)
class StateSpec:
    """The states a parameter's update reads and writes: their storages, compiler kinds and logical
    shapes, and the rounding seed (a :class:`~.precision.StateIO` over a state dict via :meth:`io`)."""

    storages: Mapping[str, StateStorage]
    kinds: Mapping[str, str]
    shapes: Mapping[str, tuple[int, ...]]
    seed: int
    #: the states laid out by the weight's rows (row-sharded under FSDP2; the others are replicated,
    #: e.g. Adafactor's column factor) and, when sharded, the global row-major index of each one's first
    #: local element (its stochastic-rounding index, :class:`~.precision.StateIO`).
    row_names: tuple[str, ...] = ()
    offsets: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def io(self, state: Any) -> StateIO:
        return StateIO(state, self.storages, self.kinds, self.seed, self.shapes, self.offsets)

    @property
    def all_fp32(self) -> bool:
        """Every state stored fp32 (what the fused K1 kernel and the grouped update read)."""
        return all(stg.name == "fp32" for stg in self.storages.values())


def state_spec(
    prec: Precision, names, kinds: dict, shapes: dict, seed: int, where: str,
    row_names=(), shard: Any = None,
) -> StateSpec:  # fmt: skip
    """The states' storages; a row state of a sharded weight is sized (int8's small-state rule) by its
    global shape and rounds with its global element indices (``shard``'s row offset)."""
    row_names = tuple(n for n in names if n in row_names)
    glob, offsets = {}, {}
    for n in names:
        shape = tuple(shapes[n])
        glob[n] = shape
        if shard is not None and n in row_names:
            glob[n] = (shard.rows, *shape[1:])
            offsets[n] = shard.row_offset * math.prod(shape[1:])
    storages = {n: state_storage(prec, n, shapes[n], kinds.get(n, "other"), where, glob[n]) for n in names}
    return StateSpec(
        MappingProxyType(storages), MappingProxyType(dict(kinds)),
        MappingProxyType({n: tuple(shapes[n]) for n in names}), seed, row_names,
        MappingProxyType({n: o for n, o in offsets.items() if o}),
    )  # fmt: skip


def row_states(shapes: dict, other: dict) -> tuple[str, ...]:
    """The states whose leading dim follows the weight's rows: those whose shape changes when the rows
    do (``other``: the same program's states at one row more), not a guess from sizes."""
    return tuple(n for n, s in shapes.items() if s and tuple(other.get(n, s))[:1] != tuple(s)[:1])
