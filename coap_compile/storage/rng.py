"""Counter-based random bits for stochastic rounding: a pure function of ``(seed, counter, index)``.

No generator object exists: the random 16 bits of element ``i`` (its row-major index in the logical
state) at store number ``counter`` of a state seeded ``seed`` are, in uint32 arithmetic (mod 2³²)::

    fmix32(h) = h ^= h >> 16;  h *= 0x85EBCA6B;  h ^= h >> 13;  h *= 0xC2B2AE35;  h ^= h >> 16
    key       = fmix32(seed + fmix32(counter ^ 0x5BD1E995))
    bits(i)   = fmix32((i · 0x9E3779B9) ^ key) >> 16                      ∈ [0, 2¹⁶)

(``fmix32`` is MurmurHash3's 32-bit finalizer, a bijection on uint32 with full avalanche; ``i ↦ i·φ`` with
the odd constant φ = 0x9E3779B9 is a bijection too, so for a fixed key distinct indices give distinct
hashes.) The state needed to resume is two integers, kept as an int64 tensor ``[seed, counter]`` in the
state dict; a checkpoint restores them and the stream continues bit-identically. The same arithmetic is
three multiplies and six shifts/xors per element inside a Triton kernel (``triton_src.RNG``) and is
checked bit-for-bit against this module under the interpreter.

Eagerly torch has no wrapping uint32 multiply, so products are formed in int64 from 16-bit halves of
the constant (each partial product < 2⁴⁸, exact). ``seed``, ``counter`` and ``i`` enter mod 2³² (a
state of more than 2³² elements would reuse indices; 2³² stores at one step each is 4·10⁹ steps).

Quality check (``benchmarks/storage_study.py``, and the unbiasedness test in
``tests/test_storage_bf16.py``): the 16-bit outputs of 2²⁰ consecutive indices are uniform (χ² over 256
bins within its 99.9 % quantile) and stochastic rounding with them is unbiased to within the sampling
error.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

__all__ = [
    "M32",
    "RNG_SUFFIX",
    "fmix32",
    "fmix32_int",
    "mix_seed",
    "random_bits",
    "stream_key",
    "stream_key_tensor",
]

M32 = 0xFFFFFFFF
#: key suffix of a state's ``[seed, counter]`` tensor in a state dict (``exp_avg.rng``); one per state,
#: not laid out by the state's rows (see :attr:`coap_compile.storage.StateStorage.replicated_suffixes`).
RNG_SUFFIX = ".rng"
PHI = 0x9E3779B9
_C1, _C2, _CNT = 0x85EBCA6B, 0xC2B2AE35, 0x5BD1E995


def fmix32_int(h: int) -> int:
    """``fmix32`` on a Python int (mod 2³²)."""
    h &= M32
    h ^= h >> 16
    h = (h * _C1) & M32
    h ^= h >> 13
    h = (h * _C2) & M32
    h ^= h >> 16
    return h


def stream_key(seed: int, counter: int) -> int:
    """The per-store key ``fmix32(seed + fmix32(counter ^ 0x5BD1E995))``."""
    return fmix32_int((seed & M32) + fmix32_int((counter & M32) ^ _CNT))


def mix_seed(seed: int, name: str) -> int:
    """The 32-bit seed kept for state ``name``: ``fmix32(seed ^ crc32(name))`` (states differ by name)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return fmix32_int((seed & M32) ^ zlib.crc32(name.encode()))


def _mul32(h: Tensor, c: int) -> Tensor:
    """``h · c mod 2³²`` for an int64 tensor ``h`` in [0, 2³²) and a constant ``c`` < 2³²."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & M32


def fmix32(h: Tensor) -> Tensor:
    """``fmix32`` element-wise on an int64 tensor holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _C2)
    return h ^ (h >> 16)


def stream_key_tensor(rng: Tensor) -> Tensor:
    """:func:`stream_key` of an int64 ``[seed, counter]`` tensor, computed on its device (no host sync)."""
    seed, counter = rng[0] & M32, rng[1] & M32
    return fmix32((seed + fmix32(counter ^ _CNT)) & M32)


def random_bits(
    key: int | Tensor, numel: int, device: torch.device | str | None = None, *, start: int = 0
) -> Tensor:
    """``bits(i)`` for ``i = start … start+numel-1`` under ``key`` (an int or a 0-d int64 tensor), as int32
    values in [0, 2¹⁶)."""
    idx = torch.arange(start, start + numel, dtype=torch.int64, device=device) & M32
    h = fmix32(_mul32(idx, PHI) ^ key)
    return (h >> 16).to(torch.int32)
