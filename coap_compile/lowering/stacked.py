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
from .codesearch import cell_tables, count

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
    cells: Any = None  # int8: the code search's cell tables (:mod:`.codesearch`), nearest or stochastic

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
    block, signed, style, lay, cm, tables, cells = 0, True, "", None, None, None, None
    if precision == "int8":
        block, style = storage.quant_block_size, storage.style
        cm = storage.code_map_for(kind)
        signed, lay, tables = cm.signed, block_layout(shape, block, storage.blocks), cm.tables(device)
        cells = cell_tables(cm.signed, cm.style, stochastic, str(torch.device(device)))
    return StackedSpec(name, precision, keys, shapes, dtypes, tuple(shape), stochastic, block, signed, style,
                       storage, lay, cm, tables, cells)  # fmt: skip


def load_stacked(spec: StackedSpec, parts: dict[str, Tensor]) -> Tensor:
    """The float32 values ``K×S`` of the stacked state (``parts``: its stacked physical keys)."""
    if spec.precision == "fp32":
        return parts[spec.name]
    if spec.precision == "bf16":
        return parts[spec.name].float()
    lay, cm = spec.layout, spec.codemap
    codes, absmax = parts[spec.name + ".q8"], parts[spec.name + ".absmax"]
    k, vals = codes.shape[0], spec.tables.values
    nr, nc = lay.grid
    # int32 indices and, where the blocks tile the state exactly, the scales as a broadcast view: Inductor
    # gathers element by element, and an int64 code index plus a gathered scale took 3.0 ns per element
    # against 1.6 ns (12×688×64 row blocks, 1 thread; the same products, so the same bits)
    if nr * lay.bh == lay.rows and nc * lay.bw == lay.cols:
        idx = codes.view(k, nr, lay.bh, nc, lay.bw).to(torch.int32) + cm.offset
        return (vals[idx] * absmax.view(k, nr, 1, nc, 1)).view(codes.shape)
    rows_b = torch.arange(lay.rows, device=codes.device) // lay.bh
    cols_b = torch.arange(lay.cols, device=codes.device) // lay.bw
    a = absmax[:, rows_b[:, None], cols_b[None, :]]
    out = vals[codes.view(k, lay.rows, lay.cols).to(torch.int32) + cm.offset] * a
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
    codes, absmax = _quantize(x, lay.bh, lay.bw, cm, spec.tables, spec.cells, bits)
    out = {spec.name + ".q8": codes.to(cm.code_dtype).view(value.shape), spec.name + ".absmax": absmax}
    if rng is not None:
        out[spec.name + ".rng"] = _advance(rng)
    return out


def _quantize(x: Tensor, bh: int, bw: int, cm, tabs, cells, bits: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`coap_compile.storage.int8._quantize_slab` over a leading member axis (``x``: ``K×R×C``), with
    the positive floor for the unsigned map (as ``Int8Storage.store_``); the search is a cell-table
    lookup (:func:`.codesearch.count`, ``cells`` of the rounding mode: ``bits`` given or not)."""
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
        j = count(cells, a5, ax, False, n)
    else:  # stochastic: the bracket j = #{k ≥ 1 : fl(m_k·a) ≤ |x|}, then up w.p. (|x| - lo)/(hi - lo)
        lv = tabs.levels
        j = count(cells, a5, ax, True, n)
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
