"""Drop-in optimizer behaviour of ``coap_compile.optimize``: memory plan, recompiles, atomic steps,
checkpoints, parameter selection, errors and ``explain``."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import WeightAveragingSGD, randn
from torch import nn

import coap_compile
from coap_compile import NonFiniteGradientError, UnsupportedOptimizerError
from coap_compile.capture import capture_count
from coap_compile.compiler import compile_count

BASES = [
    (torch.optim.AdamW, {"lr": 1e-2}),
    (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    (torch.optim.RMSprop, {"lr": 1e-3}),
    (torch.optim.Adafactor, {"lr": 1e-2}),
]


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=24, ff=40, tied=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, ff)
        self.down = nn.Linear(ff, d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.head(h)


def _train(model, opt, steps, seed=0, sched=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 50, (4, 9), generator=gen)
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return float(loss.detach())


def _state_bytes(opt) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )


@pytest.mark.parametrize(("base", "kw"), BASES, ids=[b.__name__ for b, _ in BASES])
def test_state_bytes_equal_memory_plan_exactly(base, kw):
    torch.manual_seed(0)
    model = TinyLM()
    opt = coap_compile.optimize(model, base, rank=8, update_interval=2, reproject_factor=2, **kw)
    plan = opt.memory_plan()
    assert {r.name for r in plan.rows if r.rank} == {"up.weight", "down.weight"}
    _train(model, opt, 5)
    assert _state_bytes(opt) == plan.total_bytes
    if base is torch.optim.Adafactor:
        # torch's Adafactor keeps only factored variances (m + n numbers per matrix); COAP adds P (N×r)
        # and the correlation EMA (M×r), so it costs memory here (documented in the README).
        assert plan.total_bytes > plan.base_bytes
    else:
        assert plan.total_bytes < plan.base_bytes


def test_memory_plan_on_meta_device_matches_closed_form():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 11008, bias=False), nn.Linear(11008, 4096, bias=False))
    opt = coap_compile.optimize(model, torch.optim.AdamW, rank=1024)
    m, n, r = 11008, 4096, 1024
    per = 2 * m * r * 4 + n * r * 4 + 4  # moments (M×r, fp32) + P (N×r) + step
    assert opt.memory_plan().total_bytes == 2 * per
    assert opt.memory_plan().base_bytes == 2 * (2 * m * n * 4 + 4)


def test_one_capture_and_compile_per_signature_over_100_steps_with_lr_schedule():
    torch.manual_seed(0)
    model = TinyLM()
    opt = coap_compile.optimize(
        model, torch.optim.AdamW, rank=8, update_interval=5, reproject_factor=2, lr=1e-2
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    captures, compiles = capture_count(), compile_count()
    lrs = set()
    for _ in range(100):
        _train(model, opt, 1, seed=len(lrs))
        sched.step()
        lrs.add(opt.param_groups[0]["lr"])
    assert len(lrs) > 50
    assert capture_count() == captures and compile_count() == compiles


def test_lr_schedule_reaches_projected_update():
    w = randn(0, 16, 8).requires_grad_()
    opt = coap_compile.optimize(
        [{"params": [w], "project": True}], torch.optim.SGD, rank=4, lr=0.1, momentum=0.9
    )  # SGD without momentum keeps no state and is not projected (runtime/layout.py)
    w.grad = randn(1, 16, 8)
    opt.param_groups[0]["lr"] = 0.0
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)
    opt.param_groups[0]["lr"] = 0.1
    opt.step()
    assert not torch.equal(w.detach(), before)


def _snapshot(opt, model):
    return (
        [p.detach().clone() for p in model.parameters()],
        {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
    )


@pytest.mark.parametrize(("base", "kw"), BASES, ids=[b.__name__ for b, _ in BASES])
def test_nonfinite_gradient_raises_and_modifies_nothing(base, kw):
    torch.manual_seed(0)
    model = TinyLM()
    opt = coap_compile.optimize(model, base, rank=8, **kw)
    _train(model, opt, 2)
    params, states = _snapshot(opt, model)
    ids = torch.randint(0, 50, (4, 9))
    model(ids).sum().backward()
    model.down.weight.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="down.weight"):
        opt.step()
    # GradScaler style: found_inf set → the step is skipped.
    opt.step(found_inf=torch.tensor(1.0))
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, states[id(p)][k]), k


@pytest.mark.parametrize(("base", "kw"), BASES, ids=[b.__name__ for b, _ in BASES])
def test_checkpoint_resume_is_bit_identical_across_refreshes(base, kw):
    def build():
        torch.manual_seed(0)
        model = TinyLM()
        return model, coap_compile.optimize(model, base, rank=8, update_interval=2, reproject_factor=2, **kw)

    model_a, opt_a = build()
    _train(model_a, opt_a, 3, seed=0)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    _train(model_a, opt_a, 4, seed=1)  # crosses a correlation step (k=6 with T_u=2) and an SVD (k=4)

    model_b, opt_b = build()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    _train(model_b, opt_b, 4, seed=1)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("auto", torch.bfloat16)])
def test_bf16_weights_keep_their_lowrank_state_dtype_after_load(precision, dtype):
    """torch casts floating states to the parameter's dtype on load; COAP's own states keep theirs."""
    w = randn(0, 32, 16).to(torch.bfloat16).requires_grad_()
    kw = dict(rank=4, lr=1e-2, state_precision=precision)
    opt = coap_compile.optimize([{"params": [w], "project": True}], torch.optim.AdamW, **kw)
    w.grad = randn(1, 32, 16).to(torch.bfloat16)
    opt.step()
    sd = opt.state_dict()
    opt2 = coap_compile.optimize([{"params": [w], "project": True}], torch.optim.AdamW, **kw)
    opt2.load_state_dict(sd)
    st = opt2.state[w]
    # P follows the (bf16) weight dtype under projection_precision="auto" (issue 19), whatever the states
    assert st["exp_avg"].dtype == dtype and st["proj"].dtype == torch.bfloat16
    assert torch.equal(st["exp_avg"], opt.state[w]["exp_avg"])


def test_model_selection_rules():
    model = TinyLM(vocab=50, d=24, ff=40, tied=True)
    opt = coap_compile.optimize(model, torch.optim.AdamW, rank=8)
    names = {opt.param_name(p) for p in opt.projected_parameters()}
    assert names == {"up.weight", "down.weight"}  # the tied head/embedding stays full rank
    with pytest.warns(UserWarning, match="rank"):  # min dim 24 ≤ 30: nothing projected, said once
        opt = coap_compile.optimize(model, torch.optim.AdamW, rank=30)
    assert opt.projected_parameters() == []
    opt = coap_compile.optimize(model, torch.optim.AdamW, rank=30, target_modules=[r"^up$"])
    assert {opt.param_name(p) for p in opt.projected_parameters()} == {"up.weight"}  # rank clamped to 24
    opt = coap_compile.optimize(model, torch.optim.AdamW, rank=8, target_modules=lambda n, m: n == "down")
    assert {opt.param_name(p) for p in opt.projected_parameters()} == {"down.weight"}
    untied = TinyLM(tied=False)
    opt = coap_compile.optimize(untied, torch.optim.AdamW, rank_ratio=4)
    assert {opt.param_name(p) for p in opt.projected_parameters()} == {
        "up.weight",
        "down.weight",
        "head.weight",
    }


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"rank": 0}, ValueError, "rank must be a positive int, got 0"),
        ({"rank": -3}, ValueError, "rank must be a positive int, got -3"),
        ({"rank": None, "rank_ratio": 0.0}, ValueError, "rank_ratio must be a positive number, got 0.0"),
        ({"update_interval": 0}, ValueError, "update_interval must be a positive int, got 0"),
        ({"reproject_factor": -1}, ValueError, "reproject_factor must be a positive int, got -1"),
        ({"projection": "svd++"}, ValueError, "unknown projection 'svd\\+\\+'"),
        ({"rank": 2.5}, TypeError, "rank must be a positive int, got 2.5"),
        ({"backend": "cuda"}, ValueError, "backend must be one of .* got 'cuda'"),
        ({"betas": (1.5, 0.9)}, ValueError, "beta"),
    ],
)
def test_bad_arguments_raise_clearly(kwargs, exc, pattern):
    model = TinyLM()
    with pytest.raises(exc, match=pattern):
        coap_compile.optimize(model, torch.optim.AdamW, **{"rank": 8, **kwargs})


def test_bad_inputs_raise_clearly():
    with pytest.raises(TypeError, match="base_optim must be a torch.optim.Optimizer subclass"):
        coap_compile.optimize(TinyLM(), "adamw", rank=8)
    with pytest.raises(ValueError, match="complex"):
        coap_compile.optimize([torch.zeros(4, 4, dtype=torch.complex64, requires_grad=True)], rank=2)
    with pytest.raises(TypeError, match="target_modules"):
        coap_compile.optimize([torch.zeros(4, 4, requires_grad=True)], rank=2, target_modules=["x"])
    emb = nn.Embedding(10, 4, sparse=True)
    opt = coap_compile.optimize([emb.weight], torch.optim.AdamW, rank=2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradient"):
        opt.step()


def test_unsupported_base_raises_at_optimize():
    with pytest.raises(UnsupportedOptimizerError, match="WeightAveragingSGD.*graph node"):
        coap_compile.optimize(TinyLM(), WeightAveragingSGD, rank=8)


def test_param_groups_and_per_group_hyperparameters():
    a, b = randn(0, 20, 10).requires_grad_(), randn(1, 20, 10).requires_grad_()
    opt = coap_compile.optimize(
        [{"params": [a], "betas": (0.8, 0.9)}, {"params": [b], "lr": 0.0}], torch.optim.AdamW, rank=4, lr=1e-2
    )
    a.grad, b.grad = randn(2, 20, 10), randn(3, 20, 10)
    b0 = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), b0)  # lr 0 in group 1
    # betas differ between the groups, but they are live inputs: one signature, one compiled program
    programs = opt.plan.programs()
    assert len(programs) == 2 and programs[(0, torch.float32, 2)] is programs[(1, torch.float32, 2)]


def test_explain_shows_the_derived_update_and_plan():
    opt = coap_compile.optimize(TinyLM(), torch.optim.AdamW, rank=8, lr=1e-3)
    buf = io.StringIO()
    text = coap_compile.explain(opt, file=buf)
    assert buf.getvalue().strip() == text.strip()
    for needle in (
        "torch.optim.AdamW",
        "exp_avg' = ",
        "[first_moment]",
        "D = ",
        "W <- (-lr*weight_decay + 1) * W",
        "live inputs (read from param_groups at every step): lr=0.001, beta1=betas[0]=0.9, "
        "beta2=betas[1]=0.999, eps=1e-08, weight_decay=0.01",
        "structural (the signature; a change re-compiles once): amsgrad=False",
        "memory plan",
        "saved",
    ):
        assert needle in text, needle


@pytest.mark.parametrize(("base", "kw"), BASES, ids=[b.__name__ for b, _ in BASES])
def test_lr_zero_leaves_weights_unchanged_even_with_zero_second_moment(base, kw):
    """torch's capturable Adam divides by lr (NaN at lr = 0 with v = 0); the derived form does not."""
    w = randn(0, 12, 6).requires_grad_()
    opt = coap_compile.optimize([{"params": [w], "project": True}], base, rank=3, **{**kw, "lr": 0.0})
    g = randn(1, 12, 6)
    g[:, 0] = 0.0  # a zero gradient column: exact zeros in the projected second moment are possible
    w.grad = g
    before = w.detach().clone()
    for _ in range(3):
        opt.step()
    assert torch.isfinite(w).all()
    assert torch.equal(w.detach(), before)


def test_grad_scaler_amp_drop_in():
    """torch.amp.GradScaler: scaled training equals unscaled training (power-of-two scale), and an
    overflowing step is skipped by the scaler without touching weights or state."""

    def run(use_scaler, poison_step=None):
        torch.manual_seed(0)
        model = TinyLM()
        opt = coap_compile.optimize(model, torch.optim.AdamW, rank=8, update_interval=2, lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=use_scaler)
        gen = torch.Generator().manual_seed(3)
        for i in range(4):
            ids = torch.randint(0, 50, (4, 9), generator=gen)
            loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad()
            scaler.scale(loss).backward()
            if i == poison_step:
                model.up.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        return [p.detach().clone() for p in model.parameters()], opt

    plain, _ = run(False)
    scaled, _ = run(True)
    for a, b in zip(plain, scaled):
        assert torch.equal(a, b)
    skipped, opt = run(True, poison_step=3)
    assert all(torch.isfinite(p).all() for p in skipped)
    assert int(opt.state[opt.projected_parameters()[0]]["step"]) == 3  # the poisoned step was skipped
