"""``coap-compile demo --task vision`` / ``bench vision`` end to end on the smoke UNet (seconds).

Checked: exit status, the files written (PNG signature, JSON summary, CSV with its metadata block),
state bytes exactly equal to what the optimizers hold (with the one known, exact accounting gap of
transformers' 0-d ``RMS``), identical data for every optimizer of a seed, and one-line errors naming
the option or the image.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from coap_lab.cli.main import build_parser, main
from coap_lab.cli.vision import parse_demo_argv
from coap_lab.cli.vision_train import (
    VisionConfig,
    adafactor_base,
    load_vision_data,
    train_vision_run,
)

SMOKE = ["--model", "smoke", "--batch-size", "4", "--quiet"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _keep_threads():
    """The commands set torch's thread count; give the rest of the suite its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _rows(summary) -> dict[str, dict]:
    return {r["optimizer"]: r for r in summary}


def _full_rank_params_under_transformers(row, n_params: int) -> int:
    return n_params - row["projected"]


def test_vision_demo_end_to_end(tmp_path, capsys):
    names = ["adamw", "coap-adafactor", "galore", "adafactor", "coap"]
    out = tmp_path / "demo"
    argv = ["demo", "--task", "vision", *SMOKE, "--steps", "4", "--eval-every", "2", "--out", str(out)]
    assert main([*argv, "--optimizers", ",".join(names)]) == 0
    printed = capsys.readouterr().out
    assert "vision demo, 4 steps" in printed and all(n in printed for n in names)
    assert (out / "vision.png").read_bytes()[:8] == PNG
    payload = json.loads((out / "results.json").read_text())
    assert payload["meta"]["command"].startswith("coap-compile demo --task vision")
    rows = _rows(payload["summary"])
    assert list(rows) == names
    from coap_lab.models import UNet

    with torch.device("meta"):
        n_params = len(list(UNet(VisionConfig(model="smoke").unet_config()).parameters()))
    for name, row in rows.items():
        assert row["val_mean"] > 0 and row["val_std"] == 0.0 and row["seeds"] == 1
        gap = row["real_bytes"] - row["plan_bytes"]
        if name == "adafactor" and "transformers" in adafactor_base(1e-3)[2]:
            # plain transformers' Adafactor (not COAP) keeps a 0-d float32 RMS per parameter beside its
            # moments, which the closed form of its "plan" column leaves out; COAP rows are exact.
            assert gap == 4 * _full_rank_params_under_transformers(row, n_params), (name, gap)
        else:
            assert gap == 0, (name, gap)
    assert rows["adamw"]["projected"] == 0 and rows["galore"]["projected"] > 0
    assert (
        rows["coap-adafactor"]["plan_bytes"] < rows["adafactor"]["plan_bytes"] < rows["adamw"]["plan_bytes"]
    )
    for run in payload["runs"]:
        assert run["val_steps"] == [2, 4] and len(run["train_loss"]) == 4


def test_vision_bench_writes_results_with_metadata(tmp_path):
    res = tmp_path / "results"
    argv = ["bench", "vision", *SMOKE, "--steps", "2", "--eval-every", "2", "--seeds", "0,1"]
    assert main([*argv, "--optimizers", "adamw,adafactor", "--results-dir", str(res)]) == 0
    assert (res / "vision.png").read_bytes()[:8] == PNG
    payload = json.loads((res / "vision.json").read_text())
    assert {"git_commit", "torch", "machine", "command", "finished_utc"} <= set(payload["meta"])
    assert payload["meta"]["torch_threads"] == 1  # --threads default on the CPU
    rows = _rows(payload["summary"])
    assert rows["adamw"]["seeds"] == 2 and len(payload["runs"]) == 4
    finals = [r["final_val_loss"] for r in payload["runs"] if r["optimizer"] == "adamw"]
    assert finals[0] != finals[1] and rows["adamw"]["val_std"] > 0  # two seeds, two models
    text = (res / "vision.csv").read_text().splitlines()
    assert text[0].startswith("# timestamp_utc: ")
    table = list(csv.DictReader(line for line in text if not line.startswith("#")))
    assert [r["optimizer"] for r in table] == ["adamw", "adafactor"]


def test_every_optimizer_of_a_seed_sees_the_same_data_and_runs_replay():
    torch.set_num_threads(1)  # as the commands do (2 threads were 30× slower on the loaded CI machine)
    cfg = VisionConfig(model="smoke", steps=3, batch_size=4, eval_every=3)
    data = load_vision_data(cfg)
    a, b = (train_vision_run("adamw", data, cfg, progress=False) for _ in range(2))
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss  # deterministic
    c = train_vision_run("galore", data, cfg, progress=False)
    # Same weights and the same first batch/noise: the first loss (before any update) is identical.
    assert c.train_loss[0] == a.train_loss[0] and c.train_loss[1:] != a.train_loss[1:]
    clean, noisy, _ = a.denoised
    assert torch.equal(clean, c.denoised[0]) and torch.equal(noisy, c.denoised[1])


def test_tucker_row_projects_the_large_convs(tmp_path):
    """``coap`` is COAP-AdamW with Tucker-projected convs (conv_rank_ratio): every Linear weight and every
    conv above 9216 weights is projected, and the plan equals the bytes held."""
    argv = [
        "demo",
        "--task",
        "vision",
        *SMOKE,
        "--steps",
        "2",
        "--optimizers",
        "coap",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    row = json.loads((tmp_path / "results.json").read_text())["summary"][0]
    from coap_lab.models import build_unet, conv_weights_above_threshold

    convs = conv_weights_above_threshold(build_unet(VisionConfig(model="smoke").unet_config()))
    assert len(convs) == 6 and row["projected"] == 7 + len(convs)  # 7 Linear weights + the Tucker convs
    assert row["plan_bytes"] == row["real_bytes"]


@pytest.mark.parametrize(
    ("extra", "texts"),
    [
        (["--images", "nope.png"], ["coap-compile demo: error: sample image 'nope.png' not found at"]),
        (["--optimizers", "adamw,sgd"], ["--optimizers", "unknown optimizer 'sgd'", "choose from adamw"]),
        (["--patch-size", "15"], ["--patch-size 15: the --model smoke UNet needs a multiple of 2"]),
        (["--threads", "-1"], ["--threads -1: must be >= 0"]),
        (["--device", "gpu"], ["--device", "unknown device 'gpu'"]),
    ],
)
def test_bad_input_exits_2_with_one_line(extra, texts, tmp_path, capsys):
    argv = ["demo", "--task", "vision", *SMOKE, "--steps", "1", "--out", str(tmp_path), *extra]
    assert main(argv) == 2
    (line,) = _errors(capsys)
    for t in texts:
        assert t in line, line


def test_unreadable_image_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    argv = ["bench", "vision", *SMOKE, "--image-root", str(tmp_path), "--images", "bad.jpg"]
    assert main([*argv, "--results-dir", str(tmp_path / "r")]) == 2
    (line,) = _errors(capsys)
    assert line.startswith("coap-compile bench vision: error: cannot read sample image 'bad.jpg' at ")


def test_language_demo_is_unchanged():
    assert parse_demo_argv(["demo"], build_parser().__class__) is None
    assert parse_demo_argv(["demo", "--task", "lm"], build_parser().__class__) is None
    assert build_parser().parse_args(["demo", "--task", "lm"]).task == "lm"
    args = parse_demo_argv(["demo", "--task=vision", "--steps", "3"], build_parser().__class__)
    assert args.task == "vision" and args.steps == 3 and args.command == "demo"


def test_defaults_are_documented_values():
    assert Path(VisionConfig().images[0]).name == "grace_hopper.jpg"
    args = parse_demo_argv(["demo", "--task", "vision"], build_parser().__class__)
    assert (args.steps, args.threads, args.model, args.optimizers) == (150, 1, "demo", None)


def test_vision_bench_tune_lr_keeps_each_optimizers_best_lr(tmp_path):
    """``bench vision --tune-lr``: the grid at the first seed, every seed at the chosen lr; coap-official
    (the official refresh) is on offer and builds with the Tucker convs."""
    res = tmp_path / "results"
    argv = ["bench", "vision", *SMOKE, "--steps", "2", "--eval-every", "2", "--seeds", "0,1", "--tune-lr",
            "--lr-grid", "1e-3,1e-2", "--lr-extend", "0", "--optimizers", "adamw,coap-official",
            "--results-dir", str(res)]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads((res / "vision.json").read_text())
    rows = _rows(payload["summary"])
    for name, row in rows.items():
        losses = payload["lr_grid"][name]
        assert set(losses) == {"0.001", "0.01"} and row["seeds"] == 2
        assert row["lr"] == float(min(losses, key=losses.get))
        seed1 = [r for r in payload["runs"] if r["optimizer"] == name and r["seed"] == 1]
        assert len(seed1) == 1
    assert rows["coap-official"]["projected"] == 7 + 6  # Linear weights + Tucker convs, as coap
