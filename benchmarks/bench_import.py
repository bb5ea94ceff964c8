"""``import coap_compile`` time on top of ``import torch``, in fresh interpreters (issue 14).

Usage::

    python benchmarks/bench_import.py            # 9 fresh interpreters → benchmarks/results/import_time.json

Each run is a new ``python -c`` that times ``import torch`` and then ``import coap_compile`` with
``time.perf_counter`` and reports whether Dynamo/Inductor got imported. The table is the median and the
minimum over the runs (the minimum is the least disturbed by other load; both are reported).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coap_lab.cli.report import metadata, write_json

PROBE = """
import sys, time, json
t0 = time.perf_counter(); import torch
t1 = time.perf_counter(); import coap_compile
t2 = time.perf_counter()
heavy = [m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules]
print(json.dumps({"torch_s": t1 - t0, "coap_compile_s": t2 - t1, "heavy": heavy}))
"""


def main(runs: int = 9) -> int:
    meta = metadata("cpu")
    samples = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300
        )
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {
        key: {"median_s": statistics.median(s[key] for s in samples), "min_s": min(s[key] for s in samples)}
        for key in ("torch_s", "coap_compile_s")
    }
    summary["dynamo_or_inductor_imported"] = sorted({m for s in samples for m in s["heavy"]})
    for key in ("torch_s", "coap_compile_s"):
        print(
            f"import {key[:-2]:13} median {summary[key]['median_s']:.3f} s, min {summary[key]['min_s']:.3f} s"
        )
    print(
        "Dynamo/Inductor imported by `import coap_compile`:", summary["dynamo_or_inductor_imported"] or "none"
    )
    path = write_json(
        Path(__file__).parent / "results" / "import_time.json",
        {"meta": meta, "summary": summary, "samples": samples},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
