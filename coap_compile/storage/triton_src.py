"""Kernel-side state storage: Triton ``@triton.jit`` helper *sources* for generated kernel files.

The code generator pastes :func:`helpers` (or the pieces) into a generated module, which must then be
written to a file and imported (``kernels.cache.load_module``). The helpers reproduce the eager storage
(:mod:`.bf16`, :mod:`.int8`) bit for bit, given the same float32 input tile (tested under the
interpreter in ``tests/test_storage_triton.py``; compiled for sm_90 there as well):

* ``_st_fmix32(h)``, ``_st_sr_bits(rng_ptr, idx)``: the counter hash of :mod:`.rng` (uint32 arithmetic);
  ``idx`` is the logical row-major element index ``row·R + col`` of the state;
* ``_st_bf16_rne(x)``, ``_st_bf16_sr(x, bits)``: float32 → nearest / stochastically rounded bf16 value,
  returned in float32 (integer ops, so the interpreter's truncating cast is never relied on);
  ``_st_bf16_store(ptrs, x, mask, rng_ptr, idx, STOCHASTIC)`` stores it as bf16;
* ``_st_q8_load(code_ptrs, scale_ptr, offs_m, offs_r, n_scale_cols, mask, val_ptr, BH, BW, SIGNED)``:
  the float32 tile ``value[code]·absmax[block]``;
* ``_st_q8_store(x, code_ptrs, scale_ptr, row0, col0, n_scale_rows, n_scale_cols, mask, tab_ptr,
  rng_ptr, idx, BLOCK_M, BLOCK_R, BH, BW, SIGNED, LOG2N, STOCHASTIC)``: per-block absmax of the (masked)
  tile via a 4-D reshape ``(BLOCK_M/BH, BH, BLOCK_R/BW, BW)``, the scales stored, the codes found by a
  binary search (``LOG2N`` gathers of ``tab[j + step]`` from a 128/256-entry table, L1-resident; ``tab``
  = ``CodeTables.thresholds`` for nearest, ``CodeTables.levels`` for stochastic rounding, which then
  gathers the bracket ``lo, hi`` and steps up iff ``|x| − lo > u·(hi − lo)``) and stored.

How K1 uses them for a state ``s`` (tile ``offs_m × offs_r``, ``row0 = pid_m·BLOCK_M``,
``col0 = pid_r·BLOCK_R``; the epilogue body between load and store is unchanged)::

    s = _st_q8_load(q_ptr + offs_m[:, None]*R + offs_r[None, :], a_ptr, offs_m, offs_r, NC, mask,
                    val_ptr, BH, BW, SIGNED)
    ...  s_new = <printed epilogue>  ...
    _st_q8_store(s_new, q_ptr + ..., a_ptr, row0, col0, NR, NC, mask, tab_ptr, rng_ptr,
                 offs_m[:, None] * R + offs_r[None, :], BLOCK_M, BLOCK_R, BH, BW, SIGNED, LOG2N, STOCHASTIC)

with ``BH, BW`` from :func:`.blocks.block_layout` ``((M, r), B)``, ``NR, NC`` its ``grid``, ``val_ptr`` and
``tab_ptr`` from ``CodeMap.tables(device)`` (``values``; ``levels`` or ``thresholds``), ``SIGNED =
code_map.signed``, ``LOG2N = code_map.log2_size`` and ``BLOCK_M`` a multiple of ``BH``
(:func:`.int8.kernel_block_m`). Every program reads and writes only its own blocks, so no
synchronisation is needed. With stochastic rounding (bf16 or int8) pass the state's ``<name>.rng``
tensor as ``rng_ptr`` (any valid pointer otherwise) and increment its counter (``rng[1] += 1``) after
the launch, as the eager ``store_`` does; ``idx`` is the logical element index (int64 is fine).

Bit-identity caveat on GPUs: the codes depend on the float32 input of ``_st_q8_store``; the printed
epilogue may be contracted into FMAs by the GPU compiler, so K1's new state can differ from the eager
update by an ulp, and an element within an ulp of a threshold may then get the neighbouring code (a
difference of one level, i.e. within the error bound). The helpers use no division and no
transcendental; nearest rounding only compares IEEE products, so it adds no such difference. Stochastic
rounding computes ``|x| − lvl·a``, which a GPU compiler may contract into an FMA (one rounding fewer),
so there too a code can differ from eager by one level with probability ~2⁻²⁴ per element; launching
with ``enable_fp_fusion=False`` removes both effects. Subnormal scales may flush to zero on GPUs.
"""

from __future__ import annotations

__all__ = ["BF16", "Q8", "RNG", "helpers"]

RNG = """\
@triton.jit
def _st_fmix32(h):
    # MurmurHash3 fmix32 on uint32 (storage/rng.py)
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return h


@triton.jit
def _st_sr_bits(rng_ptr, idx):
    # 16 random bits per element from (seed, counter) = rng_ptr[0:2] and the logical element index idx
    seed = tl.load(rng_ptr).to(tl.uint32)
    counter = tl.load(rng_ptr + 1).to(tl.uint32)
    key = _st_fmix32(seed + _st_fmix32(counter ^ 0x5BD1E995))
    h = _st_fmix32((idx.to(tl.uint32) * 0x9E3779B9) ^ key)
    return h >> 16
"""

BF16 = """\
@triton.jit
def _st_bf16_rne(x):
    # fp32 -> the nearest bf16 value (ties to even), as fp32; NaN -> canonical NaN
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, r)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _st_bf16_sr(x, bits):
    # fp32 -> bf16 value rounded up with probability (x - lo)/(hi - lo); inf/NaN as _st_bf16_rne
    u = x.to(tl.uint32, bitcast=True)
    r = ((u + bits) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where((u & 0x7F800000) == 0x7F800000, _st_bf16_rne(x), r)


@triton.jit
def _st_bf16_store(ptrs, x, mask, rng_ptr, idx, STOCHASTIC: tl.constexpr):
    if STOCHASTIC:
        y = _st_bf16_sr(x, _st_sr_bits(rng_ptr, idx))
    else:
        y = _st_bf16_rne(x)
    tl.store(ptrs, y.to(tl.bfloat16), mask=mask)  # y is a bf16 value: the cast is exact
"""

Q8 = """\
@triton.jit
def _st_q8_load(code_ptrs, scale_ptr, offs_m, offs_r, n_scale_cols, mask, val_ptr,
                BH: tl.constexpr, BW: tl.constexpr, SIGNED: tl.constexpr):
    # fp32 tile value[code] * absmax[row // BH, col // BW] (storage/int8.py)
    c = tl.load(code_ptrs, mask=mask, other=0).to(tl.int32)
    if SIGNED:
        c = c + 128
    v = tl.load(val_ptr + c)
    bi = offs_m // BH
    bj = offs_r // BW
    a = tl.load(scale_ptr + bi[:, None] * n_scale_cols + bj[None, :], mask=mask, other=0.0)
    return v * a


@triton.jit
def _st_q8_store(x, code_ptrs, scale_ptr, row0, col0, n_scale_rows, n_scale_cols, mask, tab_ptr, rng_ptr, idx,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                 SIGNED: tl.constexpr, LOG2N: tl.constexpr, STOCHASTIC: tl.constexpr):
    # per-block absmax of the masked tile, then the codes (storage/codemap.py, storage/int8.py):
    # nearest: tab = thresholds, count those below |x|; stochastic: tab = levels, bracket + random step up
    NR: tl.constexpr = BLOCK_M // BH
    NC: tl.constexpr = BLOCK_R // BW
    x = tl.where(mask, x, 0.0)
    if SIGNED:
        ax = tl.abs(x)
    else:
        ax = tl.maximum(x, 0.0)
    a = tl.max(tl.max(tl.reshape(ax, (NR, BH, NC, BW)), axis=3), axis=1)
    bi = row0 // BH + tl.arange(0, NR)
    bj = col0 // BW + tl.arange(0, NC)
    smask = (bi[:, None] < n_scale_rows) & (bj[None, :] < n_scale_cols)
    tl.store(scale_ptr + bi[:, None] * n_scale_cols + bj[None, :], a, mask=smask)
    af = tl.reshape(
        tl.broadcast_to(tl.expand_dims(tl.expand_dims(a, 1), 3), (NR, BH, NC, BW)), (BLOCK_M, BLOCK_R)
    )
    j = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
    if STOCHASTIC:
        for s in tl.static_range(LOG2N):
            t = tl.load(tab_ptr + j + (1 << (LOG2N - 1 - s)))
            j = tl.where(t * af <= ax, j + (1 << (LOG2N - 1 - s)), j)
        lo = tl.load(tab_ptr + j) * af
        hi = tl.load(tab_ptr + j + 1) * af
        u = _st_sr_bits(rng_ptr, idx).to(tl.float32) * (1.0 / 65536.0)
        j = tl.where((ax - lo) > u * (hi - lo), j + 1, j)
    else:
        for s in tl.static_range(LOG2N):
            t = tl.load(tab_ptr + j + (1 << (LOG2N - 1 - s)))
            j = tl.where(t * af < ax, j + (1 << (LOG2N - 1 - s)), j)
    if SIGNED:
        j = tl.where(x < 0.0, -j, j)
        tl.store(code_ptrs, j.to(tl.int8), mask=mask)
    else:
        j = tl.where((x > 0.0) & (j == 0), 1, j)  # positive floor of the second moment
        tl.store(code_ptrs, j.to(tl.uint8), mask=mask)
"""


def helpers(*, q8: bool = True, bf16: bool = True) -> str:
    """The helper sources to paste after ``import triton`` / ``import triton.language as tl``."""
    parts = [RNG]
    if bf16:
        parts.append(BF16)
    if q8:
        parts.append(Q8)
    return "\n\n".join(parts)
