"""``coap-compile bench quality``: final validation loss of several optimizers over several seeds.

The demo model and data (:mod:`coap_lab.cli.train`); every optimizer of a seed starts from the same
weights and sees the same batches. Reported: final validation loss mean, standard deviation, min and
max over the seeds, plus state bytes and median step time.

``--tune-lr``: each optimizer first runs ``--lr-grid`` at the first seed; the lr with the lowest final
validation loss is kept (that run is the table's first seed) and the other seeds run at it, so every row
is its optimizer at its own best lr (columns ``lr`` and ``grid``: ``lr:loss`` of every grid point). The
selection uses the same validation split the table reports (a small demo; say so next to the numbers).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TypeVar

from coap_lab.cli.demo import model_config_from_args
from coap_lab.cli.optimizers import EXTERNAL, UnknownOptimizerError, availability
from coap_lab.cli.report import format_table, metadata, pyplot, save_figure, write_csv, write_json
from coap_lab.cli.train import RunResult, TrainConfig, load_training_corpus, train_run

__all__ = ["at_edge", "plot_quality", "quality_rows", "run_quality", "tune_grid", "tune_lr"]

R = TypeVar("R")

MIB = 1024**2


def quality_rows(runs: dict[str, list[RunResult]]) -> list[dict[str, object]]:
    """One summary row per optimizer."""
    rows = []
    for name, rs in runs.items():
        finals = [r.final_val_loss for r in rs]
        rows.append(
            {
                "optimizer": name,
                "seeds": len(rs),
                "val_mean": statistics.fmean(finals),
                "val_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "val_min": min(finals),
                "val_max": max(finals),
                "train_mean": statistics.fmean(r.final_train_loss for r in rs),
                "state_mib": rs[0].state_bytes / MIB,
                "step_ms": statistics.median(r.median_step_ms for r in rs),
            }
        )
    return rows


def replot_quality(results_dir: str | Path) -> Path:
    """Redraw ``quality.png`` of a results folder from its ``quality.json`` (no training: the committed
    figures follow a change of :func:`plot_quality`)."""
    import dataclasses
    import json

    folder = Path(results_dir)
    payload = json.loads((folder / "quality.json").read_text())
    fields = {f.name for f in dataclasses.fields(RunResult)}
    runs: dict[str, list[RunResult]] = {}
    for r in payload["runs"]:
        runs.setdefault(r["optimizer"], []).append(RunResult(**{k: v for k, v in r.items() if k in fields}))
    cfg = payload["train_config"]
    rank_txt = f"rank {cfg['rank']}" if cfg["rank_ratio"] is None else f"rank ratio {cfg['rank_ratio']:g}"
    seeds = sorted({r.seed for rs in runs.values() for r in rs})
    title = f"quality: {rank_txt}, {cfg['steps']} steps, seeds {seeds}"
    return save_figure(plot_quality(runs, title), folder / "quality.png")


LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_quality(runs: dict[str, list[RunResult]], title: str):
    """Validation curves (mean over seeds, min–max band) and final loss mean ± std per optimizer."""
    plt = pyplot()

    fig, (ax, bx) = plt.subplots(
        1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 1]}, layout="constrained"
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rows = quality_rows(runs)
    for i, (name, rs) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        steps = rs[0].val_steps
        per_step = list(zip(*(r.val_loss for r in rs)))
        # curves that nearly coincide (coap and coap-svd-only) stay visible: own dash and marker, drawn
        # thinner the later they come, so an earlier curve shows around a later one
        style = dict(ls=LINE_STYLES[i % len(LINE_STYLES)], marker=MARKERS[i % len(MARKERS)], ms=4)
        ax.plot(steps, [statistics.fmean(v) for v in per_step], color=c, lw=max(1.0, 2.6 - 0.3 * i),
                label=name, zorder=3 + i, **style)  # fmt: skip
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=c, alpha=0.12)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("validation loss: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend()
    names = [r["optimizer"] for r in rows]
    bx.bar(
        names,
        [r["val_mean"] for r in rows],
        yerr=[r["val_std"] for r in rows],
        capsize=4,
        color=[colors[i % len(colors)] for i in range(len(rows))],
    )
    lo = min(r["val_min"] for r in rows)
    hi = max(r["val_max"] for r in rows)
    bx.set_ylim(lo - 0.5 * (hi - lo + 0.02), hi + 0.5 * (hi - lo + 0.02))
    for x, r in enumerate(rows):
        bx.text(x, r["val_max"], f"{r['state_mib']:.1f} MiB", ha="center", va="bottom", fontsize=8)
    bx.set_ylabel("final validation loss (mean ± std)")
    bx.set_title("final loss; label = optimizer state")
    bx.set_xticks(range(len(names)), names, rotation=35, ha="right", rotation_mode="anchor")
    fig.suptitle(title)
    return fig


def tune_lr(names, model_cfg, corpus, base: TrainConfig, lrs, seed: int, quiet: bool, extend: int = 0):
    """The learning-rate grid of every optimizer at one seed (:func:`tune_grid` over :func:`train_run`)."""

    def one(n: str, lr: float) -> RunResult:
        return train_run(n, model_cfg, corpus, replace(base, seed=seed, lr=lr), progress=not quiet)

    return tune_grid(names, one, lrs, extend)


def tune_grid(names, run_one: Callable[[str, float], R], lrs, extend: int = 0):
    """``(grid, best, runs)``: ``grid[name][lr]`` the final validation loss of ``run_one(name, lr)``,
    ``best[name]`` the lr of the lowest one (ties: the smaller lr) and ``runs[name]`` that run (reused as
    the first seed of the tuned table).

    A run whose loss turns non-finite (:class:`FloatingPointError`) scores ``inf`` (the lr is too large).
    ``extend``: while an optimizer's best lr is the smallest or the largest of its grid, up to ``extend``
    more points are run beyond that edge, one grid step (the ratio of the two smallest grid lrs) at a
    time, so the chosen lr is bracketed by worse ones (a best still at an edge after that is reported as
    such by :func:`at_edge`)."""
    lrs = sorted(lrs)
    ratio = lrs[1] / lrs[0] if len(lrs) > 1 else 2.0
    grid: dict[str, dict[float, float]] = {n: {} for n in names}
    kept: dict[str, dict[float, R]] = {n: {} for n in names}

    def run(n: str, lr: float) -> None:
        try:
            r = run_one(n, lr)
        except FloatingPointError as exc:
            print(f"note: {n} at lr {lr:g} diverged: {exc}", file=sys.stderr)
            grid[n][lr] = math.inf
            return
        grid[n][lr], kept[n][lr] = r.final_val_loss, r

    def best_of(n: str) -> float:
        return min(grid[n], key=lambda lr: (grid[n][lr], lr))

    for n in names:
        for lr in lrs:
            run(n, lr)
        for _ in range(extend):
            b, points = best_of(n), sorted(grid[n])
            if not math.isfinite(grid[n][b]):
                break
            if b == points[0]:
                run(n, b / ratio)
            elif b == points[-1]:
                run(n, b * ratio)
            else:
                break
        grid[n] = dict(sorted(grid[n].items()))
        if not math.isfinite(grid[n][best_of(n)]):
            raise FloatingPointError(f"{n}: every lr of the grid {sorted(grid[n])} diverged")
    best = {n: best_of(n) for n in names}
    return grid, best, {n: kept[n][best[n]] for n in names}


def at_edge(losses: dict[float, float], lr: float) -> bool:
    """Whether ``lr`` is the smallest or the largest point of its grid (the optimum is not bracketed)."""
    return lr in (min(losses), max(losses))


def run_quality(args: argparse.Namespace) -> int:
    """Train every available optimizer for every seed; print and write the summary."""
    model_cfg = model_config_from_args(args)
    names = list(args.optimizers)
    avail = availability([*names, *EXTERNAL] if getattr(args, "optimizers_default", False) else names)
    if getattr(args, "optimizers_default", False):
        names += [n for n in EXTERNAL if avail[n] is None]
    skipped = {n: avail[n] for n in dict.fromkeys((*names, *EXTERNAL)) if avail[n] is not None}
    if all(avail[n] is not None for n in names):
        reasons = "; ".join(f"{n}: {avail[n]}" for n in names)
        raise UnknownOptimizerError(f"--optimizers {','.join(names)}: none is available here ({reasons})")
    for n in names:
        if avail[n] is not None:
            print(f"note: --optimizers: skipping {n!r}: {avail[n]}", file=sys.stderr)
    names = [n for n in names if avail[n] is None]
    base = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=max(0, args.steps // 10),
        eval_every=args.eval_every,
        rank=args.rank,
        rank_ratio=args.rank_ratio,
        device=args.device,
    )
    meta = metadata(base.device, getattr(args, "argv", None))  # at the start: the code that actually runs
    corpus = load_training_corpus(args.corpus, model_cfg.max_seq_len)
    t0 = time.perf_counter()
    grid: dict[str, dict[float, float]] = {}
    best_lr = {n: base.lr for n in names}
    runs: dict[str, list[RunResult]] = {n: [] for n in names}
    if getattr(args, "tune_lr", False):
        lrs, seed0 = args.lr_grid, args.seeds[0]
        grid, best_lr, first = tune_lr(
            names, model_cfg, corpus, base, lrs, seed0, args.quiet, extend=getattr(args, "lr_extend", 0)
        )
        for n in names:
            runs[n].append(first[n])
    for seed in args.seeds[1:] if grid else args.seeds:
        for n in names:
            cfg = replace(base, seed=seed, lr=best_lr[n])
            runs[n].append(train_run(n, model_cfg, corpus, cfg, progress=not args.quiet))
    wall = time.perf_counter() - t0
    rows = quality_rows(runs)
    if grid:
        for row in rows:
            row["lr"] = best_lr[row["optimizer"]]
            row["grid"] = " ".join(f"{lr:g}:{v:.4f}" for lr, v in grid[row["optimizer"]].items())
            row["lr_at_edge"] = at_edge(grid[row["optimizer"]], row["lr"])
    print(format_table(rows, [(k, k) for k in rows[0]]))
    meta["finished_utc"] = metadata(base.device)["timestamp_utc"]
    out = Path(args.results_dir)
    rank_txt = f"rank {base.rank}" if base.rank_ratio is None else f"rank ratio {base.rank_ratio:g}"
    title = f"quality: {rank_txt}, {base.steps} steps, seeds {list(args.seeds)}"
    save_figure(plot_quality(runs, title), out / "quality.png")
    write_csv(out / "quality.csv", rows, meta)
    payload = {
        "meta": meta,
        "wall_s": wall,
        "train_config": asdict(base),
        "model_config": asdict(model_cfg),
        "corpus": corpus.describe(),
        "skipped": skipped,
        "summary": rows,
        "lr_grid": {n: {f"{lr:g}": v for lr, v in g.items()} for n, g in grid.items()} or None,
        "runs": [r.to_json() for rs in runs.values() for r in rs],
    }
    write_json(out / "quality.json", payload)
    print(f"wrote {out / 'quality.csv'}, {out / 'quality.json'}, {out / 'quality.png'} ({wall:.0f} s)")
    return 0
