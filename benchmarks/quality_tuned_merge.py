"""Merge the per-optimizer ``bench quality`` folders of ``benchmarks/results/quality_tuned`` into one table.

``run.sh`` there runs each optimizer on its own (``--lr`` at its best lr, or ``--tune-lr`` with its own
grid) into ``<folder>/<optimizer>/quality.json``; this script writes ``<folder>/quality.{csv,json,png}``
with one row per optimizer: the final validation loss over the seeds at the optimizer's lr (mean, std,
min, max), the lr, every grid point measured (``grid``: the folder's own ``--tune-lr`` grid plus the first
pass's logged losses, :data:`FIRST_PASS`), whether the lr is at an edge of its grid (optimum not
bracketed), whether it was tuned at all (:data:`NOT_TUNED`), and the goal of issue 19 (COAP within 1 % of
tuned AdamW, no worse than the GaLore policy) evaluated on these numbers.

    PYTHONPATH=. python benchmarks/quality_tuned_merge.py benchmarks/results/quality_tuned
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from coap_lab.cli.quality import at_edge, plot_quality, quality_rows
from coap_lab.cli.report import format_table, save_figure, write_csv, write_json
from coap_lab.cli.train import RunResult

__all__ = ["FIRST_PASS", "NOT_TUNED", "merge"]

#: Final validation losses of the first pass (``first_pass.log``: ``--tune-lr --lr-grid 2e-3,4e-3,8e-3
#: --lr-extend 2`` over all eight optimizers, stopped after these; grid order 2e-3, 4e-3, 8e-3, then the
#: extensions, one progress line per run).
FIRST_PASS: dict[str, dict[float, float]] = {
    "adamw": {1e-3: 2.156, 2e-3: 2.117, 4e-3: 2.381, 8e-3: 2.513},
    "coap": {2e-3: 2.163, 4e-3: 2.116, 8e-3: 2.122},
    "coap-official": {2e-3: 2.163, 4e-3: 2.117, 8e-3: 2.118},
    "galore": {2e-3: 2.170, 4e-3: 2.119},
}
#: Rows run at their full-precision counterpart's best lr instead of their own grid (cost: 2.5–4× a run).
NOT_TUNED = {"adamw8bit-torchao": "adamw", "coap-int8": "coap"}
ORDER = ("adamw", "coap", "coap-official", "galore", "galore-torch", "apollo-torch", "adamw8bit-torchao",
         "coap-int8")  # fmt: skip


def _runs(payload: dict) -> list[RunResult]:
    fields = {f.name for f in dataclasses.fields(RunResult)}
    return [RunResult(**{k: v for k, v in r.items() if k in fields}) for r in payload["runs"]]


def merge(folder: Path) -> list[dict[str, object]]:
    """Write the merged table of ``folder``; returns its rows."""
    payloads = {n: json.loads((folder / n / "quality.json").read_text()) for n in ORDER
                if (folder / n / "quality.json").exists()}  # fmt: skip
    runs = {n: _runs(p) for n, p in payloads.items()}
    rows = quality_rows(runs)
    for row in rows:
        name, p = row["optimizer"], payloads[row["optimizer"]]
        grid = {float(k): v for k, v in (p["lr_grid"] or {}).get(name, {}).items()}
        first = FIRST_PASS.get(name, {})
        earlier = folder / f"{name}-pass1" / "quality.json"  # a grid continued past its edge (run8bit.sh)
        if earlier.exists():
            first = {
                **first,
                **{
                    float(k): v
                    for k, v in (json.loads(earlier.read_text())["lr_grid"] or {}).get(name, {}).items()
                },
            }
        grid = {**first, **grid}  # a rerun point (same code and seed) replaces the earlier value
        lr = p["summary"][0].get("lr", p["train_config"]["lr"])
        row["lr"] = lr
        row["tuned"] = name not in NOT_TUNED
        row["grid"] = " ".join(f"{k:g}:{grid[k]:.4f}" for k in sorted(grid)) if grid else ""
        row["lr_at_edge"] = at_edge(grid, lr) if grid else None
        seed0 = next((r.final_val_loss for r in runs[name] if r.seed == 0), None)
        if lr in first and seed0 is not None:  # the logged value (rounded to 3-4 digits) is reproduced
            row["first_pass_reproduced"] = abs(seed0 - first[lr]) <= 5e-4
        row["wall_s"] = p["wall_s"]
        row["git_commit"] = p["meta"]["git_commit"]
        row["loadavg_1m_at_start"] = p["meta"]["loadavg_1m"]
    by = {r["optimizer"]: r for r in rows}
    goal = {}
    if {"adamw", "coap"} <= by.keys():
        gap = by["coap"]["val_mean"] / by["adamw"]["val_mean"] - 1
        goal["coap_vs_adamw_pct"] = 100 * gap
        goal["within_1pct_of_adamw"] = gap <= 0.01
    if {"galore", "coap"} <= by.keys():
        goal["coap_minus_galore"] = by["coap"]["val_mean"] - by["galore"]["val_mean"]
        goal["no_worse_than_galore"] = by["coap"]["val_mean"] <= by["galore"]["val_mean"]
    cols = ["optimizer", "lr", "tuned", "seeds", "val_mean", "val_std", "val_min", "val_max", "state_mib",
            "step_ms", "lr_at_edge", "grid"]  # fmt: skip
    print(format_table(rows, [(c, c) for c in cols]))
    print(json.dumps(goal, indent=1))
    first_meta = payloads[next(iter(payloads))]["meta"]
    meta = {**first_meta, "command": "sh benchmarks/results/quality_tuned/run.sh (per optimizer: see runs)",
            "finished_utc": max(p["meta"].get("finished_utc", "") for p in payloads.values()),
            "wall_s_total": sum(p["wall_s"] for p in payloads.values())}  # fmt: skip
    write_csv(folder / "quality.csv", rows, meta)
    write_json(folder / "quality.json", {
        "meta": meta, "goal": goal, "first_pass": {n: {f"{k:g}": v for k, v in g.items()}
                                                   for n, g in FIRST_PASS.items()},
        "not_tuned": NOT_TUNED, "summary": rows,
        "commands": {n: p["meta"]["command"] for n, p in payloads.items()},
        "train_config": payloads["adamw"]["train_config"] if "adamw" in payloads else None,
        "model_config": payloads[next(iter(payloads))]["model_config"],
    })  # fmt: skip
    cfg = next(iter(payloads.values()))["train_config"]
    title = (f"quality, each optimizer at its own lr: rank ratio {cfg['rank_ratio']:g}, "
             f"{cfg['steps']} steps, seeds 0-2")  # fmt: skip
    save_figure(plot_quality(runs, title), folder / "quality.png")
    return rows


if __name__ == "__main__":
    merge(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/quality_tuned"))
