"""Per-rank optimizer-state bytes under FSDP2 for LLaMA-1B and 7B at any world size (meta device, exact).

``python -m coap_lab.cli.fsdp_memory [--results-dir DIR]`` builds each model on the meta device, the
paper's optimizer (q/k/v/o/gate/up/down projected at the paper's rank, embeddings, head and norms on
the base AdamW) and reads :meth:`coap_compile.CoapOptimizer.memory_plan` ``(world_size=W, rank=0)``:
the bytes of rank 0 (the largest ``torch.chunk`` shard) when every parameter is ``fully_shard``-ed on
``W`` ranks. torch AdamW's per-rank figure is the plan's ``base_bytes`` (torch's own states of the same
local shards). ``P`` is sharded (``projection_sharding="sharded"``, the default: rank 0 holds its
``torch.chunk`` rows of ``n``); the transient is the largest ``P`` gathered for one weight's step
(``n×r``, held only during that step), reported separately. fp32: fp32 weights and states; bf16: bf16
weights, ``state_precision="auto"`` (bf16 low-rank moments and ``P``; full-rank parameters on torch's
bf16 AdamW); int8: fp32 weights, ``state_precision="int8"`` (row blocks, the default ``quant_blocks``),
against fp32 torch AdamW; int8 + bf16 P: the same with ``projection_precision="bf16"`` (``P`` is then
the largest term left). The per-rank plan is checked equal to real gloo runs at W = 2 and 4 in
``tests/test_fsdp2_memory.py`` (fp32, bf16) and ``tests/test_fsdp2_int8.py`` (int8).

Writes ``fsdp_memory.{csv,json}`` (with machine, versions and commit) and prints the README table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import coap_compile
from coap_lab.cli.bench import PAPER_TARGETS
from coap_lab.cli.report import format_table, metadata, write_csv, write_json
from coap_lab.models import PAPER_RANKS, build_llama

__all__ = ["SIZES", "WORLDS", "fsdp_memory_rows", "main"]

WORLDS = (1, 2, 4, 8, 16, 64)
SIZES = ("1b", "7b")
MIB = 1024**2
#: precision -> (weights dtype, optimize() keywords)
_CONFIGS = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "int8": (torch.float32, {"state_precision": "int8"}),
    "int8, bf16 P": (torch.float32, {"state_precision": "int8", "projection_precision": "bf16"}),
}


def fsdp_memory_rows(sizes=SIZES, worlds=WORLDS) -> list[dict[str, object]]:
    """One row per (model, precision, W): rank 0's COAP and torch AdamW state bytes, and the transient."""
    rows = []
    for size in sizes:
        rank = PAPER_RANKS[size]
        for precision, (dtype, extra) in _CONFIGS.items():
            model = build_llama(size, device="meta").to(dtype)
            opt = coap_compile.optimize(
                model, torch.optim.AdamW, rank, target_modules=PAPER_TARGETS, lr=1e-3, **extra
            )
            for world in worlds:
                plan = opt.memory_plan(world_size=world, rank=0)
                coap, adamw, transient = plan.total_bytes, plan.base_bytes, plan.transient_bytes
                rows.append({
                    "model": f"llama-{size}", "rank": rank, "weights": precision, "world_size": world,
                    "coap_bytes": coap, "adamw_bytes": adamw, "coap_mib": round(coap / MIB, 2),
                    "adamw_mib": round(adamw / MIB, 2), "coap_over_adamw": round(coap / adamw, 3),
                    "transient_bytes": transient, "transient_mib": round(transient / MIB, 2),
                })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    """The README table: per model and precision, COAP / AdamW MiB per rank, their ratio and the
    transient (one gathered ``P``, MiB) per W."""
    worlds = sorted({r["world_size"] for r in rows})
    head = "| model, weights | " + " | ".join(f"W = {w}" for w in worlds) + " |"
    lines = [head, "|---|" + "---|" * len(worlds)]
    keys = dict.fromkeys((r["model"], r["rank"], r["weights"]) for r in rows)
    for model, rank, weights in keys:
        cells = []
        for w in worlds:
            r = next(x for x in rows if (x["model"], x["weights"], x["world_size"]) == (model, weights, w))
            cells.append(
                f"{r['coap_mib']:,.1f} / {r['adamw_mib']:,.1f} ({r['coap_over_adamw']:.2f}) "
                f"+{r['transient_mib']:,.0f}"
            )
        name = model.replace("llama-", "LLaMA-").upper().replace("LLAMA", "LLaMA")
        lines.append(f"| {name} r={rank}, {weights} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coap_lab.cli.fsdp_memory", description=__doc__)
    parser.add_argument("--results-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    meta = metadata("meta", ["python", "-m", "coap_lab.cli.fsdp_memory", *(argv or [])])
    rows = fsdp_memory_rows()
    out = Path(args.results_dir)
    write_csv(out / "fsdp_memory.csv", rows, meta)
    write_json(out / "fsdp_memory.json", {"meta": meta, "rows": rows})
    keys = ("model", "weights", "world_size", "coap_mib", "adamw_mib", "coap_over_adamw", "transient_mib")
    cols = [(k, k) for k in keys]
    print(format_table(rows, cols))
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
