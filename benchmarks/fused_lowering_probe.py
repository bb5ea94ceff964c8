"""Probe for a fused CPU lowering (issue 20, item 1, not built): Inductor C++ on load → update → store.

Usage: ``python benchmarks/fused_lowering_probe.py [--results-dir D]`` (one thread; fresh Inductor cache
per process is not forced: run it in a clean ``TORCHINDUCTOR_CACHE_DIR`` for cold numbers).

For one ``256×64`` low-rank state pair (the demo model's ``M×r``) and each storage precision (fp32, bf16,
int8 — the library's own ``Bf16Storage`` / ``Int8Storage`` ``load``/``store_``), the AdamW low-rank middle

    m ← lerp(m, X̃, 1−β₁),  v ← β₂ v + (1−β₂) X̃²,  D = −lr/(1−β₁ᵏ) · m / (sqrt(v/(1−β₂ᵏ)) + ε)

is run eagerly and as ``torch.compile(fn, dynamic=False, fullgraph=True)`` with ``k, lr, β₁, β₂, ε`` as 0-d
float64 tensor inputs. Reported per precision: cold compile seconds (first call), whether a call with new
hyperparameter values recompiled (Dynamo's unique-graph counter), whether the stored states after one step
are bit-identical to the eager ones, ``max |D_compiled − D_eager|``, and the median eager / compiled time of
one step (30 calls after 3 warm-up). Writes ``fused_lowering_probe.json`` with the metadata block.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from coap_compile.storage.bf16 import Bf16Storage
from coap_compile.storage.int8 import Int8Storage
from coap_lab.cli.report import format_table, metadata, write_json

M, R = 256, 64


class _Fp32:
    def load(self, stored, name):
        return stored[name]

    def store_(self, stored, name, value):
        stored[name].copy_(value)


def _stored(kind: str):
    if kind == "fp32":
        return _Fp32(), {"exp_avg": torch.zeros(M, R), "exp_avg_sq": torch.zeros(M, R)}
    st = Bf16Storage() if kind == "bf16" else Int8Storage()
    parts = {}
    for name, k in (("exp_avg", "first_moment"), ("exp_avg_sq", "second_moment")):
        parts.update(st.zeros(name, (M, R), kind=k, seed=1))
    return st, parts


def _step_fn(st):
    def step(stored, x, k, lr, b1, b2, eps):
        m, v = st.load(stored, "exp_avg"), st.load(stored, "exp_avg_sq")
        m2 = torch.lerp(m, x, 1 - b1)
        v2 = v * b2 + (1 - b2) * x * x
        d = -(lr / (1 - b1**k)) * m2 / ((v2 / (1 - b2**k)).sqrt() + eps)
        st.store_(stored, "exp_avg", m2)
        st.store_(stored, "exp_avg_sq", v2)
        return d

    return step


def _median_ms(fn, stored, args) -> float:
    for _ in range(3):
        fn(stored, *args)
    out = []
    for _ in range(30):
        t0 = time.perf_counter()
        fn(stored, *args)
        out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(out)


def probe(kind: str) -> dict[str, object]:
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    st, stored = _stored(kind)
    x = torch.randn(M, R, generator=torch.Generator().manual_seed(0)) * 1e-3
    hyp = [torch.tensor(v, dtype=torch.float64) for v in (1.0, 1e-3, 0.9, 0.999, 1e-8)]
    step = _step_fn(st)
    eager, comp = copy.deepcopy(stored), copy.deepcopy(stored)
    compiled = torch.compile(step, dynamic=False, fullgraph=True)
    t0 = time.perf_counter()
    d_c = compiled(comp, x, *hyp)
    cold = time.perf_counter() - t0
    d_e = step(eager, x, *hyp)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    hyp2 = [torch.tensor(v, dtype=torch.float64) for v in (2.0, 5e-4, 0.8, 0.99, 1e-6)]  # a scheduler's edit
    compiled(comp, x, *hyp2)
    step(eager, x, *hyp2)
    return {
        "precision": kind,
        "cold_compile_s": cold,
        "recompiled_on_new_hypers": dynamo_utils.counters["stats"]["unique_graphs"] != graphs,
        "states_bit_identical": all(torch.equal(eager[k], comp[k]) for k in eager),
        "max_abs_diff_D": float((d_c - d_e).abs().max()),
        "eager_ms": _median_ms(step, eager, (x, *hyp2)),
        "inductor_ms": _median_ms(compiled, comp, (x, *hyp2)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results-dir", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = metadata("cpu", sys.argv)
    rows = [probe(kind) for kind in ("fp32", "bf16", "int8")]
    for r in rows:
        r["speedup"] = r["eager_ms"] / r["inductor_ms"]
    print(format_table(rows, [(c, c) for c in rows[0]]))
    path = write_json(Path(args.results_dir) / "fused_lowering_probe.json", {"meta": meta, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
