"""The fused CPU lowering (issue 20, item 1): ``backend="inductor"`` against the eager lowering.

Inductor compiles are slow (cold: 14–140 s per signature on the shared 2-core VM), so the module compiles
exactly two signatures and shares them: ``_SIG`` (K = 3 members of ``37×5`` states — M prime, r = 5 dividing
nothing — with a bf16 stochastic-rounding first moment, an int8 unsigned second moment and an fp32
``coap_exp_avg``: every precision in one loop) and the optimizer-level group of
:func:`test_optimizer_backend_inductor_matches_eager`. Oracles: :func:`lowrank_stored` run eagerly (the
``backend="eager"`` arithmetic) and the same update in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import randn, seeds
from hypothesis import given, settings
from hypothesis import strategies as st

import coap_compile
from coap_compile.lowering import inductor
from coap_compile.lowering.eager import run_lowrank
from coap_compile.lowering.stacked import load_stacked, stacked_spec
from coap_compile.storage.bf16 import Bf16Storage
from coap_compile.storage.int8 import Int8Storage

K, M, R = 3, 37, 5


@pytest.fixture(scope="module")
def setup():
    """The AdamW program, the stacked specs (bf16 m, int8 v, fp32 EMA) and a live-input maker."""
    w = torch.nn.Parameter(torch.zeros(M, 11))
    opt = coap_compile.optimize([{"params": [w], "project": True}], torch.optim.AdamW, rank=R, lr=1e-3)
    program = opt.layout(w).program.program
    specs = (
        stacked_spec("exp_avg", Bf16Storage(), "first_moment", (M, R)),
        stacked_spec("exp_avg_sq", Int8Storage(min_numel=0), "second_moment", (M, R)),
    )
    ema = (stacked_spec("coap_exp_avg", Int8Storage(), "first_moment", (M, R)), 0.9)  # < 4096: fp32
    assert [s.precision for s in (*specs, ema[0])] == ["bf16", "int8", "fp32"]

    def inputs(k, lr, b1, b2, eps, wd):
        g = opt.param_groups[0]
        g.update(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
        opt.state[w]["step"] = torch.tensor(float(k))
        return opt.live_inputs(w)

    inductor.reset()
    yield program, specs, ema, inputs
    inductor.reset()


def _parts(seed, specs, ema):
    parts = {}
    for i, spec in enumerate((*specs, ema[0])):
        members = []
        for j in range(K):
            value = randn(seed + 10 * i + j, M, R, scale=1e-3)
            if spec.name == "exp_avg_sq":
                value = value.square()
            members.append(spec.storage.from_value(spec.name, value, "first_moment" if i != 1 else
                                                   "second_moment", seed=seed + j))  # fmt: skip
        parts.update({key: torch.stack([m[key] for m in members]) for key in spec.keys})
    return parts


def _run(fused, program, specs, ema, x, parts, ins):
    return inductor.elementwise(fused, program, specs, ema, None, x, parts, ins)


@settings(deadline=None)
@given(
    seed=seeds,
    k=st.integers(0, 500),
    lr=st.floats(1e-5, 1e-1),
    b1=st.floats(0.5, 0.99),
    b2=st.floats(0.9, 0.9999),
    wd=st.sampled_from([0.01, 0.1]),  # 0 would be a structural edit (another program)
    grad_scale=st.sampled_from([1e-6, 1e-3, 1.0]),
)
def test_fused_equals_eager_within_the_float64_bound(setup, seed, k, lr, b1, b2, wd, grad_scale):
    """Every drawn hyperparameter set runs the one compiled loop (no recompile). D: both lowerings within
    2⁻²⁰ of float64 relative to max|D| (Inductor's own order for the bias corrections and the lerp).
    Stored states: the rounding streams and the step are equal; stored values equal the eager ones
    except where the float32 inputs to the rounding differ by an ulp, and then by one rounding step."""
    program, specs, ema, inputs = setup
    ins = inputs(k, lr, b1, b2, 1e-8, wd)
    parts = _parts(seed, specs, ema)
    x = randn(seed + 1, K, M, R, scale=grad_scale)
    d_e, delta_e, step_e, new_e = _run(False, program, specs, ema, x, parts, ins)
    d_f, delta_f, step_f, new_f = _run(True, program, specs, ema, x, parts, ins)
    assert inductor.STATS["compiles"] == 1 and inductor.STATS["disabled"] is None
    assert torch.equal(step_e, step_f) and float(d_e) == pytest.approx(float(d_f), rel=2**-50)
    olds = [load_stacked(s, parts).double() for s in specs]
    k_t, lr_t, hyp = ins
    _, delta64, _, _ = run_lowrank(program, None, x.double(), olds, k_t, lr_t, hyp)
    # normwise against float64 (elementwise is not meaningful where m' = m + (1-β₁)(g - m) cancels):
    # observed ≤ 1.2e-7 for both lowerings; bound 2⁻²⁰ ≈ 9.5e-7 (8 float32 roundings of the largest |D|)
    scale = float(delta64.abs().max())
    assert float((delta_e.double() - delta64).abs().max()) <= 2**-20 * scale
    assert float((delta_f.double() - delta64).abs().max()) <= 2**-20 * scale
    assert new_e.keys() == new_f.keys()
    for key in new_e:
        a, b = new_e[key], new_f[key]
        if key.endswith(".rng"):
            assert torch.equal(a, b), key
        elif key == "coap_exp_avg":  # fp32 EMA lerp(e, X̃, 0.1) in Inductor's order: ≤ 2 ulp of |e| + |X̃|
            assert bool(((a - b).abs() <= 2**-21 * (parts[key].abs() + x.abs())).all()), key
        elif a.dtype == torch.bfloat16:  # one bf16 step where the float32 input moved by an ulp
            diff = (a.float() - b.float()).abs()
            assert bool((diff <= 2**-7 * a.float().abs().clamp_min(1e-30)).all()), key
        else:  # int8 codes: adjacent levels at most; scales: the block absmax, within an ulp
            if key.endswith(".q8"):
                assert int((a.int() - b.int()).abs().max()) <= 1, key
            else:
                assert bool(((a - b).abs() <= 2**-23 * a.abs()).all()), key


def test_new_hyperparameters_do_not_recompile(setup):
    """A scheduler's edits (k, lr, betas, eps, weight decay) are tensor inputs: no new Dynamo graph."""
    from torch._dynamo.utils import counters

    program, specs, ema, inputs = setup
    parts, x = _parts(3, specs, ema), randn(4, K, M, R, scale=1e-3)
    _run(True, program, specs, ema, x, parts, inputs(1, 1e-3, 0.9, 0.999, 1e-8, 0.01))
    graphs, compiles = counters["stats"]["unique_graphs"], inductor.STATS["compiles"]
    for i in range(4):
        _run(True, program, specs, ema, x, parts, inputs(7 + i, 1e-2 / (i + 1), 0.8 + 0.01 * i,
                                                         0.99, 1e-6 * (i + 1), 0.01 + 0.1 * i))  # fmt: skip
    assert counters["stats"]["unique_graphs"] == graphs and inductor.STATS["compiles"] == compiles == 1


def test_unavailable_compiler_runs_eagerly_with_one_warning(setup, monkeypatch):
    """No C++ compiler (simulated: compiling raises): one RuntimeWarning, then the eager results exactly."""
    program, specs, ema, inputs = setup

    def broken(fn, *_):
        def call(*args):
            raise RuntimeError("simulated: no C++ compiler found")

        return call

    monkeypatch.setattr(inductor, "_torch_compile", broken)
    monkeypatch.setattr(inductor, "_CACHE", {})
    monkeypatch.setitem(inductor.STATS, "disabled", None)
    parts, x = _parts(5, specs, ema), randn(6, K, M, R, scale=1e-3)
    ins = inputs(3, 1e-3, 0.9, 0.999, 1e-8, 0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [_run(True, program, specs, ema, x, parts, ins) for _ in range(3)]
    msgs = [w for w in caught if issubclass(w.category, RuntimeWarning) and "inductor" in str(w.message)]
    assert len(msgs) == 1 and "no C++ compiler" in str(msgs[0].message)
    ref = _run(False, program, specs, ema, x, parts, ins)
    for o in out:
        assert torch.equal(o[1], ref[1]) and all(torch.equal(o[3][key], ref[3][key]) for key in ref[3])


def test_backend_must_be_known():
    with pytest.raises(ValueError, match="backend"):
        coap_compile.optimize([torch.nn.Parameter(torch.zeros(4, 4))], torch.optim.AdamW, backend="inductr")


def test_optimizer_backend_inductor_matches_eager():
    """A bf16 group of three (one transposed) under ``backend="inductor"`` vs ``"eager"``, lr edited every
    step, 7 steps with refreshes: one compiled signature; weights within 4 ulp-relative per step of
    float32 noise (observed max 3e-7 relative: the last-bit differences of D), rounding streams equal."""

    def build(backend):
        ps = [randn(70 + i, *s, scale=0.3).requires_grad_() for i, s in enumerate([(M, 11), (13, M), (M, 9)])]
        opt = coap_compile.optimize([{"params": ps, "project": True}], torch.optim.AdamW, rank=R, lr=1e-2,
                                    state_precision="bf16", update_interval=3, backend=backend)  # fmt: skip
        return ps, opt

    (pa, oa), (pb, ob) = build("eager"), build("inductor")
    assert [g.fused for g in ob.plan.matrix_groups] == [True] and not oa.plan.matrix_groups[0].fused
    before, fallbacks = inductor.STATS["compiles"], inductor.STATS["fallbacks"]
    for step in range(7):
        for opt in (oa, ob):
            opt.param_groups[0]["lr"] = 1e-2 * (1 + 0.1 * step)
        for ps in (pa, pb):
            for i, p in enumerate(ps):
                p.grad = randn(900 + 10 * step + i, *p.shape, scale=1e-2)
        oa.step()
        ob.step()
    assert inductor.STATS["compiles"] - before == 1 and inductor.STATS["fallbacks"] == fallbacks
    for a, b in zip(pa, pb):
        assert bool(((a - b).abs() <= 1e-6 * a.abs().max()).all())
        assert torch.equal(oa.state[a]["exp_avg.rng"], ob.state[b]["exp_avg.rng"])
        assert torch.equal(oa.state[a]["step"], ob.state[b]["step"])


def test_full_rank_int8_group_inductor_matches_eager():
    """Full-rank int8 parameters (issue 20 follow-up: the demo LM's embedding ran its int8 store eagerly)
    under ``backend="inductor"``: two ``67×63`` weights (blocks padded: 67, 63 divide nothing) form one
    fused full-rank group — one compiled signature — a lone one would form a fused group of one, a
    ``300`` vector (fp32 state below ``min_numel``) stays eager; 5 steps with lr edited every step against
    ``"eager"``: weights within 1e-6 of their scale (observed ≤ 1 ulp: the last-bit differences of D, see
    :mod:`coap_compile.lowering.inductor`), step counts and rounding streams equal, codes within one level."""

    def build(backend):
        ps = [randn(40 + i, 67, 63, scale=0.3).requires_grad_() for i in range(2)]
        lone, vec = randn(43, 67, 71, scale=0.3).requires_grad_(), randn(44, 300).requires_grad_()
        groups = [{"params": [*ps, vec], "project": False}, {"params": [lone], "project": False}]
        opt = coap_compile.optimize(
            groups, torch.optim.AdamW, lr=1e-2, state_precision="int8", backend=backend
        )
        return ps, lone, opt

    (pa, _, oa), (pb, lb, ob) = build("eager"), build("inductor")
    fused = {fg.members[0].shape: (len(fg.members), fg.fused) for fg in ob.plan.full_groups}
    assert fused == {(67, 63): (2, True), (67, 71): (1, True)}
    assert not any(fg.fused for fg in oa.plan.full_groups)
    lb.grad = None  # the lone parameter is not stepped (its compile would be one more signature)
    before, fallbacks = inductor.STATS["compiles"], inductor.STATS["fallbacks"]
    for step in range(5):
        for opt in (oa, ob):
            opt.param_groups[0]["lr"] = 1e-2 * (1 + 0.1 * step)
        for ps in (pa, pb):
            for i, p in enumerate(ps):
                p.grad = randn(700 + 10 * step + i, *p.shape, scale=1e-2)
        oa.step()
        ob.step()
    assert inductor.STATS["compiles"] - before == 1 and inductor.STATS["fallbacks"] == fallbacks
    for a, b in zip(pa, pb):
        assert bool(((a - b).abs() <= 1e-6 * a.abs().max()).all())
        sa, sb = oa.state[a], ob.state[b]
        assert torch.equal(sa["step"], sb["step"]) and torch.equal(sa["exp_avg.rng"], sb["exp_avg.rng"])
        for name in ("exp_avg", "exp_avg_sq"):
            assert int((sa[name + ".q8"].int() - sb[name + ".q8"].int()).abs().max()) <= 1
