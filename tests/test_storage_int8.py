"""int8 blockwise storage against an independent float64 oracle, its error bound, SR, layout, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from coap_compile.storage import (
    Int8Storage,
    block_layout,
    check_block_size,
    code_map,
    get_storage,
    kernel_block_m,
)
from coap_compile.storage.codemap import relative_gaps

SEEDS = st.integers(0, 2**31 - 1)


# ------------------------------------------------------------------------------------------- the oracle
def oracle_levels(signed: bool) -> np.ndarray:
    """The "decade" map from its documented formula, float64, then float32-rounded (the spec's levels)."""
    d = 7 if signed else 8
    mags = [
        10.0**-k * (0.1 + 0.9 * j / 2 ** (d - 1 - k))
        for k in range(d)
        for j in range(1, 2 ** (d - 1 - k) + 1)
    ]
    return np.concatenate([[0.0], np.sort(np.array(mags, dtype=np.float32).astype(np.float64))])


def oracle_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) >= 2:
        return math.prod(shape[:-1]), shape[-1]
    return (shape[0], 1) if shape else (1, 1)


def oracle_quantize(x: torch.Tensor, block: int, signed: bool, floor: bool, blocks: str = "rows"):
    """Nearest-level codes in float64, block by block: (codes, absmax float64, ambiguous mask). ``blocks``:
    ``"rows"`` (the default: 1×min(B, next_pow2(C), 128) inside a row for ≥ 2-D states) or ``"tiles"``
    (bh×bw, bw = min(16, next_pow2(C))); vectors are B×1 columns either way."""
    rows, cols = oracle_matrix(tuple(x.shape))
    bw = 1
    if blocks == "rows" and x.ndim >= 2:
        while bw < min(cols, block, 128):
            bw *= 2
        bh = 1
    else:
        while bw < min(cols, 16):
            bw *= 2
        bh = block // bw
    lv = oracle_levels(signed)
    xs = x.double().numpy().reshape(rows, cols)
    if not signed:
        xs = np.maximum(xs, 0.0)
    codes = np.zeros((rows, cols), dtype=np.int64)
    amb = np.zeros((rows, cols), dtype=bool)
    nr, nc = -(-rows // bh), -(-cols // bw)
    absmax = np.zeros((nr, nc))
    for i in range(nr):
        for j in range(nc):
            blk = xs[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw]
            a = np.abs(blk).max()
            absmax[i, j] = a
            if a == 0:
                continue
            t = np.abs(blk) / a
            dist = np.abs(t[..., None] - lv)
            q = dist.argmin(-1)  # first minimum: ties go to the smaller level
            srt = np.sort(dist, -1)
            # a tie within the fp32 rounding of θ·a (each ≤ 2⁻²⁴ relative): |d₁ − d₂| = 2|t − mid|
            amb[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw] = srt[..., 1] - srt[..., 0] < 2.0**-20 * t
            if floor:
                q = np.where((blk > 0) & (q == 0), 1, q)
            codes[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw] = np.where(blk < 0, -q, q)
    return codes.reshape(x.shape), absmax, amb.reshape(x.shape)


def make_tensor(seed: int, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """Random values with mixed magnitudes (per-row scales 1e-25…1e25), exact zeros, an all-zero block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if x.ndim >= 1 and x.numel():
        scale = 10.0 ** torch.randint(-25, 26, (1,), generator=g).double()
        x = (
            x
            * scale
            * 10.0
            ** torch.empty(x.shape[-1:] if x.ndim == 1 else x.shape[:1] + (1,) * (x.ndim - 1))
            .uniform_(-4, 4, generator=g)
            .double()
        )
        x.view(-1)[torch.rand(x.numel(), generator=g) < 0.05] = 0.0
        x.view(-1)[: min(x.numel(), 300)] = 0.0  # at least one all-zero block (up to 256 elements)
    x = x.float()
    return x.abs() if kind == "second_moment" else x


SHAPES = st.sampled_from(
    [(300, 48), (70, 5), (33, 130), (1000,), (17,), (), (4, 5, 19), (256, 16), (1, 40), (64, 1)]
)
KINDS = st.sampled_from(["first_moment", "second_moment"])
BLOCKS = st.sampled_from([16, 64, 256, 1024])


# --------------------------------------------------------------------------------------------- tests
def test_code_map_construction():
    for signed in (True, False):
        cm = code_map(signed)
        lv = cm.levels.double().numpy()
        assert cm.n == (127 if signed else 255) and cm.log2_size == (7 if signed else 8)
        np.testing.assert_array_equal(lv, oracle_levels(signed))
        assert lv[0] == 0.0 and lv[-1] == 1.0 and np.all(np.diff(lv) > 0)
        assert lv[1] == pytest.approx(1e-6 if signed else 1e-7, rel=1e-6)
        mid = ((lv[:-1] + lv[1:]) / 2).astype(np.float32)
        np.testing.assert_array_equal(cm.thresholds.numpy()[1:], mid)
        vals = cm.values.double().numpy()
        if signed:  # value[code + 128]: symmetric, code -128 decodes to -1
            np.testing.assert_array_equal(vals[128:], lv)
            np.testing.assert_array_equal(vals[1:128], -lv[1:][::-1])
            assert vals[0] == -1.0
        else:
            np.testing.assert_array_equal(vals, lv)
    # the error-bound table: within decade k (c_k levels) the worst relative half-gap is at its bottom,
    # ρ = (0.9/c)/(0.2 + 0.9/c) (codemap docstring): 3.4 % / 6.6 % in the top decade (unsigned / signed)
    for signed, d in ((True, 7), (False, 8)):
        lv = code_map(signed).levels.double()[1:]
        rho = relative_gaps(code_map(signed))
        for k in range(d - 1):
            c = 2 ** (d - 1 - k)
            inside = (lv[:-1] >= 10.0 ** -(k + 1) * (1 - 1e-6)) & (lv[1:] <= 10.0**-k * (1 + 1e-6))
            assert rho[inside].max().item() == pytest.approx((0.9 / c) / (0.2 + 0.9 / c), rel=1e-5)


@given(seed=SEEDS, shape=SHAPES, kind=KINDS, block=BLOCKS, blocks=st.sampled_from(["rows", "tiles"]))
def test_nearest_codes_match_float64_oracle(seed, shape, kind, block, blocks):
    x = make_tensor(seed, shape, kind)
    stg = Int8Storage(quant_block_size=block, rounding="nearest", min_numel=0, blocks=blocks)
    stored = stg.from_value("s", x, kind)
    codes, absmax, amb = oracle_quantize(
        x, block, signed=kind == "first_moment", floor=kind == "second_moment", blocks=blocks
    )
    got = stored["s.q8"].long().numpy()
    np.testing.assert_array_equal(stored["s.absmax"].double().numpy(), absmax)  # max is exact
    # Bit-identical except where |x|/a is within 2⁻²¹ (relative) of a midpoint, where the fp32
    # thresholds θ·a round; such ties differ by at most one level and are rare (none in most draws).
    np.testing.assert_array_equal(got[~amb], codes[~amb])
    assert np.abs(got[amb] - codes[amb]).max(initial=0) <= 1
    assert amb.sum() <= max(1, x.numel() // 1000)
    # dequantization is the correctly rounded fp32 product level[code]·a
    lv = oracle_levels(kind == "first_moment")
    rows, cols = oracle_matrix(tuple(x.shape))
    lay = block_layout(tuple(x.shape), block, blocks)
    a_el = np.repeat(np.repeat(absmax, lay.bh, 0)[:rows], lay.bw, 1)[:, :cols].reshape(x.shape)
    want = (np.sign(got) * lv[np.abs(got)] * a_el).astype(np.float32)
    np.testing.assert_array_equal(stg.load(stored, "s").numpy(), want)


def _bound(x: torch.Tensor, xh: torch.Tensor, block: int, signed: bool, gaps: float) -> None:
    """|x̂ − x| ≤ gaps·a·Δ + 2⁻²³(|x| + |x̂|) with Δ the bracket of |x|/a (a·m₁ below m₁, the floor)."""
    lay = block_layout(tuple(x.shape), block)
    rows, cols = lay.rows, lay.cols
    x2 = x.double().reshape(rows, cols)
    xm = x2 if signed else x2.clamp_min(0)
    pad = torch.zeros(lay.grid[0] * lay.bh, lay.grid[1] * lay.bw, dtype=torch.float64)
    pad[:rows, :cols] = xm.abs()
    a = pad.view(lay.grid[0], lay.bh, lay.grid[1], lay.bw).amax(dim=(1, 3))
    a_el = a.repeat_interleave(lay.bh, 0)[:rows].repeat_interleave(lay.bw, 1)[:, :cols]
    lv = code_map(signed).levels.double()
    t = torch.where(a_el > 0, xm.abs() / a_el.clamp_min(1e-300), 0.0)
    k = (torch.searchsorted(lv, t, right=True) - 1).clamp(0, lv.numel() - 2)
    gap = lv[k + 1] - lv[k]
    allowed = gaps * a_el * gap + 2.0**-23 * (xm.abs() + xh.double().reshape(rows, cols).abs())
    if not signed:
        allowed = torch.where(t < lv[1], a_el * lv[1] + allowed, allowed)  # the positive floor
    err = (xh.double().reshape(rows, cols) - xm).abs()
    assert torch.all(err <= allowed), f"max excess {(err - allowed).max().item():.3g}"


@given(
    seed=SEEDS, shape=SHAPES, kind=KINDS, block=BLOCKS, rounding=st.sampled_from(["nearest", "stochastic"])
)
def test_error_bound(seed, shape, kind, block, rounding):
    x = make_tensor(seed, shape, kind)
    stg = Int8Storage(quant_block_size=block, rounding=rounding, min_numel=0)
    stored = stg.from_value("s", x, kind, seed=seed)
    xh = stg.load(stored, "s")
    _bound(x, xh, block, kind == "first_moment", 0.5 if rounding == "nearest" else 1.0)
    assert torch.all(xh[x == 0] == 0)  # exact zeros stay exact
    if kind == "second_moment":
        assert torch.all(xh >= 0) and torch.all(xh[x > 0] > 0)  # the floor: v > 0 never decodes to 0
    else:
        assert torch.all(torch.sign(xh[xh != 0]) == torch.sign(x[xh != 0]))


def test_signed_map_on_second_moment_has_no_floor_and_unsigned_clamps():
    v = torch.tensor([1.0, 1e-9, 0.0] + [0.5] * 253)
    signed = Int8Storage(second_moment_map="signed", rounding="nearest", min_numel=0)
    assert signed.load(signed.from_value("v", v, "second_moment"), "v")[1] == 0.0  # below m₁/2: 0
    uns = Int8Storage(rounding="nearest", min_numel=0)
    out = uns.load(uns.from_value("v", v, "second_moment"), "v")
    assert out[1] == pytest.approx(1e-7, rel=1e-6)  # floored to m₁·a
    neg = uns.load(uns.from_value("v", -v, "second_moment"), "v")
    assert torch.all(neg == 0)  # negatives clamp to 0 under the unsigned map


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    # Values spread over brackets of the signed map; K roundings of the same x with advancing counters.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([1.0]), torch.rand(255, generator=g) * 0.3 - 0.15])
    stg = Int8Storage(rounding="stochastic", min_numel=0)
    stored = stg.zeros("m", x.shape, "cpu", "first_moment", seed=3)
    k = 2000
    acc = torch.zeros(256, dtype=torch.float64)
    for _ in range(k):
        stg.store_(stored, "m", x)
        acc += stg.load(stored, "m").double()
    mean = acc / k
    lv = code_map(True).levels.double()
    t = x.double().abs()
    idx = (torch.searchsorted(lv, t, right=True) - 1).clamp(0, 126)
    gap = lv[idx + 1] - lv[idx]
    # One rounding has std ≤ gap/2, so the mean of k has std ≤ gap/(2√k); 5σ per element over 256
    # elements fails by chance with probability < 1.5e-4 (and the seed is fixed). 2⁻¹⁶·gap: the
    # probability is resolved in 16 bits.
    tol = 5 * gap / (2 * math.sqrt(k)) + gap * 2.0**-16 + 1e-7 * t
    assert torch.all((mean - x.double()).abs() <= tol)
    assert stored["m.rng"][1].item() == k
    near = Int8Storage(rounding="nearest", min_numel=0)
    xh = near.load(near.from_value("m", x, "first_moment"), "m").double()
    assert ((xh - x.double()).abs() > tol).sum() > 100  # the deterministic rounding error is visible


def test_store_in_place_and_determinism():
    x = torch.randn(130, 40)
    for rounding in ("nearest", "stochastic"):
        stg = Int8Storage(rounding=rounding, min_numel=0)
        a = stg.zeros("m", x.shape, "cpu", "first_moment", seed=5)
        b = stg.zeros("m", x.shape, "cpu", "first_moment", seed=5)
        before = {k: (v, v.data_ptr()) for k, v in a.items()}
        for i in range(3):
            stg.store_(a, "m", x * (i + 1))
            stg.store_(b, "m", x * (i + 1))
        assert all(a[k] is t and a[k].data_ptr() == p for k, (t, p) in before.items())
        assert all(torch.equal(a[k], b[k]) for k in a)
    c = Int8Storage(min_numel=0).from_value("m", x, "first_moment", seed=6)
    d = Int8Storage(min_numel=0).from_value("m", x, "first_moment", seed=5)
    assert not torch.equal(c["m.q8"], d["m.q8"])  # another seed, another stream


def test_requantizing_dequantized_values_is_exact():
    for kind in ("first_moment", "second_moment"):
        for rounding in ("nearest", "stochastic"):
            x = make_tensor(11, (300, 48), kind)
            stg = Int8Storage(rounding=rounding, min_numel=0)
            s1 = stg.from_value("s", x, kind, seed=1)
            s2 = stg.from_value("s", stg.load(s1, "s"), kind, seed=2)
            assert torch.equal(s1["s.q8"], s2["s.q8"]) and torch.equal(s1["s.absmax"], s2["s.absmax"])


def test_layout_inferred_from_the_stored_grid():
    from coap_compile.storage.int8 import infer_layout

    for shape in [(300, 40), (70, 5), (10, 3), (5000,), (1, 1), (4, 5, 19)]:
        grids = {}
        for block in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
            lay = block_layout(shape, block)
            got = infer_layout(shape, lay.grid)
            assert got is not None and got.grid == lay.grid and got.bw == lay.bw
            rows = torch.arange(lay.rows)
            assert torch.equal(rows // got.bh, rows // lay.bh)  # the same partition of the rows
            grids[lay.grid] = block
    assert infer_layout((300, 40), (7, 2)) is None


@pytest.mark.parametrize("blocks", ["rows", "tiles"])
def test_layout_tiles_own_whole_blocks(blocks):
    for block in (16, 64, 256, 1024, 4096):
        for r in [*range(1, 40), 48, 64, 100, 127, 128, 129, 200, 256, 300, 512, 1000]:
            lay = block_layout((1000, r), block, blocks)
            if blocks == "tiles":
                assert lay.bh * lay.bw == block
            else:  # 1×min(B, next_pow2(r), 128)
                assert (lay.bh, lay.bw) == (1, min(block, 1 << max(0, (r - 1).bit_length()), 128))
            bm = kernel_block_m(r, block, blocks=blocks)
            br = min(max(16, 1 << (r - 1).bit_length()), 128)
            assert bm % lay.bh == 0 and br % lay.bw == 0 and bm >= 64
    # brute force on a small case: every block's elements lie in one (BLOCK_M × BLOCK_R) tile
    for m, r, block in ((100, 5, 256), (70, 48, 256), (200, 130, 64), (40, 3, 16)):
        lay = block_layout((m, r), block, blocks)
        bm = kernel_block_m(r, block, blocks=blocks)
        br = min(max(16, 1 << (r - 1).bit_length()), 128)
        rows, cols = torch.meshgrid(torch.arange(m), torch.arange(r), indexing="ij")
        blk = (rows // lay.bh) * lay.grid[1] + cols // lay.bw
        tile = (rows // bm) * 10_000 + cols // br
        for b in blk.unique():
            assert tile[blk == b].unique().numel() == 1
    assert block_layout((1000,), 256, blocks) == block_layout((1000, 1), 256, "tiles")  # vectors: 1-D blocks
    assert (block_layout((1000,), 256).bh, block_layout((1000,), 256).bw) == (256, 1)
    assert (block_layout((7, 9, 33), 256).rows, block_layout((7, 9, 33), 256).cols) == (63, 33)


@pytest.mark.parametrize("blocks", ["rows", "tiles"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_nbytes_closed_form(rounding, blocks):
    stg = Int8Storage(rounding=rounding, blocks=blocks)
    for shape in [
        (4096, 512),
        (11008, 1024),
        (300, 48),
        (70, 5),
        (5000,),
        (64, 64),
        (10, 10),
        (),
        (3, 4, 512),
    ]:
        for kind in ("first_moment", "second_moment"):
            n = math.prod(shape)
            rows, cols = oracle_matrix(shape)
            if blocks == "rows" and len(shape) >= 2:  # 1×min(B, next_pow2(C), 128)
                bh, bw = 1, min(128, 1 << max(0, (cols - 1).bit_length()))
            else:
                bw = min(16, 1 << max(0, (cols - 1).bit_length()))
                bh = 256 // bw
            want = (
                4 * n
                if n < 4096
                else n + 4 * -(-rows // bh) * -(-cols // bw) + 16 * (rounding == "stochastic")
            )
            assert stg.nbytes(shape, kind) == want
            z = stg.zeros("s", shape, "meta", kind)
            assert sum(t.numel() * t.element_size() for t in z.values()) == want
    grid = 4096 * 4 if blocks == "rows" else 256 * 32  # 4096 rows × 4 blocks of 128, or 16×16 tiles
    assert stg.nbytes((4096, 512), "first_moment") == 4096 * 512 + 4 * grid + 16 * (rounding == "stochastic")


def test_small_tensors_stay_float32():
    stg = get_storage("int8")  # min_numel 4096
    x = torch.randn(128)
    s = stg.from_value("v", x.abs(), "second_moment")
    assert set(s) == {"v"} and s["v"].dtype == torch.float32
    assert torch.equal(stg.load(s, "v"), x.abs())


@pytest.mark.parametrize("bad", [0, -256, 8, 100, 255, 8192, 256.0, True, "256", None])
def test_bad_block_size(bad):
    with pytest.raises((ValueError, TypeError)) as e:
        check_block_size(bad)
    msg = str(e.value)
    assert "quant_block_size" in msg and repr(bad) in msg and "power of two" in msg and "4096" in msg
    with pytest.raises((ValueError, TypeError), match="quant_block_size"):
        get_storage("int8", quant_block_size=bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"kind 'other'.*'fp32' or 'bf16'"):
        Int8Storage().zeros("row_var", (64, 64), "cpu", "other")
    with pytest.raises(ValueError, match=r"kind 'other'"):
        Int8Storage().nbytes((64, 64), "other")
    with pytest.raises(ValueError, match=r"state kind must be one of .*got 'moment'"):
        Int8Storage().zeros("m", (64, 64), "cpu", "moment")
    with pytest.raises(ValueError, match="second_moment_map must be one of"):
        Int8Storage(second_moment_map="log")
    with pytest.raises(ValueError, match="int8 rounding must be one of"):
        Int8Storage(rounding="up")
    with pytest.raises(ValueError, match="min_numel"):
        Int8Storage(min_numel=-1)
    stg = Int8Storage(min_numel=0)
    s = stg.zeros("m", (64, 64), "cpu", "first_moment")
    with pytest.raises(ValueError, match=r"has shape \(64, 63\), the state is \(64, 64\)"):
        stg.store_(s, "m", torch.zeros(64, 63))
    stg.store_(s, "m", torch.randn(64, 64))
    other = Int8Storage(quant_block_size=64, min_numel=0)  # a checkpoint with another block size loads
    assert torch.equal(other.load(s, "m"), stg.load(s, "m"))
    with pytest.raises(ValueError, match=r"absmax is torch.float32 \(5, 4\), expected float32 \(64, 1\)"):
        stg.load({"m.q8": s["m.q8"], "m.absmax": torch.zeros(5, 4)}, "m")
    with pytest.raises(KeyError, match=r"int8 state 'm' needs key 'm.q8'.*stored as bf16"):
        stg.load(get_storage("bf16").zeros("m", (64, 64)), "m")
