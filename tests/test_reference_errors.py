"""Bad inputs to the reference optimizers raise, and the message names the argument and its value."""

from __future__ import annotations

import re

import pytest
import torch

from coap_compile.reference import CoapAdafactor, CoapAdamW

BOTH = [CoapAdamW, CoapAdafactor]

# (optimizer classes, constructor kwargs, exception, text that must appear in the message)
COMMON_CASES = [
    ({"rank": 0}, ValueError, "rank=0"),
    ({"rank": -3}, ValueError, "rank=-3"),
    ({"rank": 2.5}, TypeError, "rank must be an int > 0, got 2.5"),
    ({"rank_ratio": 0}, ValueError, "rank_ratio=0"),
    ({"rank_ratio": -1.5}, ValueError, "rank_ratio=-1.5"),
    ({"rank": 2, "update_interval": 0}, ValueError, "update_interval=0"),
    ({"rank": 2, "update_interval": 1.5}, TypeError, "update_interval must be an int > 0, got 1.5"),
    ({"rank": 2, "reproject_factor": -2}, ValueError, "reproject_factor=-2"),
    ({"rank": 2, "projection": "svd"}, ValueError, "projection='svd'"),
    ({"rank": 2, "projection": "fixed"}, ValueError, "projection='fixed'"),
    ({"rank": 2, "scale": 0.0}, ValueError, "scale=0.0"),
    ({"rank": 2, "lr": -1e-3}, ValueError, "lr=-0.001"),
    ({"rank": 2, "weight_decay": -0.1}, ValueError, "weight_decay=-0.1"),
    ({}, ValueError, "rank=None and rank_ratio=None"),
]
ADAMW_CASES = [
    ({"rank": 2, "betas": (1.0, 0.999)}, ValueError, "betas[0]=1.0"),
    ({"rank": 2, "betas": (0.9, -0.1)}, ValueError, "betas[1]=-0.1"),
    ({"rank": 2, "betas": 0.9}, TypeError, "betas=0.9"),
    ({"rank": 2, "eps": -1e-8}, ValueError, "eps=-1e-08"),
]
ADAFACTOR_CASES = [
    ({"rank": 2, "beta2_decay": 0.5}, ValueError, "beta2_decay=0.5"),
    ({"rank": 2, "eps": (-1.0, 1e-3)}, ValueError, "eps[0]=-1.0"),
    ({"rank": 2, "eps": (None, -1e-3)}, ValueError, "eps[1]=-0.001"),
    ({"rank": 2, "d": 0.5}, ValueError, "d=0.5"),
    ({"rank": 2, "first_moment_beta": 1.0}, ValueError, "first_moment_beta=1.0"),
]
CASES = [(cls, *c) for cls in BOTH for c in COMMON_CASES]
CASES += [(CoapAdamW, *c) for c in ADAMW_CASES] + [(CoapAdafactor, *c) for c in ADAFACTOR_CASES]


@pytest.mark.parametrize(("cls", "kwargs", "exc", "text"), CASES)
def test_bad_constructor_arguments(cls, kwargs, exc, text):
    with pytest.raises(exc, match=re.escape(text)):
        cls([torch.zeros(8, 6, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("cls", BOTH)
def test_bad_per_group_argument(cls):
    good = torch.zeros(8, 6, requires_grad=True)
    bad = torch.zeros(8, 6, requires_grad=True)
    with pytest.raises(ValueError, match=re.escape("update_interval=-1")):
        cls([{"params": [good]}, {"params": [bad], "update_interval": -1}], rank=2)
    with pytest.raises(TypeError, match=re.escape("project='yes'")):
        cls([{"params": [good], "project": "yes"}], rank=2)


@pytest.mark.parametrize("cls", BOTH)
def test_complex_parameter_rejected_at_construction(cls):
    z = torch.zeros(4, 4, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match=re.escape("dtype=torch.complex64")):
        cls([z], rank=2)


@pytest.mark.parametrize("cls", BOTH)
def test_sparse_gradient_rejected_at_step(cls):
    w = torch.zeros(8, 6, requires_grad=True)
    opt = cls([w], rank=2)
    w.grad = torch.zeros(8, 6).to_sparse()
    with pytest.raises(ValueError, match=re.escape("grad.layout=torch.sparse_coo")):
        opt.step()


#: torch's own optimizer for each reference class (same defaults: lr, betas/beta2_decay, eps, weight decay).
TORCH_BASE = {CoapAdamW: torch.optim.AdamW, CoapAdafactor: torch.optim.Adafactor}


@pytest.mark.parametrize("cls", BOTH)
def test_no_rank_needed_without_matrices_or_with_project_flag(cls):
    """Without ``rank``/``rank_ratio`` construction succeeds when no parameter needs a rank: a group of
    vectors and a ``project=False`` group run the unmodified base update (bit-identical to torch's own
    optimizer), and ``project=True`` projects at full rank (``P`` is ``N×N``, ``N = min(shape)``)."""
    gen = torch.Generator().manual_seed(0)
    vec, mat, forced = (torch.randn(s, generator=gen).requires_grad_() for s in ((5,), (4, 4), (6, 4)))
    twins = [p.detach().clone().requires_grad_() for p in (vec, mat)]
    forced0 = forced.detach().clone()
    ours = [cls([vec]), cls([{"params": [mat], "project": False}])]
    ours.append(cls([{"params": [forced], "project": True}]))
    theirs = TORCH_BASE[cls](twins, foreach=False)
    for _ in range(3):
        for p, twin in zip((vec, mat), twins):
            p.grad = torch.randn(p.shape, generator=gen)
            twin.grad = p.grad.clone()
        forced.grad = torch.randn(forced.shape, generator=gen)
        for opt in (*ours, theirs):
            opt.step()
    for p, twin, opt in zip((vec, mat), twins, ours):
        assert "proj" not in opt.state[p], f"{cls.__name__}: shape {tuple(p.shape)} was projected"
        assert torch.equal(p, twin), f"{cls.__name__}: shape {tuple(p.shape)} differs from {type(theirs)}"
    state = ours[2].state[forced]
    assert state["proj"].shape == (4, 4), state["proj"].shape
    assert int(state["step"]) == 3 and torch.isfinite(forced).all() and not torch.equal(forced, forced0)
