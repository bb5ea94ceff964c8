"""The StateStorage interface: registry, key scheme, bytes, checkpoints, conversion, errors."""

from __future__ import annotations

import io

import pytest
import torch

from coap_compile.storage import (
    FP32Storage,
    StateStorage,
    convert_state,
    get_storage,
    load_any,
    register_storage,
    storage_names,
    stored_precision,
)

CONFIGS = [
    ("fp32", {}),
    ("fp32", {"dtype": torch.float64}),
    ("bf16", {"rounding": "nearest"}),
    ("bf16", {"rounding": "stochastic"}),
    ("int8", {"rounding": "nearest", "min_numel": 0}),
    ("int8", {"rounding": "stochastic"}),
    ("int8", {"second_moment_map": "signed", "quant_block_size": 64}),
]
KINDS = ("first_moment", "second_moment")


def _value(kind: str, shape=(300, 40), seed=0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x * x if kind == "second_moment" else x


def test_registry():
    assert storage_names() == ("fp32", "bf16", "int8")
    for name in storage_names():
        assert get_storage(name).name == name
    inst = get_storage("bf16", rounding="nearest")
    assert get_storage(inst) is inst
    with pytest.raises(
        ValueError, match=r"state precision must be one of \('fp32', 'bf16', 'int8'\), got 'int4'"
    ):
        get_storage("int4")
    with pytest.raises(TypeError, match="options"):
        get_storage(inst, rounding="nearest")
    with pytest.raises(TypeError, match="unexpected keyword"):
        get_storage("fp32", rounding="nearest")

    class Again(FP32Storage):
        name = "bf16"

    with pytest.raises(ValueError, match="already registered"):
        register_storage(Again)


@pytest.mark.parametrize(("precision", "options"), CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_keys_bytes_checkpoint_round_trip(precision, options, kind, tmp_path):
    stg = get_storage(precision, **options)
    x = _value(kind)
    stored = stg.zeros("exp_avg", x.shape, "cpu", kind, seed=2)
    assert all(k == "exp_avg" or k.startswith("exp_avg.") for k in stored)
    assert tuple(stored) == stg.keys("exp_avg", x.shape, kind)
    assert stg.nbytes(x.shape, kind) == sum(t.numel() * t.element_size() for t in stored.values())
    tensors = {k: (v, v.data_ptr()) for k, v in stored.items()}
    for i in range(3):
        stg.store_(stored, "exp_avg", x * (i + 1))
    assert all(stored[k] is t and t.data_ptr() == p for k, (t, p) in tensors.items())  # in place
    assert stored_precision(stored, "exp_avg") == precision
    path = tmp_path / "state.pt"
    torch.save({"state": {0: stored}}, path)
    loaded = torch.load(path, weights_only=True)["state"][0]
    assert loaded.keys() == stored.keys()
    for k in stored:
        assert loaded[k].dtype == stored[k].dtype and torch.equal(loaded[k], stored[k])
    assert torch.equal(stg.load(loaded, "exp_avg"), stg.load(stored, "exp_avg"))
    assert torch.equal(load_any(loaded, "exp_avg"), stg.load(stored, "exp_avg"))
    stg.store_(loaded, "exp_avg", x)  # the resumed run continues exactly like the original
    stg.store_(stored, "exp_avg", x)
    assert all(torch.equal(loaded[k], stored[k]) for k in stored)


def test_load_dtype_and_accuracy():
    x = _value("first_moment")
    for precision, options in CONFIGS:
        stg = get_storage(precision, **options)
        out = stg.load(stg.from_value("m", x, "first_moment"), "m")
        want = options.get("dtype", torch.float32)
        assert out.dtype == want
        rel = ((out.double() - x.double()).norm() / x.double().norm()).item()
        # observed: fp32 0, bf16 ≈ 2e-3, int8 ≈ 1–2e-2 (signed map, 256/64-element blocks)
        assert rel < {"fp32": 1e-7, "bf16": 4e-3, "int8": 3e-2}[precision], (precision, options, rel)


def test_fp32_load_is_the_stored_tensor():
    stg = get_storage("fp32")
    s = stg.zeros("m", (4, 4))
    assert stg.load(s, "m") is s["m"]
    stg.store_(s, "m", s["m"])  # storing the loaded tensor itself is a no-op
    stg.store_(s, "m", torch.ones(4, 4, dtype=torch.float64))
    assert s["m"].dtype == torch.float32 and torch.all(s["m"] == 1)


@pytest.mark.parametrize("kind", KINDS)
def test_conversion(kind):
    x = _value(kind, (512, 64))
    fp = {"v": x.clone()}
    for target in ("bf16", "int8"):
        q = convert_state(fp, "v", target, kind, seed=1)
        direct = get_storage(target).from_value("v", x, kind, seed=1)
        assert q.keys() == direct.keys() and all(torch.equal(q[k], direct[k]) for k in q)  # one store_
        back = convert_state(q, "v", "fp32")
        assert set(back) == {"v"} and torch.equal(back["v"], get_storage(target).load(q, "v"))  # exact
        again = convert_state(back, "v", target, kind, seed=7)
        key = "v" if target == "bf16" else "v.q8"
        assert torch.equal(again[key], q[key])  # re-quantizing dequantized values changes nothing
        if target == "int8":
            assert torch.equal(again["v.absmax"], q["v.absmax"])
    assert torch.equal(fp["v"], x)  # the source is not modified
    b = convert_state(convert_state(fp, "v", "int8", kind), "v", "bf16", kind)
    assert b["v"].dtype == torch.bfloat16
    d = convert_state(fp, "v", FP32Storage(torch.float64))
    assert d["v"].dtype == torch.float64 and torch.equal(d["v"].float(), x)


def test_errors():
    with pytest.raises(ValueError, match="fp32 storage dtype must be"):
        FP32Storage(torch.bfloat16)
    with pytest.raises(
        ValueError, match=r"state kind must be one of \('first_moment', 'second_moment', 'other'\)"
    ):
        get_storage("fp32").zeros("m", (2,), kind="momentum")
    with pytest.raises(ValueError, match="shape must be a sequence of non-negative ints"):
        get_storage("bf16").zeros("m", (2, -1))
    with pytest.raises(TypeError, match="shape must be a sequence of ints"):
        get_storage("bf16").nbytes(5)
    with pytest.raises(KeyError, match=r"no state 'x' in the stored keys \['m'\]"):
        stored_precision({"m": torch.zeros(2)}, "x")
    with pytest.raises(ValueError, match="has dtype torch.int32"):
        stored_precision({"m": torch.zeros(2, dtype=torch.int32)}, "m")
    with pytest.raises(ValueError, match="this storage holds torch.float32"):
        get_storage("fp32").load({"m": torch.zeros(2, dtype=torch.float64)}, "m")
    with pytest.raises(KeyError, match=r"bf16 state 'm' needs key 'm'"):
        get_storage("bf16").load({"x": torch.zeros(2)}, "m")
    assert issubclass(type(get_storage("int8")), StateStorage)


def test_checkpoint_bytes_are_tensors_only():
    stg = get_storage("int8")
    s = stg.from_value("exp_avg_sq", _value("second_moment", (128, 64)), "second_moment")
    buf = io.BytesIO()
    torch.save(s, buf)
    buf.seek(0)
    out = torch.load(buf, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    assert {k: v.dtype for k, v in out.items()} == {
        "exp_avg_sq.q8": torch.uint8,
        "exp_avg_sq.absmax": torch.float32,
        "exp_avg_sq.rng": torch.int64,
    }
