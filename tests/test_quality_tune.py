"""``coap-compile bench quality --tune-lr``: the grid, each optimizer's chosen lr, a tiny smoke run."""

from __future__ import annotations

import json

import pytest
from test_cli import TINY_ARGS, corpus  # noqa: F401  (the corpus fixture)

from coap_lab.cli import quality as cli_quality
from coap_lab.cli.main import main
from coap_lab.cli.train import RunResult


def test_tune_lr_keeps_each_optimizers_best_lr(monkeypatch):
    """A fake run whose loss is ``|lr − best(name)|``: the grid is complete, the argmin is kept per optimizer
    (ties to the smaller lr), and the kept run is returned for reuse as the first seed."""
    best = {"adamw": 3e-3, "coap": 1e-2}

    def fake(name, model_cfg, text, cfg, progress=True):
        loss = abs(cfg.lr - best[name]) + 1.0
        return RunResult(optimizer=name, seed=cfg.seed, steps=1, val_steps=[1], val_loss=[loss])

    monkeypatch.setattr(cli_quality, "train_run", fake)
    from coap_lab.cli.train import TrainConfig

    grid, chosen, runs = cli_quality.tune_lr(
        ["adamw", "coap"], None, None, TrainConfig(steps=1), [1e-3, 3e-3, 1e-2], seed=5, quiet=True
    )
    assert chosen == best
    assert set(grid["adamw"]) == {1e-3, 3e-3, 1e-2} and grid["coap"][1e-2] == 1.0
    assert runs["coap"].seed == 5 and runs["coap"].final_val_loss == 1.0


def test_tune_lr_extends_the_grid_until_the_best_is_bracketed(monkeypatch):
    """``extend``: a best lr at the grid's edge gets more points beyond it, one grid step (×2 here) at a time,
    until a worse point brackets it or ``extend`` points were added; a diverging run scores ``inf``."""
    best = {"low": 2.5e-4, "high": 1.6e-2, "far": 1.0, "mid": 2e-3}

    def fake(name, model_cfg, text, cfg, progress=True):
        if cfg.lr > 2e-2 and name == "low":
            raise FloatingPointError("the training loss became nan")
        loss = abs(cfg.lr - best[name]) + 1.0
        return RunResult(optimizer=name, seed=cfg.seed, steps=1, val_steps=[1], val_loss=[loss])

    monkeypatch.setattr(cli_quality, "train_run", fake)
    from coap_lab.cli.train import TrainConfig

    grid, chosen, _ = cli_quality.tune_lr(
        list(best), None, None, TrainConfig(steps=1), [1e-3, 2e-3, 4e-3], seed=0, quiet=True, extend=3
    )
    assert sorted(grid["low"]) == pytest.approx([1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3])
    assert chosen["low"] == pytest.approx(2.5e-4) and not cli_quality.at_edge(grid["low"], chosen["low"])
    assert sorted(grid["high"]) == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2])
    assert chosen["high"] == pytest.approx(1.6e-2)
    assert len(grid["far"]) == 6 and cli_quality.at_edge(grid["far"], chosen["far"])  # extend ran out
    assert sorted(grid["mid"]) == [1e-3, 2e-3, 4e-3] and chosen["mid"] == 2e-3
    grid, chosen, _ = cli_quality.tune_lr(
        ["low"], None, None, TrainConfig(steps=1), [4e-3, 3.2e-2], seed=0, quiet=True, extend=0
    )
    assert grid["low"][3.2e-2] == float("inf") and chosen["low"] == 4e-3


@pytest.mark.parametrize("grid", ["1e-3", "1e-3,x", "1e-3,-1", "1e-3,1e-3"])
def test_lr_grid_refuses_bad_values(grid, capsys):
    assert main(["bench", "quality", "--tune-lr", "--lr-grid", grid]) == 2
    err = capsys.readouterr().err
    assert "argument --lr-grid" in err and repr(grid) in err, err


def test_tune_lr_smoke(tmp_path, corpus):  # noqa: F811
    argv = ["bench", "quality", "--corpus", str(corpus), "--steps", "2", "--seeds", "0,1",
            "--eval-every", "2", "--optimizers", "adamw,coap", "--tune-lr", "--lr-grid", "1e-3,1e-2",
            "--lr-extend", "0", "--quiet", "--results-dir", str(tmp_path), *TINY_ARGS]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "quality.json").read_text())
    rows = {r["optimizer"]: r for r in data["summary"]}
    assert set(rows) == {"adamw", "coap"} and all(r["seeds"] == 2 for r in rows.values())
    for name, row in rows.items():
        losses = data["lr_grid"][name]
        assert set(losses) == {"0.001", "0.01"}
        assert row["lr"] == float(min(losses, key=losses.get))
