"""``bench step``'s refresh and amortised-cost rows (tiny shapes: checks the wiring, not the speed)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from coap_compile.projection import largest_principal_angle
from coap_lab.cli.stepbench import amortized_rows, refresh_fns, refresh_rows, run_step

KINDS = [
    "correlation-paper",
    "correlation-normalized",
    "correlation-autograd",
    "svd",
    "galore-svd",
    "dct",
    "dct-gather",
    "dct-basis",
]


@pytest.mark.parametrize(("m", "n"), [(40, 24), (24, 40)])  # tall and wide weights
def test_refresh_fns_run_each_refresh_from_the_same_state(m, n):
    fns = refresh_fns(m, n, 6, "cpu")
    assert list(fns) == KINDS
    for name in ("correlation-paper", "correlation-normalized", "svd"):
        assert fns[name]() is True, name  # a COAP refresh reports a change, on every call (fresh copy)
        assert fns[name]() is True, name
    # The DCT selection on the gradient it was initialised with keeps the same set (and says so).
    assert fns["dct"]() is False
    small = min(m, n)
    for name in ("galore-svd", "dct-gather", "correlation-autograd"):
        assert fns[name]().shape == (small, 6), name
    assert fns["dct-basis"]().shape == (small, small)


def test_paper_step_barely_moves_p_at_this_gradient_scale():
    # The refreshes time the situation: ‖G‖ small, the paper's step is ~1e-9 rad, the normalized 30°.
    from coap_compile.projection import DEFAULT_ANGLE, CoapPolicy, canonical

    x, transposed = canonical(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 1e-3)
    angles = {}
    for mode in ("paper", "normalized"):
        policy = CoapPolicy(correlation=mode)
        state = policy.init_state(x, 8)
        old = state["proj"].clone()
        policy.refresh(state, x, 32, first_moment=0.1 * (x @ old), transposed=transposed)
        angles[mode] = largest_principal_angle(old, state["proj"])
    assert abs(DEFAULT_ANGLE - torch.pi / 6) < 1e-15
    # float32 P: observed angle error 1e-7 rad.
    assert angles["paper"] < 1e-6 and abs(angles["normalized"] - DEFAULT_ANGLE) < 1e-5


def test_refresh_rows_are_ratios_to_the_given_adamw_median():
    rows = refresh_rows([(24, 16, 4)], {"24x16": 2.0}, repeat=3)
    assert [r["refresh"] for r in rows] == KINDS
    for r in rows:
        assert r["median_ms"] > 0 and r["vs_adamw"] == pytest.approx(r["median_ms"] / 2.0)


def test_amortized_rows_arithmetic():
    steps = [
        {"shape": "8x8", "optimizer": "adamw", "median_ms": 2.0},
        {"shape": "8x8", "optimizer": "coap", "median_ms": 4.0},
        {"shape": "8x8", "optimizer": "galore", "median_ms": 5.0},
    ]
    ms = {
        "correlation-paper": 16.0,
        "correlation-normalized": 32.0,
        "svd": 160.0,
        "galore-svd": 320.0,
        "dct": 64.0,
        "dct-gather": 0.5,
    }
    refreshes = [{"shape": "8x8", "rank": 2, "refresh": k, "median_ms": v} for k, v in ms.items()]
    rows = amortized_rows(steps, refreshes, update_interval=32, reproject_factor=5)
    rows = {r["schedule"]: r for r in rows}
    assert rows["coap (paper)"]["amortized_ms"] == pytest.approx(4.0 + (4 * 16.0 + 160.0) / 160)
    assert rows["coap (normalized)"]["amortized_ms"] == pytest.approx(4.0 + (4 * 32.0 + 160.0) / 160)
    assert rows["coap (off: svd only)"]["amortized_ms"] == pytest.approx(4.0 + 1.0)
    assert rows["galore"]["amortized_ms"] == pytest.approx(5.0 + 10.0)
    assert rows["dct"]["amortized_ms"] == pytest.approx(4.0 + 0.5 + 2.0)
    assert rows["dct"]["steady_from"] == "coap step (dct not timed)"
    assert rows["galore"]["vs_adamw"] == pytest.approx(7.5)


def test_run_step_writes_refresh_and_amortized_rows(tmp_path, capsys):
    args = argparse.Namespace(
        shapes="40x24:6",
        device="cpu",
        optimizers=["adamw", "coap"],
        warmup=1,
        repeat=3,
        results_dir=str(tmp_path),
        argv=["coap-compile", "bench", "step"],
    )
    assert run_step(args) == 0
    data = json.loads((tmp_path / "step_cpu.json").read_text())
    assert [r["optimizer"] for r in data["rows"]] == ["gemm-floor", "adamw", "coap"]
    assert [r["refresh"] for r in data["refresh_rows"]] == KINDS
    schedules = [r["schedule"] for r in data["amortized_rows"]]
    assert schedules == ["coap (paper)", "coap (normalized)", "coap (off: svd only)", "dct"]
    assert all(r["vs_adamw"] > 0 for r in data["amortized_rows"])
    assert (tmp_path / "step_refresh_cpu.csv").read_text().startswith("# timestamp_utc")
    assert "correlation-normalized" in capsys.readouterr().out
