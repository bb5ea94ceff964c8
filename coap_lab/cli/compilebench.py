"""``bench compile``: one whole training step (forward + backward + clip + ``opt.step()`` + ``zero_grad``)
under eager and ``torch.compile``, on the demo model.

Variants (``--variants``, default all four)::

    eager-adamw      train_step as is, torch.optim.AdamW
    eager-coap       train_step as is, COAP-AdamW (coap_compile.optimize, rank ratio 4, as the demo)
    inductor-adamw   torch.compile(train_step, backend="inductor"), torch.optim.AdamW
    coap-coap        torch.compile(train_step, backend="coap"), COAP-AdamW
    inductor-coap    (optional) torch.compile(train_step, backend="inductor"), COAP-AdamW

Every variant starts from the same weights (``build_llama(cfg, seed)``), sees the same seeded random token
batches, and uses a **tensor** lr driven by ``LambdaLR`` (linear warm-up, then cosine: the lr changes at
every step, in place). COAP refreshes ``P`` every ``--update-interval`` steps (SVD every
``update_interval · reproject_factor``), so the timed steps cross refreshes.

Measured per variant (``torch._dynamo.utils.counters``, reset before each variant):

* ``graphs``: ``counters["stats"]["unique_graphs"]`` at the end; ``graphs_after_first``: after step 1;
  ``recompiles``: graphs compiled after step 1 (a guard failure or a new frame).
* ``graph_breaks`` and ``break_reasons``: ``counters["graph_break"]`` (reason → count, over all steps).
* ``first_step_s``: wall time of step 1 (compilation included); ``compile_s``: the excess over the steady
  median summed over every step that compiled a graph; ``compile_cpu_s``: the same in CPU time of the
  worker and its finished children (``compile_threads = 1``: Inductor compiles in the worker, and the C++
  compiler it runs is a waited-for child, so this counts all of it). On a shared machine the CPU times are
  the comparable numbers: wall times include waiting for a core.
* ``steady_ms`` (p20, p80) and ``steady_cpu_ms``: medians of the steps after the last compiling step
  and ``--warmup-steps``.
* ``max_rel_loss_vs_eager``: largest relative difference of the per-step loss from the eager variant with the
  same optimizer (a compiled step that silently diverged would show here).

Each variant runs in its **own process** (``spawn``) with a fresh, empty ``TORCHINDUCTOR_CACHE_DIR``:
compile times are cold, and no variant reuses kernels another one compiled (the forward/backward kernels
of ``inductor-adamw`` and ``coap-coap`` are the same model's). ``--threads`` sets
``torch.set_num_threads`` in the workers (default: torch's own).

Exit status 1 when a COAP variant recompiled after its first step (the library's promise; torch's own
optimizer is reported, not judged).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from coap_lab.cli.checks import RESULTS_DIR, RESULTS_HELP

__all__ = ["VARIANTS", "add_parser", "measure_variant", "run_compile"]

#: name -> (torch.compile backend or None for eager, optimizer)
VARIANTS: dict[str, tuple[str | None, str]] = {
    "eager-adamw": (None, "adamw"),
    "eager-coap": (None, "coap"),
    "inductor-adamw": ("inductor", "adamw"),
    "coap-coap": ("coap", "coap"),
    "inductor-coap": ("inductor", "coap"),
}
DEFAULT_VARIANTS = ("eager-adamw", "eager-coap", "inductor-adamw", "coap-coap")


def _variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    for v in names:
        if v not in VARIANTS:
            raise argparse.ArgumentTypeError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if not names:
        raise argparse.ArgumentTypeError(f"no variant given; choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {v}")
    return v


def add_parser(bench, positive_int: Callable[[str], int], device: Callable[[str], str]) -> None:
    """Register ``bench compile`` on the ``bench`` sub-parsers (with the CLI's shared argument types)."""
    from coap_lab.cli.demo import add_model_args

    c = bench.add_parser("compile", help="whole-train-step torch.compile: graphs, breaks, compile/step time")
    dflt = " (default %(default)s)"
    c.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N" + dflt)
    c.add_argument("--variants", type=_variants, default=list(DEFAULT_VARIANTS), help=", ".join(VARIANTS))
    c.add_argument("--steps", type=positive_int, default=30, help="steps per variant" + dflt)
    c.add_argument("--warmup-steps", type=positive_int, default=3, help="untimed after the last compile")
    c.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step" + dflt)
    c.add_argument("--lr", type=_positive_float, default=3e-3, help="peak lr of the schedule" + dflt)
    c.add_argument("--rank-ratio", type=_positive_float, default=4.0, help="COAP r = min(m,n)//RATIO" + dflt)
    c.add_argument("--rank", type=positive_int, default=None, help=argparse.SUPPRESS)
    c.add_argument("--update-interval", type=positive_int, default=4, help="COAP T_u (default %(default)s)")
    c.add_argument("--reproject-factor", type=positive_int, default=2, help="COAP λ (default %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="weights and batches (default %(default)s)")
    c.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    c.add_argument("--results-dir", default=RESULTS_DIR, help=RESULTS_HELP)
    add_model_args(c)


def _optimizer(kind: str, model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    lr = torch.tensor(args.lr)  # a tensor lr: a schedule changes it in place, without a recompile
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    import coap_compile

    return coap_compile.optimize(
        model, torch.optim.AdamW, rank=args.rank, rank_ratio=args.rank_ratio, lr=lr, weight_decay=0.0,
        update_interval=args.update_interval, reproject_factor=args.reproject_factor,
    )  # fmt: skip


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (Inductor runs the C++ compiler as one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure_variant(name: str, model_cfg, args: argparse.Namespace) -> tuple[dict[str, object], list[float]]:
    """Run ``args.steps`` training steps of variant ``name``; returns ``(row, per-step losses)``."""
    from torch._dynamo.utils import counters

    from coap_lab.cli.train import lr_factor
    from coap_lab.models import build_llama

    backend, kind = VARIANTS[name]
    device = torch.device(args.device)
    torch._dynamo.reset()
    counters.clear()
    model = build_llama(model_cfg, seed=args.seed).to(device)
    model.train()
    opt = _optimizer(kind, model, args)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, args.steps, warm, 0.1))

    def train_step(ids: Tensor) -> Tensor:
        loss = model.loss(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step = train_step if backend is None else torch.compile(train_step, backend=backend)
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, model_cfg.max_seq_len + 1)
    times, cpu, graphs, losses = [], [], [], []
    for _ in range(args.steps):
        ids = torch.randint(0, model_cfg.vocab_size, shape, generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), _cpu_s()
        loss = step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_s() - c0)
        losses.append(float(loss))
        graphs.append(int(counters["stats"]["unique_graphs"]))
        sched.step()
    compiling = [i for i in range(len(graphs)) if graphs[i] > (graphs[i - 1] if i else 0)]
    start = (compiling[-1] + 1 if compiling else 0) + args.warmup_steps
    if len(times) - start < 3:
        start = len(times) - 3
    steady = times[start:]
    median, median_cpu = statistics.median(steady), statistics.median(cpu[start:])
    qs = statistics.quantiles(steady, n=10, method="inclusive")
    breaks = {str(k): int(v) for k, v in counters["graph_break"].items()}
    row = {
        "variant": name,
        "backend": backend or "eager",
        "optimizer": kind,
        "graphs": graphs[-1],
        "graphs_after_first": graphs[0],
        "recompiles": graphs[-1] - graphs[0],
        "graph_breaks": sum(breaks.values()),
        "break_reasons": " | ".join(f"{n}x {' '.join(k.split())[:240]}" for k, n in breaks.items()),
        "first_step_s": round(times[0], 3),
        "compile_s": round(sum(times[i] - median for i in compiling), 3),
        "compile_cpu_s": round(sum(cpu[i] - median_cpu for i in compiling), 3),
        "steady_ms": round(1e3 * median, 2),
        "steady_cpu_ms": round(1e3 * median_cpu, 2),
        "p20_ms": round(qs[1] * 1e3, 2),
        "p80_ms": round(qs[7] * 1e3, 2),
        "timed_steps": len(steady),
        "final_loss": losses[-1],
    }
    return row, losses


def _worker(name: str, model_cfg, args: argparse.Namespace, cache_dir: str):
    """One variant in a fresh process: an empty Inductor cache, the requested thread count."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1  # compile in this process, so _cpu_s counts it
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return measure_variant(name, model_cfg, args)


def run_compile(args: argparse.Namespace) -> int:
    """``bench compile``: print the table; write ``compile_<device>.{csv,json}`` in ``args.results_dir``."""
    from coap_lab.cli.demo import model_config_from_args
    from coap_lab.cli.report import format_table, metadata, write_csv, write_json

    meta = metadata(args.device, getattr(args, "argv", None))
    meta["torch_threads"] = args.threads or meta["torch_threads"]
    meta["inductor_cache"] = "cold: a fresh TORCHINDUCTOR_CACHE_DIR and process per variant"
    model_cfg = model_config_from_args(args)
    rows, losses = [], {}
    ctx = multiprocessing.get_context("spawn")
    for name in args.variants:
        print(f"{name} ...", flush=True)
        with (
            tempfile.TemporaryDirectory(prefix="coap_bench_inductor_") as cache,
            ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool,
        ):
            row, losses[name] = pool.submit(_worker, name, model_cfg, args, cache).result()
        rows.append(row)
    for row in rows:
        ref = losses.get(f"eager-{row['optimizer']}")
        mine = losses[row["variant"]]
        row["max_rel_loss_vs_eager"] = (
            None if ref is None or row["backend"] == "eager"
            else max(abs(a - b) / abs(b) for a, b in zip(mine, ref))
        )  # fmt: skip
    cols = ["variant", "graphs", "recompiles", "graph_breaks", "first_step_s", "compile_s", "compile_cpu_s",
            "steady_ms", "p20_ms", "p80_ms", "steady_cpu_ms", "max_rel_loss_vs_eager"]  # fmt: skip
    print(format_table(rows, [(c, c) for c in cols]))
    for row in rows:
        if row["break_reasons"]:
            print(f"{row['variant']} breaks: {row['break_reasons']}")
    tag = args.device.replace(":", "")
    out = Path(args.results_dir)
    keys = ("steps", "warmup_steps", "batch_size", "lr", "rank_ratio", "update_interval", "reproject_factor",
            "seed", "threads")  # fmt: skip
    config = {k: getattr(args, k) for k in keys}
    payload = {"metadata": meta, "config": config, "model": dataclasses.asdict(model_cfg), "rows": rows}
    written = [write_csv(out / f"compile_{tag}.csv", rows, meta)]
    written.append(write_json(out / f"compile_{tag}.json", payload))
    print("wrote " + ", ".join(str(p) for p in written))
    compiled_coap = [r for r in rows if r["optimizer"] == "coap" and r["backend"] != "eager"]
    bad = [r["variant"] for r in compiled_coap if r["recompiles"]]
    if bad:
        print(f"coap-compile bench compile: {', '.join(bad)} recompiled after the first step", flush=True)
        return 1
    return 0
