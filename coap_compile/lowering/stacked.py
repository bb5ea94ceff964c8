"""Storage load/store on a matrix group's stacked states: ``K`` members at once, each with its own bits.

A matrix group (:mod:`coap_compile.runtime.grouped`) keeps every *physical* key of a state stacked on a
leading member axis: for a state ``s`` of per-member logical shape ``S``

=========  =====================================================================================
precision  stacked keys
=========  =====================================================================================
``fp32``   ``s``: ``K×S`` float32 (float64)
``bf16``   ``s``: ``K×S`` bfloat16; stochastic rounding: ``s.rng`` ``K×2`` int64 (one stream each)
``int8``   ``s.q8``: ``K×S`` codes; ``s.absmax``: ``K×⌈R/bh⌉×⌈C/bw⌉``; ``s.rng``: ``K×2`` int64
=========  =====================================================================================

:func:`load_stacked` and :func:`stored_stacked` are the storages' ``load`` / ``store_``
(:mod:`coap_compile.storage.bf16`, :mod:`coap_compile.storage.int8`) written over that member axis, with
the same per-element arithmetic, so every member gets exactly the bits of its per-matrix store:

* bf16 stochastic rounding: member ``k``'s bits are ``fmix32((i·φ) ^ key_k) >> 16`` with ``i`` the
  row-major index *within the member* and ``key_k`` its own ``[seed, counter]``
  (:mod:`coap_compile.storage.rng`);
  every member's counter advances by one per store;
* int8: each member's blocks are its own ``bh×bw`` blocks (padding per member, never across members), the
  scale is their absmax, the code search, stochastic bracket test and positive floor are the same ``where``
  chain as :func:`coap_compile.storage.int8._quantize_slab`; dequantization is ``value[code]·a`` per element.

Both functions are pure (new tensors out, nothing written): the caller writes the results after the
weight (the compute-before-write contract of :mod:`coap_compile.runtime.update`), and Inductor can fuse
them with the derived update into one loop (:mod:`.inductor`). ``tests/test_grouped_storage.py`` checks
``torch.equal`` against the per-matrix storages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..storage import StateStorage
from ..storage.bf16 import round_bf16_stochastic
from ..storage.int8 import block_layout
from ..storage.rng import M32, PHI, _mul32, fmix32, stream_key_tensor

__all__ = ["StackedSpec", "load_stacked", "stacked_spec", "stored_stacked"]


@dataclass(frozen=True, eq=False)
class StackedSpec:
    """One logical state of a group's members: ``precision`` is the physical layout (``fp32``, ``bf16``,
    ``int8``; an int8 state below ``min_numel`` is ``fp32``), ``keys`` its physical keys with their
    per-member ``shapes``/``dtypes`` (what :meth:`StateStorage.zeros` lays out), ``stochastic`` whether it
    has a rounding stream, ``block`` the int8 block size and ``signed`` the int8 code map."""

    name: str
    precision: str
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    shape: tuple[int, ...]
    stochastic: bool = False
    block: int = 0
    signed: bool = True
    style: str = ""
    storage: StateStorage | None = None
    #: int8: the block layout, the code map and its tables on the group's device (resolved here, outside
    #: any traced function: Dynamo would trace through their caches)
    layout: Any = None
    codemap: Any = None
    tables: Any = None
    inverse: Any = None  # int8: (nearest, stochastic) cell → count tables of :func:`_count`

    def matches(self, tensors: dict[str, Tensor]) -> bool:
        """Whether a member's entries have exactly this layout (keys, shapes, dtypes)."""
        for key, shape, dtype in zip(self.keys, self.shapes, self.dtypes):
            t = tensors.get(key)
            if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                return False
        return True


def stacked_spec(
    name: str, storage: StateStorage, kind: str, shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> StackedSpec:
    """The :class:`StackedSpec` of state ``name`` of per-member ``shape`` under ``storage`` on ``device``."""
    meta = storage.zeros(name, shape, "meta", kind)
    keys = tuple(meta)
    shapes = tuple(tuple(t.shape) for t in meta.values())
    dtypes = tuple(t.dtype for t in meta.values())
    precision = "fp32" if keys == (name,) and meta[name].is_floating_point() and meta[name].dtype in (
        torch.float32, torch.float64) else storage.name  # fmt: skip
    stochastic = any(k.endswith(".rng") for k in keys)
    block, signed, style, lay, cm, tables, inverse = 0, True, "", None, None, None, None
    if precision == "int8":
        block, style = storage.quant_block_size, storage.style
        cm = storage.code_map_for(kind)
        signed, lay, tables = cm.signed, block_layout(shape, block, storage.blocks), cm.tables(device)
        n = (1 << cm.log2_size) - 1
        host = cm.tables("cpu")  # (a meta-device group has meta tables: no data to search)
        pairs = ((host.thresholds, False), (host.levels, True))
        inverse = tuple(_inverse(t[1 : n + 1], right).to(device) for t, right in pairs)
    return StackedSpec(name, precision, keys, shapes, dtypes, tuple(shape), stochastic, block, signed, style,
                       storage, lay, cm, tables, inverse)  # fmt: skip


def load_stacked(spec: StackedSpec, parts: dict[str, Tensor]) -> Tensor:
    """The float32 values ``K×S`` of the stacked state (``parts``: its stacked physical keys)."""
    if spec.precision == "fp32":
        return parts[spec.name]
    if spec.precision == "bf16":
        return parts[spec.name].float()
    lay, cm = spec.layout, spec.codemap
    codes, absmax = parts[spec.name + ".q8"], parts[spec.name + ".absmax"]
    k = codes.shape[0]
    vals = spec.tables.values
    rows_b = torch.arange(lay.rows, device=codes.device) // lay.bh
    cols_b = torch.arange(lay.cols, device=codes.device) // lay.bw
    a = absmax[:, rows_b[:, None], cols_b[None, :]]
    out = vals[codes.view(k, lay.rows, lay.cols).long() + cm.offset] * a
    return out.view(codes.shape)


def _keys(rng: Tensor) -> Tensor:
    """The ``K`` per-store keys of ``K×2`` ``[seed, counter]`` streams (:func:`.rng.stream_key_tensor`)."""
    return stream_key_tensor(rng.t())


def _bits(rng: Tensor, numel: int) -> Tensor:
    """``K×numel`` int32 random bits: member ``k``'s stream at indices ``0…numel−1``."""
    idx = torch.arange(numel, dtype=torch.int64, device=rng.device) & M32

    h = fmix32(_mul32(idx, PHI)[None, :] ^ _keys(rng)[:, None])
    return (h >> 16).to(torch.int32)


def _advance(rng: Tensor) -> Tensor:
    return rng + torch.tensor([0, 1], dtype=rng.dtype, device=rng.device)


def stored_stacked(spec: StackedSpec, parts: dict[str, Tensor], value: Tensor) -> dict[str, Tensor]:
    """The stacked physical tensors holding ``value`` (``K×S`` float32) as ``K`` per-member ``store_``
    calls would write them (module docstring): new tensors, rounding streams advanced by one."""
    if spec.precision == "fp32":
        return {spec.name: value}
    k = value.shape[0]
    if spec.precision == "bf16":
        if not spec.stochastic:
            return {spec.name: value.to(torch.bfloat16)}
        rng = parts[spec.name + ".rng"]
        flat = value.reshape(k, -1).float().contiguous()
        q = round_bf16_stochastic(flat, _bits(rng, flat.shape[1]))
        return {spec.name: q.view(value.shape), spec.name + ".rng": _advance(rng)}
    lay, cm = spec.layout, spec.codemap
    rng = parts.get(spec.name + ".rng") if spec.stochastic else None
    x = value.reshape(k, lay.rows, lay.cols).float()
    bits = None if rng is None else _bits(rng, lay.rows * lay.cols).view(k, lay.rows, lay.cols)
    codes, absmax = _quantize(x, lay.bh, lay.bw, cm, spec.tables, spec.inverse, bits)
    out = {spec.name + ".q8": codes.to(cm.code_dtype).view(value.shape), spec.name + ".absmax": absmax}
    if rng is not None:
        out[spec.name + ".rng"] = _advance(rng)
    return out


#: the inverse table's cells: float32 bit patterns >> 14 (9 mantissa bits: 0.2 % wide, below the
#: smallest relative gap between a code map's levels, 0.7 %); cells up to that of 1.0.
_CELL_SHIFT = 14
_CELLS = (0x3F800000 >> _CELL_SHIFT) + 1


def _inverse(table: Tensor, right: bool) -> Tensor:
    """``inv[c]`` = how many entries of ``table`` are ``≤`` (``right``) / ``<`` the float32 whose bits are
    ``c << 14``: the estimate ``q₀`` of :func:`_count` (built once per spec, outside any trace).

    int32, not int16 (260 KB per table instead of 130 KB): Inductor's C++ vectorizer does not vectorize a
    loop that gathers from an int16 table, so :func:`_count` ran as a scalar loop; with int32 the fused int8
    update of a ``12×688×64`` chunk (3 int8 states, 1 thread) took a median 39 ms against 49 ms
    (min 34 vs 41 ms; 60 interleaved calls, load 3–5, 2-core Xeon; the stored codes bit-identical)."""
    starts = (torch.arange(_CELLS, dtype=torch.int32) << _CELL_SHIFT).view(torch.float32)
    return torch.searchsorted(table, starts, right=right).to(torch.int32)


def _count(table: Tensor, inv: Tensor, a: Tensor, ax: Tensor, right: bool) -> Tensor:
    """Per element of ``ax`` (``K×nr×bh×nc×bw``, block scales ``a``: ``K×nr×nc``), ``q``, how many of the
    ``n`` values ``fl(table_k·a)`` are ``< |x|`` (``right``: ``≤``): the count the binary search of
    :func:`coap_compile.storage.int8._quantize_slab` reaches (``fl(t·a)`` is non-decreasing in ``t``).

    Computed as ``q₀`` = the count at the start of the 0.2 %-wide cell holding ``fl(|x|/a)`` (a table
    lookup on its float bits, :func:`_inverse`) and one exact correction each way: ``fl(|x|/a)`` and
    ``fl(t·a)`` are within 2⁻²⁴ relative of the exact values, and adjacent levels/thresholds of a code map
    are ≥ 0.7 % apart, so at most one ``table_k`` lies in the cell or compares differently and
    ``|q₀ − q| ≤ 1``; the corrections
    compare ``fl(table_k·a)`` with ``|x|`` exactly as the storage does, so ``q`` is bit-identical (tested;
    it assumes ``fl(table_1·a)`` is a normal float, i.e. block absmax ≳ 1e-31). ``a = 0`` gives the
    search's answer: 0 for ``<``, ``n`` for ``≤``. Why not the search itself: Inductor inlines its levels
    into one expression (a ``where`` chain took minutes to lower and ran slower than eager;
    ``searchsorted`` over the blocks and ``bucketize`` ran as ATen fallbacks, 26–30 ms per demo group),
    while a table lookup is one fused load."""
    k, nr, _, nc, _ = ax.shape
    a5 = a.view(k, nr, 1, nc, 1)
    n = table.shape[0]
    pos = a5 > 0
    u = torch.where(pos, ax / torch.where(pos, a5, 1.0), 0.0)
    cell = (u.view(torch.int32) >> _CELL_SHIFT).clamp(0, _CELLS - 1)
    j0 = inv[cell.long()].long()

    def below(t: Tensor) -> Tensor:
        return t <= ax if right else t < ax

    up = (j0 < n) & below(table[j0.clamp(max=n - 1)] * a5)
    down = (j0 > 0) & ~below(table[(j0 - 1).clamp(min=0)] * a5)
    j = j0 + up.to(torch.int64) - down.to(torch.int64)
    return torch.where(pos, j, n if right else 0)


def _quantize(x: Tensor, bh: int, bw: int, cm, tabs, inv, bits: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`coap_compile.storage.int8._quantize_slab` over a leading member axis (``x``: ``K×R×C``), with
    the positive floor for the unsigned map (as ``Int8Storage.store_``)."""
    floor = not cm.signed
    k, rows, cols = x.shape
    nr, nc = -(-rows // bh), -(-cols // bw)
    if not cm.signed:
        x = x.clamp_min(0.0)
    padded = nr * bh != rows or nc * bw != cols
    if padded:
        x = torch.nn.functional.pad(x, (0, nc * bw - cols, 0, nr * bh - rows))
    x5 = x.view(k, nr, bh, nc, bw)
    ax = x5.abs()
    a = ax.amax(dim=(2, 4))
    a5 = a.view(k, nr, 1, nc, 1)
    n = (1 << cm.log2_size) - 1
    if bits is None:  # nearest: q = #{k ≥ 1 : fl(θ_k·a) < |x|}
        j = _count(tabs.thresholds[1 : n + 1], inv[0], a, ax, right=False)
    else:  # stochastic: the bracket j = #{k ≥ 1 : fl(m_k·a) ≤ |x|}, then up w.p. (|x| - lo)/(hi - lo)
        lv = tabs.levels
        j = _count(lv[1 : n + 1], inv[1], a, ax, right=True)
        if padded:
            bits = torch.nn.functional.pad(bits, (0, nc * bw - cols, 0, nr * bh - rows))
        u = bits.view(ax.shape).float() * (1.0 / 65536.0)
        lo, hi = lv[j] * a5, lv[j + 1] * a5
        j = torch.where((ax - lo) > u * (hi - lo), j + 1, j)
    if floor:
        j = torch.where((x5 > 0) & (j == 0), 1, j)
    if cm.signed:
        j = torch.where(x5 < 0, -j, j)
    return j.view(k, nr * bh, nc * bw)[:, :rows, :cols], a
