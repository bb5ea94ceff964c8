"""``bench step``: time ``optimizer.step()`` on single weight matrices, AdamW vs projected AdamW.

One code path for every device; only the timer differs:

* CPU: ``time.perf_counter`` around each ``step()`` (after ``warmup`` untimed steps), median and
  20/80 % quantiles of ``repeat`` samples;
* CUDA (``--device cuda``): ``triton.testing.do_bench`` (quantiles 0.5/0.2/0.8, its own warm-up and
  cache flushing) when Triton is importable, else CUDA events around each step.

The gradient is a fixed seeded random matrix that stays attached, so every timed call is a full
step. Steps are numbered from 1 after the first (initialising) step; the default ``repeat`` stays
below the refresh interval, so the numbers are the steady-state per-step cost, not the amortised
cost of the occasional projection refresh.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from coap_compile.cli.memory import measured_state_bytes
from coap_compile.cli.optimizers import build_optimizer

__all__ = [
    "DEFAULT_SHAPES",
    "make_step",
    "parse_shapes",
    "quantiles_ms",
    "run_step",
    "step_rows",
    "time_cpu",
    "time_cuda",
]

#: ``(m, n, rank)``: a LLaMA-130M attention matrix, a 350M MLP matrix, 1B attention and MLP matrices.
DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = (
    (768, 768, 256),
    (2736, 1024, 256),
    (2048, 2048, 512),
    (5461, 2048, 512),
)


def make_step(
    optimizer: str, m: int, n: int, rank: int, device: str, seed: int = 0
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """A zero-argument ``step`` for one ``m×n`` weight with a fixed gradient, after one initialising step."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, generator=gen) * 0.02)
    layer = layer.to(device)
    layer.weight.grad = (torch.randn(m, n, generator=gen) * 1e-3).to(device)
    opt = build_optimizer(optimizer, layer, rank=None if optimizer == "adamw" else rank, lr=1e-4)
    opt.step()
    return opt.step, opt


def quantiles_ms(samples_s: Sequence[float]) -> tuple[float, float, float]:
    """(median, 20 %, 80 %) of ``samples_s`` seconds, in milliseconds."""
    qs = statistics.quantiles([1e3 * s for s in samples_s], n=10, method="inclusive")
    return 1e3 * statistics.median(samples_s), qs[1], qs[7]


def time_cpu(fn: Callable[[], None], warmup: int, repeat: int) -> tuple[float, float, float]:
    """Median/p20/p80 milliseconds of ``repeat`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return quantiles_ms(samples)


def time_cuda(fn: Callable[[], None], warmup: int, repeat: int) -> tuple[float, float, float]:
    """Median/p20/p80 milliseconds on CUDA: ``triton.testing.do_bench`` if available, else CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, warmup=warmup, rep=repeat, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return quantiles_ms(samples)


def step_rows(
    shapes: Sequence[tuple[int, int, int]],
    optimizers: Sequence[str],
    *,
    device: str = "cpu",
    warmup: int = 3,
    repeat: int = 20,
) -> list[dict[str, object]]:
    """One row per (shape, optimizer): step-time quantiles and exact optimizer-state bytes.

    For CUDA, ``warmup``/``repeat`` are passed to ``do_bench`` as milliseconds budgets.
    """
    timer = time_cuda if device.startswith("cuda") else time_cpu
    rows: list[dict[str, object]] = []
    for m, n, rank in shapes:
        base_ms = None
        for name in optimizers:
            fn, opt = make_step(name, m, n, rank, device)
            med, p20, p80 = timer(fn, warmup, repeat)
            base_ms = med if name == "adamw" else base_ms
            rows.append(
                {
                    "shape": f"{m}x{n}",
                    "rank": None if name == "adamw" else rank,
                    "optimizer": name,
                    "median_ms": med,
                    "p20_ms": p20,
                    "p80_ms": p80,
                    "vs_adamw": med / base_ms if base_ms else None,
                    "state_bytes": measured_state_bytes(opt),
                    "device": device,
                    "threads": torch.get_num_threads(),
                }
            )
            del fn, opt
    return rows


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"768x768:256,2048x5461:512"`` → ``[(768, 768, 256), (2048, 5461, 512)]``; ValueError if malformed."""
    shapes = []
    for item in text.split(","):
        try:
            dims, rank = item.strip().split(":")
            m, n = dims.lower().split("x")
            shape = (int(m), int(n), int(rank))
        except ValueError:
            raise ValueError(f"bad shape {item.strip()!r}; expected MxN:RANK, e.g. 2048x5461:512") from None
        if min(shape) <= 0:
            raise ValueError(f"bad shape {item.strip()!r}; sizes and rank must be positive")
        shapes.append(shape)
    return shapes


def run_step(args) -> int:
    """``bench step``: print the table and write ``step_<device>.{csv,json}`` under ``args.results_dir``."""
    from pathlib import Path

    from coap_compile.cli.report import format_table, metadata, write_csv, write_json

    shapes = parse_shapes(args.shapes) if args.shapes else list(DEFAULT_SHAPES)
    cuda = args.device.startswith("cuda")
    if args.warmup is None:
        args.warmup = 25 if cuda else 3
    if args.repeat is None:
        args.repeat = 100 if cuda else 20
    meta = metadata(args.device, getattr(args, "argv", None))
    rows = step_rows(shapes, args.optimizers, device=args.device, warmup=args.warmup, repeat=args.repeat)
    cols = ["shape", "rank", "optimizer", "median_ms", "p20_ms", "p80_ms", "vs_adamw", "state_bytes"]
    print(format_table(rows, [(c, c) for c in cols]))
    meta.update(warmup=args.warmup, repeat=args.repeat)
    tag = "cpu" if args.device == "cpu" else args.device.split(":")[0]
    out = Path(args.results_dir)
    write_csv(out / f"step_{tag}.csv", rows, meta)
    write_json(out / f"step_{tag}.json", {"meta": meta, "rows": rows})
    print(f"wrote {out / f'step_{tag}.csv'} and {out / f'step_{tag}.json'}")
    return 0
