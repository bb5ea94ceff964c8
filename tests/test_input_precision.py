"""``input_precision="auto"``: torch's float32 matmul precision, resolved where the kernels are launched.

The mapping itself (:func:`coap_compile.kernels.launch.resolve_input_precision`), torch ≥ 2.9's
per-backend API, and the optimizer path: the K1/K2 launches of a ``backend="triton"`` optimizer (under
``TRITON_INTERPRET=1``) receive the mapped ``tl.dot`` arithmetic, following a setting changed *after*
the optimizer was built.
"""

from __future__ import annotations

import pytest
import torch

import coap_compile
from coap_compile.kernels import launch
from coap_compile.runtime.settings import OptimizerOptions
from tests.helpers import randn


@pytest.fixture
def matmul_precision():
    """Set torch's legacy global precision inside a test; restored afterwards."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize(
    "level, fp32, bf16",
    [("highest", "ieee", "bf16"), ("high", "tf32", "bf16"), ("medium", "bf16", "bf16")],
)
def test_auto_mapping(matmul_precision, level, fp32, bf16):
    matmul_precision(level)
    assert launch.torch_matmul_precision() == level
    assert launch.resolve_input_precision("auto", torch.float32) == fp32
    assert launch.resolve_input_precision("auto", torch.bfloat16) == bf16
    for explicit in ("ieee", "tf32x3", "tf32", "bf16"):  # an explicit choice is never overridden
        assert launch.resolve_input_precision(explicit, torch.float32) == explicit
        assert launch.resolve_input_precision(explicit, torch.bfloat16) == explicit


@pytest.mark.parametrize("backend_value, expected", [("tf32", "tf32"), ("ieee", "ieee"), ("bf16", "bf16")])
def test_auto_reads_the_per_backend_api(monkeypatch, backend_value, expected):
    """Once ``torch.backends.cuda.matmul.fp32_precision`` was set, torch's legacy getter raises ("mix of
    the legacy and new APIs"); the per-backend value is read instead (patched here, so the process's
    real setting is not switched to the new API for the tests that follow)."""

    def legacy_raises():
        raise RuntimeError("PyTorch is checking the matmul precision without a specific backend name")

    monkeypatch.setattr(torch, "get_float32_matmul_precision", legacy_raises)
    matmul = type(torch.backends.cuda.matmul)
    monkeypatch.setattr(matmul, "fp32_precision", property(lambda self: backend_value), raising=False)
    assert launch.resolve_input_precision("auto", torch.float32) == expected


def test_options_validation():
    assert OptimizerOptions().input_precision == "auto"
    with pytest.raises(ValueError, match=r"input_precision must be one of .*'auto'.*got 'fp8'"):
        OptimizerOptions(input_precision="fp8")
    with pytest.raises(ValueError, match=r"input_precision must be one of .*got 'fp8'"):
        launch._dot_meta("fp8", torch.float32)


def _dot_args(monkeypatch) -> list[tuple[str, str, bool]]:
    """Records (kernel, INPUT_PRECISION, BF16_DOT) of every launch."""
    seen: list[tuple[str, str, bool]] = []
    real = launch._launch

    def spy(kernel, grid, *args, **meta):
        name = "K1" if "k1" in str(getattr(kernel, "__name__", kernel)).lower() else "K2"
        seen.append((name, meta["INPUT_PRECISION"], meta["BF16_DOT"]))
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(launch, "_launch", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launches_follow_a_setting_changed_after_construction(monkeypatch, matmul_precision, dtype):
    w = randn(0, 32, 24, dtype=dtype).requires_grad_()
    opt = coap_compile.CoapOptimizer([w], torch.optim.AdamW, rank=8, backend="triton", lr=1e-2)
    assert opt.config.options.input_precision == "auto"
    seen = _dot_args(monkeypatch)
    expected = {"highest": ("ieee", False), "high": ("tf32", False), "medium": ("ieee", True)}
    for step, level in enumerate(("highest", "high", "medium", "highest")):
        matmul_precision(level)
        w.grad = randn(step + 1, 32, 24, dtype=dtype)
        seen.clear()
        opt.step()
        if step == 0:  # the first step initializes P and the states eagerly: no kernel yet
            continue
        assert sorted(k for k, _, _ in seen) == ["K1", "K2"], seen
        want = ("ieee", True) if dtype == torch.bfloat16 else expected[level]
        assert {(p, b) for _, p, b in seen} == {want}, (level, seen)


def test_explicit_precision_is_passed_through(monkeypatch, matmul_precision):
    w = randn(0, 32, 24).requires_grad_()
    opt = coap_compile.CoapOptimizer(
        [w], torch.optim.AdamW, rank=8, backend="triton", input_precision="tf32x3"
    )
    seen = _dot_args(monkeypatch)
    matmul_precision("medium")
    for step in range(2):
        w.grad = randn(step + 1, 32, 24)
        opt.step()
    assert seen and {(p, b) for _, p, b in seen} == {("tf32x3", False)}
