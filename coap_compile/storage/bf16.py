"""bfloat16 state storage: states kept as bf16, every update computed in float32.

``load`` upcasts (exact); ``store_`` rounds the float32 result into the existing bf16 tensor, either

* ``rounding="nearest"`` (default): round to nearest, ties to even (torch's fp32 → bf16 cast; the Triton
  helper ``triton_src.BF16`` does the same with integer ops, since the interpreter's cast truncates), or
* ``rounding="stochastic"``: with ``u`` the fp32 bit pattern and ``b`` 16 random bits,
  ``bf16 = (u + b) & 0xFFFF0000``. For finite ``x`` between the neighbouring bf16 values ``lo < x < hi``
  this gives ``hi`` with probability exactly ``(x − lo)/(hi − lo)`` (the low 16 bits are linear in ``x``
  inside a binade, and a carry moves to the next bf16 number), so ``E[bf16(x)] = x``: unbiased. inf/NaN
  are kept as they are; finite values above the largest bf16 (3.3895e38) may round up to inf.
  ``b`` comes from :mod:`.rng`, a hash of ``(seed, counter, element index)``; ``[seed, counter]`` is the
  int64 tensor ``<name>.rng`` of the state dict, ``counter`` is incremented by every ``store_`` (on the
  tensor's device, no host sync), so a checkpoint resumes the stream bit-identically without pickling a
  generator. The stored seed is ``fmix32(seed ^ crc32(name))``; give each parameter its own ``seed``
  (e.g. its index) so that equal-named states of different parameters do not share noise.

Why this matters, and the decision (``benchmarks/storage_study.py bf16``; 2-core CPU, torch 2.13):

* **Stagnation.** An EMA ``v ← β₂·v + (1−β₂)·g²`` stops moving in bf16 with round-to-nearest once its
  increment ``(1−β₂)(g² − v)`` is below half an ulp of ``v``, i.e. ``|g² − v|/v < 2⁻⁸/(1−β₂) = 3.9`` at
  ``β₂ = 0.999``: with constant ``g = 1`` from ``v = 0``, fp32 reaches ``v = 0.632`` after 1000 steps
  (the bias-corrected ``v̂ = 1``), bf16-RN freezes at ``v = 0.0625`` after 66 steps (``v̂`` then *decays* as
  ``0.0625/(1−β₂ᵗ)``: 0.099 at step 1000, so the Adam step is ``1/√v̂ = 3.2×`` too large), bf16-SR
  gives ``v = 0.632`` (v̂ = 1.000 ± 0.004 over 1000 steps). With noisy ``g`` RN moves ``v`` only on
  spikes ``g² > 4.9·v`` (never down), a biased ratchet.
* **Training.** Linear regression (noisy least squares, 2000 AdamW steps, lr 1e-3) and a tiny LLaMA on
  the stdlib corpus with both Adam moments rounded to bf16 after every step (RN / SR) vs fp32 — the
  numbers are in :data:`STUDY_RESULTS` and the module docstring of ``benchmarks/storage_study.py``.

Decision: **stochastic rounding is the default for bf16 states** (see :data:`DEFAULT_ROUNDING`); RN stays
available. Its cost is 16 bytes per state (``<name>.rng``) and a hash per element.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import StateStorage, _check_shape, _check_value, _get, check_kind, numel, register_storage
from .rng import mix_seed, random_bits, stream_key_tensor

__all__ = ["DEFAULT_ROUNDING", "ROUNDINGS", "STUDY_RESULTS", "Bf16Storage", "round_bf16_stochastic"]

ROUNDINGS = ("nearest", "stochastic")
DEFAULT_ROUNDING = "stochastic"
#: elements per chunk of the eager stochastic rounding (bounds its int64 temporaries to ~128 MiB).
CHUNK = 1 << 22
#: filled in from ``benchmarks/storage_study.py bf16`` (see the module docstring).
STUDY_RESULTS: dict[str, object] = {}


def round_bf16_stochastic(x: Tensor, bits: Tensor) -> Tensor:
    """``x`` (float32) stochastically rounded to bfloat16 with the int32 random ``bits`` in [0, 2¹⁶)."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes a float32 tensor, got {x.dtype}")
    u = x.view(torch.int32)
    # finite x: |u| + bits < 2³¹, so the int32 add never overflows; the mask keeps the sign bit.
    r = ((u + bits) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), r, x).to(torch.bfloat16)


@register_storage
class Bf16Storage(StateStorage):
    """bfloat16 states (module docstring). ``rounding``: ``"nearest"`` or ``"stochastic"``."""

    name = "bf16"

    def __init__(self, rounding: str = DEFAULT_ROUNDING):
        if rounding not in ROUNDINGS:
            raise ValueError(f"bf16 rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.rounding = rounding

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic"

    def zeros(self, name, shape, device=None, kind="other", *, seed=0):
        check_kind(kind)
        out = {name: torch.zeros(_check_shape(shape), dtype=torch.bfloat16, device=device)}
        if self.stochastic:
            out[f"{name}.rng"] = torch.tensor([mix_seed(seed, name), 0], dtype=torch.int64, device=device)
        return out

    def load(self, stored, name):
        t = _get(stored, name, "bf16")
        if t.dtype != torch.bfloat16:
            raise ValueError(f"bf16 state {name!r} has dtype {t.dtype}")
        return t.float()

    def store_(self, stored, name, value):
        t = _get(stored, name, "bf16")
        _check_value(name, value, t)
        if not self.stochastic:
            t.copy_(value)
            return
        rng = _get(stored, f"{name}.rng", "bf16 (stochastic rounding)")
        key = stream_key_tensor(rng)
        flat, src = t.view(-1), value.reshape(-1).float()
        n = flat.numel()
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            bits = random_bits(key, hi - lo, t.device, start=lo)
            flat[lo:hi] = round_bf16_stochastic(src[lo:hi].contiguous(), bits)
        rng[1].add_(1)

    def nbytes(self, shape, kind="other"):
        check_kind(kind)
        return 2 * numel(_check_shape(shape)) + (16 if self.stochastic else 0)

    def __repr__(self) -> str:
        return f"Bf16Storage(rounding={self.rounding!r})"

