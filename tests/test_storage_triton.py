"""The Triton storage helpers (``storage.triton_src``) against the eager storage, in a small test kernel.

The kernel loads a tile of a quantized (or bf16) M×r state, dequantizes it, applies an EMA update
``s ← b·s + c·g`` (``g²`` for the second moment) and stores it back, exactly as a generated K1 would
around its printed epilogue. Under ``TRITON_INTERPRET=1`` (tests/conftest.py) the codes, scales and bf16
bits must equal the eager ``store_`` of the same update bit for bit; on a CUDA machine the same tests run
on the GPU (where FMA contraction of the update could move a value by an ulp: see triton_src).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coap_compile.kernels import cache
from coap_compile.storage import Bf16Storage, Int8Storage, block_layout, kernel_block_m, triton_src
from coap_compile.storage.rng import random_bits, stream_key

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

KERNELS = f'''\
"""Test kernels for coap_compile.storage.triton_src (tests/test_storage_triton.py)."""

import triton
import triton.language as tl

{triton_src.helpers()}

@triton.jit
def q8_ema(q_ptr, a_ptr, g_ptr, tab_ptr, val_ptr, rng_ptr, M, R, NR, NC, b, c,
           SQUARE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
           BH: tl.constexpr, BW: tl.constexpr, SIGNED: tl.constexpr, LOG2N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    offs = offs_m[:, None] * R + offs_r[None, :]
    s = _st_q8_load(q_ptr + offs, a_ptr, offs_m, offs_r, NC, mask, val_ptr, BH, BW, SIGNED)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    if SQUARE:
        g = g * g
    s = s * b + g * c
    _st_q8_store(s, q_ptr + offs, a_ptr, pid_m * BLOCK_M, pid_r * BLOCK_R, NR, NC, mask, tab_ptr, rng_ptr,
                 offs, BLOCK_M, BLOCK_R, BH, BW, SIGNED, LOG2N, STOCHASTIC)


@triton.jit
def bf16_ema(s_ptr, g_ptr, rng_ptr, M, R, b, c, STOCHASTIC: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    offs = offs_m[:, None] * R + offs_r[None, :]
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    _st_bf16_store(s_ptr + offs, s * b + g * c, mask, rng_ptr, offs, STOCHASTIC)


@triton.jit
def rne_only(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, _st_bf16_rne(x), mask=offs < n)


@triton.jit
def bits_only(rng_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _st_sr_bits(rng_ptr, offs).to(tl.int32), mask=offs < n)
'''


@pytest.fixture(scope="module")
def mod():
    return cache.load_module("storage_test_kernels", KERNELS)


def _block_r(r: int) -> int:
    return min(max(16, 1 << (r - 1).bit_length()), 128)


def test_random_bits_match(mod):
    rng = torch.tensor([987654321, 41], dtype=torch.int64, device=DEVICE)
    out = torch.zeros(3000, dtype=torch.int32, device=DEVICE)
    mod.bits_only[(3,)](rng, out, 3000, BLOCK=1024)
    assert torch.equal(out.cpu(), random_bits(stream_key(987654321, 41), 3000))


def test_rne_matches_torch_cast(mod):
    g = torch.Generator().manual_seed(0)
    x = (
        torch.randint(-(2**31), 2**31, (8192,), generator=g, dtype=torch.int64)
        .to(torch.int32)
        .view(torch.float32)
    )
    x[:6] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38, float("inf"), -float("inf"), 0.0])
    y = torch.empty_like(x)
    mod.rne_only[(8,)](x.to(DEVICE), y_out := y.to(DEVICE), 8192, BLOCK=1024)
    got, want = y_out.cpu(), x.to(torch.bfloat16).float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])


CASES = [  # (M, r, quant_block_size): r below, at and above 16, not a power of two, above BLOCK_R = 128
    (70, 48, 256),
    (33, 5, 256),
    (200, 130, 256),
    (64, 1, 64),
    (100, 20, 16),
    (90, 64, 1024),
]


@pytest.mark.parametrize(("m", "r", "block"), CASES)
@pytest.mark.parametrize("kind", ["first_moment", "second_moment"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("blocks", ["tiles", "rows"])
def test_q8_kernel_matches_eager(mod, m, r, block, kind, rounding, blocks):
    stg = Int8Storage(quant_block_size=block, rounding=rounding, min_numel=0, blocks=blocks)
    gen = torch.Generator().manual_seed(m * 1000 + r)
    eager = stg.zeros("s", (m, r), "cpu", kind, seed=3)
    kern = {k: v.to(DEVICE, copy=True) for k, v in eager.items()}  # never aliases eager
    lay = block_layout((m, r), block, blocks)
    cm = stg.code_map_for(kind)
    tabs = cm.tables(DEVICE)
    bm, br = kernel_block_m(r, block, blocks=blocks), _block_r(r)
    square = kind == "second_moment"
    b, c = torch.tensor(0.9), torch.tensor(0.1)  # fp32 scalars, as the kernel receives them
    for step in range(4):  # the codes evolve; every step must agree
        g = torch.randn(m, r, generator=gen) * 10.0 ** (step - 2)
        stg.store_(eager, "s", stg.load(eager, "s") * b + (g * g if square else g) * c)
        mod.q8_ema[(-(-m // bm), -(-r // br))](
            kern["s.q8"], kern["s.absmax"], g.to(DEVICE), tabs.levels if stg.stochastic else tabs.thresholds,
            tabs.values, kern.get("s.rng", kern["s.absmax"]), m, r, *lay.grid, 0.9, 0.1,
            SQUARE=square, STOCHASTIC=stg.stochastic, BLOCK_M=bm, BLOCK_R=br, BH=lay.bh, BW=lay.bw,
            SIGNED=cm.signed, LOG2N=cm.log2_size,
        )  # fmt: skip
        if stg.stochastic:
            kern["s.rng"][1] += 1  # the host-side counter increment that follows a launch
        for k in eager:
            assert torch.equal(kern[k].cpu(), eager[k]), (k, step)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize(("m", "r"), [(70, 48), (33, 5), (130, 200)])
def test_bf16_kernel_matches_eager(mod, rounding, m, r):
    stg = Bf16Storage(rounding=rounding)
    gen = torch.Generator().manual_seed(r)
    eager = stg.zeros("s", (m, r), "cpu", "first_moment", seed=5)
    kern = {k: v.to(DEVICE, copy=True) for k, v in eager.items()}  # never aliases eager
    b, c = torch.tensor(0.9), torch.tensor(0.1)
    for _ in range(3):
        g = torch.randn(m, r, generator=gen)
        stg.store_(eager, "s", stg.load(eager, "s") * b + g * c)
        br = _block_r(r)
        mod.bf16_ema[(-(-m // 64), -(-r // br))](
            kern["s"], g.to(DEVICE), kern.get("s.rng", g.to(DEVICE)), m, r, 0.9, 0.1,
            STOCHASTIC=stg.stochastic, BLOCK_M=64, BLOCK_R=br,
        )  # fmt: skip
        if stg.stochastic:
            kern["s.rng"][1] += 1
        assert torch.equal(kern["s"].cpu(), eager["s"])


_AOT = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from test_storage_triton import KERNELS
from coap_compile.kernels import cache
m = cache.load_module("storage_test_kernels_aot", KERNELS)
jf = m.q8_ema
sig = {"q_ptr": "*i8", "a_ptr": "*fp32", "g_ptr": "*fp32", "tab_ptr": "*fp32", "val_ptr": "*fp32",
       "rng_ptr": "*i64", "M": "i32", "R": "i32", "NR": "i32", "NC": "i32", "b": "fp32", "c": "fp32"}
for stochastic in (False, True):
    consts = {"SQUARE": False, "STOCHASTIC": stochastic, "BLOCK_M": 64, "BLOCK_R": 128, "BH": 16, "BW": 16,
              "SIGNED": True, "LOG2N": 7}
    src = ASTSource(fn=jf, signature={**sig, **dict.fromkeys(consts, "constexpr")},
                    constexprs={(jf.arg_names.index(k),): v for k, v in consts.items()})
    out = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1})
    print("q8", stochastic, "cubin" in out.asm)
"""


def test_helpers_compile_for_sm90(tmp_path):
    """The real (non-interpreted) path of the int8 helpers (4-D reshape, reductions, gathers) for sm_90."""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    env["COAP_COMPILE_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env)
    if out.returncode and ("ImportError" in out.stderr or "ptxas" in out.stderr):
        pytest.skip(f"cannot compile ahead of time here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["q8", "False", "True", "q8", "True", "True"]
