"""``make gpu-check``: one offline check of a CUDA machine, in at most 8 minutes.

Runs with the Python and torch already installed (no venv, no downloads; this repository on
``PYTHONPATH``, or ``pip install --no-deps --no-build-isolation -e .``)::

    python -m coap_lab.gpucheck [--out gpu_check_results] [--budget 480] [--dry-run]

Parts, each with a time budget (seconds; a part whose budget exceeds the time left is skipped, and the
summary says so; a subprocess that overruns its budget is killed and reported as ``timeout``):

========== ====== ========================================================================================
part       budget what
========== ====== ========================================================================================
versions       10 Python, torch, triton, CUDA, the GPU's name and capability, this repository's commit
pytest        200 ``pytest -m cuda tests/`` (the CUDA-marked tests: real kernels against the eager twins)
kernels       110 ``coap-compile bench kernels`` on LLaMA-1B's FFN shape (bf16, r = 512), with floors
model         110 one ``optimizer.step()`` of LLaMA-350M-shaped bf16 weights (random gradients): torch's
                  fused AdamW against COAP (rank 256, ``backend="auto"``: the generated kernels), each
                  with its floor (bytes at the measured copy bandwidth + the projection GEMMs at the
                  measured bf16 matmul rate), and the Triton launches of COAP's steady step
                  (``coap_launches_per_step``: one grouped K1 + K2 per distinct state shape)
========== ====== ========================================================================================

Everything goes under ``<out>/<UTC timestamp>/``: ``summary.json`` (versions, each part's status,
seconds and results), ``pytest.log`` + ``pytest.xml``, ``kernels/kernels_cuda.{csv,json}`` +
``kernels.log``, ``model.json``. ``--dry-run`` (CPU, CI) plans the parts, imports every module they use,
checks that they exist (test files with the ``cuda`` marker, the ``bench kernels`` command) and prints the
plan, writing nothing; it exits 1 if something is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["PARTS", "main", "model_floors", "plan", "run_part"]

ROOT = Path(__file__).resolve().parent.parent
#: (part, budget in seconds); the total stays under 8 minutes with the default budget of 480 s.
PARTS = (("versions", 10), ("pytest", 200), ("kernels", 110), ("model", 110))
KERNEL_ARGS = ["bench", "kernels", "--cases", "2048x5461:512", "--dtypes", "bf16",
               "--variants", "adamw_fused,kernels_ieee,kernels_tf32x3"]  # fmt: skip
MODEL, MODEL_RANK = "350m", 256


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), path) if p)}


def cuda_test_files() -> list[str]:
    """The test files that carry the ``cuda`` marker."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())  # fmt: skip


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "host": platform.node()}  # fmt: skip
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError as e:
        out["triton"] = f"not importable ({e})"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    out["commit"] = git.stdout.strip() if git.returncode == 0 else "unknown (no git)"
    return out


def _subprocess(cmd: list[str], log: Path, timeout: float) -> dict:
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                                timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "command": " ".join(cmd), "log": log.name}
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    return {"status": "ok" if rc == 0 else "failed", "rc": rc, "command": " ".join(cmd), "log": log.name,
            "last_line": tail[0]}  # fmt: skip


def model_floors(shapes: list[tuple[int, int]], rank: int, w_bytes: int, ceil: dict) -> dict[str, float]:
    """Floors (ms) of one step over ``shapes``: torch's AdamW (read W, G, m, v; write W, m, v, in W's
    dtype) against COAP (per matrix, ``M = max``, ``N = min``, ``r = min(rank, N)``: K1 reads G, P and
    the fp32 states, writes them and D; K2 reads D, P, reads and writes W; flops 2·2·M·N·r at the bf16
    matmul rate, since ``input_precision="auto"`` multiplies bf16 weights' operands in bf16)."""
    bw, rate = ceil["copy_GBps"] * 1e9, ceil["mm_bf16_TFLOPs"] * 1e12
    adamw = sum(m * n for m, n in shapes) * 7 * w_bytes / bw
    lowrank = 0.0
    for m, n in shapes:
        big, small = max(m, n), min(m, n)
        r = min(rank, small)
        k1_bytes = big * small * w_bytes + small * r * 4 + big * r * (2 * 2 * 4 + 4)
        k2_bytes = big * r * 4 + small * r * 4 + 2 * big * small * w_bytes
        flops = 2 * big * small * r
        lowrank += max(k1_bytes / bw, flops / rate) + max(k2_bytes / bw, flops / rate)
    return {"adamw_ms": adamw * 1e3, "coap_ms": lowrank * 1e3}


def _model_shapes() -> list[tuple[int, int]]:
    from coap_lab.models.llama import LLAMA_CONFIGS

    c = LLAMA_CONFIGS[MODEL]
    d, f = c.hidden_size, c.intermediate_size
    layer = [(d, d)] * 4 + [(f, d), (f, d), (d, f)]
    return layer * c.num_layers + [(c.vocab_size, d), (c.vocab_size, d)]


def run_model(out: Path) -> dict:
    """One step of each optimizer on LLaMA-350M-shaped bf16 weights (module docstring)."""
    import torch
    import triton.testing

    import coap_compile
    from coap_lab.cli.kernelbench import measure_ceilings

    shapes = _model_shapes()
    ceil = measure_ceilings("cuda", size_mib=512, mm=4096)
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"model": MODEL, "rank": MODEL_RANK, "matrices": len(shapes), "ceilings": ceil,
              "floors": model_floors(shapes, MODEL_RANK, 2, ceil)}  # fmt: skip
    for name in ("adamw_fused", "coap"):
        bf16 = torch.bfloat16
        params = [
            torch.nn.Parameter(0.02 * torch.randn(s, device="cuda", generator=gen, dtype=bf16))
            for s in shapes
        ]
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen, dtype=torch.bfloat16) * 1e-3
        if name == "adamw_fused":
            opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        else:
            opt = coap_compile.optimize(params, torch.optim.AdamW, rank=MODEL_RANK, lr=1e-3,
                                        update_interval=10**6, check_finite=False)  # fmt: skip
        opt.step()  # initialize (P from the first gradient)
        if name == "coap":  # Triton launches of a steady step: 2 per distinct state shape when grouped
            from coap_compile.kernels import count_launches

            with count_launches() as launches:
                opt.step()
            result["coap_launches_per_step"] = sum(launches.values())
            result["coap_matrix_groups"] = len(opt.plan.matrix_groups)
        torch.cuda.synchronize()
        ms = float(triton.testing.do_bench(opt.step, warmup=5, rep=50, return_mode="median"))
        result[f"{name}_ms"] = ms
        del opt, params
        torch.cuda.empty_cache()
    result["adamw_vs_floor"] = result["adamw_fused_ms"] / result["floors"]["adamw_ms"]
    result["coap_vs_floor"] = result["coap_ms"] / result["floors"]["coap_ms"]
    (out / "model.json").write_text(json.dumps(result, indent=2))
    return {"status": "ok", **result}


def run_part(name: str, out: Path, timeout: float) -> dict:
    if name == "versions":
        return {"status": "ok", **versions()}
    if name == "pytest":
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
               f"--junitxml={out / 'pytest.xml'}", *cuda_test_files()]  # fmt: skip
        return _subprocess(cmd, out / "pytest.log", timeout)
    if name == "kernels":
        cmd = [sys.executable, "-m", "coap_lab", *KERNEL_ARGS, "--results-dir", str(out / "kernels")]
        return _subprocess(cmd, out / "kernels.log", timeout)
    if name == "model":  # a subprocess too, so that its budget is enforced
        cmd = [sys.executable, "-m", "coap_lab.gpucheck", "--part", "model", "--out", str(out)]
        res = _subprocess(cmd, out / "model.log", timeout)
        if (out / "model.json").exists():
            res.update(json.loads((out / "model.json").read_text()))
        return res
    raise ValueError(f"unknown part {name!r}; expected one of {[p for p, _ in PARTS]}")


def plan() -> tuple[list[str], list[str]]:
    """The dry run: (lines of the plan, problems). Imports every module the parts use."""
    import importlib

    lines, problems = [], []
    for mod in ("torch", "pytest", "coap_compile", "coap_lab.cli.main", "coap_lab.cli.kernelbench",
                "coap_lab.models.llama", "triton"):  # fmt: skip
        try:
            importlib.import_module(mod)
        except ImportError as e:
            problems.append(f"cannot import {mod}: {e}")
    files = cuda_test_files()
    if not files:
        problems.append("no test file under tests/ carries the cuda marker")
    from coap_lab.cli.main import build_parser

    try:
        build_parser().parse_args([*KERNEL_ARGS, "--results-dir", "x"])
    except (SystemExit, ValueError):  # the CLI's parser raises its UsageError (a ValueError)
        problems.append(f"the bench command does not accept: coap-compile {' '.join(KERNEL_ARGS)}")
    shapes = _model_shapes()
    detail = {
        "versions": "python, torch, triton, CUDA, GPU name, commit",
        "pytest": f"pytest -m cuda on {len(files)} files: {', '.join(files)}",
        "kernels": f"coap-compile {' '.join(KERNEL_ARGS)}",
        "model": f"LLaMA-{MODEL} bf16, {len(shapes)} matrices, rank {MODEL_RANK}: fused AdamW vs COAP",
    }
    for name, budget in PARTS:
        lines.append(f"{name:<9} {budget:>4} s  {detail[name]}")
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coap_lab.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "gpu_check_results"), help="(default %(default)s)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds in all (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="plan, import, check the parts; run nothing")
    parser.add_argument("--part", choices=["model"], help=argparse.SUPPRESS)  # the model part's subprocess
    args = parser.parse_args(argv)
    if args.part == "model":
        run_model(Path(args.out))
        return 0
    if args.dry_run:
        lines, problems = plan()
        print(f"gpu-check plan (budget {args.budget:.0f} s, results under {args.out}/<timestamp>/):")
        print("\n".join("  " + line for line in lines))
        for p in problems:
            print(f"MISSING: {p}")
        return 1 if problems else 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA device (torch.cuda.is_available() is False); try --dry-run")
        return 2
    out = Path(args.out) / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    start, summary = time.monotonic(), {"parts": {}, "budget_s": args.budget}
    for name, budget in PARTS:
        left = args.budget - (time.monotonic() - start)
        if budget > left:
            res = {"status": "skipped", "reason": f"budget {budget} s > {left:.0f} s left"}
        else:
            t0 = time.monotonic()
            try:
                res = run_part(name, out, budget)
            except Exception as e:  # one failing part does not stop the others
                res = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            res["seconds"] = round(time.monotonic() - t0, 1)
        summary["parts"][name] = res
        note = res.get("reason", res.get("last_line", ""))
        print(f"{name}: {res['status']} {res.get('seconds', '')} s {note}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["total_s"] = round(time.monotonic() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"results: {out}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in summary["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
