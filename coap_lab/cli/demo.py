"""``coap-compile demo``: AdamW vs COAP-AdamW on a small byte-level LLaMA, side by side.

Both runs start from the same initial weights, see the same batches in the same order and use the
same learning-rate schedule (see :mod:`coap_lab.cli.train`); only the optimizer differs. The
default corpus is the running Python's standard library (``.py`` files), so the demo needs no download.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from coap_lab.cli.report import format_table, metadata, pyplot, save_figure, write_json
from coap_lab.cli.train import RunResult, TrainConfig, load_training_corpus, train_run
from coap_lab.models import LlamaConfig, demo_config

__all__ = [
    "DEMO_DEFAULTS",
    "add_model_args",
    "cuda_ok",
    "model_config_from_args",
    "plot_runs",
    "positive_int",
    "run_demo",
    "summary_rows",
]

#: Default demo settings: 175 s for AdamW + COAP on one Intel Xeon core at load 3 (README, *Demo timing*).
DEMO_DEFAULTS = {
    "steps": 200,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup": 30,
    "eval_every": 25,
    "eval_windows": 64,
}
MIB = 1024**2


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (argparse prefixes the message with the option's name)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model-shape options shared by ``demo`` and ``bench quality`` (defaults: the demo model)."""
    d = demo_config()
    g = p.add_argument_group("model shape")
    pos = positive_int
    g.add_argument("--dim", type=pos, default=d.hidden_size, help="hidden size (default %(default)s)")
    g.add_argument("--layers", type=pos, default=d.num_layers, help="decoder layers (default %(default)s)")
    g.add_argument("--heads", type=pos, default=d.num_heads, help="attention heads (default %(default)s)")
    g.add_argument("--ffn", type=pos, default=d.intermediate_size, help="SwiGLU width (default %(default)s)")
    g.add_argument(
        "--seq-len", type=pos, default=d.max_seq_len, help="tokens per sequence (default %(default)s)"
    )
    g.add_argument("--tie-embeddings", action="store_true", help="share the embedding with the output head")


def model_config_from_args(args: argparse.Namespace) -> LlamaConfig:
    """The :class:`LlamaConfig` the shape options describe.

    Raises:
        ValueError: ``--dim`` does not split into ``--heads`` heads of even size (rotary embeddings
            rotate pairs); the message names both options and their values.
    """
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        raise ValueError(
            f"--dim {args.dim} with --heads {args.heads}: the head size --dim / --heads must be an even "
            f"integer, got {args.dim / args.heads:g}"
        )
    return demo_config(
        hidden_size=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.ffn,
        max_seq_len=args.seq_len,
        tie_embeddings=args.tie_embeddings,
    )


def summary_rows(results: list[RunResult]) -> list[dict[str, object]]:
    """One table row per run; "saved" is relative to the first run (the AdamW baseline)."""
    base = results[0].state_bytes
    rows = []
    for r in results:
        rows.append(
            {
                "optimizer": r.optimizer,
                "state_bytes": r.state_bytes,
                "state_mib": r.state_bytes / MIB,
                "saved_pct": 100.0 * (1 - r.state_bytes / base) if base else 0.0,
                "peak_mib": r.peak_bytes / MIB,
                "step_ms": r.median_step_ms,
                "opt_step_ms": r.median_opt_step_ms,
                "train_loss": r.final_train_loss,
                "val_loss": r.final_val_loss,
            }
        )
    return rows


COLUMNS = [
    ("optimizer", "optimizer"),
    ("state_bytes", "state bytes"),
    ("state_mib", "state MiB"),
    ("saved_pct", "saved %"),
    ("peak_mib", "peak MiB*"),
    ("step_ms", "step ms"),
    ("opt_step_ms", "opt.step ms"),
    ("train_loss", "train loss"),
    ("val_loss", "val loss"),
]


def plot_runs(groups: dict[str, list[RunResult]], title: str):
    """Loss curves (train EMA thin, validation thick) and a state-memory bar per optimizer."""
    plt = pyplot()

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, runs) in enumerate(groups.items()):
        c = colors[i % len(colors)]
        for j, r in enumerate(runs):
            ema, smooth = [], r.train_loss[0]
            for v in r.train_loss:
                smooth = 0.9 * smooth + 0.1 * v
                ema.append(smooth)
            ax.plot(range(1, len(ema) + 1), ema, color=c, alpha=0.35, lw=1)
            ax.plot(r.val_steps, r.val_loss, color=c, lw=2, marker="o", ms=3, label=name if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title("train (EMA, thin) and validation (thick)")
    ax.legend()
    ax.grid(alpha=0.3)
    names = list(groups)
    mib = [groups[n][0].state_bytes / MIB for n in names]
    bx.bar(names, mib, color=[colors[i % len(colors)] for i in range(len(names))])
    for x, v in enumerate(mib):
        bx.text(x, v, f"{v:.2f}", ha="center", va="bottom")
    bx.set_ylabel("optimizer state (MiB)")
    bx.set_title("optimizer-state memory")
    bx.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    return fig


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo described by parsed ``args``; print the table; write PNG + JSON under ``args.out``."""
    model_cfg = model_config_from_args(args)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=min(DEMO_DEFAULTS["warmup"], max(0, args.steps // 10)),
        eval_every=args.eval_every,
        eval_windows=DEMO_DEFAULTS["eval_windows"],
        rank=args.rank,
        rank_ratio=args.rank_ratio,
        seed=args.seed,
        device=args.device,
    )
    meta = metadata(cfg.device, getattr(args, "argv", None))  # at the start: the code that actually runs
    t0 = time.perf_counter()
    corpus = load_training_corpus(args.corpus, model_cfg.max_seq_len)
    print(
        f"corpus: {corpus.source} ({corpus.num_files} file{'s' * (corpus.num_files != 1)}, "
        f"{corpus.train.numel():,} train / "
        f"{corpus.val.numel():,} val bytes); model: {_count(model_cfg):,} params, "
        f"d={model_cfg.hidden_size} L={model_cfg.num_layers} H={model_cfg.num_heads} "
        f"ffn={model_cfg.intermediate_size} "
        f"seq={model_cfg.max_seq_len}; {cfg.steps} steps × batch {cfg.batch_size} on {cfg.device}",
        file=sys.stderr,
    )
    results = [train_run(name, model_cfg, corpus, cfg, progress=not args.quiet) for name in args.optimizers]
    wall = time.perf_counter() - t0
    rows = summary_rows(results)
    rank_txt = f"rank {cfg.rank}" if cfg.rank_ratio is None else f"rank ratio {cfg.rank_ratio:g}"
    print(f"\nAdamW vs COAP-AdamW ({rank_txt}), {cfg.steps} steps, seed {cfg.seed}, {cfg.device}:")
    print(format_table(rows, COLUMNS))
    print(f"* peak = {results[0].peak_kind}. Losses in nats/byte; train = mean of the last 10% of steps.")
    out = Path(args.out)
    png = save_figure(
        plot_runs({r.optimizer: [r] for r in results}, f"demo: {rank_txt}, {cfg.steps} steps"),
        out / "demo.png",
    )
    payload = {
        "meta": {**meta, "finished_utc": metadata(cfg.device)["timestamp_utc"]},
        "wall_s": wall,
        "train_config": asdict(cfg),
        "model_config": asdict(model_cfg),
        "corpus": corpus.describe(),
        "summary": rows,
        "runs": [r.to_json() for r in results],
    }
    js = write_json(out / "results.json", payload)
    (out / "table.txt").write_text(format_table(rows, COLUMNS) + "\n")
    print(f"wrote {png}, {js} and {out / 'table.txt'} (total {wall:.1f} s)")
    return 0


def _count(cfg: LlamaConfig) -> int:
    from coap_lab.models import build_llama

    return sum(p.numel() for p in build_llama(cfg, device="meta").parameters())


def cuda_ok(device: str) -> bool:
    """True unless ``device`` names CUDA and no CUDA device is present."""
    return not device.startswith("cuda") or torch.cuda.is_available()
