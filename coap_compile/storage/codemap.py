"""Dynamic 8-bit code maps: the value of each code, the rounding rules, the error bound.

A map is ``n`` increasing magnitude levels ``0 = m₀ < m₁ < … < m_n = 1`` (float32 numbers) for
``t = x / a`` with ``a`` the block's absmax:

* **signed** (int8 codes ``c ∈ [−127, 127]``): ``n = 127``, value ``sign(c)·m_|c|`` (−128 is never
  written; it decodes to −1);
* **unsigned** (uint8 codes ``c ∈ [0, 255]``): ``n = 255``, value ``m_c``; negative inputs clamp to 0.

Two constructions (``style``), both spanning ``D`` decades (``D = 7`` signed, ``8`` unsigned; the smallest
non-zero level is ``m₁ = 10^-(D-1)``):

* ``"decade"`` (default; dynamic exponent + linear fraction, the idea of Dettmers' dynamic tree map, our
  own parametrization): decade ``k = 0 … D−1`` below 1 holds ``c_k = 2^(D−1−k)`` levels
  ``10^-k · (0.1 + 0.9·j/c_k)``, ``j = 1 … c_k`` (``Σ c_k = 2^D − 1 = n``; finest near the block max);
* ``"log"``: log-uniform, ``m_i = 10^(−(D−1)(n−i)/(n−1))``, ``i = 1 … n`` (level ratio 1.116 signed,
  1.066 unsigned, everywhere).

**Nearest rounding** (identical in eager torch, the Triton helper and, up to ties, a float64 oracle): with
the float32 thresholds ``θ_k = fl((m_{k−1} + m_k)/2)`` the magnitude code is
``q = #{k ∈ 1…n : fl(θ_k·a) < |x|}`` (a binary search over ``θ``; no division, so a GPU's approximate
``/`` cannot change a code): the nearest level, ties to the smaller one. **Stochastic rounding** finds
the bracket ``j = #{k ∈ 1…n : fl(m_k·a) ≤ |x|}``, ``lo = fl(m_j·a)``, ``hi = fl(m_{j+1}·a)`` and steps up
iff ``fl(|x| − lo) > fl(u·fl(hi − lo))``, ``u = bits·2⁻¹⁶`` (16 random bits from :mod:`.rng`): up with
probability ``(|x| − lo)/(hi − lo)`` to within 2⁻¹⁶, so ``E[x̂] = x``. With ``floor=True`` (used with the
unsigned map, i.e. the second moment) a positive ``x`` never gets code 0 but at least ``m₁``: a
dequantized ``v`` is never 0 where the true ``v`` is not, so ``m/(√v̂ + ε)`` cannot become ``m/ε``.

**Error bound** per element, ``t = |x|/a`` in the bracket ``[m_k, m_{k+1}]``, gap ``Δ_k = m_{k+1} − m_k``::

    nearest:     |x̂ − x| ≤ a·Δ_k/2 + 2⁻²³·(|x| + |x̂|)     (the 2⁻²³ term: fp32 rounding of θ·a and m·a)
    stochastic:  |x̂ − x| ≤ a·Δ_k   + 2⁻²³·(|x| + |x̂|)
    relative (nearest, t ≥ m₁): |x̂ − x|/|x| ≤ ρ_k = Δ_k/(m_k + m_{k+1})   (worst at the bracket midpoint)
    t < m₁ with the floor: x̂ = a·m₁ (or 0 for x = 0), |x̂ − x| ≤ a·m₁

:func:`relative_gaps` lists ``ρ_k``. For ``"decade"``, inside decade ``k`` it falls from
``(0.9/c)/(0.2 + 0.9/c)`` at the bottom to ``≈ 0.45/c`` at the top (``c = c_k``): signed 6.6 % → 0.7 %
in [0.1, 1], 12.3 % → 1.4 % in [0.01, 0.1], then 22 %, 36 %, 53 %, 69 %; unsigned 3.4 % → 0.35 % in
[0.1, 1], 6.6 %, 12.3 %, …. For ``"log"`` it is constant: 5.5 % signed, 3.2 % unsigned.
(``tests/test_storage_int8.py`` checks these against the formula and the bound on random tensors.)

Decision (``benchmarks/storage_study.py int8``, moments of a tiny-LLaMA COAP run): ``"decade"`` gives a
1.95 % relative L2 error of the Adam direction against 3.24 % for ``"log"`` (unsigned second moment,
nearest rounding; the Adam direction weights every element equally, but most of each block's mass sits
in the top decade where ``"decade"`` is finer), so it is the default (:data:`DEFAULT_STYLE`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["DEFAULT_STYLE", "STYLES", "CodeMap", "CodeTables", "code_map", "relative_gaps"]

STYLES = ("decade", "log")
DEFAULT_STYLE = "decade"


def _levels(signed: bool, style: str) -> list[float]:
    """The ``n + 1`` magnitude levels in float64, ``m₀ = 0``, ``m_n = 1``."""
    d = 7 if signed else 8
    n = 2**d - 1
    if style == "decade":
        mags = []
        for k in range(d):
            c = 2 ** (d - 1 - k)
            mags += [10.0**-k * (0.1 + 0.9 * j / c) for j in range(1, c + 1)]
        mags.sort()
    elif style == "log":
        mags = [10.0 ** (-(d - 1) * (n - i) / (n - 1)) for i in range(1, n + 1)]
    else:
        raise ValueError(f"code map style must be one of {STYLES}, got {style!r}")
    assert len(mags) == n and mags[-1] == 1.0
    return [0.0, *mags]


class CodeTables(NamedTuple):
    """Device copies of a map's tables: ``thresholds`` (nearest rounding), ``values`` (decode) and
    ``levels``: the ``n + 1`` levels plus a repeated ``1.0`` (``2^L + 1`` entries; stochastic rounding
    reads ``levels[j + 1]`` for ``j ≤ n``)."""

    thresholds: Tensor
    values: Tensor
    levels: Tensor


@dataclass(frozen=True)
class CodeMap:
    """One code map (module docstring). ``levels``: float32 ``(n+1,)``; ``thresholds``: float32 table of
    ``n+1`` entries, ``thresholds[k] = θ_k`` for ``k ≥ 1`` (entry 0 unused, 0); ``values``: float32
    decode table of 256 entries indexed by ``code + offset`` (``offset`` 128 signed, 0 unsigned)."""

    signed: bool
    style: str
    levels: Tensor
    thresholds: Tensor
    values: Tensor

    @property
    def n(self) -> int:
        """Number of non-zero magnitude levels (127 or 255)."""
        return self.levels.numel() - 1

    @property
    def log2_size(self) -> int:
        """``log2(n + 1)``: the binary-search depth (7 or 8)."""
        return (self.n + 1).bit_length() - 1

    @property
    def offset(self) -> int:
        """Added to a code to index :attr:`values` (128 for int8 codes, 0 for uint8)."""
        return 128 if self.signed else 0

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    def tables(self, device: torch.device | str) -> CodeTables:
        """The lookup tables on ``device`` (cached), as passed to the kernel helpers."""
        return _tables(self.signed, self.style, str(torch.device(device)))


@functools.cache
def code_map(signed: bool, style: str = DEFAULT_STYLE) -> CodeMap:
    """The signed or unsigned map of ``style`` (cached)."""
    lv64 = _levels(signed, style)
    levels = torch.tensor(lv64, dtype=torch.float32)
    l64 = levels.double()
    thr = torch.zeros(len(lv64), dtype=torch.float64)
    thr[1:] = (l64[:-1] + l64[1:]) / 2
    thresholds = thr.float()
    if signed:
        vals = torch.empty(256, dtype=torch.float32)
        vals[128:] = levels  # codes 0 … 127
        vals[1:128] = -levels[1:].flip(0)  # codes −127 … −1
        vals[0] = -1.0  # code −128: never written
    else:
        vals = levels.clone()
    for t in (levels, thresholds, vals):
        t.requires_grad_(False)
    return CodeMap(signed, style, levels, thresholds, vals)


@functools.cache
def _tables(signed: bool, style: str, device: str) -> CodeTables:
    cm = code_map(signed, style)
    levels = torch.cat([cm.levels, cm.levels[-1:]])
    return CodeTables(cm.thresholds.to(device), cm.values.to(device), levels.to(device))


def relative_gaps(cm: CodeMap) -> Tensor:
    """``ρ_k = (m_{k+1} − m_k)/(m_{k+1} + m_k)`` for the brackets ``k = 1 … n−1`` (float64)."""
    lv = cm.levels.double()[1:]
    return (lv[1:] - lv[:-1]) / (lv[1:] + lv[:-1])
