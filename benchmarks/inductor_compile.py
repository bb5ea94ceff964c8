"""Compile cost of ``backend="inductor"`` (issue 20, item 1): cold and warm, per state precision, demo LM.

Usage: ``python benchmarks/inductor_compile.py [--precisions fp32,bf16,int8] [--results-dir D]``.

For each precision, two fresh processes share one new ``TORCHINDUCTOR_CACHE_DIR``: the first compiles
cold (empty on-disk cache), the second warm (Inductor's FX-graph and C++ caches filled by the first). Each
builds the demo LM (:func:`coap_lab.models.demo_config`, the ``bench step --overhead demo`` case) with
COAP-AdamW at rank ratio 4 and ``backend="inductor"``, and times its first ``opt.step()`` (which compiles
every signature: one per matrix group and per matrix alone) and the second (steady, for reference).
Reported: signatures compiled, seconds spent compiling (``lowering.inductor.STATS``), first and second
step seconds, with the machine metadata and load average. Writes ``inductor_compile.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(2)
from coap_compile.lowering import inductor
from coap_lab.cli.overhead import build_case
from coap_lab.cli.optimizers import build_optimizer
model, ranks = build_case("demo", "cpu")
name = {"fp32": "coap-inductor", "bf16": "coap-bf16-inductor", "int8": "coap-int8-inductor"}[sys.argv[1]]
opt = build_optimizer(name, model, lr=1e-4, **ranks)
t0 = time.perf_counter(); opt.step(); t1 = time.perf_counter(); opt.step(); t2 = time.perf_counter()
print(json.dumps({"signatures": inductor.STATS["compiles"], "compile_s": inductor.STATS["compile_s"],
                  "first_step_s": t1 - t0, "second_step_s": t2 - t1,
                  "fallbacks": inductor.STATS["fallbacks"]}))
"""


def _child(precision: str, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD, precision], env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from coap_lab.cli.report import format_table, metadata, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precisions", default="fp32,bf16,int8")
    ap.add_argument("--results-dir", default="benchmarks/results")
    args = ap.parse_args()
    meta = metadata("cpu", sys.argv)
    rows = []
    for precision in args.precisions.split(","):
        with tempfile.TemporaryDirectory(prefix="inductor_cache_") as cache:
            for phase in ("cold", "warm"):
                t0 = time.perf_counter()
                r = _child(precision, cache)
                wall = time.perf_counter() - t0
                row = {"precision": precision, "cache": phase, **r, "process_s": wall}
                rows.append({**row, "loadavg_1m": os.getloadavg()[0]})
                print(rows[-1], flush=True)
    print(format_table(rows, [(c, c) for c in rows[0]]))
    path = write_json(Path(args.results_dir) / "inductor_compile.json", {"meta": meta, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
