"""The int8 code search as one table lookup: ``q = #{k : fl(t_k·a) < |x|}`` (or ``≤``) per element.

:func:`coap_compile.storage.int8._quantize_slab` finds an element's code by a binary search over the
products ``fl(t_k·a)`` of a code map's sorted table ``t`` (thresholds for nearest rounding, levels for
the stochastic bracket) with its block's scale ``a``. Fused by Inductor (:mod:`.inductor`), a search
becomes a chain of ``where`` levels that took minutes to lower and ran slower than eager;
``searchsorted`` over the blocks and ``bucketize`` ran as ATen fallbacks (26–30 ms per demo group). So the
stacked lowering (:mod:`.stacked`) reads the answer from a table instead (``base`` is int32, not int16:
Inductor's C++ vectorizer leaves a loop that gathers from an int16 table scalar):

* **cells.** ``u = fl(|x|/a)`` lies in ``[0, 1]``; its float32 bits ``>> 14`` name a *cell*, a run of
  2¹⁴ consecutive floats (9 mantissa bits kept: at most 2⁻⁹ ≈ 0.2 % wide relative to its start), up
  to the cell of ``1.0``: 65 025 cells.
* **base and critical entry.** For each cell, ``base`` is the count of entries ``t_k`` below the cell
  (``<``, or ``≤`` for ``right``) and ``crit`` is the one entry whose comparison can go either way for
  some ``x`` of the cell, or ``+∞``. Then ``q = base + [fl(crit·a) < |x|]``.

**Why one entry decides, exactly.** ``fl(|x|/a)`` and ``fl(t·a)`` are within 2⁻²⁴ relative of the
exact values (normal floats: block scales ≳ 1e-31, as the storage's own search assumes), so for ``u``
in a cell ``[s, e)`` the comparison ``fl(t·a) < |x|`` is already decided — true — when
``t ≤ s·(1 − 2⁻¹⁸)``, and decided false when ``t ≥ e·(1 + 2⁻¹⁸)``. An undecided entry therefore lies
in ``(s·(1 − 2⁻¹⁸), e·(1 + 2⁻¹⁸))``, a window about 0.2 % wide, and adjacent entries of every code map
are ≥ 0.7 % apart (:func:`coap_compile.storage.codemap.relative_gaps`), so each cell has at most one;
:func:`cell_tables` asserts it while building. ``base`` counts the entries below the window and
``crit`` is the undecided one, compared as the storage compares it (``fl(crit·a)`` against ``|x|``), so
``q`` is the search's count bit for bit (``tests/test_codesearch.py`` against the broadcast count, and
``tests/test_grouped_storage.py`` against the per-matrix storage).

**Measured** (Inductor C++, 1 thread, a ``12×688×64`` stacked int8 store with row blocks and its rounding
bits given, bounds asserts off in both, 2-core Xeon):
the earlier form — an inverse table ``q₀`` plus one exact correction each way, three dependent gathers —
took 6.1–6.7 ns per element for nearest rounding and 8.5–8.8 ns for stochastic; this one 3.4–3.8 and
5.7–6.6 ns, with bit-identical codes. Inductor gathers element by element, so a gather saved is most of
an element's cost.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from ..storage.codemap import code_map

__all__ = ["CELL_SHIFT", "CELLS", "CellTables", "cell_tables", "count"]

#: a cell is the float32 bit patterns sharing ``bits >> CELL_SHIFT`` (module docstring)
CELL_SHIFT = 14
#: cells up to and including the one of ``1.0``
CELLS = (0x3F800000 >> CELL_SHIFT) + 1
#: relative margin around a cell within which an entry's comparison may depend on rounding (≫ 2⁻²³)
_MARGIN = 2.0**-18


class CellTables(NamedTuple):
    """Per cell: ``base`` (int32) the count of entries decided below the cell, ``crit`` (float32) the one
    undecided entry or ``+∞``."""

    base: Tensor
    crit: Tensor


def _build(table: Tensor, right: bool) -> CellTables:
    n = table.numel()
    edges = (torch.arange(CELLS + 1, dtype=torch.int64) << CELL_SHIFT).to(torch.int32).view(torch.float32)
    start, end = edges[:-1].double(), edges[1:].double()
    j0 = torch.searchsorted(table, edges[:-1], right=right).long()  # entries below (at) each cell start
    t = table.double()
    below = (j0 > 0) & (t[(j0 - 1).clamp(min=0)] > start * (1 - _MARGIN))
    above = (j0 < n) & (t[j0.clamp(max=n - 1)] < end * (1 + _MARGIN))
    if bool((below & above).any()):
        raise AssertionError("two code-map entries in one cell: the map's gaps are below the cell width")
    base = j0 - below.long()
    crit = torch.where(below | above, table[base.clamp(max=n - 1)], torch.tensor(float("inf")))
    return CellTables(base.to(torch.int32), crit.float())


@functools.cache
def cell_tables(signed: bool, style: str, stochastic: bool, device: str) -> CellTables:
    """The cell tables of a code map's search on ``device`` (cached): nearest rounding counts thresholds
    ``θ_k < |x|``, stochastic rounding's bracket counts levels ``m_k ≤ |x|`` (``k = 1 … n``). Built on
    the CPU (a meta device has no data to search) and moved."""
    cm = code_map(signed, style)
    n = cm.n
    table = cm.levels[1 : n + 1] if stochastic else cm.thresholds[1 : n + 1]
    built = _build(table, right=stochastic)
    return CellTables(built.base.to(device), built.crit.to(device))


def count(cells: CellTables, a: Tensor, ax: Tensor, right: bool, n: int) -> Tensor:
    """Per element of ``ax = |x|`` with block scales ``a`` (broadcast to ``ax``), the number ``q`` (int32)
    of entries ``t_k`` (``k = 1 … n``) with ``fl(t_k·a) < |x|`` (``right``: ``≤``). ``a = 0`` gives the
    search's answer: 0 for ``<``, ``n`` for ``≤``."""
    pos = a > 0
    u = torch.where(pos, ax / torch.where(pos, a, 1.0), 0.0)
    cell = (u.view(torch.int32) >> CELL_SHIFT).clamp(0, CELLS - 1)
    c = cells.crit[cell] * a
    hit = c <= ax if right else c < ax
    q = cells.base[cell] + hit.to(torch.int32)
    return torch.where(pos, q, n if right else 0)
