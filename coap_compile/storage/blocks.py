"""The block layout of an int8 state (:mod:`.int8`): which elements share one float32 scale.

**Block layout.** A state of logical shape ``S`` is seen as a row-major matrix ``R×C``: ``C = S[-1]``,
``R = |S|/C`` for ``ndim ≥ 2``; a vector of ``n`` elements is the column ``n×1``; a scalar is ``1×1``.
It is cut into 2-D blocks of ``bh×bw`` elements, ``bw = min(16, next_pow2(C))``, ``bh = B/bw`` with
``B = quant_block_size`` (a power of two, 16 ≤ B ≤ 4096). Block ``(I, J)`` holds rows
``[I·bh, (I+1)·bh) ∩ [0, R)`` and columns ``[J·bw, (J+1)·bw) ∩ [0, C)``; edge blocks are partial and their
scale is the absmax of their valid elements only. Stored: ``<name>.q8``, the codes at the logical shape
``S`` in the same row-major order as the float32 state (int8 for the signed map, uint8 for the unsigned
map), and ``<name>.absmax``: float32 ``(⌈R/bh⌉, ⌈C/bw⌉)``, row-major. So::

    nbytes = |S| + 4·⌈R/bh⌉·⌈C/bw⌉        (e.g. M×r, r ≥ 16, B = 256: M·r + 4·⌈M/16⌉·⌈r/16⌉ ≈ 1.016·M·r)

**Row blocks** (``blocks="rows"``, the ``quant_blocks`` setting; issue 18): a state of ``ndim ≥ 2`` is cut
into ``1×bw`` blocks inside each row of the same ``R×C`` view, ``bw = min(B, next_pow2(C), 128)`` (128:
K1's largest ``BLOCK_R``), so ``absmax`` is ``(R, ⌈C/bw⌉)`` and ``nbytes = |S| + 4·R·⌈C/bw⌉`` (M×r,
r = 32: ``1.125·M·r``; r ≥ 128: ``≈ 1.03·M·r``). No block spans two rows, so a row shard (FSDP2's
``torch.chunk`` of the rows) holds whole blocks and its scales are its own rows of ``absmax``: the
codes and scales of a shard are those of the whole state on every mesh (with the global rounding
index, ``start`` of :func:`.int8.quantize_`) and DCP reshards them exactly. Vectors and scalars keep
the tiles layout (contiguous blocks of ``B``). ``bh = 1`` divides every ``BLOCK_M`` and ``bw | BLOCK_R``,
so K1's tiles own whole blocks in this layout too (``tests/test_kernels_storage.py``).

The block size and shape are not stored: ``(S, absmax.shape)`` determines the partition
(:func:`infer_layout`), so ``load``/``store_`` work on a state written with another block size or
shape, in its own layout. The checkpoint gate (``validate``) is narrower: it accepts the other block
*shape* at its own ``quant_block_size`` (a tiles checkpoint under row blocks), not another size (the
size is a setting the checkpoint's groups carry, and inferring it would accept a truncated scale
tensor). ``convert_state`` re-blocks explicitly.

Vectors get contiguous 1-D blocks of ``B`` (``bw = 1``). **Kernel tiles own whole blocks:** K1's tile is
``BLOCK_M × BLOCK_R`` of the row-major M×r state with ``BLOCK_R = min(max(next_pow2(r), 16), 128)`` and
``BLOCK_M`` a power of two; ``bw ≤ 16 ≤ BLOCK_R`` are powers of two so ``bw | BLOCK_R``, and ``bh | BLOCK_M``
whenever ``BLOCK_M ≥ bh`` (:func:`kernel_block_m`: 64 unless ``bh`` is larger; ``bh = 16`` for r ≥ 16 at
B = 256). Tiles start at multiples of ``BLOCK_M``/``BLOCK_R``, hence at block boundaries, for every r;
the last tile's masked elements count as 0 in its blocks' absmax, exactly like the eager padding. The
eager functions of :mod:`.int8` use this same layout and arithmetic, so the kernel helpers reproduce
their codes (``tests/test_storage_triton.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .base import _check_shape

__all__ = [
    "BLOCK_SHAPES",
    "DEFAULT_BLOCKS",
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "MAX_BLOCK_W",
    "MAX_ROW_BW",
    "BlockLayout",
    "block_layout",
    "check_block_size",
    "check_blocks",
    "infer_layout",
    "kernel_block_m",
]

DEFAULT_BLOCK_SIZE = 256
MAX_BLOCK_SIZE = 4096
MAX_BLOCK_W = 16
#: ``"rows"``: 1×bw blocks inside one row of the R×C view; ``"tiles"``: bh×bw tiles, bw ≤ 16 (docstring).
BLOCK_SHAPES = ("rows", "tiles")
DEFAULT_BLOCKS = "rows"
#: the widest row block: K1's largest ``BLOCK_R`` (a tile must own whole blocks).
MAX_ROW_BW = 128


def check_block_size(quant_block_size: object) -> int:
    """``quant_block_size`` if valid (int power of two in [16, 4096]), else a TypeError/ValueError."""
    if isinstance(quant_block_size, bool) or not isinstance(quant_block_size, int):
        raise TypeError(
            f"quant_block_size must be an int (a power of two in [16, {MAX_BLOCK_SIZE}]), "
            f"got {quant_block_size!r} ({type(quant_block_size).__name__})"
        )
    b = quant_block_size
    if b < 16 or b > MAX_BLOCK_SIZE or b & (b - 1):
        raise ValueError(
            f"quant_block_size must be a power of two in [16, {MAX_BLOCK_SIZE}] (blocks are bh×bw "
            f"sub-tiles of the kernel's power-of-two tiles), got {b!r}"
        )
    return b


def check_blocks(blocks: object) -> str:
    """``blocks`` if it is one of :data:`BLOCK_SHAPES`, else a ValueError naming it."""
    if not isinstance(blocks, str) or blocks not in BLOCK_SHAPES:
        raise ValueError(f"quant_blocks must be one of {BLOCK_SHAPES}, got {blocks!r}")
    return blocks


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class BlockLayout:
    """The block layout of one state: matrix view ``rows×cols``, blocks ``bh×bw``, scale grid shape."""

    rows: int
    cols: int
    bh: int
    bw: int

    @property
    def grid(self) -> tuple[int, int]:
        """Shape of the ``absmax`` tensor: ``(⌈rows/bh⌉, ⌈cols/bw⌉)``."""
        return -(-self.rows // self.bh), -(-self.cols // self.bw)

    @property
    def nbytes(self) -> int:
        g = self.grid
        return self.rows * self.cols + 4 * g[0] * g[1]


def block_layout(
    shape: Sequence[int], quant_block_size: int = DEFAULT_BLOCK_SIZE, blocks: str = DEFAULT_BLOCKS
) -> BlockLayout:
    """The :class:`BlockLayout` of a state of ``shape`` (module docstring): ``blocks="rows"`` gives a
    ≥ 2-D state ``1×min(B, next_pow2(C), 128)`` blocks; vectors and scalars are laid out as with tiles."""
    b = check_block_size(quant_block_size)
    dims = _check_shape(shape)
    if len(dims) >= 2:
        cols = dims[-1]
        rows = math.prod(dims[:-1])
        if check_blocks(blocks) == "rows":
            return BlockLayout(rows, cols, 1, min(b, _next_pow2(cols), MAX_ROW_BW))
    else:
        rows, cols = (dims[0], 1) if dims else (1, 1)
    bw = min(MAX_BLOCK_W, _next_pow2(cols))
    return BlockLayout(rows, cols, b // bw, bw)


def infer_layout(
    shape: Sequence[int], grid: tuple[int, ...], prefer: str = DEFAULT_BLOCKS, block: int | None = None
) -> BlockLayout | None:
    """The layout a stored state was written with, from its code shape and ``absmax`` grid (None if no
    block shape and size fits; ``prefer``'s shape is tried first). Unique: within one shape the partition
    is fixed by the grid (tiles: ``bw`` from the shape and ``⌈R/bh⌉``, two powers of two ``bh`` giving
    the same ``⌈R/bh⌉`` only when both are ≥ R, i.e. one block row; rows: ``bh = 1`` and ``⌈C/bw⌉``,
    distinct for the powers of two ``bw ≤ next_pow2(C)``). Across shapes a rows grid ``(R, ·)`` equals a
    tiles grid ``(⌈R/bh⌉, ·)`` for ``R > 1`` only when ``bh = 1`` (tiles of 1×16 at B = 16), and then
    both are 1×16 blocks: one grid, one partition. ``block``: try that block size only."""
    sizes = [block] if block is not None else [1 << k for k in range(4, MAX_BLOCK_SIZE.bit_length())]
    for style in (prefer, *(x for x in BLOCK_SHAPES if x != prefer)):
        for b in sizes:
            lay = block_layout(shape, b, style)
            if lay.grid == tuple(grid):
                return lay
    return None


def kernel_block_m(
    r: int, quant_block_size: int = DEFAULT_BLOCK_SIZE, default: int = 64, blocks: str = DEFAULT_BLOCKS
) -> int:
    """The K1 ``BLOCK_M`` for an M×r int8 state: ``max(default, bh)`` (a tile must own whole blocks)."""
    return max(default, block_layout((2, r), quant_block_size, blocks).bh)
