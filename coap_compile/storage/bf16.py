"""bfloat16 state storage: states kept as bf16, every update computed in float32.

``load`` upcasts (exact); ``store_`` rounds the float32 result into the existing bf16 tensor, either

* ``rounding="nearest"``: round to nearest, ties to even (torch's fp32 → bf16 cast; the Triton
  helper ``triton_src.BF16`` does the same with integer ops, since the interpreter's cast truncates), or
* ``rounding="stochastic"`` (default): with ``u`` the fp32 bit pattern and ``b`` 16 random bits,
  ``bf16 = (u + b) & 0xFFFF0000``. For finite ``x`` between the neighbouring bf16 values ``lo < x < hi``
  this gives ``hi`` with probability exactly ``(x − lo)/(hi − lo)`` (the low 16 bits are linear in ``x``
  inside a binade, and a carry moves to the next bf16 number), so ``E[bf16(x)] = x``: unbiased. inf/NaN
  are kept as they are; finite values above the largest bf16 (3.3895e38) may round up to inf.
  ``b`` comes from :mod:`.rng`, a hash of ``(seed, counter, element index)``; ``[seed, counter]`` is the
  int64 tensor ``<name>.rng`` of the state dict, ``counter`` is incremented by every ``store_`` (on the
  tensor's device, no host sync), so a checkpoint resumes the stream bit-identically without pickling a
  generator. The stored seed is ``fmix32(seed ^ crc32(name))``; give each parameter its own ``seed``
  (e.g. its index) so that equal-named states of different parameters do not share noise.

Why this matters, and the decision (``benchmarks/storage_study.py``; 2-core CPU VM, torch 2.13):

* **Stagnation** (``stagnation``). An EMA ``v ← β₂·v + (1−β₂)·g²`` stops moving in bf16 under
  round-to-nearest once ``(1−β₂)|g² − v|`` is below half an ulp of ``v`` (2⁻⁹…2⁻⁸ of ``v``), i.e.
  ``|g²/v − 1| < 1.95…3.9`` at ``β₂ = 0.999``. Constant ``g = 1`` from ``v = 0`` (4096 elements):
  fp32 reaches ``v = 0.632`` at step 1000 (``v̂ = v/(1−β₂ᵗ) = 1``); **bf16-RN freezes at v = 0.25
  after step 256**, so ``v̂`` decays: 0.395 at step 1000, 0.263 at 3000 (the Adam step ``1/√v̂`` is 1.6×
  and 1.9× too large); bf16-SR: ``v̂ = 1.000`` (element std 0.034) at 1000 and 3000. Noisy
  ``g ~ N(0, 1)``: RN can never decrease ``v`` (``g² ≥ 0``) and raises it only on spikes ``g² ≳ 3v``, a
  ratchet: ``v̂ = 1.057`` at 1000, ``1.303`` at 3000; SR ``1.0007``, ``1.0004``; fp32 ``1.0004``, ``1.0001``.
* **Online least squares** (``regression``: fresh ``x ~ N(0, I₂₅₆)``, 16 outputs, AdamW lr 1e-3, 4000
  steps, excess risk over the last 500 steps): fp32 1.58e-3, **bf16-SR 1.58e-3** (equal to 3 digits in
  every window), bf16-RN 0.645e-3 — RN's ``v`` stays at its large early values, which acts as a smaller
  learning rate: a 59 % departure from the fp32 optimizer (that it happens to lower the risk here is
  an accident of the problem, not a property of RN).
* **Tiny LLaMA** (``llama``: d=128, 2 layers, COAP-AdamW reference at r = 32, 500 steps, validation
  loss): seed 0 fp32 1.6478, bf16-RN 1.6470, bf16-SR 1.6434; seed 1 fp32 1.6547, bf16-SR 1.6539. At
  this size and horizon every variant lands within 2 % of fp32 (int8 ones included), so it cannot rank
  them; it shows no quality cost of bf16 states.
* The Adam direction ``m̂/(√v̂ + ε)`` computed from bf16 (RN) moments of that run is off by 0.19 %
  (relative L2), ten times less than int8 (``int8``).

Decision: **stochastic rounding is the default for bf16 states** (:data:`DEFAULT_ROUNDING`): it is the
only rounding that keeps the fp32 optimizer's behaviour once ``t`` exceeds ~256 steps; RN stays
available. Its cost: 16 bytes per state (``<name>.rng``) and one integer hash per element per store.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import StateStorage, _check_shape, _check_value, _get, check_kind, numel, register_storage
from .rng import RNG_SUFFIX, mix_seed, random_bits, stream_key_tensor

__all__ = ["DEFAULT_ROUNDING", "ROUNDINGS", "Bf16Storage", "round_bf16_stochastic"]

ROUNDINGS = ("nearest", "stochastic")
DEFAULT_ROUNDING = "stochastic"
#: elements per chunk of the eager stochastic rounding (bounds its int64 temporaries to ~128 MiB).
CHUNK = 1 << 22


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
    value_dtypes = (torch.bfloat16,)
    #: stochastic rounding's ``[seed, counter]`` (:mod:`.rng`): one per state, replicated when sharded.
    rng_suffix = RNG_SUFFIX
    companion_suffixes = (RNG_SUFFIX,)
    replicated_suffixes = (RNG_SUFFIX,)

    @classmethod
    def load_owned(cls, stored, name):
        return stored[name].float()

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
            out[name + self.rng_suffix] = torch.tensor(
                [mix_seed(seed, name), 0], dtype=torch.int64, device=device
            )
        return out

    def load(self, stored, name):
        t = _get(stored, name, "bf16")
        if t.dtype != torch.bfloat16:
            raise ValueError(f"bf16 state {name!r} has dtype {t.dtype}")
        return t.float()

    def store_(self, stored, name, value, *, start=0):
        t = _get(stored, name, "bf16")
        _check_value(name, value, t)
        if not self.stochastic:
            t.copy_(value)
            return
        rng = _get(stored, name + self.rng_suffix, "bf16 (stochastic rounding)")
        key = stream_key_tensor(rng)
        flat, src = t.view(-1), value.reshape(-1).float()
        n = flat.numel()
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            bits = random_bits(key, hi - lo, t.device, start=start + lo)
            flat[lo:hi] = round_bf16_stochastic(src[lo:hi].contiguous(), bits)
        rng[1].add_(1)

    def nbytes(self, shape, kind="other"):
        check_kind(kind)
        return 2 * numel(_check_shape(shape)) + (16 if self.stochastic else 0)

    def __repr__(self) -> str:
        return f"Bf16Storage(rounding={self.rounding!r})"
