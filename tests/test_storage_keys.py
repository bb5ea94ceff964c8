"""The storage key scheme from the registry: logical_name, is_companion, is_replicated_key, logical_layout,
and the registry's dispatch of stored_precision / load_any (storage_class_of)."""

from __future__ import annotations

import pytest
import torch

from coap_compile.storage import (
    Bf16Storage,
    FP32Storage,
    Int8Storage,
    StateStorage,
    base,
    get_storage,
    is_companion,
    is_replicated_key,
    load_any,
    logical_layout,
    logical_name,
    register_storage,
    storage_class_of,
    stored_precision,
)

SR_INT8 = {".q8": "value", ".absmax": "companion", ".rng": "replicated"}
# (precision, options, shape, the keys of state "exp_avg": {suffix: role})
CASES = [
    ("fp32", {}, (300, 40), {"": "value"}),
    ("fp32", {"dtype": torch.float64}, (300, 40), {"": "value"}),
    ("bf16", {"rounding": "nearest"}, (300, 40), {"": "value"}),
    ("bf16", {"rounding": "stochastic"}, (300, 40), {"": "value", ".rng": "replicated"}),
    ("int8", {"rounding": "nearest"}, (300, 40), {".q8": "value", ".absmax": "companion"}),
    ("int8", {"rounding": "stochastic"}, (300, 40), SR_INT8),
    ("int8", {"rounding": "stochastic", "min_numel": 0}, (7,), SR_INT8),
    ("int8", {}, (5, 3), {"": "value"}),  # fewer than min_numel elements: kept float32
    ("int8", {"rounding": "nearest"}, (64,), {"": "value"}),
]  # fmt: skip
IDS = [f"{p}-{'-'.join(f'{k}={v}' for k, v in o.items())}-{'x'.join(map(str, s))}" for p, o, s, _ in CASES]


def _old_logical_layout(state):
    """``runtime.checkpoint.logical_layout`` before the key scheme moved to the storage (the oracle)."""
    out = {}
    for k, v in state.items():
        if any(k.endswith(a) for a in (".rng", ".absmax")):
            continue
        name = k[: -len(".q8")] if k.endswith(".q8") else k
        out[name] = tuple(v.shape) if isinstance(v, torch.Tensor) else None
    return out


def _old_logical_name(key):
    """``runtime.checkpoint.logical_name`` before the move (the oracle)."""
    for suffix in (".q8", ".rng", ".absmax"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def _old_fsdp_row_key(key, names):
    """``distributed.fsdp.ShardedState._row_key`` before the move (the oracle)."""
    if key.endswith(".rng"):
        return False
    return any(key == n or key.startswith(n + ".") for n in names)


@pytest.mark.parametrize(("precision", "options", "shape", "suffixes"), CASES, ids=IDS)
def test_keys_of_one_state(precision, options, shape, suffixes):
    stg = get_storage(precision, **options)
    stored = stg.zeros("exp_avg", shape, "cpu", "second_moment", seed=3)
    assert {k[len("exp_avg") :] for k in stored} == set(suffixes)
    for key in stored:
        role = suffixes[key[len("exp_avg") :]]
        assert logical_name(key) == "exp_avg" == _old_logical_name(key)
        assert is_companion(key) == (role != "value")
        assert is_replicated_key(key) == (role == "replicated")
    assert logical_layout(stored) == {"exp_avg": shape} == _old_logical_layout(stored)
    physical = "fp32" if precision == "int8" and not stg.quantized(shape) else precision
    assert stored_precision(stored, "exp_avg") == physical
    assert storage_class_of(stored, "exp_avg") is type(get_storage(physical))
    stg.store_(stored, "exp_avg", torch.rand(shape, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(load_any(stored, "exp_avg"), stg.load(stored, "exp_avg"))


def test_a_mixed_state_dict_matches_the_old_checkpoint_and_fsdp_rules():
    shape = (96, 48)
    state = {"step": torch.tensor(3.0), "proj": torch.zeros(48, 8), "count": 7}
    state.update(get_storage("int8").zeros("exp_avg", shape, kind="first_moment"))
    state.update(get_storage("int8", rounding="nearest").zeros("exp_avg_sq", shape, kind="second_moment"))
    state.update(get_storage("bf16").zeros("m2", shape))
    state.update(get_storage("bf16", rounding="nearest").zeros("m3", shape))
    state.update(get_storage("int8").zeros("small", (3,), kind="first_moment"))
    state.update(get_storage("fp32", dtype=torch.float64).zeros("v", (4,)))
    want = {"step": (), "proj": (48, 8), "count": None, "exp_avg": shape, "exp_avg_sq": shape, "m2": shape}
    want.update({"m3": shape, "small": (3,), "v": (4,)})
    assert logical_layout(state) == want == _old_logical_layout(state)
    names = ("exp_avg", "exp_avg_sq", "m2", "m3", "small", "v")
    for key in state:
        assert logical_name(key) == _old_logical_name(key)
        row = logical_name(key) in names and not is_replicated_key(key)  # the replacement of the FSDP rule
        assert row == _old_fsdp_row_key(key, names), key
        assert is_companion(key) == any(key.endswith(s) for s in (".rng", ".absmax"))
    assert sorted(k for k in state if is_replicated_key(k)) == ["exp_avg.rng", "m2.rng"]
    assert logical_name("exp_avg") == "exp_avg" and not is_companion("step") and not is_replicated_key("proj")


def test_classes_declare_their_suffixes():
    def declared(cls):
        return cls.value_suffix, cls.companion_suffixes, cls.replicated_suffixes

    assert declared(FP32Storage) == ("", (), ())
    assert declared(Bf16Storage) == ("", (".rng",), (".rng",)) and Bf16Storage.rng_suffix == ".rng"
    assert declared(Int8Storage) == (".q8", (".absmax", ".rng"), (".rng",))
    assert (Int8Storage.scale_suffix, Int8Storage.rng_suffix) == (".absmax", ".rng")
    assert base._suffixes("value_suffix") == (".q8",)
    assert set(base._suffixes("companion_suffixes")) == {".absmax", ".rng"}


def test_dispatch_order_and_errors():
    codes = {"m.q8": torch.zeros(4, dtype=torch.float32), "m": torch.zeros(4)}
    assert stored_precision(codes, "m") == "int8"  # a suffixed value key is asked first (as before)
    assert stored_precision({"m": torch.zeros(2, dtype=torch.float64)}, "m") == "fp32"
    assert stored_precision({"m": torch.zeros(2, dtype=torch.bfloat16)}, "m") == "bf16"
    assert load_any({"m": torch.ones(2, dtype=torch.float64)}, "m").dtype == torch.float64
    with pytest.raises(KeyError, match=r"no state 'x' in the stored keys \['m'\]"):
        stored_precision({"m": torch.zeros(2)}, "x")
    with pytest.raises(KeyError, match="no state 'm'"):
        stored_precision({"m": 1.0}, "m")
    with pytest.raises(
        ValueError, match=r"dtype torch.int32; stored states are float32/float64/bfloat16/int8"
    ):
        stored_precision({"m": torch.zeros(2, dtype=torch.int32)}, "m")


class _Fp16Storage(StateStorage):
    """A toy format: float16 values with a float32 per-state scale under ``.scale16``."""

    name = "fp16-test"
    value_dtypes = (torch.float16,)
    companion_suffixes = (".scale16", ".rng")
    replicated_suffixes = (".rng",)

    @classmethod
    def load_owned(cls, stored, name):
        return stored[name].float() * stored[name + ".scale16"]

    def zeros(self, name, shape, device=None, kind="other", *, seed=0):
        return {
            name: torch.zeros(shape, dtype=torch.float16, device=device),
            f"{name}.scale16": torch.ones(()),
        }

    def load(self, stored, name):
        return self.load_owned(stored, name)

    def store_(self, stored, name, value):
        stored[name].copy_(value)

    def nbytes(self, shape, kind="other"):
        return 2 * base.numel(shape) + 4


@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_DERIVED", {})


def test_a_registered_format_joins_the_key_scheme(scratch_registry):
    assert logical_name("m.scale16") == "m.scale16"
    register_storage(_Fp16Storage)
    stored = _Fp16Storage().zeros("m", (3, 2))
    stored["m.scale16"].fill_(2.0)
    stored["m"].fill_(1.5)
    assert logical_name("m.scale16") == "m" and is_companion("m.scale16")
    assert not is_replicated_key("m.scale16") and is_replicated_key("m.rng")
    assert logical_layout(stored) == {"m": (3, 2)}
    assert stored_precision(stored, "m") == "fp16-test"
    assert torch.equal(load_any(stored, "m"), torch.full((3, 2), 3.0))


def test_conflicting_suffixes_are_refused(scratch_registry):
    class ValueIsAScale(_Fp16Storage):
        name = "bad-1"
        value_suffix = ".absmax"

    class StreamRowSharded(_Fp16Storage):
        name = "bad-2"
        replicated_suffixes = ()

    class NotACompanion(_Fp16Storage):
        name = "bad-3"
        replicated_suffixes = (".seed",)

    class NoDot(_Fp16Storage):
        name = "bad-4"
        companion_suffixes = ("scale",)

    with pytest.raises(ValueError, match="would name values and bookkeeping"):
        register_storage(ValueIsAScale)
    with pytest.raises(ValueError, match="disagree on which of"):
        register_storage(StreamRowSharded)
    with pytest.raises(ValueError, match="are not all companion_suffixes"):
        register_storage(NotACompanion)
    with pytest.raises(TypeError, match="must be a tuple of str starting with '.'"):
        register_storage(NoDot)
    assert "bad" not in "".join(base._REGISTRY)
