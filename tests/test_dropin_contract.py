"""Issue 8.2–8.6, the rest of the drop-in contract: copies, safe checkpoint loading, validated groups,
atomic steps and the generic route's probe.

Each test fails on the code before the contract was implemented (the issue lists what broke)."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from helpers import randn
from test_runtime import TinyLM, _train

import coap_compile
from coap_compile import UnsupportedOptimizerError
from coap_compile.capture import capture_count
from coap_compile.runtime import step as runtime_step


def _build(base=torch.optim.AdamW, rank=8, seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyLM()
    kw = {"lr": 1e-2, **kw}
    return model, coap_compile.optimize(model, base, rank=rank, update_interval=2, reproject_factor=2, **kw)


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return params, state, groups


def _assert_unchanged(model, opt, snap):
    params, state, groups = snap
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert s.keys() == state[id(p)].keys()
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


# -- copies -----------------------------------------------------------------------------------------


def _roundtrip_deepcopy(obj):
    return copy.deepcopy(obj)


def _roundtrip_pickle(obj):
    return pickle.loads(pickle.dumps(obj))


def _roundtrip_torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # a pickled optimizer object (not a state dict)


@pytest.mark.parametrize("how", [_roundtrip_deepcopy, _roundtrip_pickle, _roundtrip_torch_save])
@pytest.mark.parametrize("base", [torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adafactor])
def test_copies_continue_bit_identically(how, base):
    model, opt = _build(base)
    _train(model, opt, 3, seed=0)
    model2, opt2 = how((model, opt))
    assert opt2.explain().splitlines()[1] == opt.explain().splitlines()[1]  # "projected parameters: …"
    assert [n.shape for n in opt2.projected_parameters()] == [n.shape for n in opt.projected_parameters()]
    assert {r.name for r in opt2.memory_plan().rows} == {r.name for r in opt.memory_plan().rows}
    _train(model, opt, 4, seed=1)  # crosses a correlation step and an SVD refresh
    _train(model2, opt2, 4, seed=1)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
        sa, sb = opt.state[a], opt2.state[b]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- safe load_state_dict ---------------------------------------------------------------------------


def _checkpoint(base=torch.optim.AdamW, rank=8, **kw):
    model, opt = _build(base, rank=rank, **kw)
    _train(model, opt, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _refused(opt, model, sd, match):
    _train(model, opt, 2, seed=5)
    snap = _snapshot(model, opt)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_unchanged(model, opt, snap)
    _train(model, opt, 3, seed=6)  # still usable, and exactly as if the load had not been tried
    _train(twin_model, twin_opt, 3, seed=6)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("base", "kw", "match"),
    [
        (torch.optim.SGD, {"momentum": 0.9}, r"COAP-AdamW.*COAP-SGD.*exp_avg, exp_avg_sq.*momentum_buffer"),
        (torch.optim.RMSprop, {}, r"COAP-AdamW.*COAP-RMSprop.*expects.*square_avg"),
        (torch.optim.Adafactor, {}, r"COAP-AdamW.*COAP-Adafactor.*expects.*row_var"),
        (torch.optim.Adam, {}, r"saved by COAP-AdamW \(torch.optim.AdamW\); this optimizer is COAP-Adam"),
    ],
)
def test_checkpoint_of_another_base_is_refused(base, kw, match):
    model, opt = _build(base, **kw)
    _refused(opt, model, _checkpoint(torch.optim.AdamW), match)


def test_plain_torch_checkpoint_is_refused():
    model, opt = _build()
    torch.manual_seed(0)
    plain_model = TinyLM()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    _train(plain_model, plain, 2)
    sd = [
        {
            "params": list(range(6)),
            **{k: v for k, v in plain.state_dict()["param_groups"][0].items() if k != "params"},
        }
    ]
    with pytest.raises(ValueError, match="param groups of sizes"):  # one group vs COAP's two
        opt.load_state_dict(plain.state_dict())
    two_groups = {"state": plain.state_dict()["state"], "param_groups": [
        {**sd[0], "params": [0, 1, 2, 3]}, {**sd[0], "params": [4, 5]}]}  # fmt: skip
    _refused(opt, model, two_groups, r"plain torch.optim optimizer.*cannot be\s+loaded into COAP-AdamW")


def test_rank_mismatch_is_refused_naming_both_ranks():
    model, opt = _build(rank=4)
    _refused(opt, model, _checkpoint(rank=8), r"up.weight.*rank 4.*the checkpoint's states have rank 8")


def test_projection_mismatch_is_refused():
    model, opt = _build(projection="galore")
    _refused(opt, model, _checkpoint(), r"projection='coap', this optimizer projection='galore'")


def test_a_matching_checkpoint_loads_and_adopts_its_hyperparameters():
    """As torch: the checkpoint's hyperparameters (live or structural) replace the current ones."""
    sd = _checkpoint(betas=(0.5, 0.9), amsgrad=True)
    model, opt = _build(betas=(0.9, 0.999), amsgrad=True)
    opt.load_state_dict(sd)
    assert all(g["betas"] == (0.5, 0.9) for g in opt.param_groups)
    assert "coap" in sd and sd["coap"]["base"] == "torch.optim.AdamW"
    _train(model, opt, 2)  # and it steps


# -- validated groups -------------------------------------------------------------------------------

BAD = [
    ("rank", 0, ValueError, "rank must be a positive int, got 0"),
    ("rank", "8", TypeError, "rank must be a positive int, got '8'"),
    ("rank", 1.5, TypeError, "rank must be a positive int, got 1.5"),
    ("rank_ratio", 0, ValueError, "rank_ratio must be a positive number, got 0"),
    ("project", "yes", ValueError, "project must be None, True or False, got 'yes'"),
    ("first_moment_beta", 1.5, ValueError, r"first_moment_beta must be in \[0, 1\), got 1.5"),
    ("scale", math.inf, ValueError, "scale must be a finite number, got inf"),
    ("update_interval", 0, ValueError, "update_interval must be a positive int, got 0"),
    ("projection", "svd", ValueError, "unknown projection 'svd'"),
]


@pytest.mark.parametrize(("key", "value", "exc", "match"), BAD, ids=lambda v: str(v)[:20])
def test_bad_group_values_raise_like_keyword_arguments(key, value, exc, match):
    w, v = randn(0, 12, 8).requires_grad_(), randn(1, 12, 8).requires_grad_()
    if key in ("rank", "rank_ratio", "first_moment_beta", "scale", "update_interval", "projection"):
        with pytest.raises(exc, match=match):  # the keyword argument's message ...
            coap_compile.optimize([w], torch.optim.AdamW, **{"rank": 4, key: value})
    with pytest.raises(
        exc, match=match + r".*\(param group 0\)"
    ):  # ... the same for a group, at construction
        coap_compile.optimize([{"params": [w], key: value}], torch.optim.AdamW, rank=4)
    opt = coap_compile.optimize([w], torch.optim.AdamW, rank=4)
    with pytest.raises(exc, match=match + r".*\(param group 1\)"):  # in add_param_group
        opt.add_param_group({"params": [v], key: value})
    assert len(opt.param_groups) == 1 and len(opt.plan.layouts) == 1  # the bad group was not kept
    w.grad = randn(2, 12, 8)
    opt.step()
    before = (w.detach().clone(), {k: t.clone() for k, t in opt.state[w].items()})
    opt.param_groups[0][key] = value  # edited after construction: refused at the next step, unchanged
    w.grad = randn(3, 12, 8)
    with pytest.raises(exc, match=match + r".*\(param group 0\)"):
        opt.step()
    assert torch.equal(w.detach(), before[0])
    assert all(torch.equal(opt.state[w][k], t) for k, t in before[1].items())


def test_group_rank_change_rebases_the_projection():
    """Derived from its source: a new ``rank`` re-bases P at the next step (moments mapped)."""
    w = randn(0, 16, 10).requires_grad_()
    opt = coap_compile.optimize([{"params": [w], "project": True}], torch.optim.AdamW, rank=4, lr=1e-2)
    for k in range(2):
        w.grad = randn(1 + k, 16, 10)
        opt.step()
    opt.param_groups[0]["rank"] = 6
    w.grad = randn(9, 16, 10)
    opt.step()
    st = opt.state[w]
    assert st["proj"].shape == (10, 6) and st["exp_avg"].shape == (16, 6) and st["step"].item() == 3
    assert opt.memory_plan().rows[0].rank == 6


# -- atomic steps -----------------------------------------------------------------------------------


def test_a_wrong_gradient_on_the_last_parameter_changes_nothing():
    model, opt = _build()
    _train(model, opt, 2)
    ids = torch.randint(0, 50, (4, 9))
    model(ids).sum().backward()
    last = list(model.parameters())[-1]
    snap = _snapshot(model, opt)
    for bad, match in [
        (torch.zeros(3, 3), r"gradient is \(3, 3\)"),
        (torch.zeros(last.shape, dtype=torch.float64), "torch.float64"),
    ]:
        keep = last.grad
        last.grad = torch.zeros_like(last)
        last.grad.data = bad  # torch's own setter refuses a mismatch; .data does not
        with pytest.raises(ValueError, match=match):
            opt.step()
        _assert_unchanged(model, opt, snap)
        last.grad = keep


def test_a_failing_later_update_leaves_it_and_later_parameters_unchanged(monkeypatch):
    """Documented (torch's behaviour): an exception raised inside a later parameter's update leaves the
    earlier ones updated; the failing one and everything after it are untouched. (At k = 3 no refresh is
    due; a refresh due at a failing step has been committed before the updates, see the runtime docs.)"""
    model, opt = _build(grouped=False)  # per matrix (the grouped path: the next test)
    _train(model, opt, 3)
    model(torch.randint(0, 50, (4, 9))).sum().backward()
    first, second = opt.projected_parameters()
    snap = _snapshot(model, opt)
    calls = []
    real = runtime_step.projected_update_

    def flaky(p, *a, **k):
        calls.append(p)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(p, *a, **k)

    monkeypatch.setattr(runtime_step, "projected_update_", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    params, state, _ = snap
    by_id = dict(zip((id(p) for p in model.parameters()), params))
    assert not torch.equal(first.detach(), by_id[id(first)])  # earlier: updated (as torch's optimizers)
    assert torch.equal(second.detach(), by_id[id(second)])  # failing: weight, states, step unchanged
    assert all(torch.equal(opt.state[second][k], v) for k, v in state[id(second)].items())
    for p in model.parameters():  # full-rank ones run after the projected ones: untouched
        if p is not first and p is not second:
            assert torch.equal(p.detach(), by_id[id(p)])


def test_a_failing_grouped_update_leaves_its_group_unchanged(monkeypatch):
    """The grouped path computes a chunk of members completely (``X P`` and the elementwise pass) before
    its first write, so a failure there (e.g. out of memory) leaves every member of the chunk unchanged."""
    from coap_compile.runtime import chunks

    model, opt = _build()
    assert len(opt.plan.matrix_groups) == 1 and set(opt.plan.matrix_groups[0].members) == set(
        opt.projected_parameters()
    )
    _train(model, opt, 3)
    model(torch.randint(0, 50, (4, 9))).sum().backward()
    snap = _snapshot(model, opt)

    def failing(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(chunks, "elementwise", failing)  # the pass computed before any write
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    params, state, _ = snap
    by_id = dict(zip((id(p) for p in model.parameters()), params))
    for p in opt.projected_parameters():
        assert torch.equal(p.detach(), by_id[id(p)])
        assert all(torch.equal(opt.state[p][k], v) for k, v in state[id(p)].items())


def test_a_failing_refresh_changes_nothing(monkeypatch):
    """Refreshes are computed for every parameter before any is committed."""
    model, opt = _build()
    _train(model, opt, 2)  # k = 2: the next step refreshes (update_interval = 2)
    model(torch.randint(0, 50, (4, 9))).sum().backward()
    snap = _snapshot(model, opt)
    policy = opt.layout(opt.param_groups[1]["params"][0]).policy
    real, calls = policy.refresh, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected refresh failure")
        return real(*a, **k)

    monkeypatch.setattr(policy, "refresh", flaky)
    with pytest.raises(RuntimeError, match="injected refresh"):
        opt.step()
    _assert_unchanged(model, opt, snap)


# -- generic route ----------------------------------------------------------------------------------


class NeedsDecay(torch.optim.Optimizer):
    """SGD with a required constructor argument (no default): the probe must be built with it."""

    def __init__(self, params, lr, decay):
        super().__init__(params, {"lr": lr, "decay": decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["decay"]).add_(p.grad, alpha=-group["lr"])


def test_generic_probe_uses_the_users_arguments():
    """Full rank with a permutation P: the compiled NeedsDecay equals NeedsDecay itself."""
    from helpers import permutation

    from coap_compile import FixedProjection

    w = randn(0, 10, 6).requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    with pytest.warns(UserWarning, match="keeps no per-parameter state"):  # projected nothing: said once
        opt = coap_compile.optimize(
            [{"params": [w], "project": True}], NeedsDecay, rank=6, lr=0.1, decay=0.5,
            projection=FixedProjection(permutation(1)),
        )  # fmt: skip
    ref = NeedsDecay([w_ref], lr=0.1, decay=0.5)
    for k in range(3):
        w.grad = w_ref.grad = randn(1 + k, 10, 6)
        opt.step()
        ref.step()
    # fp32, a re-associated (1 − lr·decay)·W − lr·G: observed ≤ 6e-8.
    torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=1e-6, atol=1e-7)
    # NeedsDecay keeps no per-parameter state, so it runs its own step, not projected (runtime/layout.py);
    # deciding that compiled its update on a probe built with decay=0.5 (without it construction raises)
    assert opt.projected_parameters() == []
    assert "NeedsDecay keeps no per-parameter state" in opt.explain()


class IntStepSGD(torch.optim.Optimizer):
    """Keeps a Python int step (as transformers' optimizers do) and refuses a bare lr without ``mode``."""

    def __init__(self, params, lr=None, mode=None):
        if mode != "manual":
            raise ValueError("Cannot combine manual lr and mode=None")
        super().__init__(params, {"lr": lr, "mode": mode})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                st["step"] = st.get("step", 0) + 1
                p.add_(p.grad, alpha=-group["lr"])


def test_generic_route_error_is_in_the_users_terms():
    w = randn(0, 10, 6).requires_grad_()
    with pytest.raises(UnsupportedOptimizerError) as info:
        coap_compile.optimize([{"params": [w], "project": True}], IntStepSGD, rank=3, lr=1e-3, mode="manual")
    msg = str(info.value)
    assert "Cannot combine manual" not in msg  # the probe was built with the user's mode="manual"
    assert "IntStepSGD" in msg and "state 'step' is a int" in msg


def test_generic_baked_hyperparameter_is_re_captured_and_correct():
    """Adagrad branches on ``weight_decay != 0`` in Python: it stays a baked constant, so editing it
    re-captures once and the result equals torch's Adagrad edited the same way."""
    from helpers import permutation

    from coap_compile import FixedProjection

    w = randn(0, 9, 5).requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    opt = coap_compile.optimize(
        [{"params": [w], "project": True}], torch.optim.Adagrad, rank=5, lr=0.1, weight_decay=0.1,
        projection=FixedProjection(permutation(3)),
    )  # fmt: skip
    ref = torch.optim.Adagrad([w_ref], lr=0.1, weight_decay=0.1)
    for k in range(4):
        if k == 2:
            before = capture_count()
            opt.param_groups[0]["weight_decay"] = ref.param_groups[0]["weight_decay"] = 0.4
        w.grad = w_ref.grad = randn(10 + k, 9, 5)
        opt.step()
        ref.step()
    assert capture_count() == before + 1
    # Full rank with a permutation P: the derived form equals torch's Adagrad to rounding (observed 6e-8).
    torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=1e-6, atol=1e-7)
