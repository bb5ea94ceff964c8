"""``opt.step()`` of the demo LM, quiet and with one competing busy process, interleaved (issue 20).

Usage: ``python benchmarks/contention.py [--threads 2] [--rounds 6] [--phases 2] [--results-dir D]``

Optimizers (built as ``bench step --overhead``'s demo case: :func:`coap_lab.cli.overhead.build_case`, every
parameter with a fixed seeded gradient): ``adamw`` (torch, single-tensor), ``adamw-1thread`` (the same under
``torch.set_num_threads(1)``: the baseline at COAP's thread count), ``coap`` (fp32 states, the default: a
small CPU step runs single-threaded, its group chunks spread over the member pool,
``coap_compile.runtime.threads``), ``coap-serial`` (the same with the member pool off,
``MAX_MEMBER_THREADS = 1``: every task in the stepping thread, the behaviour before the pool),
``coap-torch-threads`` (the step left at torch's thread count, no pool: the behaviour before issue 20),
``coap-bf16``, ``coap-int8``.
Phases alternate quiet / contended (``--phases`` of each); in a contended phase one extra process spins
(``while True: pass``) for its whole duration. In each phase every optimizer takes one step per round, in
turn (``--rounds`` rounds, after one untimed warm-up round). Rows: the median per (phase kind, optimizer)
over all its phases, ``vs_adamw`` and ``vs_adamw_1thread`` (the ratios of medians within the same phase
kind) and, on the contended rows, ``ratio_vs_quiet`` = contended ``vs_adamw`` / quiet ``vs_adamw`` (the
issue's goal: ≤ 1.5), and ``ratio_vs_quiet_1thread`` the same with ``adamw-1thread``. The load average
(other users of the machine) is recorded per phase: "quiet" means no competing process *of ours*. Writes
``contention_cpu.{csv,json}`` with the metadata block.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from coap_compile.runtime import threads
from coap_lab.cli.optimizers import build_optimizer
from coap_lab.cli.overhead import build_case
from coap_lab.cli.report import format_table, metadata, write_csv, write_json

NAMES = ("adamw", "adamw-1thread", "coap", "coap-serial", "coap-torch-threads", "coap-bf16", "coap-int8")


def build(name: str):
    model, ranks = build_case("demo", "cpu")
    if name.startswith("adamw"):
        opt = build_optimizer("adamw", model, lr=1e-4)
        return opt if name == "adamw" else OneThread(opt)
    if name == "coap-serial":
        return NoPool(build("coap"))
    saved = threads.SMALL_GEMM_MACS
    if name == "coap-torch-threads":  # every matrix "large": the plan keeps torch's thread count
        threads.SMALL_GEMM_MACS = 0
    try:
        opt = build_optimizer("coap" if name == "coap-torch-threads" else name, model, lr=1e-4, **ranks)
        opt.step()  # (construction built the plan and its runner: the thread rule was read there)
    finally:
        threads.SMALL_GEMM_MACS = saved
    return opt


class OneThread:
    """``step()`` of an optimizer under ``torch.set_num_threads(1)`` (what COAP's small CPU step does)."""

    def __init__(self, opt) -> None:
        self.opt = opt

    def step(self) -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self.opt.step()
        finally:
            torch.set_num_threads(before)


class NoPool:
    """``step()`` of an optimizer with the member pool off (``threads.MAX_MEMBER_THREADS = 1``)."""

    def __init__(self, opt) -> None:
        self.opt = opt

    def step(self) -> None:
        saved = threads.MAX_MEMBER_THREADS
        threads.MAX_MEMBER_THREADS = 1
        try:
            self.opt.step()
        finally:
            threads.MAX_MEMBER_THREADS = saved


def phase(opts: dict, rounds: int) -> dict[str, list[float]]:
    samples = {n: [] for n in opts}
    for r in range(rounds + 1):
        for n, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if r:  # round 0 is the warm-up
                samples[n].append(time.perf_counter() - t0)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--phases", type=int, default=2)
    ap.add_argument("--results-dir", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = metadata("cpu", sys.argv)
    opts = {n: build(n) for n in NAMES}
    samples = {(kind, n): [] for kind in ("quiet", "contended") for n in NAMES}
    loads = {"quiet": [], "contended": []}
    for _ in range(args.phases):
        for kind in ("quiet", "contended"):
            busy = None
            if kind == "contended":
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.5)
            try:
                for n, s in phase(opts, args.rounds).items():
                    samples[(kind, n)] += s
                loads[kind].append(os.getloadavg()[0])
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            print(f"{kind} phase done (load {loads[kind][-1]:.1f})", file=sys.stderr, flush=True)
    med = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    rows = []
    for kind in ("quiet", "contended"):
        for n in NAMES:
            ratio = med[(kind, n)] / med[(kind, "adamw")]
            quiet_ratio = med[("quiet", n)] / med[("quiet", "adamw")]
            ratio1 = med[(kind, n)] / med[(kind, "adamw-1thread")]
            quiet1 = med[("quiet", n)] / med[("quiet", "adamw-1thread")]
            rows.append({
                "phase": kind, "optimizer": n, "median_ms": med[(kind, n)], "vs_adamw": ratio,
                "vs_adamw_1thread": ratio1,
                "ratio_vs_quiet": ratio / quiet_ratio if kind == "contended" else None,
                "ratio_vs_quiet_1thread": ratio1 / quiet1 if kind == "contended" else None,
                "samples": len(samples[(kind, n)]), "load_avg_1min": statistics.mean(loads[kind]),
                "threads": args.threads,
            })  # fmt: skip
    cols = ["phase", "optimizer", "median_ms", "vs_adamw", "vs_adamw_1thread", "ratio_vs_quiet"]
    cols += ["ratio_vs_quiet_1thread", "load_avg_1min"]
    print(format_table(rows, [(c, c) for c in cols]))
    meta.update(rounds=args.rounds, phases=args.phases, competing_processes=1, cpu_count=os.cpu_count())
    out = Path(args.results_dir)
    write_csv(out / "contention_cpu.csv", rows, meta)
    write_json(out / "contention_cpu.json", {"meta": meta, "rows": rows})
    print(f"wrote {out / 'contention_cpu.csv'} and {out / 'contention_cpu.json'}")


if __name__ == "__main__":
    main()
