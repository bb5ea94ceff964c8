"""bf16 storage: round-to-nearest, stochastic rounding (unbiased, reproducible, resumable), the hash."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from coap_compile.storage import Bf16Storage, get_storage
from coap_compile.storage.bf16 import round_bf16_stochastic
from coap_compile.storage.rng import fmix32, fmix32_int, mix_seed, random_bits, stream_key, stream_key_tensor

SEEDS = st.integers(0, 2**31 - 1)


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above |x| (float64), by truncating the fp32 bits (reference)."""
    u = x.abs().view(torch.int32).long()
    lo = (u & ~0xFFFF).to(torch.int32).view(torch.float32).double()
    hi = ((u & ~0xFFFF) + 0x10000).to(torch.int32).view(torch.float32).double()
    return lo, hi


def test_fmix32_and_hash_against_python_ints():
    vals = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0x9E3779B9]
    got = fmix32(torch.tensor(vals, dtype=torch.int64)).tolist()
    assert got == [fmix32_int(v) for v in vals]
    # MurmurHash3_x86_32 of the empty key is fmix32(seed): published vectors 0x514E28B7 (seed 1) and
    # 0x81F16F39 (seed 0xFFFFFFFF)
    assert fmix32_int(0) == 0 and fmix32_int(1) == 0x514E28B7 and fmix32_int(0xFFFFFFFF) == 0x81F16F39
    key = stream_key(7, 3)
    bits = random_bits(key, 1000).tolist()
    phi = 0x9E3779B9
    assert bits == [fmix32_int(((i * phi) & 0xFFFFFFFF) ^ key) >> 16 for i in range(1000)]
    assert random_bits(key, 10, start=995).tolist() == bits[995:] + random_bits(key, 1005)[1000:].tolist()
    assert stream_key_tensor(torch.tensor([7, 3])).item() == key
    assert mix_seed(0, "exp_avg") != mix_seed(0, "exp_avg_sq") != mix_seed(1, "exp_avg_sq")


def test_hash_bits_are_uniform():
    n = 1 << 18
    for seed, counter in ((0, 0), (1, 0), (0, 1), (987654321, 42)):
        bits = random_bits(stream_key(seed, counter), n)
        assert bits.min() >= 0 and bits.max() < 65536
        hist = torch.bincount((bits >> 8).long(), minlength=256).double()
        chi2 = ((hist - n / 256) ** 2 / (n / 256)).sum().item()
        assert chi2 < 330.5  # 99.9 % quantile of χ²(255); observed 220–290 for these streams
        low = torch.bincount((bits & 0xFF).long(), minlength=256).double()  # low bits too
        assert ((low - n / 256) ** 2 / (n / 256)).sum().item() < 330.5


@given(seed=SEEDS)
def test_nearest_is_torch_round_to_nearest_even(seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = torch.where(torch.isfinite(x), x, 1.0)
    x[:4] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.4e38])  # ties and overflow
    stg = Bf16Storage(rounding="nearest")
    s = stg.zeros("m", x.shape)
    stg.store_(s, "m", x)
    assert torch.equal(s["m"], x.to(torch.bfloat16))
    assert s["m"][0].item() == 1.0 and s["m"][1].item() == 1.0 + 4 * 2**-8  # ties to even
    assert s["m"][3].item() == math.inf
    lo, hi = bf16_neighbours(x)
    err = (s["m"].double() - x.double()).abs()
    fin = s["m"].float().isfinite()
    assert torch.all(err[fin] <= (hi - lo)[fin] / 2)  # half an ulp


@given(seed=SEEDS)
def test_stochastic_rounding_brackets_and_specials(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5000, generator=g) * 10.0 ** torch.randint(-30, 30, (5000,), generator=g).float()
    x[:6] = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.5])
    bits = torch.randint(0, 65536, (5000,), generator=g, dtype=torch.int32)
    y = round_bf16_stochastic(x, bits).double()
    lo, hi = bf16_neighbours(x)
    fin = x.isfinite()
    ay = y.abs()
    assert torch.all((ay[fin] == lo[fin]) | (ay[fin] == hi[fin]))  # one of the two neighbours
    assert torch.all(torch.sign(y[fin]) == torch.sign(x[fin].double()))
    assert y[0].item() == 0.0 and y[2].item() == math.inf and y[3].item() == -math.inf and math.isnan(y[4])
    assert y[5].item() == 1.5  # exactly representable values never move
    assert torch.equal(round_bf16_stochastic(x, torch.zeros_like(bits)).double()[fin].abs(), lo[fin])


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(512, generator=g) + 0.5) * 10.0 ** torch.randint(-5, 5, (512,), generator=g).float()
    stg = Bf16Storage(rounding="stochastic")
    s = stg.zeros("v", x.shape, "cpu", "second_moment", seed=1)
    k = 4000
    acc = torch.zeros(512, dtype=torch.float64)
    for _ in range(k):
        stg.store_(s, "v", x)
        acc += s["v"].double()
    lo, hi = bf16_neighbours(x)
    # A single rounding has std ≤ ulp/2, the mean of k has std ≤ ulp/(2√k); 5σ per element over 512
    # elements fails by chance with probability < 3e-4 (fixed seed: deterministic). SR with 16 uniform
    # bits is exactly unbiased, so no other term.
    tol = 5 * (hi - lo) / (2 * math.sqrt(k))
    assert torch.all((acc / k - x.double()).abs() <= tol)
    assert s["v.rng"][1].item() == k
    # round-to-nearest fails the same check (its error is deterministic, up to half an ulp)
    assert ((x.to(torch.bfloat16).double() - x.double()).abs() > tol).sum() > 300


def test_resume_from_checkpoint_is_bit_identical():
    stg = get_storage("bf16")
    assert stg.rounding == "stochastic"  # the documented default
    g = torch.Generator().manual_seed(3)
    values = [torch.randn(70, 33, generator=g) for _ in range(6)]
    run = stg.zeros("exp_avg", (70, 33), "cpu", "first_moment", seed=9)
    for v in values[:3]:
        stg.store_(run, "exp_avg", v)
    buf = io.BytesIO()
    torch.save(run, buf)
    for v in values[3:]:
        stg.store_(run, "exp_avg", v)
    buf.seek(0)
    resumed = torch.load(buf, weights_only=True)
    for v in values[3:]:
        stg.store_(resumed, "exp_avg", v)
    assert resumed.keys() == run.keys() and all(torch.equal(resumed[k], run[k]) for k in run)
    fresh = stg.zeros("exp_avg", (70, 33), "cpu", "first_moment", seed=9)
    other = stg.zeros("exp_avg", (70, 33), "cpu", "first_moment", seed=10)
    stg.store_(fresh, "exp_avg", values[0])
    stg.store_(other, "exp_avg", values[0])
    assert not torch.equal(fresh["exp_avg"], other["exp_avg"])  # the seed matters


def test_store_in_place_chunked(monkeypatch):
    import coap_compile.storage.bf16 as bf16

    x = torch.randn(1000, 7)
    whole = Bf16Storage().from_value("m", x, seed=4)
    monkeypatch.setattr(bf16, "CHUNK", 97)  # chunks must not change the stream
    stg = Bf16Storage()
    s = stg.zeros("m", x.shape, seed=4)
    ptrs = {k: (v, v.data_ptr()) for k, v in s.items()}
    stg.store_(s, "m", x)
    assert all(s[k] is t and t.data_ptr() == p for k, (t, p) in ptrs.items())
    assert torch.equal(s["m"], whole["m"]) and torch.equal(s["m.rng"], whole["m.rng"])


def test_stagnation_of_round_to_nearest():
    """The documented effect: v ← β₂v + (1−β₂)·1 from 0 freezes at 0.25 under RN (bf16-SR tracks fp32)."""
    beta2 = 0.999
    out = {}
    for rounding in ("nearest", "stochastic"):
        stg = Bf16Storage(rounding=rounding)
        s = stg.zeros("v", (2048,), "cpu", "second_moment", seed=0)
        for _ in range(1000):
            stg.store_(s, "v", stg.load(s, "v") * beta2 + (1 - beta2))
        out[rounding] = stg.load(s, "v").double().mean().item() / (1 - beta2**1000)
    assert out["nearest"] == pytest.approx(0.25 / (1 - beta2**1000), rel=1e-6)  # v̂ = 0.396 instead of 1
    assert out["stochastic"] == pytest.approx(1.0, abs=0.01)  # observed 1.0000 (2048 elements)


def test_bad_arguments():
    with pytest.raises(
        ValueError, match=r"bf16 rounding must be one of \('nearest', 'stochastic'\), got 'up'"
    ):
        Bf16Storage(rounding="up")
    stg = Bf16Storage()
    with pytest.raises(TypeError, match="seed must be an int"):
        stg.zeros("m", (3,), seed=1.5)
    s = stg.zeros("m", (3,))
    with pytest.raises(ValueError, match=r"has shape \(4,\), the state is \(3,\)"):
        stg.store_(s, "m", torch.zeros(4))
    with pytest.raises(TypeError, match="floating-point tensor"):
        stg.store_(s, "m", torch.zeros(3, dtype=torch.int32))
    with pytest.raises(KeyError, match=r"needs key 'm.rng'"):
        stg.store_({"m": s["m"]}, "m", torch.zeros(3))  # an RN checkpoint loaded with SR storage
    with pytest.raises(TypeError, match="float32 tensor"):
        round_bf16_stochastic(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int32))
