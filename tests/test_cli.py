"""The ``coap-compile`` command line: demo end to end, benchmarks' numbers, and one-line usage errors.

COAP must be importable here: every run that compares optimizers runs ``coap`` next to ``adamw``
(no AdamW-only fallback), and :func:`test_coap_is_available` fails, naming the import error, otherwise.
Usage errors are checked by their text: the option, the value given and what is allowed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coap_lab.cli import main as cli_main
from coap_lab.cli import memory as mem
from coap_lab.cli import quality as cli_quality
from coap_lab.cli.bench import PAPER_TARGETS, memory_rows
from coap_lab.cli.main import main
from coap_lab.cli.optimizers import availability, build_optimizer, projected_linear_weights
from coap_lab.cli.progress import Progress
from coap_lab.data import min_single_file_bytes
from coap_lab.models import build_llama, demo_config

ROOT = Path(__file__).resolve().parents[1]
TINY = demo_config(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_seq_len=32)
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


def test_coap_is_available():
    assert availability()["coap"] is None, availability()["coap"]


def test_demo_end_to_end(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    names = "adamw,coap"
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
    model = build_llama(TINY, device="meta")
    assert adamw["state_bytes"] == mem.total_bytes(mem.closed_form_rows(model, "adamw"))
    coap = result["runs"][1]
    closed = mem.total_bytes(mem.closed_form_rows(model, "coap", rank_ratio=4.0))
    assert coap["state_bytes"] == coap["plan_bytes"] == closed < adamw["state_bytes"]
    assert len(coap["train_loss"]) == 4 and all(map(math.isfinite, coap["train_loss"]))


def _one_error_line(capsys) -> str:
    err = _errors(capsys)
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# (argv, texts the one error line must contain: the command, the option, the value, what is allowed)
BAD_OPTIONS = [
    (["demo", "--rank", "0"], ["coap-compile demo: error:", "argument --rank", "positive integer", "got 0"]),
    (["demo", "--rank", "-4"], ["argument --rank", "got -4"]),
    (["demo", "--rank-ratio", "0.5"], ["argument --rank-ratio", "must be >= 1", "got 0.5"]),
    (
        ["demo", "--optimizers", "adamw,sgdx"],
        ["argument --optimizers", "'sgdx'", "adamw, adamw-foreach, coap, galore"],
    ),
    (["demo", "--optimizers", "coap,coap"], ["argument --optimizers", "'coap' given twice"]),
    (["demo", "--steps", "0"], ["argument --steps", "positive integer", "got 0"]),
    (["demo", "--lr", "inf"], ["argument --lr", "positive finite", "got inf"]),
    (["demo", "--lr=-1e-3"], ["argument --lr", "got -0.001"]),
    (["demo", "--seq-len", "0"], ["argument --seq-len", "positive integer", "got 0"]),
    (["demo", "--heads", "x"], ["argument --heads", "'x'"]),
    (["demo", "--dim", "30", "--heads", "4"], ["--dim 30 with --heads 4", "even integer", "7.5"]),
    (["demo", "--seed", "-1"], ["argument --seed", "[0, 2**63)", "got -1"]),
    (["demo", "--device", "tpu9"], ["argument --device", "'tpu9'", "cpu, cuda, cuda:N"]),
    (["demo", "--device", "gpu"], ["coap-compile demo:", "argument --device", "'gpu'", "cpu, cuda, cuda:N"]),
    (["demo", "--device", "meta"], ["argument --device", "'meta'", "cpu, cuda, cuda:N"]),
    (["bench", "step", "--device", "gpu"], ["coap-compile bench step:", "argument --device", "'gpu'"]),
    (["bench", "quality", "--optimizers", "nope"], ["coap-compile bench quality:", "--optimizers", "'nope'"]),
    (["bench", "quality", "--seeds", ","], ["--seeds", "at least one seed"]),
    (["bench", "quality", "--seeds", "0,x"], ["argument --seeds", "'x'"]),
    (["bench", "quality", "--seeds", "1,2,1"], ["argument --seeds", "seed 1 given twice"]),
    (
        ["bench", "memory", "--sizes", "3b"],
        ["bench memory: error: --sizes", "'3b'", "60m, 130m, 350m, 1b, 7b"],
    ),
    (["bench", "memory", "--sizes", ","], ["--sizes", "no model size given", "60m, 130m"]),
    (["bench", "memory", "--real", "2b"], ["--real", "'2b'", "60m, 130m"]),
    (["bench", "memory", "--sizes", "60m", "--real", "1b"], ["--real", "'1b'", "not among --sizes '60m'"]),
    (["bench", "step", "--shapes", "12by4"], ["--shapes", "'12by4'", "MxN:RANK"]),
    (["bench", "kernels", "--device", "cpu", "--variants", "foo"], ["--variants", "'foo'", "lowrank_eager"]),
    (["bench", "kernels", "--device", "cpu", "--dtypes", "fp16"], ["--dtypes", "'fp16'", "fp32, bf16"]),
    (["bench", "kernels", "--device", "cpu", "--cases", "4x4"], ["--cases", "'4x4'", "MxN:RANK"]),
    (["nonsense"], ["invalid choice", "'nonsense'", "demo"]),
]


@pytest.mark.parametrize(("argv", "texts"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_exit_2_with_one_line_naming_the_option(argv, texts, capsys):
    assert main(argv) == 2
    line = _one_error_line(capsys)
    missing = [t for t in texts if t not in line]
    assert not missing, f"{missing} not in {line!r}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: --device cuda is valid here")
@pytest.mark.parametrize(
    ("argv", "texts"),
    [
        (["demo", "--device", "cuda"], ["--device cuda:", "CUDA is not available", "use --device cpu"]),
        (["demo", "--device", "cuda:1"], ["--device cuda:1:", "CUDA is not available"]),
        (["bench", "kernels"], ["--device cuda (the default):", "CUDA is not available", "--device cpu"]),
    ],
)
def test_cuda_requested_without_cuda_exits_2(argv, texts, capsys):
    assert main([*argv, "--optimizers", "adamw"] if argv[0] == "demo" else argv) == 2
    line = _one_error_line(capsys)
    assert all(t in line for t in texts), line


@pytest.mark.parametrize("count", [1, 2])
def test_cuda_index_past_the_device_count_exits_2(monkeypatch, count, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the check runs: it exits first
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert main(["demo", "--optimizers", "adamw", "--device", f"cuda:{count}"]) == 2
    line = _one_error_line(capsys)
    devices = "device" if count == 1 else "devices"
    want = f"--device cuda:{count}: this machine has {count} CUDA {devices} (cuda:0..cuda:{count - 1})"
    assert want in line, line


@pytest.mark.parametrize("option", ["--out", "--results-dir"])
def test_output_folder_that_is_a_file_is_named(tmp_path, option, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = ["demo"] if option == "--out" else ["bench", "memory", "--real", ""]
    assert main([*argv, option, str(blocker)]) == 2
    assert f"{option} {blocker}: exists and is not a folder" in _one_error_line(capsys)
    assert main([*argv, option, str(blocker / "sub")]) == 2
    assert f"{option} {blocker / 'sub'}: {blocker} is a file" in _one_error_line(capsys)


def test_unavailable_optimizer_names_the_option(monkeypatch, capsys):
    fake = {**availability(), "galore-torch": "galore-torch is not installed (test)"}
    monkeypatch.setattr(cli_main, "availability", lambda names=None: fake)
    for argv in (["demo"], ["bench", "step"]):
        assert main([*argv, "--optimizers", "adamw,galore-torch"]) == 2
        line = _one_error_line(capsys)
        assert "--optimizers: optimizer 'galore-torch' is unavailable" in line and "(test)" in line, line


def test_quality_with_no_available_optimizer_is_one_line(monkeypatch, corpus, capsys):
    fake = {**availability(), "galore-torch": "not installed (test)", "apollo-torch": "not installed (test)"}
    monkeypatch.setattr(cli_quality, "availability", lambda names=None: fake)
    argv = ["bench", "quality", "--optimizers", "galore-torch,apollo-torch", "--corpus", str(corpus)]
    assert main([*argv, *TINY_ARGS]) == 2
    line = _one_error_line(capsys)
    assert "--optimizers galore-torch,apollo-torch: none is available here" in line, line
    assert "galore-torch: not installed (test)" in line and "apollo-torch: not installed (test)" in line


def test_diverging_run_exits_1_naming_lr(tmp_path, corpus, capsys):
    argv = ["demo", "--corpus", str(corpus), "--optimizers", "adamw", "--lr", "1e30", "--steps", "5"]
    assert main([*argv, "--quiet", "--out", str(tmp_path), *TINY_ARGS]) == 1
    err = _errors(capsys)
    assert err[-1].startswith("coap-compile demo: error: adamw (seed 0): the training loss became nan"), err
    assert "--lr 1e+30 may be too large" in err[-1] and not any("Traceback" in e for e in err)


def _demo(corpus, out, *extra: str) -> list[str]:
    return ["demo", "--optimizers", "adamw", "--corpus", str(corpus), "--out", str(out), "--quiet",
            "--steps", "1", *TINY_ARGS, *extra]  # fmt: skip


def test_missing_and_empty_corpus_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(_demo(missing, tmp_path / "o")) == 2
    assert f"coap-compile demo: error: --corpus {missing}: not found" in _one_error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n")
    assert main(_demo(empty, tmp_path / "o")) == 2
    line = _one_error_line(capsys)
    assert f"--corpus {empty}: corpus is empty" in line and "1 empty file with a suffix read: .txt" in line


def test_folder_of_skipped_suffixes_names_them(tmp_path, capsys):
    root = tmp_path / "bins"
    root.mkdir()
    for name in ("a.bin", "b.bin", "c.pdf", "LICENSE"):
        (root / name).write_text("text\n" * 100)
    assert main(_demo(root, tmp_path / "o")) == 2
    line = _one_error_line(capsys)
    assert f"--corpus {root}: corpus is empty" in line, line
    assert "skipped 4 files by suffix: (no suffix) (1), .bin (2), .pdf (1)" in line, line


def test_ignored_suffixes_in_a_corpus_folder_get_one_note(tmp_path, corpus, capsys):
    (corpus / "weights.bin").write_bytes(b"\x00\x01" * 50)
    (corpus / "more.bin").write_text("x")
    (corpus / "Makefile").write_text("all:\n")
    assert main(_demo(corpus, tmp_path / "o")) == 0
    notes = [e for e in _errors(capsys) if e.startswith("note:")]
    assert notes == [
        f"note: --corpus {corpus}: skipped 3 files by suffix: (no suffix) (1), .bin (2); read suffixes: "
        ".txt .md .rst .py .c .h .json .csv .tex .html"
    ], notes
    described = json.loads((tmp_path / "o" / "results.json").read_text())["corpus"]
    assert described["skipped_by_suffix"] == {"": 1, ".bin": 2} and described["files"] == 8


def test_no_note_when_nothing_is_skipped(tmp_path, corpus, capsys):
    assert main(_demo(corpus, tmp_path / "o")) == 0
    assert not [e for e in _errors(capsys) if e.startswith("note:")]


def test_too_short_single_file_names_corpus_seq_len_and_sizes(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghi\n" * 30)  # 300 bytes: 285 training + 15 validation
    assert main(_demo(short, tmp_path / "o")) == 2  # TINY_ARGS: --seq-len 32
    line = _one_error_line(capsys)
    need = min_single_file_bytes(32)
    assert need == 660  # 5% of 660 = 33 = --seq-len + 1 validation bytes
    expected = (
        f"coap-compile demo: error: --corpus {short}: 300 bytes of text, split into 280 training and 20 "
        "validation bytes (the last 5% of a single file); --seq-len 32 needs at least 34 training and 33 "
        f"validation bytes: give a file of at least {need:,} bytes, or --seq-len 19 or less"
    )
    assert line == expected
    # both remedies the message offers do work
    assert main(_demo(short, tmp_path / "o", "--seq-len", "19")) == 0
    fits = tmp_path / "fits.txt"
    fits.write_text(("abcdefghi\n" * 66)[:need])
    assert main(_demo(fits, tmp_path / "o")) == 0
    capsys.readouterr()
    assert main(_demo(short, tmp_path / "o", "--seq-len", "20")) == 2
    assert "--seq-len 20 needs at least 22 training and 21 validation bytes" in _one_error_line(capsys)


def test_too_short_folder_names_the_split(tmp_path, capsys):
    root = tmp_path / "few"
    root.mkdir()
    for i in range(3):
        (root / f"f{i}.txt").write_text(f"{i}" * 20)
    assert main(_demo(root, tmp_path / "o")) == 2
    line = _one_error_line(capsys)
    assert (
        f"--corpus {root}: 3 files, split by a hash of their paths into 2 training files (41 bytes) " in line
    )
    assert (
        "and 1 validation files (20 bytes); --seq-len 32 needs at least 34 training and 33 validation" in line
    )
    assert line.endswith("give more text, or --seq-len 19 or less"), line


def test_python_dash_m_entry_point_reports_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "coap_lab", "demo", "--rank", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "coap-compile demo: error: argument --rank: must be a positive integer, got 0"
    ]


def test_library_entry_point_points_at_the_cli():
    """``python -m coap_compile`` is no command line (the library imports nothing of coap_lab): it says where
    the CLI is and exits 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "coap_compile", "demo"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 2 and "coap-compile" in proc.stderr and "python -m coap_lab" in proc.stderr


VISION_NEEDS = "error: the vision task (matplotlib's sample images, vision.png) needs matplotlib"


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["demo"], "coap-compile demo: error: the demo's plot (demo.png) needs matplotlib"),
        (["bench", "quality"], "coap-compile bench quality: error: bench quality's plot (quality.png) needs"),
        (["demo", "--task", "vision"], "coap-compile demo: " + VISION_NEEDS),
        (["bench", "vision"], "coap-compile bench vision: " + VISION_NEEDS),
    ],
)
def test_plotting_commands_without_matplotlib_say_how_to_get_it(argv, what, tmp_path, monkeypatch, capsys):
    """matplotlib is the optional ``demo`` extra: a command that plots refuses up front, in one line."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    folder = ["--results-dir" if argv[0] == "bench" else "--out", str(tmp_path)]
    assert main([*argv, "--device", "cpu", *folder]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(what) and "pip install 'coap-compile[demo]'" in line, line


def test_commands_without_plots_run_without_matplotlib(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["optimizers"]) == 0
    assert "coap " in capsys.readouterr().out


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
    assert mem.plan_total_bytes(opt) == closed


def test_bench_memory_writes_exact_rows(tmp_path, capsys):
    assert main(["bench", "memory", "--sizes", "60m", "--real", "", "--results-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "1,988.34" in printed and "True" in printed
    data = json.loads((tmp_path / "memory.json").read_text())
    assert all(c["match"] for c in data["official_checks"])
    assert [(r["weights"], r["optimizer"]) for r in data["rows"]] == [
        *[("fp32", n) for n in ("adamw", "coap", "coap", "coap", "galore", "flora", "dct")],
        *[("bf16", n) for n in ("adamw", "coap", "coap-bf16", "coap-int8")],
    ]
    for row in data["rows"]:  # every row measured (meta step or memory_plan) and equal to the closed form
        assert row["measured_bytes"] == row["closed_form_bytes"], row
    comparisons = data["official_comparisons"]
    assert [(c["model"], c["states"]) for c in comparisons] == [
        ("llama-1b", "bf16 (auto)"), ("llama-1b", "bf16"), ("llama-7b", "int8"),
    ]  # fmt: skip
    assert all(c["explained"] for c in comparisons) and "explained exactly" in printed
    assert (tmp_path / "memory.csv").read_text().startswith("# timestamp_utc")
    assert len(memory_rows(["60m"])) == len(data["rows"])


def test_bench_step_and_quality_smoke(tmp_path, corpus, capsys):
    names = "adamw,coap"
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
                "--overhead",
                "64x64x16",
                "--results-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    step = json.loads((tmp_path / "step_cpu.json").read_text())
    rows = {r["optimizer"]: r for r in step["rows"]}
    assert list(rows) == ["gemm-floor", *names.split(",")] and rows["gemm-floor"]["median_ms"] > 0
    # the projection GEMMs' floor, timed in the same run: each row's median over it (issue 20)
    floor = rows["gemm-floor"]["median_ms"]
    assert rows["coap"]["vs_floor"] == pytest.approx(rows["coap"]["median_ms"] / floor)
    over = {r["optimizer"]: r for r in step["overhead_rows"]}
    assert over["gemm-floor"]["vs_floor"] == 1.0
    floor = over["gemm-floor"]["median_ms"]
    assert over["coap"]["vs_floor"] == pytest.approx(over["coap"]["median_ms"] / floor)
    assert {"adamw", "adamw-foreach", "coap", "coap-per-matrix"} <= set(over)
    assert over["adamw"]["vs_adamw"] == 1.0 and over["coap"]["projected_matrices"] == 16
    assert over["coap"]["per_matrix_us"] == pytest.approx(1e3 * over["coap"]["median_ms"] / 16)
    assert (tmp_path / "step_overhead_cpu.csv").read_text().startswith("# timestamp_utc")
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


def test_bench_compile_smoke(tmp_path, capsys):
    """``bench compile`` (whole-step compile measurement) on a one-layer model, eager rows only (seconds)."""
    argv = ["bench", "compile", "--variants", "eager-adamw,eager-coap", "--steps", "4", "--layers", "1"]
    argv += ["--dim", "64", "--heads", "2", "--ffn", "128", "--seq-len", "16", "--results-dir", str(tmp_path)]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "compile_cpu.json").read_text())
    rows = [(r["optimizer"], r["backend"]) for r in payload["rows"]]
    assert rows == [("adamw", "eager"), ("coap", "eager")]
    assert {"git_commit", "torch"} <= set(payload["metadata"])
    assert "coap" in capsys.readouterr().out


def test_optimizers_list_is_aligned(capsys):
    assert main(["optimizers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = {len(line) - len(line.split(maxsplit=1)[1]) for line in lines}
    assert len(lines) > 5 and len(starts) == 1, lines  # every status starts in the same column


def test_vision_demo_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--task", "vision", "-h"])
    out = capsys.readouterr().out
    assert "The vision demo:" in out and "``" not in out and ":mod:" not in out


@pytest.mark.parametrize("bench", ["memory", "quality", "step", "kernels", "compile", "vision"])
def test_bench_results_default_outside_the_source_tree(bench):
    from coap_lab.cli.main import build_parser

    args = build_parser().parse_args(["bench", bench])
    assert args.results_dir == "coap_results"  # relative to the current directory, not benchmarks/results


def test_bench_memory_writes_to_coap_results_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "memory", "--sizes", "60m", "--real", ""]) == 0
    assert (tmp_path / "coap_results" / "memory.json").is_file()


def test_bench_step_demo_train_runs_a_training_pass_before_every_timed_step(monkeypatch):
    """``demo-train``: each step (warm-up, timed, the initialising one) follows an untimed zero_grad +
    forward/backward, for the floor too; the step-only ``demo`` case has none."""
    from coap_lab.cli import overhead

    real, calls = overhead.training_pass, []

    def counted(case, model):
        run = real(case, model)
        if run is None:
            return None
        before = len(calls)
        calls.append(0)

        def counting():
            calls[before] += 1
            grads = [p.grad for p in model.parameters()]
            run()
            assert all(p.grad is not None and p.grad is not g for p, g in zip(model.parameters(), grads))

        return counting

    monkeypatch.setattr(overhead, "training_pass", counted)
    assert overhead.training_pass("demo", torch.nn.Linear(2, 2)) is None
    rows = overhead.overhead_rows(["demo-train"], ["adamw", "coap"], warmup=1, repeat=2, rounds=2)
    assert [r["optimizer"] for r in rows] == ["gemm-floor", "adamw", "coap"]
    assert calls == [2 * (1 + 2), 1 + 2 * (1 + 2), 1 + 2 * (1 + 2)]  # floor, then + the initialising step
