"""``coap-compile demo --task vision`` and ``coap-compile bench vision``: a conv denoiser, five optimizers.

Train the small DDPM UNet on patches of matplotlib's sample images (no download) with AdamW, COAP-AdamW
(Tucker on the convs), COAP-Adafactor (transformers' base when installed), the GaLore policy and full-rank
Adafactor (:mod:`coap_lab.cli.vision_train`), and report per optimizer: optimizer-state bytes (the
memory plan and the bytes really held), median step time, final validation loss (mean ± std over the
seeds) and a PNG with the validation curves, the state memory and denoised samples (clean, noised to
``t``, and each optimizer's one-step denoising ``x̂₀``).

* ``demo --task vision`` (one seed; default ``adamw`` + ``coap``, or ``coap-adafactor`` when this build
  has no Tucker projection) → ``--out`` (``vision.png``, ``results.json``, ``table.txt``);
* ``bench vision`` (all available optimizers × ``--seeds``) → ``--results-dir``
  (``vision.{json,csv,png}``, with the metadata block of :func:`coap_lab.cli.report.metadata`).

Threads: on the CPU the command sets ``torch.set_num_threads(--threads)``, default 1. Measured on this
project's 2-core machine under load (other jobs running, load average 3.4–6.1), AdamW training step of
the demo UNet at batch 16, 16×16 patches, medians of 3 rounds × 5 steps: 1 thread 106–114 ms, 2 threads
3,268–4,900 ms (OpenMP threads spinning against the other jobs); the smoke UNet: 38–61 ms vs
2,712–3,041 ms. Two threads can only win by ≤ 2× on an idle machine, and lose 30× under load, so 1 is
the default; ``--threads 0`` keeps torch's default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from coap_lab.cli.checks import RESULTS_DIR, RESULTS_HELP, check_device, check_folder, require_matplotlib
from coap_lab.cli.report import format_table, metadata, pyplot, save_figure, write_csv, write_json
from coap_lab.cli.vision_train import (
    MODEL_CONFIGS,
    VISION_DEFAULT,
    VISION_OPTIMIZERS,
    VisionConfig,
    VisionRun,
    adafactor_base,
    load_vision_data,
    train_vision_run,
    vision_availability,
)
from coap_lab.data import SAMPLE_IMAGES

__all__ = [
    "add_vision_args",
    "config_from_args",
    "parse_demo_argv",
    "plot_vision",
    "run_bench",
    "run_demo",
    "summary_rows",
    "validate_args",
]

MIB = 1024**2
DEMO_STEPS, BENCH_STEPS = 150, 300


def _images(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"no image given (default: {','.join(SAMPLE_IMAGES)})")
    return names


def add_vision_args(p: argparse.ArgumentParser, *, bench: bool) -> None:
    """The options of both vision commands (``bench``: several seeds and a results folder)."""
    from coap_lab.cli import argtypes

    d = VisionConfig()
    p.add_argument(
        "--steps",
        type=argtypes._positive_int,
        default=BENCH_STEPS if bench else DEMO_STEPS,
        help="optimizer steps per run (default %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=argtypes._positive_int, default=d.batch_size, help="(default %(default)s)"
    )
    p.add_argument(
        "--lr", type=argtypes._positive_float, default=d.lr, help="shared peak lr (default %(default)s)"
    )
    p.add_argument(
        "--eval-every", type=argtypes._positive_int, default=d.eval_every, help="(default %(default)s)"
    )
    p.add_argument(
        "--patch-size",
        type=argtypes._positive_int,
        default=d.patch_size,
        help="patch side, divisible by 2 (default %(default)s)",
    )
    p.add_argument("--channels", type=int, choices=(1, 3), default=d.channels, help="(default %(default)s)")
    p.add_argument(
        "--model", choices=sorted(MODEL_CONFIGS), default=d.model, help="UNet size (default %(default)s)"
    )
    p.add_argument("--rank", type=argtypes._positive_int, help="matrix rank r = min(RANK, min(m, n))")
    p.add_argument(
        "--rank-ratio",
        type=argtypes._ratio,
        help=f"matrix rank min(m, n) // RATIO (default {d.rank_ratio:g})",
    )
    p.add_argument(
        "--conv-rank-ratio",
        type=argtypes._ratio,
        default=d.conv_rank_ratio,
        help="Tucker ranks of the convs (default %(default)s)",
    )
    p.add_argument(
        "--update-interval",
        type=argtypes._positive_int,
        default=d.update_interval,
        help="(default %(default)s)",
    )
    p.add_argument("--images", type=_images, default=SAMPLE_IMAGES, help="comma-separated sample-data files")
    p.add_argument("--image-root", help="folder to read --images from (default: matplotlib's sample data)")
    p.add_argument("--optimizers", type=argtypes.name_list(VISION_OPTIMIZERS), default=None,
                   help=f"comma-separated from {','.join(VISION_OPTIMIZERS)} "
                   f"(default: {','.join(VISION_DEFAULT)}"
                   f"{'' if bench else '; demo: adamw,coap'})")  # fmt: skip
    p.add_argument(
        "--device", type=argtypes._device, default="cpu", help="cpu, cuda or cuda:N (default %(default)s)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads (default 1, faster under load; 0: torch's)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if bench:
        p.add_argument(
            "--seeds", type=argtypes._seeds, default=[0, 1, 2], help="comma-separated (default 0,1,2)"
        )
        p.add_argument("--results-dir", default=RESULTS_DIR, help=RESULTS_HELP)
        p.add_argument("--tune-lr", action="store_true",
                       help="per optimizer: run --lr-grid at the first seed, keep the lr of the lowest final "
                       "validation loss, run every seed at it (as bench quality --tune-lr)")  # fmt: skip
        p.add_argument("--lr-grid", type=argtypes._lr_grid, default=[1e-3, 3e-3, 1e-2],
                       help="with --tune-lr (default 1e-3,3e-3,1e-2)")  # fmt: skip
        p.add_argument(
            "--lr-extend",
            type=argtypes._non_negative_int,
            default=2,
            help="with --tune-lr: grid points added beyond an edge holding the best (default 2)",
        )
    else:
        p.add_argument("--seed", type=argtypes._seed, default=0, help="model init and data order (default 0)")
        p.add_argument("--out", default="out/demo-vision", help="output folder (default %(default)s)")


#: ``demo --task vision -h``: plain text (argparse prints it as is, so no reST markup).
DEMO_DESCRIPTION = (
    "The vision demo: train a small conv denoiser (a DDPM UNet) on patches of matplotlib's sample images "
    "with AdamW and COAP-AdamW (Tucker-projected convolutions) from the same initial weights, then print "
    "optimizer-state memory, step time and validation loss, and write vision.png, results.json and "
    "table.txt to --out. coap-compile bench vision runs every optimizer over several seeds."
)


def parse_demo_argv(
    argv: list[str], parser_class: type[argparse.ArgumentParser]
) -> argparse.Namespace | None:
    """The parsed ``demo --task vision …`` command line, or None for any other command."""
    if argv[:1] != ["demo"]:
        return None
    rest, task = [], None
    it = iter(argv[1:])
    for a in it:
        if a == "--task":
            task = next(it, None)
        elif a.startswith("--task="):
            task = a.split("=", 1)[1]
        else:
            rest.append(a)
    if task != "vision":
        return None
    p = parser_class(prog="coap-compile demo", description=DEMO_DESCRIPTION)
    p.add_argument("--task", choices=["vision"], default="vision")
    add_vision_args(p, bench=False)
    args = p.parse_args(rest)
    args.command, args.task = "demo", "vision"
    return args


def validate_args(args: argparse.Namespace, fail) -> None:
    """Cross-option checks (device, folders, patch size, optimizer availability); ``fail(message)``."""
    check_device(args, fail)
    require_matplotlib("the vision task (matplotlib's sample images, vision.png)", fail)
    for option in ("out", "results_dir"):
        if getattr(args, option, None) is not None:
            check_folder("--" + option.replace("_", "-"), getattr(args, option), fail)
    levels = len(MODEL_CONFIGS[args.model]().channel_mults)
    if args.patch_size % 2 ** (levels - 1):
        fail(
            f"--patch-size {args.patch_size}: the --model {args.model} UNet needs a multiple of "
            f"{2 ** (levels - 1)}"
        )
    if args.threads < 0:
        fail(f"--threads {args.threads}: must be >= 0 (0 keeps torch's default)")
    if args.rank is None and args.rank_ratio is None:
        args.rank_ratio = VisionConfig().rank_ratio
    avail = vision_availability()
    if args.optimizers is None:
        args.optimizers_default = True
        demo = ["adamw", "coap" if avail["coap"] is None else "coap-adafactor"]
        args.optimizers = [n for n in VISION_DEFAULT if avail[n] is None] if args.command == "bench" else demo
    for n in args.optimizers:
        if avail[n] is not None:
            fail(f"--optimizers: optimizer {n!r} is unavailable: {avail[n]}")


def config_from_args(args: argparse.Namespace) -> VisionConfig:
    return VisionConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=min(20, args.steps // 10),
        eval_every=args.eval_every, patch_size=args.patch_size, channels=args.channels, model=args.model,
        rank=args.rank, rank_ratio=args.rank_ratio, conv_rank_ratio=args.conv_rank_ratio,
        update_interval=args.update_interval, seed=getattr(args, "seed", 0), device=args.device,
        images=tuple(args.images), image_root=args.image_root,
    )  # fmt: skip


def summary_rows(runs: dict[str, list[VisionRun]]) -> list[dict[str, object]]:
    """One row per optimizer; "saved" is relative to the first optimizer's planned bytes."""
    base = next(iter(runs.values()))[0].plan_bytes
    rows = []
    for name, rs in runs.items():
        finals = [r.final_val_loss for r in rs]
        r0 = rs[0]
        rows.append({
            "optimizer": name, "seeds": len(rs), "projected": r0.projected, "plan_bytes": r0.plan_bytes,
            "real_bytes": r0.real_bytes, "plan_minus_real": r0.plan_bytes - r0.real_bytes,
            "state_mib": r0.plan_bytes / MIB, "saved_pct": 100 * (1 - r0.plan_bytes / base) if base else 0.0,
            "step_ms": statistics.median(r.median_step_ms for r in rs),
            "opt_step_ms": statistics.median(r.median_opt_step_ms for r in rs),
            "val_mean": statistics.fmean(finals), "val_std": statistics.stdev(finals) if len(rs) > 1 else 0.0,
            "train_mean": statistics.fmean(r.final_train_loss for r in rs),
        })  # fmt: skip
    return rows


COLUMNS = [
    ("optimizer", "optimizer"), ("projected", "proj."), ("plan_bytes", "state B (plan)"),
    ("real_bytes", "state B (held)"), ("saved_pct", "saved %"), ("step_ms", "step ms"),
    ("opt_step_ms", "opt.step ms"), ("val_mean", "val loss"), ("val_std", "± std"), ("seeds", "seeds"),
]  # fmt: skip


def plot_vision(runs: dict[str, list[VisionRun]], title: str):
    """Validation curves (mean over seeds, band min..max) and state bytes beside denoised samples."""
    plt = pyplot()

    from coap_lab.data import image_grid

    fig = plt.figure(figsize=(16, 5.2), layout="constrained")  # room for the tiles' row labels
    grid = fig.add_gridspec(1, 3, width_ratios=[2.0, 1.0, 2.2])
    ax, bx, cx = (fig.add_subplot(grid[0, i]) for i in range(3))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, rs) in enumerate(runs.items()):
        per = list(zip(*(r.val_loss for r in rs)))
        ax.plot(rs[0].val_steps, [statistics.fmean(v) for v in per], color=colors[i % 10], lw=2, marker="o",
                ms=3, label=name)  # fmt: skip
        ax.fill_between(rs[0].val_steps, [min(v) for v in per], [max(v) for v in per], color=colors[i % 10],
                        alpha=0.15)  # fmt: skip
    ax.set(xlabel="step", ylabel="validation loss (noise MSE)", title="validation: mean over seeds, min..max")
    ax.grid(alpha=0.3)
    ax.legend()
    names = list(runs)
    mib = [runs[n][0].plan_bytes / MIB for n in names]
    bx.bar(names, mib, color=[colors[i % 10] for i in range(len(names))])
    for x, v in enumerate(mib):
        bx.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    bx.set(ylabel="optimizer state (MiB, plan)", title="optimizer-state memory")
    bx.set_xticks(range(len(names)), names, rotation=35, ha="right")
    clean, noisy, _ = next(iter(runs.values()))[0].denoised
    side = clean.shape[-1] + 2  # image_grid pads by 2
    cx.imshow(image_grid([clean, noisy, *(runs[n][0].denoised[2] for n in names)]))
    cx.set_yticks([2 + (i + 0.5) * side for i in range(2 + len(names))], ["clean x₀", "noisy x_t", *names])
    cx.tick_params(axis="y", length=0, pad=6)
    cx.set_xticks([])
    cx.set_title("one-step denoising x̂₀ of validation patches")
    fig.suptitle(title)
    return fig


def _header(cfg: VisionConfig, data, names: list[str]) -> str:
    ucfg = cfg.unet_config()
    from coap_lab.models import UNet, conv_weights_above_threshold

    with torch.device("meta"):
        model = UNet(ucfg)
    n = sum(p.numel() for p in model.parameters())
    convs = len(conv_weights_above_threshold(model))
    _, _, ada = adafactor_base(cfg.lr)
    tucker = "Tucker projection,"
    return (
        f"data: {', '.join(data.sources)}: {data.train.shape[0]} train / {data.val.shape[0]} val patches "
        f"{cfg.patch_size}×{cfg.patch_size}×{cfg.channels}; model: UNet '{cfg.model}' {n:,} params, {convs} "
        f"convs > 9216 weights ({tucker} conv rank ratio {cfg.conv_rank_ratio:g}); Adafactor base: {ada}; "
        f"{cfg.steps} steps × batch {cfg.batch_size} on {cfg.device}, {torch.get_num_threads()} thread(s); "
        f"optimizers: {', '.join(names)}"
    )


def _setup(args: argparse.Namespace) -> tuple[VisionConfig, dict]:
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    return cfg, metadata(cfg.device, getattr(args, "argv", None))  # at the start: the code that runs


def _mismatch_note(rows: list[dict[str, object]]) -> str | None:
    bad = [f"{r['optimizer']} {r['plan_minus_real']:+,} B" for r in rows if r["plan_minus_real"]]
    if not bad:
        return None
    return (
        "note: memory plan − bytes held: " + ", ".join(bad) + " (transformers' Adafactor keeps a 0-d RMS "
        "per full-rank parameter that the plan does not count)"
    )


def _payload(meta, cfg, data, rows, runs, wall) -> dict[str, object]:
    return {
        "meta": {**meta, "finished_utc": metadata(cfg.device)["timestamp_utc"]},
        "wall_s": wall,
        "config": asdict(cfg),
        "unet_config": asdict(cfg.unet_config()),
        "adafactor_base": adafactor_base(cfg.lr)[2],
        "data": {"sources": list(data.sources), "train": data.train.shape[0], "val": data.val.shape[0]},
        "summary": rows,
        "runs": [r.to_json() for rs in runs.values() for r in rs],
    }


def run_demo(args: argparse.Namespace) -> int:
    """One seed of ``args.optimizers``; table on stdout; PNG + JSON + table under ``args.out``."""
    cfg, meta = _setup(args)
    t0 = time.perf_counter()
    data = load_vision_data(cfg)
    print(_header(cfg, data, args.optimizers), file=sys.stderr)
    runs = {n: [train_vision_run(n, data, cfg, progress=not args.quiet)] for n in args.optimizers}
    wall = time.perf_counter() - t0
    rows = summary_rows(runs)
    table = format_table(rows, COLUMNS)
    print(f"\nvision demo, {cfg.steps} steps, seed {cfg.seed}, {cfg.device}:\n{table}")
    note = _mismatch_note(rows)
    if note:
        print(note)
    out = Path(args.out)
    png = save_figure(
        plot_vision(runs, f"vision demo: {cfg.steps} steps, seed {cfg.seed}"), out / "vision.png"
    )
    js = write_json(out / "results.json", _payload(meta, cfg, data, rows, runs, wall))
    (out / "table.txt").write_text(table + "\n")
    print(f"wrote {png}, {js} and {out / 'table.txt'} (total {wall:.1f} s)")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """Every optimizer × every seed; → ``vision.{json,csv,png}`` under ``args.results_dir``."""
    cfg, meta = _setup(args)
    t0 = time.perf_counter()
    data = load_vision_data(cfg)
    print(_header(cfg, data, args.optimizers) + f"; seeds {list(args.seeds)}", file=sys.stderr)
    runs: dict[str, list[VisionRun]] = {n: [] for n in args.optimizers}
    grid: dict[str, dict[float, float]] = {}
    best_lr = {n: cfg.lr for n in args.optimizers}
    if args.tune_lr:
        from coap_lab.cli.quality import at_edge, tune_grid

        def one(n: str, lr: float) -> VisionRun:
            c = replace(cfg, seed=args.seeds[0], lr=lr)
            return train_vision_run(n, data, c, progress=not args.quiet)

        grid, best_lr, first = tune_grid(args.optimizers, one, args.lr_grid, args.lr_extend)
        for n in args.optimizers:
            runs[n].append(first[n])
    for seed in args.seeds[1:] if grid else args.seeds:
        for n in args.optimizers:
            c = replace(cfg, seed=seed, lr=best_lr[n])
            runs[n].append(train_vision_run(n, data, c, progress=not args.quiet))
    wall = time.perf_counter() - t0
    rows = summary_rows(runs)
    for row in rows if grid else ():
        g = grid[row["optimizer"]]
        row["lr"] = best_lr[row["optimizer"]]
        row["grid"] = " ".join(f"{lr:g}:{v:.5f}" for lr, v in g.items())
        row["lr_at_edge"] = at_edge(g, row["lr"])
    print(format_table(rows, COLUMNS + ([("lr", "lr"), ("lr_at_edge", "at edge")] if grid else [])))
    note = _mismatch_note(rows)
    if note:
        print(note)
    out = Path(args.results_dir)
    title = f"vision: UNet '{cfg.model}', {cfg.steps} steps, seeds {list(args.seeds)}"
    save_figure(plot_vision(runs, title), out / "vision.png")
    write_csv(out / "vision.csv", rows, meta)
    payload = _payload(meta, cfg, data, rows, runs, wall)
    payload["lr_grid"] = {n: {f"{lr:g}": v for lr, v in g.items()} for n, g in grid.items()} or None
    write_json(out / "vision.json", payload)
    print(f"wrote {out / 'vision.csv'}, {out / 'vision.json'}, {out / 'vision.png'} ({wall:.0f} s)")
    return 0
