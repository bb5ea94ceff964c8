"""int8 row blocks (``quant_blocks="rows"``, issue 18): the layout, codes against per-row quantization,
row shards with global rounding indices equal to the whole state, and loading across block shapes."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from coap_compile.storage import Int8Storage, block_layout, check_blocks, convert_state
from coap_compile.storage.int8 import infer_layout

SEEDS = st.integers(0, 2**31 - 1)


def _moment(kind: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    return x.square() if kind == "second_moment" else x


@pytest.mark.parametrize(
    ("shape", "block", "bw"),
    [
        ((64, 32), 256, 32),
        ((64, 5), 256, 8),
        ((10, 300), 256, 128),
        ((10, 300), 64, 64),
        ((3, 4, 20), 16, 16),
    ],
)
def test_layout(shape, block, bw):
    lay = block_layout(shape, block, "rows")
    rows = shape[0] * (shape[1] if len(shape) == 3 else 1)
    assert (lay.bh, lay.bw, lay.rows) == (1, bw, rows)
    assert lay.grid == (rows, -(-shape[-1] // bw))
    assert infer_layout(shape, lay.grid, "tiles") == lay  # found whichever shape is tried first
    # vectors keep contiguous blocks
    assert block_layout((5000,), 256, "rows") == block_layout((5000,), 256, "tiles")


def test_bad_blocks():
    with pytest.raises(ValueError, match=r"quant_blocks must be one of \('rows', 'tiles'\), got 'cols'"):
        check_blocks("cols")
    with pytest.raises(ValueError, match="quant_blocks"):
        Int8Storage(blocks="cols")


@given(
    seed=SEEDS,
    m=st.integers(1, 40),
    r=st.integers(1, 70),
    kind=st.sampled_from(["first_moment", "second_moment"]),
)
def test_rows_are_independent_blocks(seed, m, r, kind):
    """Nearest rounding: each row of a rows-layout state (r ≤ 128: one block per row) quantizes exactly as
    that row alone, stored as a vector in one contiguous block."""
    x = _moment(kind, (m, r), seed)
    stg = Int8Storage(rounding="nearest", min_numel=0, blocks="rows")
    whole = stg.from_value("s", x, kind)
    bs = max(16, 1 << (r - 1).bit_length())
    vec = Int8Storage(quant_block_size=bs, rounding="nearest", min_numel=0)
    for i in range(m):
        one = vec.from_value("s", x[i].clone(), kind)
        assert torch.equal(whole["s.q8"][i], one["s.q8"])
        assert torch.equal(whole["s.absmax"][i], one["s.absmax"].view(-1))


@given(
    seed=SEEDS,
    m=st.integers(1, 37),
    r=st.sampled_from([1, 7, 16, 33, 130]),
    world=st.sampled_from([2, 3, 4]),
    rounding=st.sampled_from(["stochastic", "nearest"]),
    kind=st.sampled_from(["first_moment", "second_moment"]),
)
def test_row_shards_equal_the_whole_state(seed, m, r, world, rounding, kind):
    """``torch.chunk`` row shards stored with ``start`` = their global index give the whole state's codes
    and scales bit for bit, over two stores (the counter advances alike), empty shards included."""
    stg = Int8Storage(rounding=rounding, min_numel=0, blocks="rows")
    whole = stg.zeros("s", (m, r), "cpu", kind, seed=seed)
    chunk = -(-m // world)
    parts = [stg.zeros("s", (max(0, min(m, (k + 1) * chunk) - min(m, k * chunk)), r), "cpu", kind, seed=seed)
             for k in range(world)]  # fmt: skip
    for step in range(2):
        x = _moment(kind, (m, r), seed + step)
        stg.store_(whole, "s", x)
        for k, part in enumerate(parts):
            lo = min(m, k * chunk)
            stg.store_(part, "s", x[lo : lo + part["s.q8"].shape[0]].clone(), start=lo * r)
    for key in ("s.q8", "s.absmax"):
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
    if rounding == "stochastic":
        assert all(torch.equal(p["s.rng"], whole["s.rng"]) for p in parts)
    assert parts[-1]["s.q8"].dtype == whole["s.q8"].dtype  # an empty shard keeps the int8 keys


@given(seed=SEEDS, m=st.integers(1, 50), r=st.integers(1, 40))
def test_tiles_and_rows_load_each_other(seed, m, r):
    """A state written with tiles loads and updates under a rows storage in its own layout, and
    ``convert_state`` re-blocks it (one quantization of the dequantized values)."""
    x = _moment("first_moment", (m, r), seed)
    tiles = Int8Storage(min_numel=0, blocks="tiles")
    rows = Int8Storage(min_numel=0, blocks="rows")
    old = tiles.from_value("s", x, "first_moment")
    assert torch.equal(rows.load(old, "s"), tiles.load(old, "s"))
    rows.store_(old, "s", x)  # updated in the tiles layout
    assert tuple(old["s.absmax"].shape) == block_layout((m, r), 256, "tiles").grid
    new = convert_state(old, "s", rows, "first_moment")
    assert tuple(new["s.absmax"].shape) == block_layout((m, r), 256, "rows").grid
    assert torch.equal(new["s.q8"], rows.from_value("s", tiles.load(old, "s"), "first_moment")["s.q8"])


def test_validate_accepts_a_state_written_with_tiles():
    """A 16×16-tiles state (an old checkpoint) validates under a rows storage (its own layout); a grid that
    fits no layout is still refused."""
    x = _moment("second_moment", (64, 32), 0)
    old = Int8Storage(min_numel=0, blocks="tiles").from_value("v", x, "second_moment")
    rows = Int8Storage(min_numel=0, blocks="rows")
    rows.validate(old, "v", (64, 32), "second_moment")
    with pytest.raises(ValueError, match="absmax"):
        rows.validate({**old, "v.absmax": torch.zeros(3, 3)}, "v", (64, 32), "second_moment")


@pytest.mark.parametrize(("saved", "loading"), [("tiles", "tiles"), ("tiles", "rows"), ("rows", "tiles")])
def test_optimizer_resumes_a_checkpoint_with_the_other_block_shape(saved, loading):
    """An optimizer with one block shape loads a checkpoint written with the other and continues exactly
    like the writer (the state keeps the layout it was written in)."""
    import coap_compile

    def build(blocks):
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 128)  # 128×64 at rank 32: 4096-element moments, quantized
        kw = dict(rank=32, state_precision="int8", quant_blocks=blocks, update_interval=2, lr=1e-2)
        return lin, coap_compile.optimize([lin.weight], torch.optim.AdamW, **kw)

    def step(lin, opt, k):
        opt.zero_grad()
        lin(torch.randn(8, 64, generator=torch.Generator().manual_seed(k))).square().mean().backward()
        opt.step()

    lin, opt = build(saved)
    for k in range(3):
        step(lin, opt, k)
    sd, w = copy.deepcopy(opt.state_dict()), lin.weight.detach().clone()  # (state_dict holds references)
    for k in range(3, 5):
        step(lin, opt, k)
    lin2, opt2 = build(loading)
    with torch.no_grad():
        lin2.weight.copy_(w)
    opt2.load_state_dict(sd)
    for k in range(3, 5):
        step(lin2, opt2, k)
    assert torch.equal(lin2.weight, lin.weight)
    for key, v in opt.state[lin.weight].items():
        assert torch.equal(opt2.state[lin2.weight][key], v), key
