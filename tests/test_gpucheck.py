"""``python -m coap_lab.gpucheck``: the dry run (what CI runs), the per-part budget, the model floors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coap_lab import gpucheck

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_plans_every_part(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "coap_lab.gpucheck", "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env={**gpucheck._env(), "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "MISSING" not in out.stdout
    for name, budget in gpucheck.PARTS:
        assert f"{name:<9} {budget:>4} s" in out.stdout
    assert "tests/test_kernels.py" in out.stdout  # a file with the cuda marker was found
    assert list(tmp_path.iterdir()) == []  # the dry run writes nothing
    assert sum(b for _, b in gpucheck.PARTS) <= 450  # 8 minutes with 30 s for start-up and writing


def test_dry_run_reports_a_missing_part(monkeypatch, capsys):
    monkeypatch.setattr(gpucheck, "KERNEL_ARGS", ["bench", "kernels", "--no-such-option"])
    assert gpucheck.main(["--dry-run"]) == 1
    assert "MISSING: the bench command does not accept" in capsys.readouterr().out


def test_parts_over_the_budget_are_skipped(monkeypatch, tmp_path):
    """Each part is started only if its budget fits in the time left (a fake clock: each part takes its
    whole budget, as one killed at its timeout would)."""
    ran, clock = [], [0.0]

    def run_part(name, out, timeout):
        ran.append(name)
        clock[0] += timeout
        return {"status": "ok"}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpucheck, "run_part", run_part)
    monkeypatch.setattr(gpucheck.time, "monotonic", lambda: clock[0])
    assert gpucheck.main(["--out", str(tmp_path), "--budget", "250"]) == 0
    (folder,) = tmp_path.iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert ran == ["versions", "pytest"]  # 10 + 200 s fit in 250 s; kernels (110 s) would overrun
    assert summary["parts"]["kernels"]["status"] == "skipped"
    assert "110 s >" in summary["parts"]["kernels"]["reason"]
    assert summary["parts"]["model"]["status"] == "skipped"


def test_gpu_check_needs_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpucheck.main(["--out", str(tmp_path)]) == 2


def test_model_floors_arithmetic():
    """One bf16 4096×4096 weight, r = 512, H100-like ceilings (3350 GB/s, 989 bf16 TFLOP/s)."""
    ceil = {"copy_GBps": 3350.0, "mm_bf16_TFLOPs": 989.0}
    fl = gpucheck.model_floors([(4096, 4096)], 512, 2, ceil)
    mn = 4096 * 4096
    assert fl["adamw_ms"] == pytest.approx(mn * 14 / 3350e9 * 1e3)  # 7 bf16 accesses per element
    k1 = max((mn * 2 + 4096 * 512 * 4 + 4096 * 512 * 20) / 3350e9, 2 * mn * 512 / 989e12)
    k2 = max((2 * 4096 * 512 * 4 + 2 * mn * 2) / 3350e9, 2 * mn * 512 / 989e12)
    assert fl["coap_ms"] == pytest.approx((k1 + k2) * 1e3)
    assert 2 * mn * 512 / 989e12 * 1e6 == pytest.approx(17.4, abs=0.1)  # µs per projection GEMM in bf16
