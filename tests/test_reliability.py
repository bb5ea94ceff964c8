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
