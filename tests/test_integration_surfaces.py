"""Drop-in surfaces people reach for, with a COAP optimizer: ``torch.optim.swa_utils``,
``torch.amp.GradScaler`` (CPU; CUDA under ``@pytest.mark.cuda``) and ``accelerate``'s
``Accelerator.prepare`` + ``save_state``/``load_state``.

Each test compares values against a reference: the eager oracle :class:`coap_compile.reference.CoapAdamW`
(independent code) driven through the same surface, closed forms (a running mean, GradScaler's scale
sequence), torch's own optimizer under the same scheduler, or an uninterrupted run.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_close
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel

import coap_compile
from coap_compile.reference import CoapAdamW


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is several times faster than two on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


KW = dict(rank=4, update_interval=2, reproject_factor=2, lr=1e-2, weight_decay=0.01)  # refresh k=2, 4, 6…


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64, device: str = "cpu") -> nn.Module:
    """Linear(12→24) and Linear(24→16) are projected at rank 4; Linear(16→3) (3 ≤ 4) and biases are not."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 3)).to(
        dtype=dtype, device=device
    )


def batches(n: int, dtype: torch.dtype = torch.float64, device: str = "cpu") -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    out = [(torch.randn(8, 12, generator=g, dtype=dtype), torch.randn(8, 3, generator=g, dtype=dtype))
           for _ in range(n)]  # fmt: skip
    return [(x.to(device), y.to(device)) for x, y in out]


def groups(model: nn.Module) -> list[dict]:
    """The groups ``optimize(model)`` builds, spelled out for the oracle (full-rank first, then projected)."""
    proj = [model[0].weight, model[2].weight]
    return [{"params": [p for p in model.parameters() if all(p is not q for q in proj)], "project": False},
            {"params": proj}]  # fmt: skip


def make(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "coap":
        opt = coap_compile.optimize(model, torch.optim.AdamW, **KW)
        assert {id(p) for p in opt.projected_parameters()} == {id(model[0].weight), id(model[2].weight)}
        return opt
    if kind == "oracle":
        return CoapAdamW(groups(model), **KW)
    return torch.optim.AdamW(groups(model), lr=KW["lr"], weight_decay=KW["weight_decay"])


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).mean()


# -- torch.optim.swa_utils ---------------------------------------------------------------------------------
def _swa_run(kind: str):
    model = mlp()
    opt = make(kind, model)
    swa = AveragedModel(model)
    sched = SWALR(opt, swa_lr=2e-3, anneal_epochs=3, anneal_strategy="cos")
    snapshots, lrs = [], []
    for i, (x, y) in enumerate(batches(9)):
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:  # SWA starts after a short burn-in
            swa.update_parameters(model)
            snapshots.append([p.detach().clone() for p in model.parameters()])
        sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    return model, swa, snapshots, lrs


def test_swa_averaged_model_and_swalr_match_the_oracle():
    model, swa, snaps, lrs = _swa_run("coap")
    model_o, swa_o, _, lrs_o = _swa_run("oracle")
    *_, lrs_torch = _swa_run("torch")
    assert lrs == lrs_o == lrs_torch  # SWALR drives COAP's groups exactly as torch.optim.AdamW's
    assert lrs[-1] == [2e-3, 2e-3]
    assert int(swa.n_averaged) == len(snaps) == 7
    for i, (a, b) in enumerate(zip(swa.module.parameters(), swa_o.module.parameters())):
        mean = torch.stack([s[i] for s in snaps]).mean(0)  # the closed form: the mean of the snapshots
        # float64 running mean vs stacked mean: observed 1.4e-16 relative (rounding of the running update).
        assert_rel_close(a.detach(), mean, 1e-13, f"swa param {i} vs mean of snapshots")
        # COAP vs the eager oracle (float64, 9 steps across 4 refreshes): observed 2.6e-16.
        assert_rel_close(a.detach(), b.detach(), 1e-10, f"swa param {i} vs oracle")
    for i, (a, b) in enumerate(zip(model.parameters(), model_o.parameters())):
        assert_rel_close(a.detach(), b.detach(), 1e-10, f"param {i} vs oracle")


# -- torch.amp.GradScaler ----------------------------------------------------------------------------------
def _scaler_run(kind: str, device: str, amp_dtype: torch.dtype, inf_step: int | None, scaled: bool = True):
    model = mlp(dtype=torch.float32, device=device)
    opt = make(kind, model)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2, enabled=scaled)
    params, scales = [], []
    for i, (x, y) in enumerate(batches(8, torch.float32, device)):
        with torch.autocast(device, dtype=amp_dtype):
            loss = loss_fn(model, x, y)
        scaler.scale(loss).backward()
        if i == inf_step:
            model[2].weight.grad[0, 0] = float("inf")  # an overflowed gradient: the step must be skipped
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i == inf_step:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "inf step not skipped"
        params.append([p.detach().clone() for p in model.parameters()])
        scales.append(scaler.get_scale() if scaled else None)
    return params, scales


def _expected_scales(n: int, inf_step: int) -> list[float]:
    """GradScaler's closed form: ×2 after every ``growth_interval`` (2) clean steps, ×0.5 on inf."""
    scale, clean, out = 2.0**10, 0, []
    for i in range(n):
        if i == inf_step:
            scale, clean = scale * 0.5, 0
        else:
            clean += 1
            if clean == 2:
                scale, clean = scale * 2.0, 0
        out.append(scale)
    return out


def _check_scaler(device: str, amp_dtype: torch.dtype, tol: float) -> None:
    params, scales = _scaler_run("coap", device, amp_dtype, inf_step=3)
    assert scales == _expected_scales(8, 3)
    # The same COAP run without a scaler gets the same gradients exactly (power-of-two scaling and
    # unscaling are exact in float32), so it ends bit-identical when it skips the same step.
    unscaled, _ = _scaler_run("coap", device, amp_dtype, inf_step=None, scaled=False)
    assert all(torch.equal(a, b) for a, b in zip(params[2], unscaled[2]))
    oracle, oracle_scales = _scaler_run("oracle", device, amp_dtype, inf_step=3)
    assert oracle_scales == scales
    for i, (a, b) in enumerate(zip(params[-1], oracle[-1])):
        assert_rel_close(a, b, tol, f"param {i} vs oracle under GradScaler")


def test_grad_scaler_cpu_skips_inf_steps_and_matches_the_oracle():
    # float32 with bf16 autocast, 8 steps across 3 refreshes: observed 3.7e-8 relative to the oracle
    # (re-ordered float32 arithmetic in the compiled update, amplified by Adam's normalisation).
    _check_scaler("cpu", torch.bfloat16, 1e-6)


@pytest.mark.cuda
def test_grad_scaler_cuda_skips_inf_steps_and_matches_the_oracle():
    # fp16 autocast on CUDA; COAP runs its Triton kernels (backend "auto"), the oracle eager torch.
    # Not observed yet (no GPU in the building sessions); 1e-4 allows for kernel vs eager float32 order.
    _check_scaler("cuda", torch.float16, 1e-4)


# -- accelerate ----------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _accelerated(kind: str, seed: int = 0):
    from accelerate import Accelerator

    model = mlp(seed)
    opt = make(kind, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.5 * k))
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    return (acc, *acc.prepare(model, opt, sched))


def _micro_steps(acc, model, opt, sched, data) -> None:
    for x, y in data:
        with acc.accumulate(model):
            acc.backward(loss_fn(model, x, y))
            opt.step()
            sched.step()
            opt.zero_grad()


def test_accelerate_prepare_with_accumulation_matches_the_oracle(fresh_accelerate):
    """8 micro-batches, accumulation 2: accelerate steps COAP 4 times on the summed (loss/2) gradients;
    the oracle is stepped by hand on the same accumulated gradients."""
    acc, model, opt, sched = _accelerated("coap")
    data = batches(8)
    _micro_steps(acc, model, opt, sched, data)
    assert int(opt.optimizer.state[model[0].weight]["step"]) == 4

    ref = mlp()
    ref_opt = make("oracle", ref)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda k: 1.0 / (1 + 0.5 * k))
    for j in range(0, 8, 2):
        for x, y in data[j : j + 2]:
            (loss_fn(ref, x, y) / 2).backward()
        ref_opt.step()
        ref_sched.step()
        ref_opt.zero_grad()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    for i, (a, b) in enumerate(zip(model.parameters(), ref.parameters())):
        # float64, 4 steps across 2 refreshes: observed 2.2e-16 relative.
        assert_rel_close(a.detach(), b.detach(), 1e-10, f"param {i}")


def test_accelerate_save_state_load_state_round_trip_is_bit_identical(fresh_accelerate, tmp_path):
    data = batches(12)
    acc, model, opt, sched = _accelerated("coap")
    _micro_steps(acc, model, opt, sched, data[:6])  # 3 optimizer steps (refresh at k=2)
    acc.save_state(str(tmp_path / "state"))
    _micro_steps(acc, model, opt, sched, data[6:])  # 3 more (refreshes at k=4, 6 (SVD))
    final = [p.detach().clone() for p in model.parameters()]
    final_state = opt.state_dict()

    AcceleratorState_reset()
    acc2, model2, opt2, sched2 = _accelerated("coap", seed=5)  # other weights: all must come from the state
    acc2.load_state(str(tmp_path / "state"))
    _micro_steps(acc2, model2, opt2, sched2, data[6:])
    for i, (a, b) in enumerate(zip(final, model2.parameters())):
        assert torch.equal(a, b), f"param {i}"
    resumed = opt2.state_dict()
    for k, s in final_state["state"].items():
        for name, v in s.items():
            assert torch.equal(v, resumed["state"][k][name]), (k, name)
    assert sched.get_last_lr() == sched2.get_last_lr()


def AcceleratorState_reset() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
