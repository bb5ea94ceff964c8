"""Issue 9 through the optimizer: bf16 and int8 state storage, ``P`` precision, memory, checkpoints, errors.

The storage formats themselves are tested in ``test_storage_*``; here: that the optimizer stores what it
says, that its update is "load → the unchanged compiled update → store", that the memory plan is exact,
and that checkpoints resume bit-identically and convert between precisions."""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from helpers import VirtualLowRank, orthonormal, randn
from test_runtime import TinyLM, _train

import coap_compile
from coap_compile import FixedProjection
from coap_compile.storage import Bf16Storage, Int8Storage, load_any


def _real_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())


def _lm(seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyLM(vocab=50, d=64, ff=96)
    kw = {"rank": 16, "lr": 1e-2, "update_interval": 2, "reproject_factor": 2, **kw}
    return model, coap_compile.optimize(model, kw.pop("base", torch.optim.AdamW), **kw)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize(
    ("base", "kw"),
    [(torch.optim.AdamW, {}), (torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adafactor, {})],
    ids=["adamw", "sgd", "adafactor"],
)
def test_states_are_stored_as_asked_and_the_plan_is_exact(precision, base, kw):
    model, opt = _lm(base=base, state_precision=precision, quant_block_size=64, **kw)
    _train(model, opt, 5)
    assert _real_bytes(opt) == opt.memory_plan().total_bytes
    for p in opt.projected_parameters():
        st = opt.state[p]
        assert st["proj"].dtype == torch.float32  # P follows the (float32) weights (issue 19, precision.py)
        for name in ("exp_avg", "momentum_buffer", "coap_exp_avg"):
            if not any(k.startswith(name) for k in st):
                continue
            if precision == "bf16":
                assert st[name].dtype == torch.bfloat16 and st[f"{name}.rng"].dtype == torch.int64
            elif precision == "int8":  # 96×16 = 1536 elements < 4096: kept float32 (documented threshold)
                assert st[name].dtype == torch.float32
            else:
                assert st[name].dtype == torch.float32 and f"{name}.rng" not in st


def test_int8_quantizes_large_moments_and_keeps_small_ones():
    w = randn(0, 256, 64).requires_grad_()  # M×r = 256×32 = 8192 elements: quantized
    b = randn(1, 256).requires_grad_()  # a bias of 256 elements: kept fp32
    opt = coap_compile.optimize(
        [{"params": [w], "project": True}, {"params": [b]}], torch.optim.AdamW, rank=32, lr=1e-2,
        state_precision="int8",
    )  # fmt: skip
    w.grad, b.grad = randn(2, 256, 64), randn(3, 256)
    opt.step()
    st = opt.state[w]
    assert (
        st["exp_avg.q8"].dtype == torch.int8 and st["exp_avg_sq.q8"].dtype == torch.uint8
    )  # signed / unsigned
    assert st["exp_avg.absmax"].shape == (256, 1)  # 1×32 row blocks (quant_blocks="rows", the default)
    assert "exp_avg" not in st and opt.state[b]["exp_avg"].dtype == torch.float32
    assert _real_bytes(opt) == opt.memory_plan().total_bytes
    # closed form: codes 1 B + one float32 scale per row of 32 (1×32 blocks) + 16 B rng, per moment;
    # P float32 (it follows the float32 weight, issue 19); step 4 B
    per_moment = 256 * 32 + 4 * 256 + 16
    assert opt.memory_plan().rows[0].state_bytes == 2 * per_moment + 64 * 32 * 4 + 4


@pytest.mark.parametrize("blocks", ["rows", "tiles"])
def test_int8_vectors_stay_fp32_with_row_blocks(blocks):
    """A 4096-element vector (above the size threshold): row blocks keep its states fp32 (no row to block
    along; contiguous blocks would straddle FSDP2 shards), tiles quantize it in 1-D blocks of 256. The
    plan, the bench closed form and the held bytes agree; under FSDP2's plan the vector is accepted."""
    from coap_lab.cli import memory as mem

    gain = randn(0, 4096).requires_grad_()
    opt = coap_compile.optimize(
        [gain], torch.optim.AdamW, lr=1e-2, state_precision="int8", quant_blocks=blocks
    )
    gain.grad = randn(1, 4096)
    opt.step()
    st = opt.state[gain]
    if blocks == "rows":
        assert st["exp_avg"].dtype == torch.float32 and "exp_avg.q8" not in st
    else:
        assert st["exp_avg.q8"].dtype == torch.int8 and st["exp_avg.absmax"].shape == (16, 1)
    acc = dataclasses.replace(mem.COAP_INT8, blocks=blocks)
    assert _real_bytes(opt) == opt.memory_plan().total_bytes == 2 * mem.moment_bytes((4096,), "int8", acc) + 4
    if blocks == "rows":
        assert opt.memory_plan(world_size=4).total_bytes == 2 * 4 * 1024 + 4  # a quarter each, fp32
    else:
        with pytest.raises(ValueError, match="straddle shard boundaries"):
            opt.memory_plan(world_size=4)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_the_update_is_load_compiled_update_store(precision):
    """One step from a fixed state equals: load the stored states, step torch's AdamW on the virtual
    low-rank parameter from them (fixed P), store the result with the same storage and rounding stream.
    The two float32 computations differ in op order (≈ 1 ulp), which can move an element across a
    rounding boundary: ≥ 99 % of the stored elements are bit-identical, the rest one level apart."""
    shape, r = (256, 48), 32  # M×r = 8192 elements: int8 quantizes them
    w = randn(0, *shape).requires_grad_()
    proj = orthonormal(1)(shape[1], r, torch.float32, "cpu")
    opt = coap_compile.optimize(
        [{"params": [w], "project": True}], torch.optim.AdamW, rank=r, lr=1e-2, state_precision=precision,
        projection_precision="fp32", projection=FixedProjection(orthonormal(1)),
    )  # fmt: skip
    for k in range(3):
        w.grad = randn(10 + k, *shape)
        opt.step()
    before = copy.deepcopy(opt.state[w])
    g = randn(20, *shape)
    oracle = VirtualLowRank(torch.optim.AdamW, w, proj, lr=1e-2)
    z_state = oracle.opt.state[oracle.z]
    z_state["step"] = before["step"].clone()
    z_state["exp_avg"] = load_any(before, "exp_avg").clone()
    z_state["exp_avg_sq"] = load_any(before, "exp_avg_sq").clone()
    oracle.step(g)
    w.grad = g
    opt.step()
    storage = Bf16Storage() if precision == "bf16" else Int8Storage()
    for name in ("exp_avg", "exp_avg_sq"):
        expected = copy.deepcopy(before)
        storage.store_(expected, name, z_state[name])
        key = name if precision == "bf16" else f"{name}.q8"
        got, want = opt.state[w][key], expected[key]
        same = (got == want).float().mean().item()
        assert same >= 0.99, (name, same)
        if precision == "bf16":
            ulp = (want.float().abs() * 2.0**-7).clamp_min(1e-30)
            assert ((got.float() - want.float()).abs() <= ulp).all(), name
        else:
            assert ((got.int() - want.int()).abs() <= 1).all(), name
            assert torch.allclose(opt.state[w][f"{name}.absmax"], expected[f"{name}.absmax"], rtol=1e-6)
        if f"{name}.rng" in before:
            assert opt.state[w][f"{name}.rng"][1] == before[f"{name}.rng"][1] + 1  # one draw per step


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_checkpoint_resume_is_bit_identical(precision):
    kw = dict(state_precision=precision, quant_block_size=64)
    model_a, opt_a = _lm(**kw)
    _train(model_a, opt_a, 3)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    _train(model_a, opt_a, 4, seed=1)  # crosses correlation steps and an SVD
    model_b, opt_b = _lm(**kw)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    _train(model_b, opt_b, 4, seed=1)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_checkpoints_convert_between_precisions():
    """fp32 → int8: one quantization of the saved values; int8 → fp32: the exact dequantized values; the
    optimizer keeps its own precision (the checkpoint's storage keys do not replace it)."""
    w = randn(0, 256, 64).requires_grad_()
    opt32 = coap_compile.optimize([{"params": [w], "project": True}], torch.optim.AdamW, rank=32, lr=1e-2)
    for k in range(2):
        w.grad = randn(1 + k, 256, 64)
        opt32.step()
    sd32 = opt32.state_dict()
    opt8 = coap_compile.optimize(
        [{"params": [w], "project": True}], torch.optim.AdamW, rank=32, lr=1e-2, state_precision="int8"
    )
    opt8.load_state_dict(sd32)
    assert opt8.param_groups[0]["state_precision"] == "int8"
    st8 = opt8.state[w]
    expected = Int8Storage().from_value("exp_avg", sd32["state"][0]["exp_avg"], "first_moment", seed=0)
    assert torch.equal(st8["exp_avg.q8"], expected["exp_avg.q8"])
    assert torch.equal(st8["proj"], sd32["state"][0]["proj"])  # P float32 with float32 weights, any states
    back = coap_compile.optimize([{"params": [w], "project": True}], torch.optim.AdamW, rank=32, lr=1e-2)
    back.load_state_dict(opt8.state_dict())
    assert torch.equal(back.state[w]["exp_avg"], load_any(st8, "exp_avg"))
    w.grad = randn(9, 256, 64)
    back.step()  # and both keep stepping
    opt8.step()


def test_int8_refuses_a_state_that_is_not_moment_like():
    w = randn(0, 256, 64).requires_grad_()
    with pytest.raises(ValueError, match=r"int8.*'param\[\(256, 64\)\]'.*'momentum_buffer'.*'other'.*'bf16'"):
        coap_compile.optimize(
            [{"params": [w], "project": True}],
            torch.optim.RMSprop,
            rank=32,
            momentum=0.9,
            state_precision="int8",
        )
    with pytest.raises(ValueError, match=r"'exp_inf'"):  # Adamax's running max (generic route)
        coap_compile.optimize(
            [{"params": [w], "project": True}], torch.optim.Adamax, rank=32, state_precision="int8"
        )


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (
            {"state_precision": "fp8"},
            ValueError,
            r"state_precision must be one of \('auto', 'fp32', 'bf16', 'int8'\)",
        ),
        ({"projection_precision": "int8"}, ValueError, r"projection_precision must be one of"),
        ({"state_precision": "int8", "quant_block_size": 100}, ValueError, r"quant_block_size.*100"),
        ({"state_precision": "int8", "quant_block_size": 0}, ValueError, r"quant_block_size.*0"),
    ],
)
def test_bad_precision_arguments_raise(kw, exc, match):
    w = randn(0, 16, 8).requires_grad_()
    with pytest.raises(exc, match=match):
        coap_compile.optimize([w], torch.optim.AdamW, rank=4, **kw)
    with pytest.raises(exc, match=match):
        coap_compile.optimize([{"params": [w], **kw}], torch.optim.AdamW, rank=4)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_trains_like_fp32(precision):
    """Not a quality claim (``bench quality`` is): on a rank-3 least-squares problem whose projected
    moments are large enough to be quantized (256×16), bf16 and int8 train like fp32."""
    from helpers import least_squares, run

    final = {}
    for p in ("fp32", precision):
        w, b, loss = least_squares(0, 256, 64)
        opt = coap_compile.optimize(
            [{"params": [w], "project": True}, {"params": [b]}], torch.optim.AdamW, rank=16, lr=5e-2,
            update_interval=10, state_precision=p,
        )  # fmt: skip
        final[p] = run(opt, loss, 60)[-1]
        if p == "int8":
            assert "exp_avg.q8" in opt.state[w]
    # observed after 60 steps (from 274.7): fp32 118.02, bf16 118.01, int8 129.2 (8-bit moments of a
    # 60-step-old EMA carry ~2 % direction error, see storage.int8); a broken store would not train.
    assert final[precision] < 1.2 * final["fp32"], final
