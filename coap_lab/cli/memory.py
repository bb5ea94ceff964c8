"""Closed-form optimizer-state accounting, and measurement of the state an optimizer really holds.

Written from the documented storage rules only (it never calls ``coap_compile.storage`` or
``coap_compile.runtime``), so the library's memory plan can be checked against it by exact integer
equality. Per parameter (AdamW base: two moments, ``exp_avg`` and ``exp_avg_sq``):

* a projected ``m×n`` matrix, ``M = max(m, n)``, ``N = min(m, n)``, rank ``r ≤ N``: two moments of shape
  ``M×r`` (row-major, ``C = r`` columns) and the projection ``P`` (``N·r`` elements, ``p`` bytes each);
* any other parameter: two moments of the parameter's own shape;
* plus the step counter (``s`` bytes, a 0-d float32 tensor in torch.optim and in this library) and policy
  extras (:data:`POLICY_EXTRA_BYTES`, e.g. Flora's int64 seed) where the accounting counts them.

One moment of ``n`` elements, by **storage**:

=========  ===============================================================================================
``plain``  ``n·b`` (``b`` = :attr:`Accounting.state`: 4 for float32, 2 for torch's bf16 states, 1 for the
           official 8-bit accounting)
``bf16``   ``2·n + 16``: bfloat16 values plus the 16-byte stochastic-rounding stream (int64
           ``[seed, counter]``)
``int8``   ``n ≥ 4096``: ``n + 4·⌈R/bh⌉·⌈C/bw⌉ + 16``: one-byte codes, one float32 absmax per block and the
           rounding stream. The moment is viewed as ``R×C`` (``C`` = last dimension, a vector of ``n`` is
           ``n×1``); ``B = quant_block_size`` (256). Blocks (:attr:`Accounting.blocks`, the library's
           ``quant_blocks``): ``"rows"`` (the default) ``1×bw`` with ``bw = min(B, next_pow2(C), 128)``
           for ``≥ 2``-D moments; ``"tiles"`` ``bh×bw`` with ``bw = min(16, next_pow2(C))``,
           ``bh = B/bw``; vectors ``B×1`` with tiles, float32 with rows. ``n < 4096``: ``4·n`` (kept
           float32, no stream)
=========  ===============================================================================================

Accountings (:class:`Accounting`; ``storage`` for projected moments, ``full_storage`` for the others):

* :data:`OURS` (= :data:`FP32`): float32 weights; AdamW and COAP keep float32 moments, float32 ``P``, a
  4-byte step;
* :data:`ADAMW_BF16`: torch AdamW on bfloat16 weights (bf16 ``exp_avg``/``exp_avg_sq`` + a 4-byte float32
  step);
* :data:`COAP_BF16_AUTO`: COAP on bf16 weights, ``state_precision="auto"``: bf16 low-rank moments with
  their streams, bf16 ``P``, full-rank parameters on torch's own bf16 AdamW (plain 2 bytes, no stream);
* :data:`COAP_BF16`: ``state_precision="bf16"``: every moment bf16 with a stream, ``P`` bf16;
* :data:`COAP_INT8`: ``state_precision="int8"``: every moment int8 (small ones float32), ``P`` bf16;
* :data:`OFFICIAL` / :data:`OFFICIAL_8BIT`: what the reference ``show_memory_usage`` counts (2 resp. 1 byte
  per moment element, ``P`` in bf16, no step: it is a Python int there, and absmax/code maps count 0).

:func:`decompose` splits a total into ``elements`` (moments at their nominal element size + ``P``, i.e.
exactly what the official accounting counts), ``absmax`` (int8 scales), ``rng`` (rounding streams),
``fp32_small`` (3 extra bytes per element of a moment an int8 accounting keeps float32), ``step`` and
``policy_extras``; the parts sum to :meth:`ParamRow.bytes`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from coap_lab.cli.optimizers import projected_linear_weights

__all__ = [
    "ADAMW_BF16",
    "COAP_BF16",
    "COAP_BF16_AUTO",
    "COAP_INT8",
    "FP32",
    "OFFICIAL",
    "OFFICIAL_8BIT",
    "OURS",
    "POLICY_EXTRA_BYTES",
    "STORAGES",
    "Accounting",
    "ParamRow",
    "closed_form_rows",
    "decompose",
    "measured_state_bytes",
    "meta_step",
    "moment_bytes",
    "plan_total_bytes",
    "total_bytes",
]

MIB = 1024**2
STORAGES = ("plain", "bf16", "int8")
#: bytes of one stochastic-rounding stream (an int64 ``[seed, counter]`` tensor per bf16/int8 moment).
RNG_BYTES = 16
#: int8 keeps moments with fewer elements than this in float32.
INT8_MIN_NUMEL = 4096
#: widest int8 tile (columns); tiles are ``bh×bw`` with ``bw = min(16, next_pow2(C))``.
INT8_MAX_BLOCK_W = 16
#: widest int8 row block: row blocks are ``1×min(B, next_pow2(C), 128)``.
INT8_MAX_ROW_W = 128
INT8_BLOCKS = ("rows", "tiles")
DEFAULT_QUANT_BLOCK = 256

#: Policy-specific per-matrix state beyond ``P`` in this library (bytes): Flora keeps its int64 seed.
POLICY_EXTRA_BYTES = {"flora": 8}


@dataclass(frozen=True)
class Accounting:
    """How one optimizer configuration stores its state (module docstring).

    ``state``: bytes per element of a ``plain`` moment; ``proj``: bytes per element of ``P``; ``step``: bytes
    per step counter; ``extras``: whether policy extras (:data:`POLICY_EXTRA_BYTES`) are counted;
    ``storage``: storage of projected moments; ``full_storage``: of every other parameter's moments (None:
    the same as ``storage``); ``block``: int8 ``quant_block_size``; ``blocks``: int8 block shape.
    """

    name: str
    state: int
    proj: int
    step: int
    extras: bool = False
    storage: str = "plain"
    full_storage: str | None = None
    block: int = DEFAULT_QUANT_BLOCK
    blocks: str = "rows"

    def __post_init__(self) -> None:
        if self.blocks not in INT8_BLOCKS:
            raise ValueError(f"Accounting.blocks must be one of {INT8_BLOCKS}, got {self.blocks!r}")
        for field, value in (("storage", self.storage), ("full_storage", self.full_storage)):
            if value is not None and value not in STORAGES:
                raise ValueError(f"Accounting.{field} must be one of {STORAGES}, got {value!r}")
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"Accounting.block must be a power of two >= 16, got {self.block!r}")


OURS = Accounting("ours", state=4, proj=4, step=4, extras=True)
FP32 = OURS
ADAMW_BF16 = Accounting("adamw-bf16", state=2, proj=2, step=4, extras=True)
COAP_BF16_AUTO = Accounting(
    "coap-bf16-auto", state=2, proj=2, step=4, extras=True, storage="bf16", full_storage="plain"
)
COAP_BF16 = Accounting("coap-bf16", state=2, proj=2, step=4, extras=True, storage="bf16")
COAP_INT8 = Accounting("coap-int8", state=1, proj=2, step=4, extras=True, storage="int8")
OFFICIAL = Accounting("official", state=2, proj=2, step=0)
OFFICIAL_8BIT = Accounting("official-8bit", state=1, proj=2, step=0)


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _int8_scales(shape: tuple[int, ...], block: int, blocks: str = "rows") -> int:
    """Number of float32 absmax scales of an int8 moment of ``shape`` (``R×C`` view, ``bh×bw`` blocks)."""
    if len(shape) >= 2:
        rows, cols = math.prod(shape[:-1]), shape[-1]
        if blocks == "rows":
            return rows * -(-cols // min(block, _next_pow2(cols), INT8_MAX_ROW_W))
    else:
        rows, cols = (shape[0] if shape else 1), 1
    bw = min(INT8_MAX_BLOCK_W, _next_pow2(cols))
    bh = block // bw
    return -(-rows // bh) * -(-cols // bw)


def _moment_parts(shape: tuple[int, ...], storage: str, acc: Accounting) -> dict[str, int]:
    """Bytes of one moment of ``shape`` by part (``elements``, ``absmax``, ``rng``, ``fp32_small``)."""
    n = math.prod(shape)
    if storage == "plain":
        return {"elements": n * acc.state}
    if storage == "bf16":
        return {"elements": 2 * n, "rng": RNG_BYTES}
    if n < INT8_MIN_NUMEL or (acc.blocks == "rows" and len(shape) < 2):  # vectors: fp32 with row blocks
        return {"elements": n, "fp32_small": 3 * n}
    return {"elements": n, "absmax": 4 * _int8_scales(shape, acc.block, acc.blocks), "rng": RNG_BYTES}


def moment_bytes(shape: Sequence[int], storage: str, acc: Accounting = OURS) -> int:
    """Exact bytes of one moment of ``shape`` in ``storage`` (module docstring table)."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    return sum(_moment_parts(tuple(int(d) for d in shape), storage, acc).values())


@dataclass(frozen=True)
class ParamRow:
    """One parameter's optimizer state as shapes and element counts (independent of byte sizes).

    ``moment_shape``: the shape of each of the ``n_moments`` moments (``M×r`` when projected).
    """

    name: str
    shape: tuple[int, ...]
    rank: int | None
    moment_shape: tuple[int, ...]
    proj_elems: int
    extra_bytes: int = 0
    n_moments: int = 2
    has_step: bool = True

    @property
    def state_elems(self) -> int:
        """Moment elements of this parameter (``n_moments · |moment_shape|``)."""
        return self.n_moments * math.prod(self.moment_shape)

    def storage(self, acc: Accounting) -> str:
        """The storage ``acc`` gives this parameter's moments."""
        if self.rank is not None or acc.full_storage is None:
            return acc.storage
        return acc.full_storage

    def parts(self, acc: Accounting) -> dict[str, int]:
        """Bytes by part (:func:`decompose`'s keys); they sum to :meth:`bytes`."""
        one = _moment_parts(self.moment_shape, self.storage(acc), acc)
        out = {k: self.n_moments * v for k, v in one.items()}
        out["elements"] += self.proj_elems * acc.proj
        out["step"] = acc.step if self.has_step else 0
        out["policy_extras"] = self.extra_bytes if acc.extras else 0
        return out

    def bytes(self, acc: Accounting) -> int:
        return sum(self.parts(acc).values())


def closed_form_rows(
    model: nn.Module,
    policy: str,
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    target_modules: Sequence[str] | None = None,
) -> list[ParamRow]:
    """Per-parameter state for ``policy`` in ``{"adamw", "coap", "galore", "flora", "dct"}`` (AdamW base).

    coap/galore/flora keep ``P`` (``N×r``) in the state; they differ in how it is refreshed. ``dct``
    keeps ``r`` int64 column indices per matrix instead of ``P`` (``8·r`` bytes, counted as a policy
    extra) and one float32 ``N×N`` DCT-II basis per distinct width ``N``, shared by every matrix of that
    width: one extra row each (``[shared] dct N×N``, no step counter), counted where extras are.
    Which weights are projected follows :func:`~coap_lab.cli.optimizers.projected_linear_weights`.
    Works on meta-device models (only shapes are read).
    """
    if policy not in ("adamw", "coap", "galore", "flora", "dct"):
        raise ValueError(f"no closed form for optimizer {policy!r}")
    chosen = {} if policy == "adamw" else projected_linear_weights(model, rank, rank_ratio, target_modules)
    rows = []
    widths: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = tuple(p.shape)
        if name in chosen:
            r = chosen[name]
            big, small = max(shape), min(shape)
            if policy == "dct":
                widths.add(small)
                rows.append(ParamRow(name, shape, r, (big, r), 0, 8 * r))
            else:
                rows.append(ParamRow(name, shape, r, (big, r), small * r, POLICY_EXTRA_BYTES.get(policy, 0)))
        else:
            rows.append(ParamRow(name, shape, None, shape, 0))
    for n in sorted(widths):  # the shared bases (float32 whatever the accounting's state size)
        name = f"[shared] dct {n}×{n}"
        rows.append(ParamRow(name, (n, n), None, (0,), 0, 4 * n * n, n_moments=0, has_step=False))
    return rows


def total_bytes(rows: Iterable[ParamRow], acc: Accounting = OURS) -> int:
    """Sum of :meth:`ParamRow.bytes` over ``rows``."""
    return sum(r.bytes(acc) for r in rows)


def decompose(rows: Iterable[ParamRow], acc: Accounting) -> dict[str, dict[str, int]]:
    """``{"bytes": {part: bytes}, "count": {...}}`` summed over ``rows``.

    Counts: ``params`` (= step counters), ``rng_streams``, ``absmax_scales``, ``fp32_small_tensors`` and
    ``fp32_small_elements`` (moments an int8 storage keeps float32), ``moment_elements``, ``proj_elements``.
    """
    parts = dict.fromkeys(("elements", "absmax", "rng", "fp32_small", "step", "policy_extras"), 0)
    count = dict.fromkeys(
        ("params", "rng_streams", "absmax_scales", "fp32_small_tensors", "fp32_small_elements",
         "moment_elements", "proj_elements"), 0,
    )  # fmt: skip
    for row in rows:
        for k, v in row.parts(acc).items():
            parts[k] += v
        count["params"] += 1
        count["moment_elements"] += row.state_elems
        count["proj_elements"] += row.proj_elems
        one = _moment_parts(row.moment_shape, row.storage(acc), acc)
        count["rng_streams"] += row.n_moments * (one.get("rng", 0) // RNG_BYTES)
        count["absmax_scales"] += row.n_moments * (one.get("absmax", 0) // 4)
        if "fp32_small" in one:
            count["fp32_small_tensors"] += row.n_moments
            count["fp32_small_elements"] += row.state_elems
    return {"bytes": parts, "count": count}


def _tensors(obj: object) -> Iterable[Tensor]:
    if isinstance(obj, Tensor) and hasattr(obj, "__tensor_flatten__"):
        # a wrapper subclass (torchao's OptimState8bit: int8 codes + scales + a code map) owns no storage
        # of its own: count the plain tensors it is made of
        names, _ = obj.__tensor_flatten__()
        for name in names:
            yield from _tensors(getattr(obj, name))
    elif isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "ortho_matrix"):  # galore-torch / apollo-torch keep P inside a projector object
        yield from _tensors(obj.ortho_matrix)


def measured_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (nested dicts/lists included), each storage counted once.

    Projector objects of the external GaLore/APOLLO packages contribute their ``ortho_matrix``; a
    traceable tensor subclass (torchao's 8-bit states) contributes its inner tensors.

    Works for meta tensors too (``numel × element_size``; no memory is touched).
    """
    seen: set[tuple[str, int, int]] = set()
    total = 0
    for t in _tensors(dict(optimizer.state)):
        if t.device.type == "meta":
            total += t.numel() * t.element_size()
            continue
        key = (str(t.device), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def meta_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give every meta parameter a meta gradient and take one step, so lazily created state exists.

    Raises whatever the optimizer raises when its step cannot run on the meta device.
    """
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.empty_like(p)
    optimizer.step()


def plan_total_bytes(optimizer: torch.optim.Optimizer) -> int | None:
    """``optimizer.memory_plan().total_bytes`` when the optimizer has a memory plan, else None."""
    plan = getattr(optimizer, "memory_plan", None)
    return None if plan is None else int(plan().total_bytes)
