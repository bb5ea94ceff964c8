"""Grouped update (issue 14): projected matrices with equal ``M×r`` states stepped together.

The oracle is the per-matrix path (``grouped=False``) of the same optimizer: on CPU the grouped path
must be bit-identical to it (``torch.equal`` on every weight and every state tensor), across refreshes,
live hyperparameter edits, checkpoints in either direction, copies and the fallbacks.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import randn, seeds
from hypothesis import given, settings
from hypothesis import strategies as st

import coap_compile
from coap_compile import NonFiniteGradientError
from coap_compile.runtime import grouped as grouped_mod
from coap_compile.runtime import threads as threads_mod
from coap_lab.cli.memory import measured_state_bytes

#: (m, n) of the projected matrices: six share M = 24 (three 24×16, two transposed 16×24, one of width
#: 12), one (30×16) is alone.
SHAPES = [(24, 16), (24, 16), (16, 24), (24, 16), (16, 24), (24, 12), (30, 16)]
BASES = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}),
    "adam-l2": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),  # prologue X = G + λW
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.1}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5}),  # coap_exp_avg under COAP
}
RANK = 4


def _params(seed: int, shapes=SHAPES) -> list[torch.Tensor]:
    ws = [randn(seed + i, *s, scale=0.3).requires_grad_() for i, s in enumerate(shapes)]
    return [*ws, randn(seed + 99, 24, scale=0.1).requires_grad_()]  # a full-rank bias


def _build(params, base="adamw", grouped=True, **kw):
    cls, base_kw = BASES[base]
    groups = [{"params": params[:-1], "project": True}, {"params": params[-1:]}]
    return coap_compile.optimize(
        groups, cls, rank=RANK, update_interval=3, reproject_factor=2, grouped=grouped, **{**base_kw, **kw}
    )


def _grads(params, seed: int, step: int, skip=()):
    for i, p in enumerate(params):
        p.grad = None if i in skip else randn(seed * 1000 + 17 * step + i, *p.shape, scale=1e-2)


def _assert_same(pa, oa, pb, ob):
    for a, b in zip(pa, pb):
        assert torch.equal(a.detach(), b.detach())
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def _pair(seed, base="adamw", **kw):
    pa, pb = _params(seed), _params(seed)
    return pa, _build(pa, base, True, **kw), pb, _build(pb, base, False, **kw)


@settings(deadline=None)
@given(
    seed=seeds,
    base=st.sampled_from(sorted(BASES)),
    projection=st.sampled_from(["coap", "galore", "flora", "dct"]),
    scale=st.sampled_from([1.0, 0.3]),
)
def test_grouped_is_bit_identical_to_per_matrix(seed, base, projection, scale):
    """13 steps (init, correlation steps at k = 3, 9, low-cost SVDs at 6, 12 for COAP) with lr and the
    first beta/momentum edited every step: weights and every state tensor are equal bit for bit."""
    pa, oa, pb, ob = _pair(seed, base, projection=projection, scale=scale)
    assert [len(g.members) for g in oa.plan.matrix_groups] == [6] and ob.plan.matrix_groups == ()
    for step in range(13):
        for opt in (oa, ob):
            group = opt.param_groups[0]
            group["lr"] = BASES[base][1]["lr"] * (1 + 0.1 * (step % 3))
            if "betas" in group:
                group["betas"] = (0.9 - 0.01 * step, group["betas"][1])
            elif group.get("momentum"):
                group["momentum"] = 0.5 + 0.02 * step
        _grads(pa, seed, step)
        _grads(pb, seed, step)
        oa.step()
        ob.step()
        assert [runs for _, runs in oa.grouped_runs] == [((0, 6),)]
    _assert_same(pa, oa, pb, ob)


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 24 * RANK * 4, 5 * 24 * RANK * 4])
def test_chunked_elementwise_pass_is_bit_identical(monkeypatch, chunk_bytes):
    """CPU runs the elementwise pass over chunks of members (1, 2 and 5 of 6 here): same bits."""
    monkeypatch.setattr(grouped_mod, "CHUNK_BYTES", chunk_bytes)
    pa, oa, pb, ob = _pair(3)
    for step in range(8):
        _grads(pa, 3, step)
        _grads(pb, 3, step)
        oa.step()
        ob.step()
    _assert_same(pa, oa, pb, ob)


def test_states_are_views_of_one_buffer_and_bytes_are_unchanged():
    pa, oa, pb, ob = _pair(1)
    for step in range(3):
        _grads(pa, 1, step)
        _grads(pb, 1, step)
        oa.step()
        ob.step()
    group = oa.plan.matrix_groups[0]
    for name in ("exp_avg", "exp_avg_sq"):
        buf = oa.state[group.members[0]][name]._base  # the group's K×M×r buffer
        assert buf.shape == (6, 24, RANK) and buf.is_contiguous()
        for k, p in enumerate(group.members):
            view = oa.state[p][name]
            assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            assert view.data_ptr() == buf[k].data_ptr() and view.shape == (24, RANK)
    assert oa.state[group.members[0]]["step"]._base.shape == (6,) and all(
        oa.state[p]["step"].ndim == 0 for p in group.members
    )
    assert measured_state_bytes(oa) == measured_state_bytes(ob) == oa.memory_plan().total_bytes


@pytest.mark.parametrize("direction", ["grouped->per-matrix", "per-matrix->grouped", "grouped->grouped"])
def test_checkpoints_are_interchangeable(direction):
    """Save after 4 steps (torch.load(weights_only=True)), resume for 6 more in the other mode: the
    result equals 10 uninterrupted steps of the per-matrix path."""
    src_grouped = direction.startswith("grouped")
    dst_grouped = direction.endswith("->grouped")
    p_ref = _params(5)
    o_ref = _build(p_ref, grouped=False)
    p_src = _params(5)
    o_src = _build(p_src, grouped=src_grouped)
    for step in range(4):
        for ps, o in ((p_ref, o_ref), (p_src, o_src)):
            _grads(ps, 5, step)
            o.step()
    buf = io.BytesIO()
    torch.save({"w": [p.detach() for p in p_src], "opt": o_src.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    p_dst = _params(5)
    with torch.no_grad():
        for p, w in zip(p_dst, ckpt["w"]):
            p.copy_(w)
    o_dst = _build(p_dst, grouped=dst_grouped)
    o_dst.load_state_dict(ckpt["opt"])
    for step in range(4, 10):
        for ps, o in ((p_ref, o_ref), (p_dst, o_dst)):
            _grads(ps, 5, step)
            o.step()
    if dst_grouped:
        assert o_dst.grouped_runs  # the loaded (unpacked) states were packed and stepped as a group
    _assert_same(p_dst, o_dst, p_ref, o_ref)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_bit_identically(how):
    pa, oa, _, _ = _pair(7)
    for step in range(4):
        _grads(pa, 7, step)
        oa.step()
    if how == "deepcopy":
        pc, oc = copy.deepcopy((pa, oa))
    else:
        pc, oc = pickle.loads(pickle.dumps((pa, oa)))
    for step in range(4, 9):
        _grads(pa, 7, step)
        _grads(pc, 7, step)
        oa.step()
        oc.step()
    assert oc.grouped_runs
    _assert_same(pa, oa, pc, oc)


def test_missing_gradient_and_unequal_steps_split_the_group_into_runs():
    """A member without a gradient is skipped; afterwards its step counter lags, so the group steps as
    runs of equal counters (bit-identical throughout); a rank change re-bases and re-packs."""
    pa, oa, pb, ob = _pair(11)
    for step in range(10):
        skip = (1,) if step in (2, 3) else ()
        _grads(pa, 11, step, skip)
        _grads(pb, 11, step, skip)
        oa.step()
        ob.step()
        want = ((0, 6),) if step < 2 else ((0, 1), (2, 6)) if step < 4 else ((0, 1), (1, 2), (2, 6))
        assert [runs for _, runs in oa.grouped_runs] == [want], step
        if step == 6:
            for opt in (oa, ob):
                opt.param_groups[0]["rank"] = 3  # re-base at the next step: new buffers, packed again
    assert oa.state[oa.plan.matrix_groups[0].members[0]]["exp_avg"]._base.shape == (6, 24, 3)
    _assert_same(pa, oa, pb, ob)


def test_structural_change_rebuilds_groups_bit_identically():
    """amsgrad switched on after 4 steps adds max_exp_avg_sq: the groups are rebuilt with it."""
    pa, oa, pb, ob = _pair(13)
    for step in range(9):
        if step == 4:
            for opt in (oa, ob):
                opt.param_groups[0]["amsgrad"] = True
        _grads(pa, 13, step)
        _grads(pb, 13, step)
        oa.step()
        ob.step()
    assert "max_exp_avg_sq" in oa.plan.matrix_groups[0].names and oa.grouped_runs
    _assert_same(pa, oa, pb, ob)


def test_nonfinite_gradient_modifies_nothing_with_groups():
    pa, oa, _, _ = _pair(17)
    for step in range(3):
        _grads(pa, 17, step)
        oa.step()
    before = [p.detach().clone() for p in pa]
    states = {id(p): {k: v.clone() for k, v in oa.state[p].items()} for p in pa}
    _grads(pa, 17, 3)
    pa[4].grad[1, 2] = float("inf")
    with pytest.raises(NonFiniteGradientError, match=r"16, 24"):
        oa.step()
    oa.step(found_inf=torch.tensor(1.0))
    for p, b in zip(pa, before):
        assert torch.equal(p.detach(), b)
        for k, v in oa.state[p].items():
            assert torch.equal(v, states[id(p)][k]), k


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"grouped": False}, "grouped=False"),
    ],
)
def test_cases_that_run_per_matrix(kw, reason):
    params = _params(19)
    opt = _build(params, **kw)
    assert opt.plan.matrix_groups == ()
    assert reason in opt.explain()


def test_adafactor_keeps_per_matrix_semantics():
    params = _params(23)
    groups = [{"params": params[:-1], "project": True}, {"params": params[-1:]}]
    opt = coap_compile.optimize(groups, torch.optim.Adafactor, rank=RANK, lr=1e-2)
    assert opt.plan.matrix_groups == ()
    assert "reductions" in opt.explain()


def test_explain_names_the_groups():
    opt = _build(_params(29))
    text = opt.explain()
    assert "grouped update: 1 group" in text and "6 matrices" in text


def test_grouped_must_be_a_bool():
    with pytest.raises(TypeError, match="grouped must be a bool, got 1"):
        _build(_params(31), grouped=1)


def test_compiled_train_step_with_groups_does_not_recompile():
    """torch.compile (aot_eager) of a step over a grouped optimizer, LR and β₁ changed every step: one
    graph set after the first step, refreshes included, and the result matches eager."""
    from torch._dynamo.utils import counters

    def setup():
        params = _params(37)
        return params, _build(params, lr=torch.tensor(1e-2))

    pe, oe = setup()
    pc, oc = setup()

    def step(opt):
        def fn():
            opt.step()

        return fn

    fe, fc = step(oe), torch.compile(step(oc), backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    first = None
    for i in range(14):
        for ps, o in ((pe, oe), (pc, oc)):
            _grads(ps, 37, i)
            o.param_groups[0]["lr"].fill_(1e-2 / (1 + i))
            o.param_groups[0]["betas"] = (0.9 - 0.01 * i, 0.999)
        fe()
        fc()
        if i == 1:  # step 0 initializes per matrix, step 1 is the first grouped one
            first = counters["stats"]["unique_graphs"]
    assert oc.grouped_runs and first > 0
    assert counters["stats"]["unique_graphs"] == first, dict(counters["stats"])
    # aot_eager replays the same aten ops; observed equal to ~1e-7 relative (re-ordered scalar math).
    for a, b in zip(pc, pe):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _fail_second_chunk(monkeypatch, threads_: int):
    """Chunks of two members; the second call of the low-rank pass raises. Returns the members, and
    for each whether its weight and whether its states changed."""
    monkeypatch.setattr(grouped_mod, "CHUNK_BYTES", 2 * 24 * RANK * 4)  # chunks of two members
    monkeypatch.setattr(threads_mod, "MAX_MEMBER_THREADS", threads_)
    pa, oa, _, _ = _pair(41)
    for step in range(2):
        _grads(pa, 41, step)
        oa.step()
    _grads(pa, 41, 2)
    before = [p.detach().clone() for p in pa]
    states = {id(p): {k: v.clone() for k, v in oa.state[p].items()} for p in pa}
    from coap_compile.lowering import inductor as lowering_mod  # the group's pass: lowering.inductor

    real, calls = lowering_mod.lowrank_stored, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(*a, **k)

    monkeypatch.setattr(lowering_mod, "lowrank_stored", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        oa.step()
    members = oa.plan.matrix_groups[0].members
    out = []
    for p in members:
        changed = not torch.equal(p.detach(), before[_idx(pa, p)])
        same_state = all(torch.equal(v, states[id(p)][n]) for n, v in oa.state[p].items())
        out.append((changed, not same_state))
    assert torch.equal(pa[-1].detach(), before[-1])  # the full-rank bias runs after the groups
    return out


def test_a_failing_chunk_leaves_it_and_later_members_unchanged(monkeypatch):
    """Each chunk is computed before its first write: run in order (no member pool), an exception inside
    the second chunk's update leaves the first chunk updated (as torch's optimizers leave earlier
    parameters) and the failing chunk and every later member untouched, states and step counters
    included."""
    changed = _fail_second_chunk(monkeypatch, 1)
    assert changed == [(k < 2, k < 2) for k in range(len(changed))]


def test_a_failing_chunk_on_the_member_pool_is_all_or_nothing(monkeypatch):
    """On the member pool (2 threads) the chunks in flight finish and no chunk starts after the error:
    every chunk is updated completely (weights and states) or not at all, the failing one is not, and at
    most the two chunks that ran beside it (one before, one in flight) are."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        changed = _fail_second_chunk(monkeypatch, 8)
    finally:
        torch.set_num_threads(before)
    chunks = [changed[i : i + 2] for i in range(0, len(changed), 2)]
    assert all(c[0] == c[1] and len(set(c[0])) == 1 for c in chunks)  # all or nothing per chunk
    updated = sum(c[0][0] for c in chunks)
    assert 1 <= updated <= 2 and len(chunks) >= 3


def _idx(params, p):
    return next(i for i, q in enumerate(params) if q is p)
