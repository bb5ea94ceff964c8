"""Host time of a kernel-path step (issue 22): grouped launches vs per matrix, launches stubbed out.

Usage: ``TRITON_INTERPRET=1 python benchmarks/kernel_host_overhead.py [--results-dir D]`` (one thread).

On a GPU the launches are asynchronous, so a steady step costs the host its Python work: scheduling,
the scalar vectors ``c``, argument checks, member tables, custom-op dispatch and the launch calls. This
measures that work on CPU for ``backend="triton"`` with ``kernels.launch._launch`` replaced by a no-op
(the results are garbage, the host path is the real one) on a LLaMA-shaped model of 8 decoder layers
(d = 64, SwiGLU 128: 56 projected matrices in 2 state shapes, rank 16, ``check_finite=False``):

* ``grouped``: the default, one grouped K1 + K2 call per run (``runtime/grouped_kernels.py``);
* ``per_matrix``: ``grouped=False`` (one op call, K1 + K2, per matrix);
* ``per_matrix_reregister``: ``per_matrix`` with every parameter's stored kernel plan re-derived each
  step, as the step did before this change (``Epilogue.key()`` printed sympy per matrix and step).

Thread CPU time (``time.thread_time``) per ``opt.step()``: median over 5 interleaved rounds × 20 steps
after 3 warm-up steps. Writes ``kernel_host_overhead.json`` with the metadata block.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import coap_compile
from coap_compile.kernels import launch
from coap_lab.cli.report import format_table, metadata, write_json
from coap_lab.models.llama import LlamaConfig, build_llama

CONFIG = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=2,
                     max_seq_len=16)  # fmt: skip
VARIANTS = ("grouped", "per_matrix", "per_matrix_reregister")


def _optimizer(variant: str):
    torch.manual_seed(0)
    model = build_llama(CONFIG)
    named = list(model.named_parameters())
    proj = [p for n, p in named if ".layers." in n and p.ndim == 2]
    rest = [p for n, p in named if not (".layers." in n and p.ndim == 2)]
    opt = coap_compile.optimize(
        [{"params": proj, "project": True}, {"params": rest, "project": False}], torch.optim.AdamW,
        rank=16, lr=1e-3, update_interval=10**6, backend="triton", grouped=variant == "grouped",
        check_finite=False,
    )  # fmt: skip
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # init (real launches under the interpreter)
    return opt, len(proj)


def _step(opt, variant: str) -> float:
    if variant == "per_matrix_reregister":
        opt._runner.stored_plans.clear()
    t = time.thread_time()
    opt.step()
    return time.thread_time() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results-dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    meta = metadata("cpu", sys.argv)
    meta["load_average_start"] = os.getloadavg()
    opts = {v: _optimizer(v) for v in VARIANTS}
    real = launch._launch
    launch._launch = lambda *a, **k: None
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for v in VARIANTS:
            for _ in range(3):
                _step(opts[v][0], v)
        for _ in range(5):
            for v in VARIANTS:
                times[v] += [_step(opts[v][0], v) for _ in range(20)]
    finally:
        launch._launch = real
    meta["load_average_end"] = os.getloadavg()
    base = statistics.median(times["grouped"])
    rows = []
    for v in VARIANTS:
        med = statistics.median(times[v])
        rows.append({"variant": v, "matrices": opts[v][1], "host_ms_per_step": round(med * 1e3, 3),
                     "host_us_per_matrix": round(med * 1e6 / opts[v][1], 1),
                     "vs_grouped": round(med / base, 2)})  # fmt: skip
    cols = [(k, k) for k in ("variant", "matrices", "host_ms_per_step", "host_us_per_matrix", "vs_grouped")]
    print(format_table(rows, cols))
    path = write_json(Path(args.results_dir) / "kernel_host_overhead.json", {"meta": meta, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
