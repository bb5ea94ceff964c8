"""First use: ``optimize()`` says when it projects fewer parameters than asked (issue 21, item 6).

One ``UserWarning`` naming each reason and its fix (a rank not below ``min(m, n)``, ``rank_ratio ≤ 1``,
``target_modules`` matching nothing or a tied head, a base without per-parameter state); stateless bases
(SGD without momentum) stay torch's own step, bit for bit; ``target_modules`` reaches parameters such as
``nn.MultiheadAttention.in_proj_weight``; a refusal of the compiler names the user's parameter.
"""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch
from helpers import randn, seeds
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import coap_compile
from coap_compile import UnsupportedOptimizerError


def _mlp(seed: int, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 16))


def _optimize(*args, **kwargs):
    """``optimize`` and the UserWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = coap_compile.optimize(*args, **kwargs)
    return opt, [w for w in caught if issubclass(w.category, UserWarning)]


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 40, bias=False)
        self.head.weight = self.embed.weight


def test_quick_start_rank_on_narrow_layers_warns_once_with_reason_and_fix():
    opt, caught = _optimize(_mlp(0), torch.optim.AdamW, lr=1e-3)  # the default rank=256, layers ≤ 128
    assert opt.projected_parameters() == []
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "projects 0 parameters of the 2" in msg
    assert "'0.weight': rank=256 is not below min(m, n) = 64" in msg and "use a rank below 64" in msg


def test_no_warning_when_the_default_rule_projects_something():
    opt, caught = _optimize(_mlp(0), torch.optim.AdamW, rank=16, lr=1e-3)
    assert len(opt.projected_parameters()) == 1  # 2.weight (16 rows) is under the size rule: as documented
    assert caught == []


@given(ratio=st.floats(0.05, 1.0))
def test_rank_ratio_at_most_one_warns(ratio):
    opt, caught = _optimize(_mlp(0, width=8), torch.optim.AdamW, rank=None, rank_ratio=ratio, lr=1e-3)
    assert opt.projected_parameters() == []
    assert len(caught) == 1 and f"rank_ratio={ratio}" in str(caught[0].message)
    assert "use rank_ratio > 1" in str(caught[0].message)


def test_target_modules_matching_nothing_warns():
    opt, caught = _optimize(_mlp(0), torch.optim.AdamW, rank=8, target_modules=["q_proj"], lr=1e-3)
    assert opt.projected_parameters() == []
    assert len(caught) == 1
    assert "target_modules=['q_proj'] matched no module or parameter" in str(caught[0].message)


def test_tied_head_named_in_target_modules_warns_naming_it():
    model = TiedLM()
    opt, caught = _optimize(model, torch.optim.AdamW, rank=8, target_modules=["head", "body"], lr=1e-3)
    assert [opt.param_name(p) for p in opt.projected_parameters()] == ["body.weight"]
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "projects 1 parameter of the 2" in msg
    assert "'head.weight': an embedding weight, or a head tied" in msg


def test_huggingface_path_refuses_with_the_same_check(tmp_path):
    pytest.importorskip("transformers")
    from coap_compile.integrations.transformers import CoapOptimizerFactory
    from coap_compile.runtime.selection import select, shortfall

    kw = dict(base_optim=torch.optim.AdamW, base_kwargs={"lr": 1e-3}, coap={"rank": 8}, weight_decay=0.0)
    only_head = lambda name, m: name == "head"  # noqa: E731
    with pytest.raises(ValueError, match=r"'head.weight': an embedding weight, or a head tied"):
        CoapOptimizerFactory()(TiedLM(), target_modules=only_head, **kw)
    with warnings.catch_warnings(record=True) as caught:  # partly projected: the same message, a warning
        warnings.simplefilter("always")
        model = TiedLM()
        opt = CoapOptimizerFactory()(model, target_modules=["head", "body"], **kw)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert msgs == [shortfall(opt, select(model, ["head", "body"]))]


# -- bases without per-parameter state ------------------------------------------------------------------
@given(seed=seeds, project=st.sampled_from([None, True]))
def test_sgd_without_momentum_is_not_projected_and_equals_torch(seed, project):
    w = randn(seed, 48, 32).requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    group = {"params": [w]} if project is None else {"params": [w], "project": True}
    opt, caught = _optimize([group], torch.optim.SGD, rank=8, lr=0.05, weight_decay=0.01)
    ref = torch.optim.SGD([w_ref], lr=0.05, weight_decay=0.01)
    assert opt.projected_parameters() == [] and opt.memory_plan().total_bytes == 0
    assert len(caught) == 1 and "SGD keeps no per-parameter state with momentum=0" in str(caught[0].message)
    assert "keeps no per-parameter state" in opt.explain()
    for k in range(4):
        w.grad = w_ref.grad = randn(seed + 1 + k, 48, 32)
        opt.step()
        ref.step()
    assert torch.equal(w.detach(), w_ref.detach())  # torch's own step: bit-identical
    assert all(len(s) == 0 for s in opt.state.values())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def test_momentum_becoming_nonzero_before_the_first_step_projects():
    w = randn(0, 48, 32).requires_grad_()
    opt, _ = _optimize([w], torch.optim.SGD, rank=8, lr=0.05)
    assert opt.projected_parameters() == []
    opt.param_groups[0]["momentum"] = 0.9  # a structural edit: another program, the plan is rebuilt
    w.grad = randn(1, 48, 32)
    opt.step()
    assert opt.projected_parameters() == [w]
    assert opt.state[w]["momentum_buffer"].shape == (48, 8)


# -- target_modules naming parameters --------------------------------------------------------------------
class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        return self.out(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize(
    "target", [[r"attn\.in_proj_weight$"], ["in_proj"], lambda n, m: isinstance(m, nn.MultiheadAttention)]
)
def test_target_modules_reaches_multihead_in_proj_weight(target):
    model = Attn()
    opt, caught = _optimize(model, torch.optim.AdamW, rank=4, target_modules=target, lr=1e-2)
    assert [opt.param_name(p) for p in opt.projected_parameters()] == ["attn.in_proj_weight"]
    assert caught == []
    model(randn(0, 2, 5, 32)).square().mean().backward()
    opt.step()
    assert opt.state[model.attn.in_proj_weight]["exp_avg"].shape == (96, 4)


# -- errors name the user's parameter ------------------------------------------------------------------------
def test_unsupported_base_names_the_users_parameter_not_a_probe():
    model = nn.Sequential(nn.Linear(40, 24))
    with pytest.raises(UnsupportedOptimizerError) as info:
        coap_compile.optimize(model, torch.optim.NAdam, rank=8)
    msg = str(info.value)
    assert "parameter '0.weight'" in msg and "(24, 40)" in msg and "'mu_product'" in msg
    assert not re.search(r"\(5, 3\)|\(7, 5\)", msg), msg  # the capture probe's shapes
