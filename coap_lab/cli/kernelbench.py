"""Kernel step benchmark (CUDA): fused AdamW vs eager low-rank vs Inductor vs the generated kernels.

For one ``m×n`` weight, rank ``r``, weight dtype ``w`` (bytes ``b_w``), float32 states, it times the
steady-state ``optimizer.step()`` (no projector refresh in the timed window) of

* ``adamw_fused``      ``torch.optim.AdamW(fused=True)`` on the full weight;
* ``lowrank_eager``    ``coap_compile.optimize(..., backend="eager")``: torch ops, unfused;
* ``lowrank_inductor`` the same step under ``torch.compile(mode="max-autotune-no-cudagraphs")``;
* ``kernels_ieee`` / ``kernels_tf32x3``  the generated K1 + K2 kernels (``backend="triton"``).

Each time is reported with its **floor**: ``Σ_kernel max(bytes / copy bandwidth, flops / matmul rate)``
with the two ceilings measured once on the machine (a device-to-device copy; a float32 and a bf16
matmul). Bytes count each input read once and each output written once (``M = max(m, n)``,
``N = min(m, n)``)::

    AdamW (elementwise):  m·n·(2·b_w + b_g + 16)                        flops ≈ 0
    K1  (X P + states):   M·N·b_g + N·r·4 + M·r·(4·4 + 4)               flops 2·M·N·r
    K2  (W ← decay·W + D Pᵀ): M·r·4 + N·r·4 + 2·M·N·b_w                  flops 2·M·N·r

Before timing, every low-rank variant's weight update over 3 steps is compared with a float64 eager
run started from the same ``P`` and states (relative error of the update, reported in the CSV).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import coap_compile

__all__ = ["VARIANTS", "floors", "measure_ceilings", "run_kernel_bench", "run_kernels"]

VARIANTS = ("adamw_fused", "lowrank_eager", "lowrank_inductor", "kernels_ieee", "kernels_tf32x3")
DEFAULT_CASES = tuple(
    (m, n, r) for m, n in ((2048, 2048), (2048, 5461), (5461, 2048)) for r in (128, 256, 512)
)


def _bench(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds (``triton.testing.do_bench`` on CUDA, perf_counter elsewhere)."""
    if device.startswith("cuda"):
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    for _ in range(2):
        fn()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def measure_ceilings(device: str, size_mib: int = 1024, mm: int = 8192) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write counted) and matmul rates (TFLOP/s, fp32 without tf32, bf16)."""
    n = size_mib * 2**20 // 4
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    t = _bench(lambda: b.copy_(a), device)
    out = {"copy_GBps": 2 * a.numel() * 4 / (t * 1e-3) / 1e9}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            x = torch.randn(mm, mm, device=device, dtype=dtype)
            t = _bench(lambda x=x: x @ x, device)
            out[f"mm_{name}_TFLOPs"] = 2 * mm**3 / (t * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def floors(m: int, n: int, r: int, w_bytes: int, ceil: dict[str, float]) -> dict[str, float]:
    """Floor in milliseconds per variant family (see the module docstring)."""
    big, small, g_bytes = max(m, n), min(m, n), w_bytes
    bw = ceil["copy_GBps"] * 1e9
    rate = ceil["mm_fp32_TFLOPs"] * 1e12
    adamw = m * n * (2 * w_bytes + g_bytes + 16) / bw
    k1 = max((big * small * g_bytes + small * r * 4 + big * r * 20) / bw, 2 * big * small * r / rate)
    k2 = max((big * r * 4 + small * r * 4 + 2 * big * small * w_bytes) / bw, 2 * big * small * r / rate)
    return {"adamw": adamw * 1e3, "lowrank": (k1 + k2) * 1e3}


def _optimizer(variant: str, w: torch.nn.Parameter, r: int, lr):
    if variant == "adamw_fused":
        return torch.optim.AdamW([w], lr=lr, fused=w.is_cuda)
    backend = "eager" if variant.startswith("lowrank") else "triton"
    precision = variant.split("_")[1] if variant.startswith("kernels") else "ieee"
    return coap_compile.optimize(
        [{"params": [w], "project": True}],
        torch.optim.AdamW,
        rank=r,
        lr=lr,
        update_interval=10**9,
        backend=backend,
        input_precision=precision,
        check_finite=False,
    )


def _setup(variant: str, m: int, n: int, r: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter((torch.randn(m, n, generator=gen) * 0.02).to(device=device, dtype=dtype))
    w.grad = (torch.randn(m, n, generator=gen) * 1e-3).to(device=device, dtype=dtype)
    opt = _optimizer(variant, w, r, torch.tensor(1e-3, device="cpu") if variant != "adamw_fused" else 1e-3)
    opt.step()  # initialise (P from the first gradient)
    step = opt.step
    if variant == "lowrank_inductor":
        step = torch.compile(opt.step, mode="max-autotune-no-cudagraphs")
    return w, opt, step


def _rel_error_vs_fp64(variant: str, m: int, n: int, r: int, dtype: torch.dtype, device: str) -> float:
    """‖ΔW − ΔW₆₄‖ / ‖ΔW₆₄‖ over 3 steps, where the float64 eager run starts from this run's ``P`` and
    states (copied after the initialising step), so only the step arithmetic is compared, not the
    float32-vs-float64 difference of the SVD that computes ``P`` (which Adam's sign-like early steps
    amplify for entries of ``X P`` near ``eps``)."""
    w, opt, step = _setup(variant, m, n, r, dtype, device)
    w64, opt64, step64 = _setup("lowrank_eager", m, n, r, torch.float64, "cpu")
    with torch.no_grad():
        w64.copy_(w.detach().double().cpu())
        for key, value in opt.state[w].items():
            opt64.state[w64][key].copy_(value.cpu())
    w0 = w64.detach().clone()
    for _ in range(3):
        step()
        step64()
    ref = w64.detach() - w0
    return float((w.detach().double().cpu() - w0 - ref).norm() / ref.norm())


def run_kernel_bench(
    device: str = "cuda", cases=DEFAULT_CASES, dtypes=("fp32", "bf16"), variants=VARIANTS, log=print
) -> tuple[list[dict], dict[str, float]]:
    """Check, then time every (case, dtype, variant); returns (rows, measured ceilings)."""
    ceil = (
        measure_ceilings(device)
        if device.startswith("cuda")
        else {"copy_GBps": 10.0, "mm_fp32_TFLOPs": 0.1, "mm_bf16_TFLOPs": 0.1}
    )
    rows = []
    for m, n, r in cases:
        for dname in dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
            fl = floors(m, n, r, torch.empty((), dtype=dtype).element_size(), ceil)
            for variant in variants:
                floor = fl["adamw"] if variant == "adamw_fused" else fl["lowrank"]
                err = (
                    float("nan")
                    if variant == "adamw_fused"
                    else _rel_error_vs_fp64(variant, m, n, r, dtype, device)
                )
                _, _, step = _setup(variant, m, n, r, dtype, device)
                ms = _bench(step, device)
                rows.append(
                    {
                        "m": m,
                        "n": n,
                        "rank": r,
                        "dtype": dname,
                        "variant": variant,
                        "median_ms": ms,
                        "floor_ms": floor,
                        "vs_floor": ms / floor,
                        "rel_err_vs_fp64": err,
                    }
                )
                log(f"{m}x{n} r={r} {dname} {variant:<17} {ms:9.3f} ms  floor {floor:8.3f}  err {err:.1e}")
    return rows, ceil


def run_kernels(args) -> int:
    """``bench kernels``: check and time, print a table, write ``kernels_<device>.{csv,json}``."""
    from pathlib import Path

    from coap_lab.cli.report import format_table, metadata, write_csv, write_json
    from coap_lab.cli.stepbench import parse_shapes

    meta = metadata(args.device, args.argv)
    cases = tuple(parse_shapes(args.cases)) if args.cases else DEFAULT_CASES
    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants else VARIANTS
    dtypes = tuple(d.strip() for d in args.dtypes.split(","))
    rows, ceil = run_kernel_bench(args.device, cases=cases, dtypes=dtypes, variants=variants)
    cols = ["m", "n", "rank", "dtype", "variant", "median_ms", "floor_ms", "vs_floor", "rel_err_vs_fp64"]
    print(format_table(rows, [(c, c) for c in cols]))
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name(args.device)
    meta.update({f"ceiling_{k}": v for k, v in ceil.items()})
    tag = "cuda" if args.device.startswith("cuda") else "cpu_smoke"
    out = Path(args.results_dir)
    write_csv(out / f"kernels_{tag}.csv", rows, meta)
    write_json(out / f"kernels_{tag}.json", {"meta": meta, "rows": rows})
    return 0
