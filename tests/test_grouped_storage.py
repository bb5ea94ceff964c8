"""Grouped update with bf16/int8 states (issue 20, item 2): every member keeps its own rounding stream.

Oracles: the storages' own per-matrix ``load``/``store_`` (for the stacked functions of
``lowering/stacked.py``) and the per-matrix optimizer (``grouped=False``) for the grouped update:
``torch.equal`` on every weight and every physical state tensor (codes, scales, rounding streams).
"""

from __future__ import annotations

import pytest
import torch
from helpers import randn, seeds
from hypothesis import given, settings
from hypothesis import strategies as st

import coap_compile
from coap_compile.lowering.stacked import load_stacked, stacked_spec, stored_stacked
from coap_compile.storage.bf16 import Bf16Storage
from coap_compile.storage.int8 import Int8Storage

STORAGES = {
    "bf16-sr": Bf16Storage(),
    "bf16-rn": Bf16Storage(rounding="nearest"),
    "int8-sr": Int8Storage(min_numel=0),
    "int8-rn": Int8Storage(min_numel=0, rounding="nearest"),
    "int8-b64": Int8Storage(min_numel=0, quant_block_size=64),
    "int8-tiles": Int8Storage(min_numel=0, blocks="tiles"),
    "int8-tiles-b64-rn": Int8Storage(min_numel=0, blocks="tiles", quant_block_size=64, rounding="nearest"),
    "int8-small-kept-fp32": Int8Storage(),  # < 4096 elements: the fp32 layout
}


@settings(deadline=None)
@given(
    seed=seeds,
    storage=st.sampled_from(sorted(STORAGES)),
    kind=st.sampled_from(["first_moment", "second_moment"]),
    k=st.integers(1, 4),
    rows=st.integers(1, 70),
    cols=st.integers(1, 19),
    stores=st.integers(1, 3),
)
def test_stacked_load_store_equal_the_per_member_storage(seed, storage, kind, k, rows, cols, stores):
    """Odd shapes (blocks cut by both edges), K members with distinct seeds and counters: the stacked load
    is each member's ``load`` and the stacked store each member's ``store_``, bit for bit."""
    stg = STORAGES[storage]
    members = [stg.from_value("m", randn(seed + i, rows, cols), kind, seed=seed + i) for i in range(k)]
    spec = stacked_spec("m", stg, kind, (rows, cols))
    assert all(spec.matches(m) for m in members)
    for step in range(stores):
        parts = {key: torch.stack([m[key] for m in members]) for key in spec.keys}
        loaded = load_stacked(spec, parts)
        for i, m in enumerate(members):
            assert torch.equal(loaded[i], stg.load(m, "m"))
        value = randn(seed * 7 + step, k, rows, cols, scale=10.0 ** (step - 1))
        value[0, : rows // 2] = 0.0  # zero blocks (absmax 0) and blocks of mixed zeros
        new = stored_stacked(spec, parts, value)
        for i, m in enumerate(members):
            stg.store_(m, "m", value[i])
            for key in spec.keys:
                assert torch.equal(new[key][i], m[key]), key


@pytest.mark.parametrize("storage", ["int8-sr", "int8-tiles", "int8-tiles-b64-rn"])
@pytest.mark.parametrize(("rows", "cols"), [(64, 16), (48, 32), (50, 16), (64, 13)])
def test_stacked_int8_load_on_whole_and_cut_blocks(storage, rows, cols):
    """Both load paths: blocks that tile the state exactly (the scales broadcast as a view) and blocks cut by
    an edge (the scales gathered per element), each member's ``load`` bit for bit."""
    stg = STORAGES[storage]
    members = [stg.from_value("m", randn(40 + i, rows, cols), "first_moment", seed=i) for i in range(3)]
    spec = stacked_spec("m", stg, "first_moment", (rows, cols))
    parts = {key: torch.stack([m[key] for m in members]) for key in spec.keys}
    loaded = load_stacked(spec, parts)
    for i, m in enumerate(members):
        assert torch.equal(loaded[i], stg.load(m, "m"))


# M = 523 (a prime: int8 blocks of 32 rows and bf16 streams cut at odd places), widths 9, 11 and 13 with
# two transposed members; rank 8: M·r = 4184 ≥ 4096, so int8 quantizes the low-rank states.
SHAPES = [(523, 11), (523, 9), (13, 523), (523, 11), (11, 523), (200, 9)]
RANK = 8


#: full-rank parameters (a second param group, project=False): DERIVED kind under a state precision; two
#: 70×70 (4900 elements: int8 quantizes them) and three vectors of 37 form two full-rank groups.
FULL = [(70, 70), (37,), (70, 70), (37,), (37,)]


def _params(seed):
    return [randn(seed + i, *s, scale=0.3).requires_grad_() for i, s in enumerate(SHAPES + FULL)]


def _build(params, grouped, precision, base="adamw"):
    cls, kw = {
        "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}),
        "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3}),  # COAP keeps coap_exp_avg (stored in precision)
    }[base]
    n = len(SHAPES)
    groups = [{"params": params[:n], "project": True}, {"params": params[n:], "project": False}]
    return coap_compile.optimize(
        groups, cls, rank=RANK, update_interval=3, reproject_factor=2,
        grouped=grouped, state_precision=precision, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("precision", "base"), [("bf16", "adamw"), ("int8", "adamw"), ("bf16", "rmsprop"), ("int8", "rmsprop")]
)
def test_grouped_low_precision_states_are_bit_identical_to_per_matrix(precision, base):
    """8 steps (correlation steps and a low-cost SVD included), lr edited every step, one member without
    a gradient at step 5 (the group splits into runs): weights, codes, scales, streams, steps equal."""
    pa, pb = _params(5), _params(5)
    oa, ob = _build(pa, True, precision, base), _build(pb, False, precision, base)
    assert [len(g.members) for g in oa.plan.matrix_groups] == [5] and ob.plan.matrix_groups == ()
    assert sorted(len(g.members) for g in oa.plan.full_groups) == [2, 3] and ob.plan.full_groups == ()
    seen = []
    for step in range(8):
        for opt in (oa, ob):
            opt.param_groups[0]["lr"] *= 1.1
        for ps in (pa, pb):
            for i, p in enumerate(ps):
                p.grad = None if (step == 5 and i == 2) else randn(1000 * step + i, *p.shape, scale=1e-2)
        oa.step()
        ob.step()
        seen.append([runs for _, runs in oa.grouped_runs])
        assert len(oa._runner.work_full) == 2
    assert seen[4] == [((0, 5),)] and len(seen[6][0]) > 1  # whole group, then split by the step counts
    for a, b in zip(pa, pb):
        assert torch.equal(a.detach(), b.detach())
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        if precision == "int8" and 523 in a.shape:
            assert any(k.endswith(".q8") for k in sa)  # really quantized
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_low_precision_checkpoints_are_interchangeable():
    """A grouped int8 optimizer's state_dict loads into a per-matrix one and both continue bit-identically."""
    pa, pb = _params(9), _params(9)
    oa, ob = _build(pa, True, "int8"), _build(pb, False, "int8")
    for step in range(4):
        for ps in (pa, pb):
            for i, p in enumerate(ps):
                p.grad = randn(50 * step + i, *p.shape, scale=1e-2)
        oa.step()
        if step < 3:
            ob.step()
        if step == 2:
            ob.load_state_dict(oa.state_dict())
            with torch.no_grad():
                for a, b in zip(pa, pb):
                    b.copy_(a)
    ob.step()  # the 4th step for ob (its gradients are the same)
    for a, b in zip(pa, pb):
        assert torch.equal(a.detach(), b.detach())
        for key in oa.state[a]:
            assert torch.equal(oa.state[a][key], ob.state[b][key]), key
