"""Kernel variants: a derived :class:`~coap_compile.ir.Epilogue` plus the storage mode of each state.

The storage of the low-rank states is a pluggable part of the K1 lowering. The epilogue (the derived
elementwise update, in float32 registers) is the same for every storage; only the state loads before it
and the stores after it change (:mod:`coap_compile.storage`, helpers :mod:`coap_compile.storage.triton_src`):

==============  =====================================  ==============================================
mode (``tag``)  op tensors of a state ``s`` (in order)  K1 load / store
==============  =====================================  ==============================================
``fp32``        ``s`` (float32 M×r)                    plain load / store (today's kernel)
``bf16_rn``     ``s`` (bfloat16 M×r)                   upcast (exact) / round to nearest even
``bf16_sr``     ``s``, ``s.rng`` (int64 ``[seed, n]``)  upcast / stochastic rounding, counter hash
``q8s_rn``      ``s.q8`` (int8), ``s.absmax`` (fp32)    ``value[code]·absmax`` / per-block absmax +
``q8u_rn``      ``s.q8`` (uint8), ``s.absmax``          nearest code (signed / unsigned map)
``q8s_sr``      ``s.q8``, ``s.absmax``, ``s.rng``        as above, stochastic code rounding
``q8u_sr``      ``s.q8`` (uint8), ``s.absmax``, ``s.rng``
==============  =====================================  ==============================================

(int8 tags get ``_log`` appended for the ``"log"`` code-map style; the style only changes the tables,
which K1 reads by pointer, so the generated source depends on the tag without the style.) The code
tables are not op arguments: the launcher takes them from ``CodeMap.tables(device)`` (constants).

A variant whose states are all ``fp32`` *is* the plain epilogue: same op id
(:func:`~coap_compile.kernels.ops.register_variant` returns :func:`register_epilogue`'s id), same
generated source and kernel name as before storage variants existed (``tests/test_kernels_storage.py``
pins their digests).

:func:`mode_of` maps a :class:`~coap_compile.storage.StateStorage` (with the state's kind and logical
shape) to the mode it stores that state in; ``None`` when no K1 can read it (float64 states, a storage
the kernels do not know), and the caller then keeps the eager path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from coap_compile.ir import Epilogue
from coap_compile.storage import (
    Bf16Storage,
    BlockLayout,
    FP32Storage,
    Int8Storage,
    StateStorage,
    code_map,
)
from coap_compile.storage.codemap import STYLES
from coap_compile.storage.int8 import infer_layout

__all__ = ["FP32", "PRECISIONS", "KernelVariant", "StateMode", "mode_of"]

PRECISIONS = ("fp32", "bf16", "int8")
ROUNDINGS = ("nearest", "stochastic")


@dataclass(frozen=True)
class StateMode:
    """How one state is stored (module docstring). ``signed``/``style`` matter for int8 only,
    ``rounding`` for bf16/int8 only (``fp32`` is always ``"nearest"``)."""

    precision: str = "fp32"
    rounding: str = "nearest"
    signed: bool = True
    style: str = "decade"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"state mode precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"state mode rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.precision == "fp32" and self.rounding != "nearest":
            raise ValueError("an fp32 state mode has no rounding: use rounding='nearest'")
        if self.style not in STYLES:
            raise ValueError(f"code map style must be one of {STYLES}, got {self.style!r}")

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic"

    @property
    def kernel_tag(self) -> str:
        """The part of the K1 name/source this mode determines (no style: tables are pointers)."""
        if self.precision == "fp32":
            return "fp32"
        rnd = "sr" if self.stochastic else "rn"
        if self.precision == "bf16":
            return f"bf16_{rnd}"
        return f"q8{'s' if self.signed else 'u'}_{rnd}"

    @property
    def tag(self) -> str:
        """The mode's full tag (kernel tag plus a non-default int8 style)."""
        t = self.kernel_tag
        return f"{t}_{self.style}" if self.precision == "int8" and self.style != "decade" else t

    def suffixes(self) -> tuple[str, ...]:
        """State-dict key suffixes of a state ``s`` in op order: ``s`` + suffix (module docstring; the
        storage classes declare them)."""
        if self.precision == "fp32":
            return (FP32Storage.value_suffix,)
        if self.precision == "bf16":
            return (Bf16Storage.value_suffix, *((Bf16Storage.rng_suffix,) if self.stochastic else ()))
        rng = (Int8Storage.rng_suffix,) if self.stochastic else ()
        return (Int8Storage.value_suffix, Int8Storage.scale_suffix, *rng)

    def keys(self, name: str) -> tuple[str, ...]:
        return tuple(name + s for s in self.suffixes())

    @property
    def n_tensors(self) -> int:
        return len(self.suffixes())

    def storage(self) -> StateStorage:
        """A storage instance that loads/stores this mode (the eager twin's arithmetic)."""
        if self.precision == "fp32":
            return FP32Storage()
        if self.precision == "bf16":
            return Bf16Storage(rounding=self.rounding)
        return Int8Storage(rounding=self.rounding, min_numel=0, style=self.style)

    def as_dict(self, tensors: Sequence[Tensor], name: str = "s") -> dict[str, Tensor]:
        return dict(zip(self.keys(name), tensors))

    def load(self, tensors: Sequence[Tensor]) -> Tensor:
        """The float32 value (fp32: the tensor itself)."""
        return self.storage().load(self.as_dict(tensors), "s")

    def store_(self, tensors: Sequence[Tensor], value: Tensor) -> None:
        """Round/quantize ``value`` into ``tensors`` (advances the rng counter when stochastic)."""
        self.storage().store_(self.as_dict(tensors), "s", value)

    def layout(self, tensors: Sequence[Tensor]) -> BlockLayout:
        """int8: the block layout the state was written with (from its code shape and scale grid)."""
        codes, absmax = tensors[0], tensors[1]
        lay = infer_layout(tuple(codes.shape), tuple(absmax.shape))
        if lay is None:
            raise ValueError(
                f"int8 state: absmax of shape {tuple(absmax.shape)} fits no power-of-two block size for "
                f"codes of shape {tuple(codes.shape)}"
            )
        return lay

    def check(self, tensors: Sequence[Tensor], shape: tuple[int, int], where: str) -> None:
        """TypeError/ValueError unless ``tensors`` are this mode's tensors for an M×r state."""
        if len(tensors) != self.n_tensors:
            raise ValueError(f"{where} ({self.tag}) needs {self.n_tensors} tensors, got {len(tensors)}")
        main = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
            self.precision, torch.int8 if self.signed else torch.uint8
        )
        t = tensors[0]
        if not isinstance(t, Tensor) or t.dtype != main or tuple(t.shape) != shape:
            raise TypeError(
                f"{where} ({self.tag}) must be a {main} tensor of shape {shape}, "
                f"got {getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}"
            )
        if self.precision == "fp32":
            return
        if not t.is_contiguous():
            raise ValueError(f"{where} ({self.tag}) must be contiguous (row-major), strides {t.stride()}")
        if self.precision == "int8":
            a = tensors[1]
            if a.dtype != torch.float32 or a.ndim != 2 or not a.is_contiguous():
                raise TypeError(f"{where} ({self.tag}): absmax must be a contiguous 2-D float32 tensor")
            self.layout(tensors)
        if self.stochastic:
            rng = tensors[-1]
            if rng.dtype != torch.int64 or tuple(rng.shape) != (2,):
                raise TypeError(
                    f"{where} ({self.tag}): rng must be an int64 [seed, counter] tensor of shape (2,), "
                    f"got {rng.dtype} {tuple(rng.shape)}"
                )


FP32 = StateMode()


def mode_of(storage: StateStorage, kind: str, shape: Sequence[int]) -> StateMode | None:
    """The mode ``storage`` keeps a state of ``kind`` and logical ``shape`` in, or ``None`` if no K1
    reads it (float64, or a storage class the kernels do not know)."""
    if type(storage) is FP32Storage:
        return FP32 if storage.dtype == torch.float32 else None
    if type(storage) is Bf16Storage:
        return StateMode("bf16", storage.rounding)
    if type(storage) is Int8Storage:
        if not storage.quantized(tuple(shape)):
            return FP32  # small states stay float32 under int8
        cm = storage.code_map_for(kind)
        return StateMode("int8", storage.rounding, cm.signed, storage.style)
    return None


@dataclass(frozen=True)
class KernelVariant:
    """An epilogue with the storage mode of each of its states (``modes[i]`` ↔ ``state_names[i]``)."""

    epilogue: Epilogue
    modes: tuple[StateMode, ...]

    def __post_init__(self) -> None:
        if len(self.modes) != len(self.epilogue.state_names):
            raise ValueError(
                f"{len(self.modes)} storage modes for the states {self.epilogue.state_names} of the epilogue"
            )
        if not all(isinstance(m, StateMode) for m in self.modes):
            raise TypeError(f"modes must be StateMode instances, got {self.modes!r}")

    @property
    def all_fp32(self) -> bool:
        return all(m == FP32 for m in self.modes)

    def key(self) -> str:
        """Stable text (the epilogue key plus the mode tags): hashed into the op id."""
        return f"{self.epilogue.key()}|storage={','.join(m.tag for m in self.modes)}"

    def n_tensors(self) -> int:
        return sum(m.n_tensors for m in self.modes)

    def split(self, tensors: Sequence[Tensor]) -> list[tuple[Tensor, ...]]:
        """The op's flat tensor list cut into one group per state (ValueError on a wrong count)."""
        if len(tensors) != self.n_tensors():
            names = self.epilogue.state_names
            want = " + ".join(f"{n}: {m.n_tensors} ({m.tag})" for n, m in zip(names, self.modes))
            raise ValueError(
                f"the storage variant takes {self.n_tensors()} state tensors ({want}), got {len(tensors)}"
            )
        out, i = [], 0
        for m in self.modes:
            out.append(tuple(tensors[i : i + m.n_tensors]))
            i += m.n_tensors
        return out

    def tables(self, device: torch.device) -> list[tuple[Tensor, Tensor] | None]:
        """Per state: the int8 ``(tab, values)`` tables K1 reads (tab = levels or thresholds), else None."""
        out: list[tuple[Tensor, Tensor] | None] = []
        for m in self.modes:
            if m.precision != "int8":
                out.append(None)
                continue
            t = code_map(m.signed, m.style).tables(device)
            out.append((t.levels if m.stochastic else t.thresholds, t.values))
        return out
