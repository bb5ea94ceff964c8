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

**Refreshes** (:func:`refresh_rows`) are timed on their own, per shape, on the canonical gradient ``X``
(``M×N``), an orthonormal ``P`` and a first moment ``0.1·X P``, with the same timer (CPU: ``max(3, repeat //
4)`` timed calls after one untimed; each call starts from a copy of the same state, whose ``N×r`` copy is
inside the timing and negligible next to any refresh):

* ``correlation-paper`` / ``correlation-normalized``: COAP's correlation step (closed-form gradient; the
  paper's clipped step, or the fixed-angle step), ``correlation-autograd``: the autograd gradient it replaced
  plus the same clip (for the record);
* ``svd``: COAP's low-cost SVD (QR of ``X P``, SVD of ``Qᵀ X``); ``galore-svd``: GaLore's full SVD of ``X``;
* ``dct``: the DCT policy's selection (``X B`` and a top-k), ``dct-gather``: materialising ``P = B[:, S]``
  (once per step under ``projection="dct"``), ``dct-basis``: building the shared ``N×N`` basis (once per
  process and ``N``).

**Amortised step** (:func:`amortized_rows`) over one COAP cycle of ``T_u·λ`` steps (``T_u = 32``, ``λ = 5``,
the optimizer defaults): ``steady + ((λ − 1)·correlation + svd) / (T_u·λ)`` for ``coap`` with each
correlation mode (``off``: SVD only), ``steady + galore-svd / T_u`` for ``galore`` and, for ``dct``,
``steady + dct-gather + dct / T_u``, where ``steady`` is the ``dct`` optimizer's step if it was timed, else
COAP's (the same two projection matmuls). Every row carries ``vs_adamw``: its median over AdamW's median step
at the same shape, measured in the same run.

**Overhead** (``--overhead``, default ``demo,64x64x16``; :mod:`.overhead`): a whole model's ``opt.step()``
and the fixed cost per matrix, for AdamW (defaults and ``foreach``), COAP grouped and per matrix,
galore-torch and apollo-torch, in one interleaved run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from coap_lab.cli.floor import gemm_floor_fn
from coap_lab.cli.memory import measured_state_bytes
from coap_lab.cli.optimizers import BASELINES, build_optimizer
from coap_lab.cli.timing import quantiles_ms, time_cpu, time_cuda, timed_samples

__all__ = [
    "DEFAULT_SHAPES",
    "amortized_rows",
    "make_step",
    "parse_shapes",
    "quantiles_ms",
    "refresh_fns",
    "refresh_rows",
    "run_step",
    "step_rows",
    "time_cpu",
    "time_cuda",
    "timed_samples",
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
    opt = build_optimizer(optimizer, layer, rank=None if optimizer in BASELINES else rank, lr=1e-4)
    opt.step()
    return opt.step, opt


def step_rows(
    shapes: Sequence[tuple[int, int, int]],
    optimizers: Sequence[str],
    *,
    device: str = "cpu",
    warmup: int = 3,
    repeat: int = 20,
) -> list[dict[str, object]]:
    """One row per (shape, optimizer): step-time quantiles and exact optimizer-state bytes, and per shape a
    ``gemm-floor`` row (:func:`gemm_floor_fn`, timed in the same run); ``vs_floor`` is a row's median over it.

    For CUDA, ``warmup``/``repeat`` are passed to ``do_bench`` as milliseconds budgets.
    """
    timer = time_cuda if device.startswith("cuda") else time_cpu
    rows: list[dict[str, object]] = []
    for m, n, rank in shapes:
        base_ms = None
        floor_ms, f20, f80 = timer(gemm_floor_fn(m, n, rank, device), warmup, repeat)
        shape_rows = [{
            "shape": f"{m}x{n}", "rank": rank, "optimizer": "gemm-floor", "median_ms": floor_ms,
            "p20_ms": f20, "p80_ms": f80, "vs_adamw": None, "vs_floor": 1.0, "state_bytes": 0,
            "device": device, "threads": torch.get_num_threads(),
        }]  # fmt: skip
        for name in optimizers:
            fn, opt = make_step(name, m, n, rank, device)
            med, p20, p80 = timer(fn, warmup, repeat)
            base_ms = med if name == "adamw" else base_ms
            shape_rows.append(
                {
                    "shape": f"{m}x{n}",
                    "rank": None if name in BASELINES else rank,
                    "optimizer": name,
                    "median_ms": med,
                    "p20_ms": p20,
                    "p80_ms": p80,
                    "vs_adamw": med / base_ms if base_ms else None,
                    "vs_floor": med / floor_ms,
                    "state_bytes": measured_state_bytes(opt),
                    "device": device,
                    "threads": torch.get_num_threads(),
                }
            )
            del fn, opt
        base_ms = next((r["median_ms"] for r in shape_rows if r["optimizer"] == "adamw"), None)
        shape_rows[0]["vs_adamw"] = floor_ms / base_ms if base_ms else None
        rows += shape_rows
    return rows


def refresh_fns(m: int, n: int, rank: int, device: str, seed: int = 0) -> dict[str, Callable[[], object]]:
    """Zero-argument refreshes (module docstring) for one ``m×n`` weight's canonical gradient."""
    from coap_compile.projection import (
        CoapPolicy,
        DctPolicy,
        canonical,
        dct_basis,
        top_right_singular_vectors,
    )
    from coap_compile.projection.correlation import autograd_correlation_grad

    gen = torch.Generator().manual_seed(seed)
    x, transposed = canonical((torch.randn(m, n, generator=gen) * 1e-3).to(device))
    coap = CoapPolicy()
    state0 = coap.init_state(x, rank)
    first = 0.1 * (x @ state0["proj"])
    svd_k = coap.update_interval * coap.reproject_factor
    corr_k = coap.update_interval

    def coap_refresh(policy: CoapPolicy, k: int) -> Callable[[], object]:
        def fn() -> object:
            state = {"proj": state0["proj"].clone()}
            return policy.refresh(state, x, k, first_moment=first, transposed=transposed)

        return fn

    def autograd_step() -> object:
        p = state0["proj"].clone()
        grad = autograd_correlation_grad(p, x, first, transposed=transposed)
        coef = 1.0 / (float(grad.norm()) + 1e-6)
        return p - 0.1 * (grad * coef if coef < 1.0 else grad)

    dct = DctPolicy()
    dct_state0 = dct.init_state(x, rank)

    def dct_refresh() -> object:
        state = {k: v.clone() for k, v in dct_state0.items()}
        return dct.refresh(state, x, dct.update_interval, first_moment=None, transposed=transposed)

    return {
        "correlation-paper": coap_refresh(coap, corr_k),
        "correlation-normalized": coap_refresh(CoapPolicy(correlation="normalized"), corr_k),
        "correlation-autograd": autograd_step,
        "svd": coap_refresh(coap, svd_k),
        "galore-svd": lambda: top_right_singular_vectors(x, rank),
        "dct": dct_refresh,
        "dct-gather": lambda: dct.basis(dct_state0),
        "dct-basis": lambda: dct_basis(x.shape[1], dtype=torch.float32, device=x.device),
    }


def refresh_rows(
    shapes: Sequence[tuple[int, int, int]],
    adamw_ms: dict[str, float],
    *,
    device: str = "cpu",
    warmup: int = 1,
    repeat: int = 5,
) -> list[dict[str, object]]:
    """One row per (shape, refresh): time quantiles and the ratio to ``adamw_ms[shape]`` (AdamW's median)."""
    timer = time_cuda if device.startswith("cuda") else time_cpu
    rows: list[dict[str, object]] = []
    for m, n, rank in shapes:
        shape = f"{m}x{n}"
        for name, fn in refresh_fns(m, n, rank, device).items():
            med, p20, p80 = timer(fn, warmup, repeat)
            base = adamw_ms.get(shape)
            rows.append(
                {
                    "shape": shape,
                    "rank": rank,
                    "refresh": name,
                    "median_ms": med,
                    "p20_ms": p20,
                    "p80_ms": p80,
                    "vs_adamw": med / base if base else None,
                    "device": device,
                    "threads": torch.get_num_threads(),
                }
            )
    return rows


def amortized_rows(
    steps: Sequence[dict[str, object]],
    refreshes: Sequence[dict[str, object]],
    *,
    update_interval: int = 32,
    reproject_factor: int = 5,
) -> list[dict[str, object]]:
    """Amortised per-step cost per shape and schedule (module docstring), from measured medians."""
    step = {(r["shape"], r["optimizer"]): float(r["median_ms"]) for r in steps}
    ref = {(r["shape"], r["refresh"]): float(r["median_ms"]) for r in refreshes}
    rows: list[dict[str, object]] = []
    cycle = update_interval * reproject_factor
    for shape, rank in dict.fromkeys((r["shape"], r["rank"]) for r in refreshes):
        adamw = step.get((shape, "adamw"))
        coap = step.get((shape, "coap"))
        candidates: list[tuple[str, float | None, str]] = []
        if coap is not None:
            for mode in ("paper", "normalized"):
                extra = (reproject_factor - 1) * ref[(shape, f"correlation-{mode}")] + ref[(shape, "svd")]
                candidates.append((f"coap ({mode})", coap + extra / cycle, "coap step"))
            candidates.append(("coap (off: svd only)", coap + ref[(shape, "svd")] / cycle, "coap step"))
        galore = step.get((shape, "galore"))
        if galore is not None:
            per_step = galore + ref[(shape, "galore-svd")] / update_interval
            candidates.append(("galore", per_step, "galore step"))
        dct_steady, source = step.get((shape, "dct")), "dct step"
        if dct_steady is None:
            dct_steady, source = coap, "coap step (dct not timed)"
        if dct_steady is not None:
            per_step = dct_steady + ref[(shape, "dct-gather")] + ref[(shape, "dct")] / update_interval
            candidates.append(("dct", per_step, source))
        for schedule, ms, steady in candidates:
            rows.append(
                {
                    "shape": shape,
                    "rank": rank,
                    "schedule": schedule,
                    "amortized_ms": ms,
                    "vs_adamw": ms / adamw if adamw else None,
                    "steady_from": steady,
                }
            )
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

    from coap_lab.cli.report import format_table, metadata, write_csv, write_json

    shapes = parse_shapes(args.shapes) if args.shapes else list(DEFAULT_SHAPES)
    cuda = args.device.startswith("cuda")
    if args.warmup is None:
        args.warmup = 25 if cuda else 3
    if args.repeat is None:
        args.repeat = 100 if cuda else 20
    meta = metadata(args.device, getattr(args, "argv", None))
    rows = step_rows(shapes, args.optimizers, device=args.device, warmup=args.warmup, repeat=args.repeat)
    cols = ["shape", "rank", "optimizer", "median_ms", "p20_ms", "p80_ms", "vs_adamw", "vs_floor"]
    cols.append("state_bytes")
    print(format_table(rows, [(c, c) for c in cols]))
    refreshes: list[dict[str, object]] = []
    amortized: list[dict[str, object]] = []
    if any(name not in BASELINES for name in args.optimizers):
        adamw = {str(r["shape"]): float(r["median_ms"]) for r in rows if r["optimizer"] == "adamw"}
        rows_timed = [r for r in rows if r["optimizer"] != "gemm-floor"]
        warm, rep = (args.warmup, args.repeat) if cuda else (1, max(3, args.repeat // 4))
        refreshes = refresh_rows(shapes, adamw, device=args.device, warmup=warm, repeat=rep)
        cols = ["shape", "rank", "refresh", "median_ms", "p20_ms", "p80_ms", "vs_adamw"]
        print(format_table(refreshes, [(c, c) for c in cols]))
        amortized = amortized_rows(rows_timed, refreshes)
        cols = ["shape", "rank", "schedule", "amortized_ms", "vs_adamw", "steady_from"]
        print(format_table(amortized, [(c, c) for c in cols]))
        meta.update(refresh_warmup=warm, refresh_repeat=rep)
    overhead: list[dict[str, object]] = []
    cases = [c for c in (getattr(args, "overhead", None) or "").split(",") if c.strip()]
    if cases:
        from coap_lab.cli.overhead import overhead_rows

        names = getattr(args, "overhead_optimizers", None)
        extra = {"optimizers": names} if names else {}
        overhead = overhead_rows(cases, device=args.device, warmup=args.warmup if not cuda else 3, **extra)
        cols = [
            "case",
            "optimizer",
            "median_ms",
            "p20_ms",
            "p80_ms",
            "per_matrix_us",
            "vs_adamw",
            "vs_floor",
            "vs_galore_torch",
        ]
        print(format_table(overhead, [(c, c) for c in cols]))
    meta.update(warmup=args.warmup, repeat=args.repeat)
    tag = "cpu" if args.device == "cpu" else args.device.split(":")[0]
    out = Path(args.results_dir)
    write_csv(out / f"step_{tag}.csv", rows, meta)
    written = [out / f"step_{tag}.csv"]
    if refreshes:
        written.append(write_csv(out / f"step_refresh_{tag}.csv", [*refreshes, *amortized], meta))
    if overhead:
        written.append(write_csv(out / f"step_overhead_{tag}.csv", overhead, meta))
    payload = {
        "meta": meta, "rows": rows, "refresh_rows": refreshes, "amortized_rows": amortized,
        "overhead_rows": overhead,
    }  # fmt: skip
    written.append(write_json(out / f"step_{tag}.json", payload))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
