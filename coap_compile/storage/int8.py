"""Blockwise dynamic 8-bit state storage (written here; no bitsandbytes).

**Block layout**: :mod:`.blocks` (``bh×bw`` tiles or ``1×bw`` row blocks of the state's ``R×C`` view;
stored: ``<name>.q8``, the codes at the logical shape, and ``<name>.absmax``, one float32 scale per
block; the layout is inferred from the two shapes).

**Quantize** (per block, float32): ``a = max|x|`` (unsigned map: ``max(x, 0)``), store ``a``; codes by
the nearest-level threshold search or by stochastic rounding between the bracketing levels
(:mod:`.codemap`; no division anywhere); ``a = 0`` gives codes 0. **Dequantize**: ``x̂ = fl(value[code]·a)``.
Error bound: :mod:`.codemap` (nearest ``|x̂ − x| ≤ a·Δ/2 + 2⁻²³(|x|+|x̂|)``, stochastic ``a·Δ + …``).
Stochastic rounding reads ``<name>.rng`` (int64 ``[seed, counter]``, as for bf16) and increments the
counter per store. Work is done per tensor in slabs of whole block rows (≤ :data:`CHUNK` elements), so
the float32/int64 temporaries are bounded by a slab, never a copy of all states. Non-finite inputs are
not supported (the optimizer refuses non-finite gradients first): a NaN makes its block's scale NaN.

Decisions (``benchmarks/storage_study.py``; 2-core CPU VM, torch 2.13):

* **Second moment: unsigned map with the positive floor** (``second_moment_map="unsigned"``). On the
  moments of a tiny-LLaMA COAP run after 500 steps (``int8``: 21 tensor pairs, 165k elements, low-rank
  M×r and full-rank) the relative L2 error of the Adam direction ``m̂/(√v̂ + ε)`` is 1.95 % with the
  unsigned ``v`` against 2.52 % with the signed map (the official COAP code's choice for both
  moments); the error from ``v``
  alone halves (0.94 % vs 1.88 %) and the worst element error falls from 18 % to 9.7 % of the largest
  update. The floor changes nothing there (no ``v`` below ``m₁/2`` of its block), but on heavy-tailed
  synthetic moments (gradient scale ``10^N(0, 1.5)``, ``v`` spanning > 7 decades in a block) it is what
  keeps the direction bounded: error 0.74 with the floor, 8.5·10⁵ without (``m/ε`` blow-ups), 2.1·10⁶
  signed.
* **Stochastic rounding by default** (``rounding="stochastic"``). Nearest rounding stalls an EMA exactly
  like bf16-RN, only with far wider gaps: in online least squares (``regression``, AdamW lr 1e-3, 4000
  steps) the excess risk of the last 500 steps is fp32 1.58e-3, **int8-SR 1.58e-3** (equal to 3 digits
  in every window), int8-nearest 2.30e-3 (+46 %; quantizing only ``v`` gives the same +46 %, only ``m``
  +0 %), int8-nearest with a signed ``v`` 2.48e-3. Tiny LLaMA (``llama``, validation loss after 500
  steps): seed 0 fp32 1.6478, int8-SR 1.6431, int8-nearest 1.6460, nearest + signed ``v`` 1.6161;
  seed 1 fp32 1.6547, int8-SR 1.6374, nearest + signed ``v`` 1.6552 — all within 2 % of fp32, a spread
  this small model cannot resolve further.
* First moment: signed map. States of kind ``"other"`` are refused (not a moment-like EMA).
* ``quant_block_size = 256`` (16×16 blocks for r ≥ 16): Adam-direction error 1.45 % / 1.95 % / 2.26 % /
  2.54 % at B = 64 / 256 / 1024 / 4096 for 6.3 % / 1.6 % / 0.4 % / 0.1 % of scale bytes per element.
  The 2-D blocks cost nothing against flat row-major 256-element blocks (1.95 % both).
* Code map style ``"decade"`` (:data:`.codemap.DEFAULT_STYLE`; ``"log"``: 3.24 %).
* Tensors with fewer than ``min_numel = 4096`` elements (norms, biases) stay float32 (< 16 KiB each); the
  runtime also keeps 1-D states float32 under row blocks
  (:func:`coap_compile.runtime.precision.state_storage`).
* **Block shape (issue 18): ``"rows"`` is the default** (``"tiles"`` selectable on one process; FSDP2
  needs rows).
  Measured (``storage_study.py int8``, ``benchmarks/results/precision/storage_blocks.json``; the tiny
  LLaMA's 21 moment pairs after 200 fp32 COAP steps, r = 32): Adam-direction error 1.49 % with row blocks
  (1×32 on the projected moments, 1×128 on the full-rank ones: 8.7 % scale bytes per element) against
  2.16 % with 16×16 tiles (1.6 %) and 1.67 % with 8×8 tiles at B = 64 (6.3 %); heavy-tailed synthetic
  moments 0.61 vs 0.74. Rows are more accurate per byte of scales, but for small ranks they cost more
  bytes (r = 32: 1.125 B per element against 1.016), and the end-to-end comparison on ``bench quality``
  (``benchmarks/results/precision/quality_blocks.json``: ``--dim 128 --layers 2 --seq-len 64 --steps 200
  --seeds 0,1``, final validation loss) puts them level: fp32 COAP 2.2565 ± 0.0275, int8 rows 2.2498 ±
  0.0310, int8 tiles 2.2537 ± 0.0264 (per seed rows 2.2278 / 2.2717, tiles 2.2350 / 2.2723), states
  0.676 vs 0.639 MiB. Rows are as good (better per seed, within the seed spread) for 6 % more state bytes
  at r = 32, so rows are the better default (the int8 goldens were re-recorded for the switch), and one
  layout then serves one process and every mesh. Rows are what FSDP2 requires.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import StateStorage, _check_shape, _check_value, _get, check_kind, numel, register_storage
from .blocks import (
    BLOCK_SHAPES,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_BLOCKS,
    MAX_BLOCK_SIZE,
    BlockLayout,
    block_layout,
    check_block_size,
    check_blocks,
    infer_layout,
    kernel_block_m,
)
from .codemap import DEFAULT_STYLE, STYLES, CodeMap, code_map
from .rng import RNG_SUFFIX, mix_seed, random_bits, stream_key_tensor

__all__ = [
    "BLOCK_SHAPES",
    "CHUNK",
    "DEFAULT_BLOCKS",
    "DEFAULT_BLOCK_SIZE",
    "BlockLayout",
    "Int8Storage",
    "block_layout",
    "check_block_size",
    "check_blocks",
    "dequantize",
    "infer_layout",
    "kernel_block_m",
    "quantize_",
]

#: elements per slab of the eager quantizer (bounds its temporaries).
CHUNK = 1 << 22
SECOND_MOMENT_MAPS = ("unsigned", "signed")
ROUNDINGS = ("nearest", "stochastic")
DEFAULT_ROUNDING = "stochastic"


def _slab_rows(lay: BlockLayout) -> int:
    """Rows per slab: a multiple of ``bh`` with about :data:`CHUNK` elements."""
    per = max(1, CHUNK // max(1, lay.bh * lay.grid[1] * lay.bw))
    return per * lay.bh


def _quantize_slab(
    x: Tensor, bh: int, bw: int, cm: CodeMap, floor: bool, bits: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Codes (int64, ``x``'s shape) and scales of one ``rows×cols`` float32 slab (rows a multiple of bh
    except possibly at the end); ``bits`` (int32, ``x``'s shape) selects stochastic rounding."""
    rows, cols = x.shape
    nr, nc = -(-rows // bh), -(-cols // bw)
    if not cm.signed:
        x = x.clamp_min(0.0)
    padded = nr * bh != rows or nc * bw != cols
    if padded:
        xp = x.new_zeros(nr * bh, nc * bw)
        xp[:rows, :cols] = x
    else:
        xp = x
    x4 = xp.view(nr, bh, nc, bw)
    ax = x4.abs()
    a = ax.amax(dim=(1, 3))
    a4 = a.view(nr, 1, nc, 1)
    tabs = cm.tables(x.device)
    j = torch.zeros(ax.shape, dtype=torch.int64, device=x.device)
    if bits is None:  # nearest: count the thresholds below |x|
        for s in range(cm.log2_size - 1, -1, -1):
            step = 1 << s
            j = torch.where(tabs.thresholds[j + step] * a4 < ax, j + step, j)
    else:  # stochastic: the bracket [lo, hi], then up with probability (|x| - lo)/(hi - lo)
        lv = tabs.levels
        for s in range(cm.log2_size - 1, -1, -1):
            step = 1 << s
            j = torch.where(lv[j + step] * a4 <= ax, j + step, j)
        if padded:
            bp = bits.new_zeros(nr * bh, nc * bw)
            bp[:rows, :cols] = bits
            bits = bp
        u = bits.view(ax.shape).float() * (1.0 / 65536.0)
        lo, hi = lv[j] * a4, lv[j + 1] * a4
        j = torch.where((ax - lo) > u * (hi - lo), j + 1, j)
    if floor:
        j = torch.where((x4 > 0) & (j == 0), 1, j)
    if cm.signed:
        j = torch.where(x4 < 0, -j, j)
    return j.view(nr * bh, nc * bw)[:rows, :cols], a


def quantize_(
    x: Tensor, codes: Tensor, absmax: Tensor, lay: BlockLayout, cm: CodeMap, *, floor: bool = False,
    key: Tensor | int | None = None, start: int = 0,
) -> None:  # fmt: skip
    """Quantize float32 ``x`` into the existing ``codes`` (``x``'s shape) and ``absmax`` (``lay.grid``);
    ``key`` (:func:`.rng.stream_key_tensor` of the state's ``[seed, counter]``) selects stochastic
    rounding; ``start``: the rounding index of ``x``'s first element (its global row-major index when
    ``x`` is a row shard, so a shard draws the bits the whole state would)."""
    x2 = x.reshape(lay.rows, lay.cols).float()
    c2 = codes.view(lay.rows, lay.cols)
    step = _slab_rows(lay)
    for r0 in range(0, lay.rows, step):
        xs = x2[r0 : r0 + step]
        bits = None
        if key is not None:
            bits = random_bits(key, xs.numel(), x.device, start=start + r0 * lay.cols).view(xs.shape)
        q, a = _quantize_slab(xs, lay.bh, lay.bw, cm, floor, bits)
        c2[r0 : r0 + step] = q.to(codes.dtype)
        absmax[r0 // lay.bh : r0 // lay.bh + a.shape[0]] = a


def dequantize(codes: Tensor, absmax: Tensor, lay: BlockLayout, cm: CodeMap) -> Tensor:
    """float32 values ``fl(value[code]·a)`` at ``codes``' shape."""
    vals = cm.tables(codes.device).values
    c2 = codes.view(lay.rows, lay.cols)
    out = torch.empty((lay.rows, lay.cols), dtype=torch.float32, device=codes.device)
    step = _slab_rows(lay)
    cols_b = torch.arange(lay.cols, device=codes.device) // lay.bw
    for r0 in range(0, lay.rows, step):
        c = c2[r0 : r0 + step]
        rows_b = torch.arange(r0, r0 + c.shape[0], device=codes.device) // lay.bh
        a = absmax[rows_b[:, None], cols_b[None, :]]
        out[r0 : r0 + step] = vals[c.long() + cm.offset] * a
    return out.view(codes.shape)


@register_storage
class Int8Storage(StateStorage):
    """Blockwise 8-bit states (module docstring).

    Args:
        quant_block_size: elements per block ``B`` (power of two in [16, 4096], default 256).
        second_moment_map: ``"unsigned"`` (default; uint8 codes, positive floor) or ``"signed"``.
        rounding: ``"stochastic"`` (default; adds ``<name>.rng``, int64 ``[seed, counter]``) or ``"nearest"``.
        min_numel: tensors with fewer elements are stored float32 (default 4096; 0 quantizes everything).
        style: code map construction, ``"decade"`` or ``"log"`` (:mod:`.codemap`).
        blocks: block shape, ``"rows"`` (1×bw inside a row: shard-local, any mesh) or ``"tiles"``
            (bh×bw, bw ≤ 16); a state written with the other shape loads and updates in its own layout.
    """

    name = "int8"
    #: the codes, at the state's logical shape (int8: signed map, uint8: unsigned map).
    value_suffix = ".q8"
    value_dtypes = (torch.int8, torch.uint8)
    #: the float32 per-block scales (``layout(shape).grid``, block rows × block columns).
    scale_suffix = ".absmax"
    #: stochastic rounding's ``[seed, counter]`` (:mod:`.rng`): one per state, replicated when sharded.
    rng_suffix = RNG_SUFFIX
    companion_suffixes = (scale_suffix, RNG_SUFFIX)
    replicated_suffixes = (RNG_SUFFIX,)

    @classmethod
    def owns(cls, stored, name):
        """The codes key ``name.q8`` is present (its dtype is checked by :meth:`load`); a small state kept
        float32 (``numel < min_numel``) is in the fp32 layout."""
        return name + cls.value_suffix in stored

    @classmethod
    def load_owned(cls, stored, name):
        return cls(min_numel=0).load(stored, name)

    def __init__(
        self,
        quant_block_size: int = DEFAULT_BLOCK_SIZE,
        second_moment_map: str = "unsigned",
        rounding: str = DEFAULT_ROUNDING,
        min_numel: int = 4096,
        style: str = DEFAULT_STYLE,
        blocks: str = DEFAULT_BLOCKS,
    ):
        self.quant_block_size = check_block_size(quant_block_size)
        self.blocks = check_blocks(blocks)
        if second_moment_map not in SECOND_MOMENT_MAPS:
            raise ValueError(
                f"second_moment_map must be one of {SECOND_MOMENT_MAPS}, got {second_moment_map!r}"
            )
        if rounding not in ROUNDINGS:
            raise ValueError(f"int8 rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be a non-negative int, got {min_numel!r}")
        if style not in STYLES:
            raise ValueError(f"code map style must be one of {STYLES}, got {style!r}")
        self.second_moment_map = second_moment_map
        self.rounding = rounding
        self.min_numel = min_numel
        self.style = style

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic"

    def _kind(self, name: str, kind: str) -> str:
        check_kind(kind)
        if kind == "other":
            raise ValueError(
                f"int8 storage quantizes moment-like EMA states only (kind 'first_moment' or "
                f"'second_moment'); state {name!r} is of kind 'other': store it as 'fp32' or 'bf16'"
            )
        return kind

    def code_map_for(self, kind: str) -> CodeMap:
        """The code map a state of ``kind`` is quantized with."""
        unsigned = kind == "second_moment" and self.second_moment_map == "unsigned"
        return code_map(not unsigned, self.style)

    def layout(self, shape: Sequence[int]) -> BlockLayout:
        return block_layout(shape, self.quant_block_size, self.blocks)

    def quantized(self, shape: Sequence[int]) -> bool:
        """Whether a state of ``shape`` is 8-bit (``numel ≥ min_numel``) rather than float32. With
        ``min_numel = 0`` every state is, empty ones too (an empty FSDP2 shard keeps the int8 keys of
        the other ranks: the layout does not depend on the mesh)."""
        return numel(_check_shape(shape)) >= self.min_numel

    def zeros(self, name, shape, device=None, kind="other", *, seed=0):
        self._kind(name, kind)
        dims = _check_shape(shape)
        if not self.quantized(dims):
            return {name: torch.zeros(dims, dtype=torch.float32, device=device)}
        cm = self.code_map_for(kind)
        out = {
            name + self.value_suffix: torch.zeros(dims, dtype=cm.code_dtype, device=device),
            name + self.scale_suffix: torch.zeros(self.layout(dims).grid, dtype=torch.float32, device=device),
        }
        if self.stochastic:
            out[name + self.rng_suffix] = torch.tensor(
                [mix_seed(seed, name), 0], dtype=torch.int64, device=device
            )
        return out

    def validate(self, stored, name, shape, kind="other"):
        """The base rules (codes, scales and rounding stream present with their dtypes and shapes), and
        scales ``≥ 0`` (an absmax), a rounding counter ``≥ 0``. Scales written with another block size or
        shape at this block size (a 16×16-tiles checkpoint loaded with row blocks) are accepted in the
        layout they were written with: ``load``/``store_`` keep using it. Only the other block *shape* is
        accepted, not another block size: the size is a setting the checkpoint's ``param_groups`` carry,
        and a truncated scale tensor (``absmax[:1]`` of a 256×16 state) fits a 256-row tile at size 256,
        so inferring sizes would load a corrupt checkpoint silently with wrong scales."""
        key = name + self.scale_suffix
        scales, codes = stored.get(key), stored.get(name + self.value_suffix)
        if isinstance(scales, Tensor) and isinstance(codes, Tensor) and tuple(codes.shape) == tuple(shape):
            grid = self.layout(tuple(shape)).grid
            theirs = tuple(scales.shape)
            if theirs != grid and infer_layout(shape, theirs, self.blocks, self.quant_block_size) is not None:
                if scales.dtype != torch.float32 or not bool(torch.isfinite(scales).all()):
                    raise ValueError(f"{key!r} must be finite float32 block scales, got {scales.dtype}")
                stored = {**stored, key: torch.zeros(grid, dtype=torch.float32, device=scales.device)}
                super().validate(stored, name, shape, kind)
                stored = {**stored, key: scales}
            else:
                super().validate(stored, name, shape, kind)
        else:
            super().validate(stored, name, shape, kind)
        scales = stored.get(name + self.scale_suffix)
        if scales is not None and bool((scales < 0).any()):
            raise ValueError(f"{name + self.scale_suffix!r} holds negative block scales (an absmax is >= 0)")
        rng = stored.get(name + self.rng_suffix)
        if rng is not None and int(rng[1]) < 0:
            raise ValueError(f"{name + self.rng_suffix!r} has a negative counter {int(rng[1])}")

    def _parts(self, stored: dict[str, Tensor], name: str) -> tuple[Tensor, Tensor, BlockLayout, CodeMap]:
        codes = _get(stored, name + self.value_suffix, "int8")
        absmax = _get(stored, name + self.scale_suffix, "int8")
        if codes.dtype not in (torch.int8, torch.uint8):
            raise ValueError(f"int8 state {name!r}: codes must be int8/uint8, got {codes.dtype}")
        lay = self.layout(tuple(codes.shape))
        if tuple(absmax.shape) != lay.grid:  # written with another block size or shape: its layout
            lay = infer_layout(tuple(codes.shape), tuple(absmax.shape), self.blocks) or lay
        if tuple(absmax.shape) != lay.grid or absmax.dtype != torch.float32:
            raise ValueError(
                f"int8 state {name!r}: absmax is {absmax.dtype} {tuple(absmax.shape)}, expected float32 "
                f"{lay.grid} for codes {tuple(codes.shape)} (quant_block_size={self.quant_block_size}); "
                f"no power-of-two block size in [16, {MAX_BLOCK_SIZE}] gives that grid"
            )
        return codes, absmax, lay, code_map(codes.dtype == torch.int8, self.style)

    @classmethod
    def _kept_fp32(cls, stored: dict[str, Tensor], name: str) -> bool:
        """Whether ``name`` is a small state this storage kept in float32 (no codes, a float32 tensor)."""
        t = stored.get(name)
        return not cls.owns(stored, name) and isinstance(t, Tensor) and t.dtype == torch.float32

    def load(self, stored, name):
        if self._kept_fp32(stored, name):
            return stored[name]
        codes, absmax, lay, cm = self._parts(stored, name)
        return dequantize(codes, absmax, lay, cm)

    def store_(self, stored, name, value, *, start=0):
        if self._kept_fp32(stored, name):
            t = stored[name]
            _check_value(name, value, t)
            if value is not t:
                t.copy_(value)
            return
        codes, absmax, lay, cm = self._parts(stored, name)
        _check_value(name, value, codes)
        rng = _get(stored, name + self.rng_suffix, "int8 (stochastic rounding)") if self.stochastic else None
        key = stream_key_tensor(rng) if rng is not None else None
        quantize_(value, codes, absmax, lay, cm, floor=not cm.signed, key=key, start=start)
        if rng is not None:
            rng[1].add_(1)

    def nbytes(self, shape, kind="other"):
        self._kind("(planned)", kind)
        dims = _check_shape(shape)
        if not self.quantized(dims):
            return 4 * numel(dims)
        return self.layout(dims).nbytes + (16 if self.stochastic else 0)

    def __repr__(self) -> str:
        return (
            f"Int8Storage(quant_block_size={self.quant_block_size}, second_moment_map="
            f"{self.second_moment_map!r}, rounding={self.rounding!r}, min_numel={self.min_numel}, "
            f"style={self.style!r}, blocks={self.blocks!r})"
        )
