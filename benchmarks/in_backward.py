"""Peak live gradient bytes: normal path vs in-backward updates vs in-backward + projected accumulation.

Usage: ``python benchmarks/in_backward.py [--models demo,60m] [--micro 4] [--seq 32] [--results-dir D]``
writes ``benchmarks/results/in_backward.{csv,json}`` (the metadata block of :mod:`coap_lab.cli.report`).

What is counted: the bytes of every live ``p.grad`` plus the in-backward accumulators ``Σ Xᵢ P``,
sampled in a ``register_post_accumulate_grad_hook`` registered before the in-backward hooks (so it runs
first on every parameter) and once after each backward pass. Gradients are only created by autograd's
``AccumulateGrad`` right before those hooks, so the maximum of the samples is the maximum over time of
that sum. Not counted: autograd's transient buffers (activation gradients, the incoming gradient that
``AccumulateGrad`` adds in place) and the temporaries inside one parameter's update; those are the same
with or without in-backward updates and bounded by one layer. Each measured peak must equal its closed
form (below) exactly, or the script fails.

Closed forms (``S_p`` = bytes of parameter ``p``; ``P`` projected, ``F`` full-rank; ``M_p = max(m, n)``):

* normal (``loss.backward()`` ×N, then ``opt.step()``): ``Σ_p S_p`` (every gradient alive at the step);
* in-backward, no accumulation: ``max_p S_p`` (one gradient at a time);
* in-backward + accumulation, a window with a P refresh due (every ``update_interval`` steps, the init
  included): ``Σ_p S_p`` (the refresh reads the summed full gradient, :mod:`coap_compile.runtime.inbackward`);
* in-backward + accumulation, a window without a refresh:
  ``Σ_{p∈P} 4 M_p r + Σ_{p∈F} S_p + max_{p∈P} S_p`` (the ``M×r`` accumulators, the full-rank gradients
  autograd accumulates, and the one projected gradient being projected), reached in the second
  micro-batch, once every accumulator exists and before the boundary frees any: so for ``N ≥ 3``
  (with ``N = 2`` it is an upper bound, since the boundary steps and frees as it goes).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import coap_compile  # noqa: E402
from coap_lab.cli.report import format_table, metadata, write_csv, write_json  # noqa: E402
from coap_lab.models import LLAMA_CONFIGS, PAPER_RANKS, build_llama, demo_config  # noqa: E402

__all__ = ["LiveGradientBytes", "closed_forms", "main", "measure"]

RESULTS = ROOT / "benchmarks" / "results"


class LiveGradientBytes:
    """Peak of live ``.grad`` bytes + accumulator bytes (module docstring); ``reset()`` restarts it."""

    def __init__(self, model: nn.Module) -> None:
        self.params, self.handle, self.peak = list(model.parameters()), None, 0
        self.hooks = [p.register_post_accumulate_grad_hook(self.sample) for p in self.params]

    def sample(self, _p: torch.Tensor | None = None) -> None:
        live = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        acc = self.handle.accumulator_bytes() if self.handle is not None else 0
        self.peak = max(self.peak, live + acc)


def _model(name: str, seq: int):
    cfg = demo_config(max_seq_len=seq) if name == "demo" else LLAMA_CONFIGS[name]
    rank = 64 if name == "demo" else PAPER_RANKS[name]
    return cfg, rank


def closed_forms(model: nn.Module, opt: coap_compile.CoapOptimizer, rank: int) -> dict[str, int]:
    """The four closed forms of the module docstring, from shapes alone."""
    projected = opt.projected_parameters()
    size = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    proj_ids = {id(p) for p in projected}
    full = sum(v for k, v in size.items() if k not in proj_ids)
    lowrank = sum(max(p.shape) * rank * 4 for p in projected)
    return {
        "normal": sum(size.values()),
        "in_backward": max(size.values()),
        "in_backward_accum_refresh": sum(size.values()),
        "in_backward_accum_no_refresh": lowrank + full + max(size[id(p)] for p in projected),
    }


def measure(name: str, micro: int, seq: int, batch: int = 1) -> list[dict[str, object]]:
    """Rows for model ``name``: each mode's measured peak next to its closed form (asserted equal)."""
    cfg, rank = _model(name, seq)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen) for _ in range(2 * micro)]
    kw = {"rank": rank, "update_interval": 200, "lr": 1e-3, "weight_decay": 0.0}
    rows = []

    def run(mode: str) -> tuple[list[int], dict[str, int], float]:
        model = build_llama(cfg, seed=0)
        opt = coap_compile.optimize(model, torch.optim.AdamW, **kw)
        tracker = LiveGradientBytes(model)
        steps = {"normal": micro, "in_backward": 1, "in_backward_accum": micro}[mode]
        if mode != "normal":
            tracker.handle = coap_compile.step_in_backward(model, opt, accumulation_steps=steps)
        peaks, t0 = [], time.perf_counter()
        for window in range(2):  # window 0: k = 0 (init: a refresh), window 1: k = 1 (no refresh)
            tracker.peak = 0
            for i in range(steps):
                (model.loss(ids[window * micro + i]) / steps).backward()
                tracker.sample()
            opt.step()
            opt.zero_grad()
            peaks.append(tracker.peak)
        return peaks, closed_forms(model, opt, rank), time.perf_counter() - t0

    for mode in ("normal", "in_backward", "in_backward_accum"):
        peaks, forms, seconds = run(mode)
        n_params = sum(p.numel() for p in build_llama(cfg, seed=0, device="meta").parameters())
        windows = [("refresh (k=0)", peaks[0]), ("no refresh (k=1)", peaks[1])]
        for window, peak in windows:
            key = mode
            if mode == "in_backward_accum":
                key += "_refresh" if window.startswith("refresh") else "_no_refresh"
            if peak != forms[key]:
                raise AssertionError(f"{name} {mode} {window}: measured {peak} B, closed form {forms[key]} B")
            rows.append({
                "model": name, "params": n_params, "rank": rank,
                "micro_batches": 1 if mode == "in_backward" else micro,
                "mode": mode, "window": window, "peak_grad_bytes": peak, "closed_form_bytes": forms[key],
                "peak_MiB": round(peak / 2**20, 2), "vs_normal": round(peak / forms["normal"], 4),
                "seconds_two_steps": round(seconds, 2),
            })  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="demo,60m", help="comma list of demo, 60m, 130m, ...")
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per step (accumulation)")
    ap.add_argument("--seq", type=int, default=32, help="sequence length (does not change the bytes)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    for m in args.models.split(","):
        if m != "demo" and m not in LLAMA_CONFIGS:
            ap.error(f"--models: unknown model {m!r}; allowed: demo, {', '.join(LLAMA_CONFIGS)}")
    if args.micro < 3:
        ap.error(f"--micro must be >= 3 (the closed forms' accumulation window), got {args.micro}")
    torch.set_num_threads(1)
    meta = metadata("cpu", argv=["benchmarks/in_backward.py", *(sys.argv[1:] if argv is None else argv)])
    rows = [r for m in args.models.split(",") for r in measure(m, args.micro, args.seq)]
    cols = [(k, k) for k in ("model", "mode", "window", "peak_grad_bytes", "closed_form_bytes", "peak_MiB",
                             "vs_normal")]  # fmt: skip
    print(format_table(rows, cols))
    write_csv(args.results_dir / "in_backward.csv", rows, meta)
    write_json(args.results_dir / "in_backward.json", {"meta": meta, "closed_forms": __doc__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
