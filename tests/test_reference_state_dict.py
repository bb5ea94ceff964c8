"""state_dict round trips of the reference optimizers: weights_only loading and bit-identical resumption."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import randn

from coap_compile.projection import CoapPolicy
from coap_compile.reference import CoapAdafactor, CoapAdamW

SHAPES = [(16, 12), (10, 14), (12,)]  # tall, wide, bias


def make_params(dtype: torch.dtype) -> list[torch.Tensor]:
    return [randn(i, *s, dtype=dtype).requires_grad_() for i, s in enumerate(SHAPES)]


def set_grads(params: list[torch.Tensor], step: int) -> None:
    for i, p in enumerate(params):
        p.grad = randn(1000 + 10 * step + i, *p.shape, dtype=p.dtype)


def roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


CASES = [
    (CoapAdamW, "coap", torch.float32),
    (CoapAdamW, "galore", torch.float32),
    (CoapAdamW, "flora", torch.float32),
    (CoapAdamW, "coap", torch.float64),
    (CoapAdamW, "flora", torch.bfloat16),
    (CoapAdamW, "coap", torch.bfloat16),
    (CoapAdafactor, "coap", torch.float32),
    (CoapAdafactor, "flora", torch.float32),
    (CoapAdafactor, "coap", torch.bfloat16),
]


@pytest.mark.parametrize(("cls", "projection", "dtype"), CASES)
@pytest.mark.parametrize("restore", [False, True])
def test_resume_is_bit_identical_across_refreshes(cls, projection, dtype, restore):
    # T_u = 2, λ = 2: the save after 3 steps falls between the correlation step (k=2) and the SVD
    # (k=4); the 6 resumed steps cross the SVD and two more correlation steps / resamples.
    kw = {"rank": 4, "projection": projection, "update_interval": 2, "reproject_factor": 2}
    kw["restore_state"] = restore
    straight, first = make_params(dtype), make_params(dtype)
    opt_straight, opt_first = cls(straight, **kw), cls(first, **kw)
    for step in range(3):
        for params, opt in ((straight, opt_straight), (first, opt_first)):
            set_grads(params, step)
            opt.step()
    saved = roundtrip(opt_first.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt_resumed = cls(resumed, **kw)
    opt_resumed.load_state_dict(saved)
    for p_old, p_new in zip(first, resumed):
        old, new = opt_first.state[p_old], opt_resumed.state[p_new]
        assert old.keys() == new.keys()
        assert all(old[k].dtype == new[k].dtype and torch.equal(old[k], new[k]) for k in old)
    for step in range(3, 9):
        for params, opt in ((straight, opt_straight), (resumed, opt_resumed)):
            set_grads(params, step)
            opt.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    for a, b in zip(straight, resumed):
        sa, sb = opt_straight.state[a], opt_resumed.state[b]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bf16_state_keeps_its_dtypes_through_load():
    params = make_params(torch.bfloat16)
    opt = CoapAdamW(params, rank=4, projection="flora")
    set_grads(params, 0)
    opt.step()
    fresh = CoapAdamW(params, rank=4, projection="flora")
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    tall = fresh.state[params[0]]
    assert tall["proj"].dtype == torch.float32 and tall["exp_avg"].dtype == torch.float32
    assert tall["seed"].dtype == torch.int64 and tall["step"].dtype == torch.float32
    assert fresh.state[params[2]]["exp_avg"].dtype == torch.bfloat16  # bias: plain AdamW state


def test_policy_instance_is_saved_by_name_and_kept_on_load():
    policy = CoapPolicy(update_interval=3, reproject_factor=2)
    params = make_params(torch.float32)
    opt = CoapAdafactor(params, rank=4, projection=policy)
    set_grads(params, 0)
    opt.step()
    sd = roundtrip(opt.state_dict())
    assert sd["param_groups"][0]["projection"] == "coap"
    fresh = CoapAdafactor(params, rank=4, projection=policy)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["projection"] is policy
    assert opt.param_groups[0]["projection"] is policy  # state_dict() did not touch the live groups


def test_loaded_state_does_not_alias_the_state_dict():
    params = make_params(torch.float32)
    opt = CoapAdamW(params, rank=4)
    set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    fresh = CoapAdamW([p.detach().clone().requires_grad_() for p in params], rank=4)
    fresh.load_state_dict(sd)
    for pid, st in sd["state"].items():
        p = fresh.param_groups[0]["params"][pid]
        assert all(fresh.state[p][k] is not v for k, v in st.items())
