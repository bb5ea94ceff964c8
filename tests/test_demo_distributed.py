"""``coap-compile demo --nproc 2 --strategy ddp`` through ``torch.distributed.run`` (tiny settings).

One DDP launch trains AdamW (normal path, gradient clipping) and COAP with ``--in-backward`` (the DDP
step hook) on 2 gloo workers; one FSDP2 launch trains both on ``fully_shard`` parameters. Checked
against independent references: the per-rank optimizer-state bytes against the optimizer's own
closed-form memory plan for the same model (DDP) or the closed form of one rank's shard (FSDP2),
replicas against rank 0 bit for bit (the workers broadcast rank 0's parameters and compare), and the
refusals' messages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coap_lab.cli.main import main
from coap_lab.cli.memory import plan_total_bytes
from coap_lab.cli.optimizers import build_optimizer
from coap_lab.models import build_llama, demo_config

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["--dim", "32", "--heads", "2", "--ffn", "64", "--seq-len", "32"]


def _launch(tmp_path, options: list[str]) -> dict:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((ROOT / "coap_lab" / "cli" / "main.py").read_text())  # ≈20 kB of text
    cmd = [
        sys.executable, "-m", "coap_lab", "demo", "--nproc", "2", *options, "--steps", "4",
        "--batch-size", "2", *SHAPE, "--corpus", str(corpus), "--out", str(tmp_path / "out"), "--quiet",
        "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc-per-node 2" in proc.stderr
    strategy = options[options.index("--strategy") + 1]
    assert f"{strategy.upper()} on 2 processes (gloo)" in proc.stdout
    name = f"results_{strategy}{'_in_backward' if '--in-backward' in options else ''}.json"
    others = {p.name for p in (tmp_path / "out").glob("results_*.json")} - {name}
    assert not others, others  # an --in-backward run does not overwrite the plain run's results_ddp.json
    return json.loads((tmp_path / "out" / name).read_text())


def test_ddp_demo_two_workers(tmp_path):
    options = ["--strategy", "ddp", "--in-backward", "--optimizers", "adamw,coap", "--layers", "1"]
    result = _launch(tmp_path, options)
    assert result["world_size"] == 2 and result["meta"]["command"].startswith("coap-compile demo")
    rows = {(r["optimizer"], r["rank"]): r for r in result["rows"]}
    assert sorted(rows) == [("adamw", 0), ("adamw", 1), ("coap", 0), ("coap", 1)]
    assert all(r["equal_to_rank0"] for r in rows.values())
    assert not rows["adamw", 0]["in_backward"]  # not a CoapOptimizer: the normal path
    assert rows["coap", 0]["in_backward"] and rows["coap", 1]["in_backward"]
    cfg = demo_config(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_seq_len=32)
    model = build_llama(cfg, seed=0)
    coap = build_optimizer("coap", model, rank_ratio=4.0, lr=1e-3)
    adamw_bytes = 2 * sum(p.numel() * 4 for p in model.parameters()) + 4 * len(list(model.parameters()))
    for rank in (0, 1):  # DDP replicates the optimizer: every rank holds the full state
        assert rows["coap", rank]["state_bytes"] == plan_total_bytes(coap)
        assert rows["adamw", rank]["state_bytes"] == adamw_bytes  # exp_avg, exp_avg_sq, a float32 step
    assert rows["coap", 0]["val_loss"] is not None and rows["coap", 1]["val_loss"] is None


def test_fsdp2_demo_two_workers(tmp_path):
    """``--strategy fsdp2``: each rank's optimizer-state bytes equal the closed form of its shard (every
    row count here is even, so each rank holds half the rows): AdamW ``2·4·numel/2 + 4`` per parameter;
    COAP (rows side, r = min(m, n) // 4) ``4·(n/2)·r`` for its slice of the sharded P
    ``+ 2·4·(m/2)·r + 4``, and the full-rank parameters as AdamW; the transient (one gathered P) is the
    largest ``4·n·r``."""
    result = _launch(tmp_path, ["--strategy", "fsdp2", "--optimizers", "adamw,coap", "--layers", "2"])
    assert result["strategy"] == "fsdp2" and result["world_size"] == 2
    rows = {(r["optimizer"], r["rank"]): r for r in result["rows"]}
    model = build_llama(demo_config(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                    max_seq_len=32), seed=0)  # fmt: skip
    coap = build_optimizer("coap", model, rank_ratio=4.0, lr=1e-3)
    projected = {id(p) for p in coap.projected_parameters()}
    adamw = coap_bytes = transient = 0
    for p in model.parameters():
        assert p.shape[0] % 2 == 0
        adamw += 2 * 4 * p.numel() // 2 + 4
        if id(p) in projected:
            (m, n), r = p.shape, min(p.shape) // 4
            assert n % 2 == 0
            coap_bytes += 4 * (n // 2) * r + 2 * 4 * (m // 2) * r + 4
            transient = max(transient, 4 * n * r)
        else:
            coap_bytes += 2 * 4 * p.numel() // 2 + 4
    for rank in (0, 1):
        assert rows["adamw", rank]["state_bytes"] == adamw
        assert rows["coap", rank]["state_bytes"] == coap_bytes
        assert rows["coap", rank]["transient_bytes"] == transient
        assert rows["adamw", rank]["transient_bytes"] == 0
        assert rows["coap", rank]["equal_to_rank0"] is None  # shards, not replicas
    assert coap_bytes < adamw


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategy", "fsdp2", "--in-backward"], "--in-backward with --strategy fsdp2"),
        (["--in-backward"], "--in-backward: needs --strategy ddp"),
        (["--nproc", "0"], "argument --nproc"),
        (["--strategy", "zero"], "argument --strategy: invalid choice"),
    ],
)
def test_distributed_demo_refusals(argv, message, capsys):
    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "\n" not in err.strip()
