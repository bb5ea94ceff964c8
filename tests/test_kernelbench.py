"""The GPU kernel benchmark's arithmetic and a CPU smoke run (interpreter kernels, tiny case)."""

from __future__ import annotations

import csv

from coap_lab.cli.kernelbench import floors
from coap_lab.cli.main import main


def test_floors_follow_the_traffic_model():
    ceil = {"copy_GBps": 1000.0, "mm_fp32_TFLOPs": 50.0}
    m, n, r = 5461, 2048, 256
    f = floors(m, n, r, 4, ceil)
    assert abs(f["adamw"] - m * n * (2 * 4 + 4 + 16) / 1e12 * 1e3) < 1e-12
    k1 = max((m * n * 4 + n * r * 4 + m * r * 20) / 1e12, 2 * m * n * r / 50e12)
    k2 = max((m * r * 4 + n * r * 4 + 2 * m * n * 4) / 1e12, 2 * m * n * r / 50e12)
    assert abs(f["lowrank"] - (k1 + k2) * 1e3) < 1e-12
    assert floors(n, m, r, 4, ceil) == f  # orientation does not change the traffic


def test_bench_kernels_smoke_on_cpu(tmp_path):
    status = main(
        [
            "bench",
            "kernels",
            "--device",
            "cpu",
            "--cases",
            "24x40:4",
            "--dtypes",
            "fp32",
            "--variants",
            "lowrank_eager,kernels_ieee",
            "--results-dir",
            str(tmp_path),
        ]
    )
    assert status == 0
    with open(tmp_path / "kernels_cpu_smoke.csv") as fh:
        rows = [r for r in csv.DictReader(line for line in fh if not line.startswith("#"))]
    assert [r["variant"] for r in rows] == ["lowrank_eager", "kernels_ieee"]
    # Same P and states as the float64 run: only step arithmetic differs (observed ~2e-6).
    assert all(float(r["rel_err_vs_fp64"]) < 1e-4 for r in rows)
    assert (tmp_path / "kernels_cpu_smoke.json").exists()
