"""In-backward updates and gradient accumulation (``coap_compile.runtime.inbackward``, issue 10 item 3).

References: the normal path (``loss.backward(); opt.step()``) of the same optimizer, on which the
in-backward path must be bit-identical (each parameter's update is independent of the others), and the
normal path on the summed gradient of ``N`` micro-batches, which projected accumulation must match
within float32 rounding across the init, correlation and SVD refreshes. Live gradient bytes are
checked for exact equality against closed forms.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err, seeds
from hypothesis import given
from torch import nn

import coap_compile
from coap_compile import NonFiniteGradientError
from coap_compile.runtime.inbackward import accumulation_needs_full_gradient, step_in_backward
from coap_compile.runtime.refresh import plan_refresh
from coap_compile.runtime.schedule import due
from coap_lab.models import build_llama, demo_config

CFG = demo_config(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_seq_len=12)
KW = {"rank": 4, "update_interval": 2, "reproject_factor": 2, "lr": 1e-2}
STEPS = 9  # init k=0, correlation k=2, 6, SVD k=4, 8
BASES = {
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.01}),
    "adam-l2": (torch.optim.Adam, {"weight_decay": 0.05}),  # prologue X = G + λW
    "sgd-momentum": (torch.optim.SGD, {"momentum": 0.9}),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices: one intra-op thread (this test's benchmark: 3.8 s instead of 8.6 s with 2 threads
    on the 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (2, CFG.max_seq_len + 1), generator=gen) for _ in range(n)]


def _setup(base: str):
    cls, extra = BASES[base]
    model = build_llama(CFG, seed=0)
    opt = coap_compile.optimize(model, cls, **KW, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _state(opt) -> dict:
    return {(i, k): v.clone() for i, e in opt.state_dict()["state"].items() for k, v in e.items()}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class LiveGradientBytes:
    """Peak of (live ``.grad`` bytes + in-backward accumulators), sampled at every post-accumulate hook.

    Registered before the in-backward hooks, so it runs first: a gradient is created just before its
    parameter's hooks fire and only freed inside them, so the maximum over these samples is the maximum
    over time of the live gradient tensors."""

    def __init__(self, model: nn.Module, handle=None) -> None:
        self.params, self.handle, self.peak = list(model.parameters()), handle, 0
        self.hooks = [p.register_post_accumulate_grad_hook(self.sample) for p in self.params]

    def sample(self, _p=None) -> None:
        live = sum(_bytes(p.grad) for p in self.params if p.grad is not None)
        self.peak = max(self.peak, live + (self.handle.accumulator_bytes() if self.handle else 0))


@pytest.mark.parametrize("base", sorted(BASES))
def test_in_backward_is_bit_identical_to_the_normal_path(base):
    batches = _batches(STEPS)
    model, opt, sched = _setup(base)
    normal_tracker = LiveGradientBytes(model)
    for b in batches:
        model.loss(b).backward()
        normal_tracker.sample()
        opt.step()
        sched.step()
        opt.zero_grad()
    model2, opt2, sched2 = _setup(base)
    tracker = LiveGradientBytes(model2)
    handle = step_in_backward(model2, opt2)
    tracker.handle = handle
    p0 = {n: opt2.state[p]["proj"].clone() for n, p in model2.named_parameters() if p in opt2.state}
    for b in batches:
        model2.loss(b).backward()
        assert all(p.grad is None for p in model2.parameters())  # stepped and freed inside backward
        opt2.step()  # nothing left to do
        sched2.step()
        opt2.zero_grad()
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name
    s1, s2 = _state(opt), _state(opt2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"] == KW["lr"] / (1 + STEPS)
    assert not p0  # no state before the first backward: the init ran inside the hooks
    projected = opt2.projected_parameters()
    assert len(projected) == 8 and all(opt2.state[p]["step"].item() == STEPS for p in projected)
    sizes = [_bytes(p) for p in model2.parameters()]
    assert normal_tracker.peak == sum(sizes)  # every gradient alive before opt.step()
    assert tracker.peak == max(sizes)  # one gradient at a time


def _accumulated(base: str, micro: int, handle_steps: int | None, windows: int = STEPS):
    """Train ``windows`` steps of ``micro`` micro-batches; ``handle_steps``: in-backward accumulation."""
    batches = _batches(windows * micro, seed=1)
    model, opt, sched = _setup(base)
    tracker = LiveGradientBytes(model)  # registered first: samples before the in-backward hooks
    handle = step_in_backward(model, opt, accumulation_steps=handle_steps) if handle_steps else None
    tracker.handle = handle
    acc_after_first = []
    for w in range(windows):
        for i in range(micro):
            (model.loss(batches[w * micro + i]) / micro).backward()
            if handle and i == 0:
                acc_after_first.append(handle.accumulator_bytes())
        if handle:
            assert handle.micro_batch == 0 and handle.accumulator_bytes() == 0
            assert all(p.grad is None for p in model.parameters())
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, tracker, acc_after_first


@pytest.mark.parametrize("base", ["adamw", "adam-l2"])
def test_accumulation_matches_the_normal_path_on_the_summed_gradient(base):
    micro = 4
    ref_model, ref_opt, ref_tracker, _ = _accumulated(base, micro, None)
    model, opt, tracker, acc = _accumulated(base, micro, micro)
    # float32: Σᵢ (Xᵢ P) vs (Σᵢ Xᵢ) P round differently; over 9 steps with 4 refreshes observed
    # ≤ 1.9e-7 (weights) and ≤ 4.1e-6 (states: P after the SVDs, whose inputs differ at rounding level).
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        assert rel_err(b, a) < 5e-6, name
    s1, s2 = _state(ref_opt), _state(opt)
    assert s1.keys() == s2.keys()
    for k in s1:
        assert rel_err(s2[k], s1[k]) < 5e-5, k
    # Projected accumulation ran exactly on the steps without a refresh (k = 1, 3, 5, 7): after the
    # first micro-batch each projected weight holds M×r floats instead of its gradient.
    projected = opt.projected_parameters()
    lowrank = sum(max(p.shape) * KW["rank"] * 4 for p in projected)
    assert acc == [lowrank if k % 2 else 0 for k in range(STEPS)]
    sizes = {p: _bytes(p) for p in model.parameters()}
    full_rank = sum(v for p, v in sizes.items() if all(p is not q for q in projected))
    assert ref_tracker.peak == sum(sizes.values())
    # Over the run the refresh windows keep full gradients (the normal path's peak); a window without a
    # refresh peaks at the accumulators + the full-rank gradients (kept by autograd across micro-batches)
    # + the one projected gradient being projected.
    assert tracker.peak == sum(sizes.values())
    assert _peak_of_window_k1(base, micro) == lowrank + full_rank + max(sizes[p] for p in projected)


def _peak_of_window_k1(base: str, micro: int) -> int:
    """The live gradient peak of the window at k = 1 (no refresh) alone."""
    batches = _batches(2 * micro, seed=1)
    model, _opt, _ = _setup(base)
    tracker = LiveGradientBytes(model)
    tracker.handle = step_in_backward(model, _opt, accumulation_steps=micro)
    for i in range(micro):  # window k = 0 (init: full gradients)
        (model.loss(batches[i]) / micro).backward()
    tracker.peak = 0
    for i in range(micro):  # window k = 1: projected accumulation
        (model.loss(batches[micro + i]) / micro).backward()
    return tracker.peak


@given(seed=seeds)
def test_accumulation_property_single_matrix(seed):
    """One ``12×7`` weight (transposed orientation: X = Gᵀ) fed known gradients ``Cᵢ`` through
    ``loss = Σ W ⊙ Cᵢ``: accumulation over 3 micro-batches equals one step on ``Σ Cᵢ``, across refreshes."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(7, 12, generator=gen)
    grads = [torch.randn(7, 12, generator=gen) for _ in range(3 * 7)]
    kw = {"rank": 3, "update_interval": 2, "reproject_factor": 2, "lr": 1e-2, "weight_decay": 0.1}

    def run(in_backward: bool) -> tuple[torch.Tensor, dict]:
        w = nn.Parameter(w0.clone())
        opt = coap_compile.CoapOptimizer([w], torch.optim.Adam, **kw)
        handle = step_in_backward([w], opt, accumulation_steps=3) if in_backward else None
        for s in range(7):
            for i in range(3):
                (w * grads[3 * s + i]).sum().backward()
            if handle is None:
                opt.step()
            opt.zero_grad()
        return w.detach(), _state(opt)

    (w_ref, s_ref), (w_acc, s_acc) = run(False), run(True)
    # observed ≤ 5e-8 (weight) and ≤ 3e-6 (states) over 40 seeds (float32 rounding of the sums, amplified
    # by Adam's 1/√v)
    assert rel_err(w_acc, w_ref) < 5e-6
    for k in s_ref:
        assert rel_err(s_acc[k], s_ref[k]) < 5e-5, k


def test_parameter_unused_in_the_last_micro_batch_still_steps():
    """The normal path steps every parameter holding a gradient at the boundary; so must the hooks."""
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        model = nn.ModuleDict({"a": nn.Linear(10, 9), "b": nn.Linear(10, 9)})
        return model, coap_compile.optimize(model, torch.optim.AdamW, rank=3, update_interval=2, lr=1e-2)

    xs = [torch.randn(4, 10) for _ in range(3 * 6)]

    def loss(model, i):  # branch b only in the first micro-batch of each window
        out = model["a"](xs[i])
        return (out.square().mean() + (model["b"](xs[i]).square().mean() if i % 3 == 0 else 0)) / 3

    ref, ref_opt = make()
    model, opt = make()
    step_in_backward(model, opt, accumulation_steps=3)
    for s in range(6):
        for i in range(3 * s, 3 * s + 3):
            loss(ref, i).backward()
            loss(model, i).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert rel_err(b, a) < 5e-6, name  # observed ≤ 3e-7
        assert opt.state[b]["step"].item() == 6, name


def test_nonfinite_gradient_raises_and_leaves_that_parameter_untouched():
    model, opt, _ = _setup("adamw")
    handle = step_in_backward(model, opt)
    b1, b2, b3 = _batches(3)
    model.loss(b1).backward()
    victim = model.model.layers[0].mlp.down_proj.weight
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in opt.state[victim].items()}
    hook = victim.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteGradientError, match="down_proj"):
        model.loss(b2).backward()
    hook.remove()
    assert torch.equal(victim.detach(), weights["model.layers.0.mlp.down_proj.weight"])
    assert all(torch.equal(before[k], opt.state[victim][k]) for k in before)
    # documented: the head's hook ran before the failure, so the head was stepped and stays stepped
    assert not torch.equal(model.lm_head.weight.detach(), weights["lm_head.weight"])
    embed = model.model.embed_tokens.weight.detach()
    assert torch.equal(embed, weights["model.embed_tokens.weight"])  # not reached
    opt.zero_grad()
    handle.reset()
    model.loss(b3).backward()  # training continues
    assert all(p.grad is None for p in model.parameters())
    assert opt.state[victim]["step"].item() == 2


def test_resume_and_remove():
    batches = _batches(8)
    model, opt, _ = _setup("adamw")
    with step_in_backward(model, opt):
        for b in batches:
            model.loss(b).backward()
    model2, opt2, _ = _setup("adamw")
    handle = step_in_backward(model2, opt2)
    for b in batches[:5]:
        model2.loss(b).backward()
    saved_w, saved_s = {k: v.clone() for k, v in model2.state_dict().items()}, opt2.state_dict()
    handle.remove()
    model3, opt3, _ = _setup("adamw")
    model3.load_state_dict(saved_w)
    opt3.load_state_dict(saved_s)
    with step_in_backward(model3, opt3):
        for b in batches[5:]:
            model3.loss(b).backward()
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    s1, s3 = _state(opt), _state(opt3)
    assert all(torch.equal(s1[k], s3[k]) for k in s1)
    model3.loss(batches[0]).backward()  # hooks removed on exit: gradients stay for opt.step()
    assert all(p.grad is not None for p in model3.parameters())


def test_full_gradient_rule_agrees_with_plan_refresh():
    """``accumulation_needs_full_gradient`` must be True exactly when the optimizer's refresh planning
    reads ``X`` (a commit is due), across the schedule and after a rank change."""
    w = nn.Parameter(torch.randn(9, 6))
    opt = coap_compile.CoapOptimizer([w], torch.optim.AdamW, **KW)
    seen = []
    for k in range(12):
        if k == 9:
            opt.param_groups[0]["rank"] = 2  # a re-base (needs X) at the next step
        w.grad = torch.randn(9, 6)
        need = accumulation_needs_full_gradient(opt, w)
        layout = opt.sync_plan().layouts[w]
        io = opt.state_io(w)
        commit = plan_refresh(layout, w, io, due(layout, opt.state[w], io), opt.live_inputs(w))
        assert need == (commit is not None), k
        seen.append(need)
        opt.step()
    # refreshes at even k (update_interval 2); k = 9: the re-base after the rank change
    assert seen == [True, False, True, False, True, False, True, False, True, True, True, False]
    bias = nn.Parameter(torch.zeros(6))
    opt.add_param_group({"params": [bias]})
    assert accumulation_needs_full_gradient(opt, bias)  # full-rank: its base needs G


def test_argument_errors():
    model, opt, _ = _setup("adamw")
    with pytest.raises(TypeError, match="CoapOptimizer"):
        step_in_backward(model, torch.optim.AdamW(model.parameters()))
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="accumulation_steps must be an int >= 1"):
            step_in_backward(model, opt, accumulation_steps=bad)
    with pytest.raises(ValueError, match="not in the optimizer"):
        step_in_backward([nn.Parameter(torch.zeros(3))], opt)
    with pytest.raises(TypeError, match="single tensor"):
        step_in_backward(model.lm_head.weight, opt)
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        step_in_backward(frozen, opt)


def test_scoped_step_leaves_the_rest_of_its_matrix_group_untouched():
    """``_step_only([p])`` on a member of a matrix group (:mod:`coap_compile.runtime.grouped`) steps that
    member alone, bit-identically to the grouped step, and reads no other gradient."""
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 6, generator=gen) for _ in range(3)]
    grads = [[torch.randn(8, 6, generator=gen) for _ in range(3)] for _ in range(4)]

    def make():
        params = [nn.Parameter(w.clone()) for w in ws]
        return params, coap_compile.CoapOptimizer(params, torch.optim.AdamW, **KW)

    ref, ref_opt = make()
    params, opt = make()
    for s in range(4):
        for p, q, g in zip(ref, params, grads[s]):
            p.grad, q.grad = g.clone(), g.clone()
        ref_opt.step()  # grouped from the second step on (states packed into one buffer)
        others = [(q.detach().clone(), {k: v.clone() for k, v in opt.state[q].items()}) for q in params[1:]]
        params[1].grad = torch.full((8, 6), float("nan"))  # would raise if the scoped step read it
        opt.step_subset([params[0]])
        for q, (w, st) in zip(params[1:], others):
            assert torch.equal(q, w) and all(torch.equal(st[k], opt.state[q][k]) for k in st)
        params[1].grad = grads[s][1].clone()
        opt.step_subset(params[1:])
    assert (
        ref_opt.plan.matrix_groups and len(ref_opt.plan.matrix_groups[0].members) == 3
    )  # the reference did step grouped
    for p, q in zip(ref, params):
        assert torch.equal(p, q)
        assert all(torch.equal(ref_opt.state[p][k], opt.state[q][k]) for k in ref_opt.state[p])


def test_benchmark_measures_its_closed_forms():
    """``benchmarks/in_backward.py`` on the demo model: every measured peak equals its closed form (the
    script raises otherwise) and the modes order as the closed forms say."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "in_backward.py"
    spec = importlib.util.spec_from_file_location("bench_in_backward", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {(r["mode"], r["window"][:2]): r for r in bench.measure("demo", micro=3, seq=8)}
    assert all(r["peak_grad_bytes"] == r["closed_form_bytes"] for r in rows.values())
    model = build_llama(demo_config(), seed=0)
    sizes = [_bytes(p) for p in model.parameters()]
    assert rows[("normal", "re")]["peak_grad_bytes"] == sum(sizes) == 13_181_952
    assert rows[("in_backward", "no")]["peak_grad_bytes"] == max(sizes) == 688 * 256 * 4
    assert rows[("in_backward_accum", "re")]["peak_grad_bytes"] == sum(sizes)
    assert max(sizes) < rows[("in_backward_accum", "no")]["peak_grad_bytes"] < sum(sizes)
