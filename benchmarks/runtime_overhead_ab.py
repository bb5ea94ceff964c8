"""``opt.step()`` overhead before and after the runtime redesign (issue 17), interleaved in one run.

Usage: ``python benchmarks/runtime_overhead_ab.py --before DIR --after DIR [--pairs 5] [--results-dir D]``

``DIR`` is a source tree (a ``git worktree`` of the commit to compare). Each *pair* runs one process per
tree, in turn (before, after, before, after, …), each timing ``bench step --overhead``'s rows
(``coap_lab.cli.overhead.overhead_rows``, or ``coap_compile.cli.overhead`` in trees older than the
``coap_lab`` split) for ``adamw``, ``coap`` (grouped) and ``coap-per-matrix`` on both cases (the demo LM,
16 × 64×64). What is compared is each process's COAP/AdamW ratio of medians, measured in the same process
(so a drift in the machine's speed between processes cancels), then the median over pairs per tree, and
``after/before`` of those medians. Writes ``runtime_overhead_ab.{csv,json}`` with the metadata block.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, torch
torch.set_num_threads(2)
try:
    from coap_lab.cli.overhead import overhead_rows
except ImportError:
    from coap_compile.cli.overhead import overhead_rows
rows = overhead_rows(optimizers=("adamw", "coap", "coap-per-matrix"), rounds=3)
print("ROWS" + json.dumps([{k: r[k] for k in ("case", "optimizer", "median_ms", "vs_adamw")} for r in rows]))
"""


def run_tree(tree: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=tree, env=env, capture_output=True, text=True, check=True
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("ROWS"))
    return json.loads(line[4:])


def git_commit(tree: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True
    ).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--results-dir", default="benchmarks/results")
    args = ap.parse_args()
    samples: dict[tuple[str, str, str], list[float]] = {}
    for i in range(args.pairs):
        for label, tree in (("before", args.before), ("after", args.after)):
            for row in run_tree(tree):
                for metric in ("median_ms", "vs_adamw"):
                    samples.setdefault((label, row["case"], row["optimizer"], metric), []).append(row[metric])
        print(f"pair {i + 1}/{args.pairs} done", flush=True)
    rows = []
    cases = sorted({k[1] for k in samples})
    for case in cases:
        for opt in ("adamw", "coap", "coap-per-matrix"):
            b_ms = statistics.median(samples[("before", case, opt, "median_ms")])
            a_ms = statistics.median(samples[("after", case, opt, "median_ms")])
            b_r = statistics.median(samples[("before", case, opt, "vs_adamw")])
            a_r = statistics.median(samples[("after", case, opt, "vs_adamw")])
            rows.append({
                "case": case, "optimizer": opt, "before_ms": round(b_ms, 4), "after_ms": round(a_ms, 4),
                "before_vs_adamw": round(b_r, 4), "after_vs_adamw": round(a_r, 4),
                "after_over_before_ratio": round(a_r / b_r, 4),
                "ratio_spread_before": [round(min(samples[("before", case, opt, "vs_adamw")]), 4),
                                        round(max(samples[("before", case, opt, "vs_adamw")]), 4)],
                "ratio_spread_after": [round(min(samples[("after", case, opt, "vs_adamw")]), 4),
                                       round(max(samples[("after", case, opt, "vs_adamw")]), 4)],
            })  # fmt: skip
    try:
        from coap_lab.cli.report import metadata
    except ImportError:  # pragma: no cover - the after tree has coap_lab
        metadata = None
    meta = (
        dict(metadata("cpu", ["python", "benchmarks/runtime_overhead_ab.py", *sys.argv[1:]]))
        if metadata
        else {}
    )
    meta.update({"before_commit": git_commit(args.before), "after_commit": git_commit(args.after),
                 "pairs": args.pairs})  # fmt: skip
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime_overhead_ab.json").write_text(
        json.dumps({"metadata": meta, "rows": rows}, indent=2) + "\n"
    )
    head = [
        "case",
        "optimizer",
        "before_ms",
        "after_ms",
        "before_vs_adamw",
        "after_vs_adamw",
        "after_over_before_ratio",
    ]
    lines = [f"# {k}: {v}" for k, v in meta.items()] + [",".join(head)]
    lines += [",".join(str(r[h]) for h in head) for r in rows]
    (out / "runtime_overhead_ab.csv").write_text("\n".join(lines) + "\n")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
