"""The ``coap-compile`` command line: demo end to end, benchmarks' numbers, and one-line usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coap_compile.cli import memory as mem
from coap_compile.cli.bench import PAPER_TARGETS, memory_rows
from coap_compile.cli.main import main
from coap_compile.cli.optimizers import availability, build_optimizer, projected_linear_weights
from coap_compile.cli.progress import Progress
from coap_compile.models import build_llama, demo_config

ROOT = Path(__file__).resolve().parents[1]
HAVE_COAP = availability()["coap"] is None
TINY_ARGS = [
    "--dim",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--ffn",
    "64",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(8):
        (root / f"part{i}.txt").write_text(f"# part {i}\n" + "def f(x):\n    return x * 2\n" * (40 + i))
    return root


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_demo_end_to_end(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    names = "adamw,coap" if HAVE_COAP else "adamw"
    rc = main(
        [
            "demo",
            "--corpus",
            str(corpus),
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--optimizers",
            names,
            "--out",
            str(out),
            "--quiet",
            *TINY_ARGS,
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    assert "state bytes" in printed and "val loss" in printed
    for name in names.split(","):
        assert any(line.startswith(name) for line in printed.splitlines()), printed
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "state bytes" in (out / "table.txt").read_text()
    result = json.loads((out / "results.json").read_text())
    assert [r["optimizer"] for r in result["runs"]] == names.split(",")
    assert result["meta"]["torch"] == torch.__version__ and result["corpus"]["files"] == 8
    adamw = result["runs"][0]
    assert len(adamw["train_loss"]) == 4 and adamw["val_steps"] == [2, 4]
    model = build_llama(
        demo_config(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_seq_len=32),
        device="meta",
    )
    assert adamw["state_bytes"] == mem.total_bytes(mem.closed_form_rows(model, "adamw"))
    if HAVE_COAP:
        assert result["runs"][1]["state_bytes"] < adamw["state_bytes"]


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--rank", "0"],
        ["demo", "--rank", "-4"],
        ["demo", "--rank-ratio", "0.5"],
        ["demo", "--optimizers", "adamw,sgdx"],
        ["demo", "--steps", "0"],
        ["demo", "--device", "tpu9"],
        ["bench", "quality", "--optimizers", "nope"],
        ["bench", "memory", "--sizes", "3b"],
        ["bench", "step", "--shapes", "12by4"],
        ["nonsense"],
    ],
)
def test_bad_options_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "Traceback" not in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: --device cuda is valid here")
def test_cuda_requested_without_cuda_exits_2(capsys):
    assert main(["demo", "--optimizers", "adamw", "--device", "cuda"]) == 2
    assert len(err := _errors(capsys)) == 1 and "CUDA is not available" in err[0]


def test_missing_and_empty_corpus_exit_2(tmp_path, capsys):
    assert main(["demo", "--optimizers", "adamw", "--corpus", str(tmp_path / "missing"), *TINY_ARGS]) == 2
    assert len(err := _errors(capsys)) == 1 and "not found" in err[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    assert main(["demo", "--optimizers", "adamw", "--corpus", str(tmp_path / "empty"), *TINY_ARGS]) == 2
    assert len(err := _errors(capsys)) == 1 and "empty" in err[0]


def test_python_dash_m_entry_point_reports_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "coap_compile", "demo", "--rank", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "rank" in proc.stderr


def test_closed_form_equals_real_adamw_state_on_meta():
    model = build_llama("60m", device="meta")
    opt = build_optimizer("adamw", model, lr=1e-3)
    mem.meta_step(model, opt)
    assert mem.measured_state_bytes(opt) == mem.total_bytes(mem.closed_form_rows(model, "adamw"))


def test_official_llama_1b_figure_reproduces():
    rows = mem.closed_form_rows(
        build_llama("1b", device="meta"), "coap", rank=512, target_modules=PAPER_TARGETS
    )
    assert sum(r.state_elems + r.proj_elems for r in rows) == 1_042_460_672
    assert round(mem.total_bytes(rows, mem.OFFICIAL) / 2**20, 2) == 1988.34
    assert sum(r.rank is not None for r in rows) == 7 * 24


def test_projection_selection_rules():
    model = build_llama(demo_config(num_layers=1), device="meta")
    by_rank = projected_linear_weights(model, 64, None)
    assert "lm_head.weight" in by_rank and set(by_rank.values()) == {64}
    assert "lm_head.weight" not in projected_linear_weights(model, 64, None, PAPER_TARGETS)
    assert projected_linear_weights(model, 256, None) == {}  # rank = min dim saves nothing: not projected
    assert set(projected_linear_weights(model, None, 4.0).values()) == {64}


@pytest.mark.skipif(not HAVE_COAP, reason="coap_compile.optimize not available yet")
@pytest.mark.parametrize("policy", ["coap", "galore", "flora"])
def test_memory_plan_and_real_state_match_closed_form(policy):
    torch.manual_seed(0)
    model = build_llama(
        demo_config(hidden_size=64, intermediate_size=96, num_layers=1, num_heads=2, max_seq_len=16)
    )
    opt = build_optimizer(policy, model, rank=16, lr=1e-3)
    closed = mem.total_bytes(mem.closed_form_rows(model, policy, rank=16))
    model.loss(torch.randint(0, 256, (2, 17))).backward()
    opt.step()
    assert mem.measured_state_bytes(opt) == closed
    planned = mem.plan_total_bytes(opt)
    assert planned is None or planned == closed


def test_bench_memory_writes_exact_rows(tmp_path, capsys):
    assert main(["bench", "memory", "--sizes", "60m", "--real", "", "--results-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "1,988.34" in printed and "True" in printed
    data = json.loads((tmp_path / "memory.json").read_text())
    assert all(c["match"] for c in data["official_checks"])
    for row in data["rows"]:
        assert row["measured_bytes"] in (None, row["closed_form_bytes"])
    assert (
        data["rows"][0]["measured_bytes"] == data["rows"][0]["closed_form_bytes"]
    )  # AdamW is always measured
    assert (tmp_path / "memory.csv").read_text().startswith("# timestamp_utc")
    assert len(memory_rows(["60m"])) == len(data["rows"])


def test_bench_step_and_quality_smoke(tmp_path, corpus, capsys):
    names = "adamw,coap" if HAVE_COAP else "adamw"
    assert (
        main(
            [
                "bench",
                "step",
                "--shapes",
                "48x32:8",
                "--optimizers",
                names,
                "--repeat",
                "3",
                "--warmup",
                "1",
                "--results-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    step = json.loads((tmp_path / "step_cpu.json").read_text())
    assert len(step["rows"]) == len(names.split(",")) and step["rows"][0]["median_ms"] > 0
    assert (
        main(
            [
                "bench",
                "quality",
                "--corpus",
                str(corpus),
                "--steps",
                "3",
                "--seeds",
                "0,1",
                "--eval-every",
                "3",
                "--optimizers",
                names,
                "--quiet",
                "--results-dir",
                str(tmp_path),
                *TINY_ARGS,
            ]
        )
        == 0
    )
    q = json.loads((tmp_path / "quality.json").read_text())
    assert [r["seeds"] for r in q["summary"]] == [2] * len(names.split(","))
    assert (tmp_path / "quality.png").exists()
    assert q["meta"]["command"].startswith("coap-compile bench quality --corpus")


def test_progress_bar_on_a_pipe_prints_deciles():
    import io

    buf = io.StringIO()
    with Progress(20, "x", stream=buf) as bar:
        for _ in range(20):
            bar.update(loss=1.0)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].split()[2] == "20/20"
