"""Issue 21 items 2–4: settings edits, checkpoint validation and hyperparameter validation that is a pure
function of the values and happens before anything is written.

References: ``torch.optim``'s own constructor (what it refuses as keyword arguments a param group's value
must be refused for), an untouched optimizer (a refused step or load leaves params, state and groups
bit-identical), and a run that never saw the bad value (the optimizer keeps working after a refusal).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_dropin_contract import _assert_unchanged, _build, _snapshot
from test_runtime import _train

import coap_compile
from coap_compile import compiler
from coap_compile.capture import trace
from coap_compile.runtime.fullrank import restored_full_state
from coap_compile.runtime.layout import Kind
from coap_compile.storage import load_any, logical_layout

NAN = float("nan")

# -- item 4: base hyperparameters, validated as torch validates them, before anything is written ----------

#: (key, value, exception, message) for edits that torch's AdamW refuses or cannot step with
BAD_EDITS = [
    ("betas", (NAN, 0.999), ValueError, "Invalid beta parameter at index 0: nan"),
    ("betas", (1.0, 0.999), ValueError, "Invalid beta parameter at index 0: 1.0"),
    ("weight_decay", [4], TypeError, "weight_decay=\\[4\\]"),
    ("eps", 10**30, ValueError, "step fails .*eps=10+.*OverflowError"),
    ("eps", -1.0, ValueError, "Invalid epsilon value"),
    ("lr", None, TypeError, "lr=None"),
    ("lr", NAN, ValueError, "Invalid learning rate"),
]


@pytest.mark.parametrize(("key", "value", "exc", "match"), BAD_EDITS, ids=lambda v: str(v)[:16])
def test_a_bad_hyperparameter_edit_raises_before_anything_is_written(key, value, exc, match):
    model, opt = _build()
    _train(model, opt, 2)
    ref_model, reference = _build()
    _train(ref_model, reference, 2)
    good = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(5))
    opt.zero_grad()
    model(ids).sum().backward()
    snap = _snapshot(model, opt)
    with pytest.raises(exc, match=f"param group 0: .*{match}"):
        opt.step()
    _assert_unchanged(model, opt, snap)  # no parameter, state or step counter written
    opt.param_groups[0][key] = good  # the optimizer keeps working, as if the edit never happened
    opt.step()
    reference.zero_grad()
    ref_model(ids).sum().backward()
    reference.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def _cold() -> None:
    trace.clear_capture_cache()
    compiler._CACHE.clear()


@pytest.mark.parametrize("warm_first", [False, True], ids=["cold", "warm"])
def test_validation_does_not_depend_on_the_compile_caches(warm_first):
    """A NaN β₁ in a group is refused with a cold and with a warm cache (it used to pass once another
    AdamW had been compiled)."""
    _cold()
    if warm_first:
        _build()  # compiles AdamW's program for float32 matrices
    w = torch.randn(16, 12, requires_grad=True)
    with pytest.raises(ValueError, match=r"param group 0: AdamW\(betas=\(nan, 0.999\)\).*index 0: nan"):
        coap_compile.optimize([{"params": [w], "betas": (NAN, 0.999)}], torch.optim.AdamW, rank=4)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 0: nan"):
        torch.optim.AdamW([w], betas=(NAN, 0.999))  # the reference: torch's keyword argument


def test_checks_of_new_values_are_cached_by_value():
    """A schedule that cycles a value revisits it: the base is probed once per distinct value set."""
    model, opt = _build()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20, cycle_momentum=True)
    _train(model, opt, 3, sched=sched)
    assert all(math.isfinite(float(p.detach().sum())) for p in model.parameters())


def test_restore_state_string_is_refused_as_keyword_and_in_a_group():
    w = torch.randn(16, 12, requires_grad=True)
    with pytest.raises(TypeError, match="restore_state must be a bool, got 'False'$"):
        coap_compile.optimize([w], torch.optim.AdamW, rank=4, restore_state="False")
    with pytest.raises(TypeError, match=r"restore_state must be a bool, got 'False' \(param group 0\)"):
        coap_compile.optimize([{"params": [w], "restore_state": "False"}], torch.optim.AdamW, rank=4)


def test_rank_ratio_below_one_with_project_true_fails_at_construction():
    w = torch.randn(16, 12, requires_grad=True)
    group = {"params": [w], "project": True, "rank": None, "rank_ratio": 0.5}
    with pytest.raises(ValueError, match=r"rank_ratio=0.5 gives .* rank 24 > min\(m, n\) = 12"):
        coap_compile.optimize([group], torch.optim.AdamW, rank=4)
    opt = coap_compile.optimize([{**group, "rank_ratio": 1.0}], torch.optim.AdamW, rank=4)  # r = 12: fine
    assert opt.layout(w).rank == 12


# -- item 3: checkpoints validated like keyword arguments and like the storage expects ---------------------

BAD_SETTINGS = [
    ("scale", math.inf, ValueError, "scale must be a finite number, got inf"),
    ("rank", -5, ValueError, "rank must be a positive int, got -5"),
    ("update_interval", 0, ValueError, "update_interval must be a positive int, got 0"),
    ("first_moment_beta", 1.5, ValueError, r"first_moment_beta must be in \[0, 1\)"),
    ("restore_state", "False", TypeError, "restore_state must be a bool"),
    ("correlation", "fast", ValueError, "correlation must be one of"),
    ("projection_side", "cols", ValueError, "projection_side must be one of"),
    ("projection_sharding", "rows", ValueError, r"projection_sharding must be one of \('sharded', 're"),
    ("rank_ratio", -1.0, ValueError, "rank_ratio must be a positive number"),
    ("betas", (NAN, 0.999), ValueError, "Invalid beta parameter at index 0"),
    ("lr", -1.0, ValueError, "Invalid learning rate"),
    ("eps", 10**30, ValueError, "OverflowError"),
    ("weight_decay", "0.1", TypeError, "weight_decay='0.1'"),
]


@pytest.mark.parametrize(("key", "value", "exc", "match"), BAD_SETTINGS, ids=lambda v: str(v)[:16])
def test_a_checkpoint_with_a_bad_setting_is_refused_unchanged(key, value, exc, match):
    model, opt = _build()
    _train(model, opt, 3)
    sd = opt.state_dict()
    sd["param_groups"][0][key] = value
    snap = _snapshot(model, opt)
    with pytest.raises(exc, match=f"the checkpoint's settings are refused: .*{match}"):
        opt.load_state_dict(sd)
    _assert_unchanged(model, opt, snap)
    _train(model, opt, 1)  # still usable


def _linear_opt(precision: str):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 256)  # weight 256×64, rank 16: M×r states of 4096 elements (int8 quantizes)
    opt = coap_compile.optimize(model, torch.optim.AdamW, rank=16, lr=1e-2, state_precision=precision)
    for k in range(2):
        opt.zero_grad()
        model(torch.randn(8, 64, generator=torch.Generator().manual_seed(k))).square().mean().backward()
        opt.step()
    return model, opt


def _set(key, value):
    def edit(st):
        st[key] = value(st[key]) if callable(value) else value

    return edit


def _drop(key):
    return lambda st: st.pop(key)


#: (precision, parameter, edit, state named, message)
CORRUPT = [
    ("int8", "weight", _drop("exp_avg.absmax"), "exp_avg", "needs key 'exp_avg.absmax'"),
    ("int8", "weight", _set("exp_avg.q8", lambda t: t.float()), "exp_avg", "float32 .* expects torch.int8"),
    ("int8", "weight", _drop("exp_avg_sq.rng"), "exp_avg_sq", "needs key 'exp_avg_sq.rng'"),
    ("int8", "weight", _set("exp_avg.absmax", lambda t: -t), "exp_avg", "negative block scales"),
    ("int8", "weight", _set("exp_avg.absmax", lambda t: t[:1]), "exp_avg", "expects torch.float32"),
    ("int8", "weight", _set("proj", lambda t: t.clone().fill_(NAN)), "proj", "inf/NaN"),
    ("int8", "weight", _set("step", torch.tensor(NAN)), "step", "finite integer count"),
    ("int8", "weight", _set("step", torch.tensor(-1.0)), "step", "finite integer count"),
    ("int8", "weight", _set("step", torch.tensor(2.5)), "step", "finite integer count"),
    ("int8", "bias", _set("step", torch.tensor(-3.0)), "step", "finite integer count"),  # the full-rank bias
    ("fp32", "weight", _set("exp_avg", lambda t: t.double()), "exp_avg", "float64 .* expects torch.float32"),
    ("fp32", "weight", _set("exp_avg_sq", lambda t: t.clone().fill_(math.inf)), "exp_avg_sq", "inf/NaN"),
    ("fp32", "bias", _set("exp_avg", lambda t: t.clone().fill_(NAN)), "exp_avg", "inf/NaN"),  # torch's state
    ("fp32", "weight", _set("step", torch.tensor(math.inf)), "step", "finite integer count"),
    ("bf16", "weight", _drop("exp_avg.rng"), "exp_avg", "needs key 'exp_avg.rng'"),
    ("bf16", "weight", _set("exp_avg.rng", lambda t: t.float()), "exp_avg", "float32 .* expects torch.int64"),
    ("bf16", "bias", _set("exp_avg", lambda t: t.clone().fill_(NAN)), "exp_avg", "inf/NaN"),  # DERIVED bias
]


@pytest.mark.parametrize(("precision", "name", "edit", "state", "match"), CORRUPT)
def test_a_corrupt_checkpoint_tensor_is_refused_naming_it(precision, name, edit, state, match):
    model, opt = _linear_opt(precision)
    sd = opt.state_dict()
    sd["state"] = {i: dict(s) for i, s in sd["state"].items()}
    params = [opt.param_name(p) for g in opt.param_groups for p in g["params"]]
    edit(sd["state"][[i for g in sd["param_groups"] for i in g["params"]][params.index(name)]])
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=f"parameter '{name}' .*state '{state}'.*{match}"):
        opt.load_state_dict(sd)
    _assert_unchanged(model, opt, snap)
    opt.load_state_dict(opt.state_dict())  # an intact checkpoint still loads, and the optimizer steps
    opt.zero_grad()
    model(torch.randn(8, 64)).square().mean().backward()
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -- item 2: state_precision edited mid-training, in a group that also holds full-rank parameters ---------

PRECISIONS = ["fp32", "bf16", "int8", "auto"]


class _Mixed(torch.nn.Module):
    """One group: a projected 256×64 weight, a small full-rank bias (int8 keeps it fp32) and a full-rank
    vector of 4096 elements (int8 quantizes its states with ``quant_blocks="tiles"``, as :func:`_mixed`
    builds it; row blocks keep vectors fp32)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(256, 64, generator=gen) / 8)
        self.bias = torch.nn.Parameter(torch.zeros(256))
        self.gain = torch.nn.Parameter(torch.ones(4096))

    def forward(self, x):
        return (x @ self.weight.t() + self.bias).square().mean() + (self.gain * x.sum()).square().mean()


def _mixed(precision: str):
    model = _Mixed()
    opt = coap_compile.CoapOptimizer(
        [{"params": list(model.parameters())}], torch.optim.AdamW, rank=16, lr=1e-2,
        state_precision=precision, param_names={id(p): n for n, p in model.named_parameters()},
        quant_blocks="tiles",  # so the 4096-element vector's states are int8 (every kind converts)
    )  # fmt: skip
    return model, opt


def _mixed_step(model, opt, k: int, bad: bool = False) -> None:
    opt.zero_grad()
    model(torch.randn(8, 64, generator=torch.Generator().manual_seed(k))).backward()
    if bad:
        model.gain.grad[0] = NAN


@pytest.mark.parametrize("after", PRECISIONS)
@pytest.mark.parametrize("before", PRECISIONS)
def test_state_precision_edit_converts_every_kind_of_parameter_atomically(before, after):
    model, opt = _mixed(before)
    for k in range(2):
        _mixed_step(model, opt, k)
        opt.step()
    checkpoint = opt.state_dict()
    opt.param_groups[0]["state_precision"] = after
    _mixed_step(model, opt, 2, bad=True)  # a refused step converts nothing
    snap = _snapshot(model, opt)
    with pytest.raises(coap_compile.NonFiniteGradientError):
        opt.step()
    _assert_unchanged(model, opt, snap)
    for k in range(3, 6):
        _mixed_step(model, opt, k)
        opt.step()  # every later step works (it used to raise on each)
    for p in model.parameters():
        assert bool(torch.isfinite(p).all())
    # The states have the new precision's layout: an optimizer built with it accepts the checkpoint as is.
    _, fresh = _mixed(after)
    fresh.load_state_dict(opt.state_dict())
    for p, q in zip(opt.param_groups[0]["params"], fresh.param_groups[0]["params"]):
        assert sorted(opt.state[p]) == sorted(fresh.state[q]), opt.param_name(p)

    if after in ("fp32", "auto"):  # to fp32 (float32 weights): the full-rank conversion is exact
        _, again = _mixed(before)
        again.load_state_dict(checkpoint)
        again.param_groups[0]["state_precision"] = after
        again.sync_plan()
        for p, state in again.state.items():
            lay = again.layout(p)
            if lay.projected:
                continue
            io = again.state_io(p) if lay.kind is Kind.DERIVED else None
            new = restored_full_state(state, p, io) or state
            for n in logical_layout(new):
                assert torch.equal(load_any(new, n).float(), load_any(state, n).float()), (lay.name, n)
