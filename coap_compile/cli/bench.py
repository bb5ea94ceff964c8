"""``coap-compile bench memory``: optimizer-state bytes of the GaLore-paper LLaMA configurations.

Models are built on the meta device (nothing allocated). Every measured number is compared with the
closed form of :mod:`coap_compile.cli.memory` by exact integer equality; a mismatch exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from coap_compile.cli import memory as mem
from coap_compile.cli.optimizers import availability, build_optimizer
from coap_compile.cli.report import format_table, metadata, write_csv, write_json
from coap_compile.models import LLAMA_CONFIGS, PAPER_RANKS, build_llama

__all__ = ["PAPER_TARGETS", "MemoryMismatchError", "memory_rows", "run_memory"]

#: The paper's LLaMA setup projects the attention and MLP matrices only (not embeddings or lm_head).
PAPER_TARGETS = ("self_attn", "mlp")
MIB = 1024**2
#: The reference implementation's printed figures (show_memory_usage), in bytes.
OFFICIAL_FIGURES = {
    ("1b", "coap", 512): 1_042_460_672 * 2,
    ("7b", "coap-8bit", 1024): 3_762_823_168 + 939_524_096 * 2,
}
OFFICIAL_8BIT = mem.Accounting("official-8bit", state=1, proj=2, step=0)


class MemoryMismatchError(AssertionError):
    """A measured optimizer-state size differs from the closed form."""


def _variants(size: str) -> list[tuple[str, str, dict]]:
    """``(optimizer, label, kwargs)`` rows measured for one model size."""
    r = PAPER_RANKS[size]
    return [
        ("adamw", "full", {}),
        ("coap", f"rank {r}, attn+mlp", {"rank": r, "target_modules": PAPER_TARGETS}),
        ("coap", f"rank {r}, all Linear", {"rank": r}),
        ("coap", "ratio 4, attn+mlp", {"rank_ratio": 4.0, "target_modules": PAPER_TARGETS}),
        ("galore", f"rank {r}, attn+mlp", {"rank": r, "target_modules": PAPER_TARGETS}),
        ("flora", f"rank {r}, attn+mlp", {"rank": r, "target_modules": PAPER_TARGETS}),
    ]


def _measure(name: str, size: str, kwargs: dict) -> tuple[int | None, str]:
    """Measured state bytes on a meta model: the real state after one meta step, else ``memory_plan()``."""
    model = build_llama(size, device="meta")
    opt = build_optimizer(name, model, lr=1e-3, **kwargs)
    planned = mem.plan_total_bytes(opt)
    try:
        mem.meta_step(model, opt)
        stepped: int | None = mem.measured_state_bytes(opt)
    except (NotImplementedError, RuntimeError):  # SVD/QR need data: projected optimizers can't step on meta
        stepped = None
    if planned is not None and stepped is not None and planned != stepped:
        raise MemoryMismatchError(
            f"{size} {name} {kwargs}: memory_plan {planned} != state after a meta step {stepped}"
        )
    if stepped is not None:
        return stepped, "state after one meta-device step" + (" = memory_plan" if planned is not None else "")
    return planned, "memory_plan()" if planned is not None else "unmeasured"


def _measure_real(name: str, size: str, kwargs: dict) -> int:
    """State bytes after one real CPU step with random gradients (allocates the model: small sizes only)."""
    model = build_llama(size, seed=0)
    opt = build_optimizer(name, model, lr=1e-3, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt.step()
    return mem.measured_state_bytes(opt)


def memory_rows(sizes: list[str], real_sizes: tuple[str, ...] = ()) -> list[dict[str, object]]:
    """One row per (size, variant); raises :class:`MemoryMismatchError` on any inexact match.

    For sizes in ``real_sizes`` every variant also takes one real CPU step (column ``real_step_bytes``).
    """
    avail = availability()
    rows: list[dict[str, object]] = []
    for size in sizes:
        model = build_llama(size, device="meta")
        n_params = sum(p.numel() for p in model.parameters())
        base = None
        for name, label, kwargs in _variants(size):
            rows_cf = mem.closed_form_rows(model, name, **kwargs)
            closed = mem.total_bytes(rows_cf, mem.OURS)
            measured, how = _measure(name, size, kwargs) if avail[name] is None else (None, "unavailable")
            if measured is not None and measured != closed:
                raise MemoryMismatchError(
                    f"LLaMA-{size} {name} ({label}): measured {measured} B != closed form {closed} B "
                    f"(difference {measured - closed:+d} B)"
                )
            real = _measure_real(name, size, kwargs) if size in real_sizes and avail[name] is None else None
            if real is not None and real != closed:
                raise MemoryMismatchError(
                    f"LLaMA-{size} {name} ({label}): state after a real CPU step {real} B "
                    f"!= closed form {closed} B"
                )
            base = closed if name == "adamw" else base
            official = mem.total_bytes(rows_cf, mem.OFFICIAL) if name in ("adamw", "coap") else None
            rows.append(
                {
                    "model": f"llama-{size}",
                    "params": n_params,
                    "optimizer": name,
                    "setting": label,
                    "projected": sum(1 for r in rows_cf if r.rank is not None),
                    "closed_form_bytes": closed,
                    "measured_bytes": measured,
                    "measured_by": how,
                    "real_step_bytes": real,
                    "state_mib": closed / MIB,
                    "saved_pct": 100.0 * (1 - closed / base) if base else 0.0,
                    "official_bf16_mib": official / MIB if official is not None else None,
                }
            )
    return rows


def _official_checks() -> list[dict[str, object]]:
    """Recompute the reference's two printed figures with the official accounting."""
    out = []
    for (size, variant, rank), expected in OFFICIAL_FIGURES.items():
        rows = mem.closed_form_rows(
            build_llama(size, device="meta"), "coap", rank=rank, target_modules=PAPER_TARGETS
        )
        acc = mem.OFFICIAL if variant == "coap" else OFFICIAL_8BIT
        got = mem.total_bytes(rows, acc)
        out.append(
            {
                "model": f"llama-{size}",
                "variant": variant,
                "rank": rank,
                "accounting": acc.name,
                "bytes": got,
                "mib": round(got / MIB, 2),
                "reference_mib": round(expected / MIB, 2),
                "match": got == expected,
            }
        )
    return out


MEMORY_COLUMNS = [
    ("model", "model"),
    ("optimizer", "optimizer"),
    ("setting", "setting"),
    ("projected", "proj."),
    ("closed_form_bytes", "closed-form bytes"),
    ("measured_bytes", "measured bytes"),
    ("real_step_bytes", "real-step bytes"),
    ("state_mib", "MiB (fp32)"),
    ("saved_pct", "saved %"),
    ("official_bf16_mib", "official MiB (bf16)"),
]


def run_memory(args: argparse.Namespace) -> int:
    """Print the memory table, write ``memory.{csv,json}``; exit 1 on any closed-form mismatch."""
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in LLAMA_CONFIGS] or ([] if sizes else ["(none)"])
    if bad:  # main() checks this first; kept for direct callers
        raise ValueError(f"--sizes: unknown model size {bad[0]!r}; choose from {', '.join(LLAMA_CONFIGS)}")
    avail = availability()
    for name in ("coap", "galore", "flora"):
        if avail[name] is not None:
            print(f"note: {name}: {avail[name]}; showing the closed form only", file=sys.stderr)
    try:
        rows = memory_rows(sizes, tuple(x.strip().lower() for x in args.real.split(",") if x.strip()))
    except MemoryMismatchError as exc:
        print(f"coap-compile bench memory: MISMATCH: {exc}", file=sys.stderr)
        return 1
    checks = _official_checks()
    print(format_table(rows, MEMORY_COLUMNS))
    print("\nOfficial accounting (states and P in bf16 or 8-bit, step counters not counted):")
    print(
        format_table(
            checks,
            [
                (k, k)
                for k in ("model", "variant", "rank", "accounting", "bytes", "mib", "reference_mib", "match")
            ],
        )
    )
    meta = metadata("meta", getattr(args, "argv", None))
    out = Path(args.results_dir)
    write_csv(out / "memory.csv", rows, meta)
    write_json(
        out / "memory.json",
        {
            "meta": meta,
            "accounting": {"ours": asdict(mem.OURS), "official": asdict(mem.OFFICIAL)},
            "rows": rows,
            "official_checks": checks,
        },
    )
    print(f"wrote {out / 'memory.csv'} and {out / 'memory.json'}")
    return 0 if all(c["match"] for c in checks) else 1
