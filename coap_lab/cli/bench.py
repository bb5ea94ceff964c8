"""``coap-compile bench memory``: optimizer-state bytes of the GaLore-paper LLaMA configurations.

Models are built on the meta device (nothing allocated), with float32 weights and, for the bf16/int8 rows,
bfloat16 weights (``build_llama(size, device="meta").to(torch.bfloat16)``). Every measured number
(``opt.memory_plan().total_bytes``, or the real state after a meta-device step where the optimizer can
take one, and the state after one real CPU step for the ``--real`` sizes) is compared with the closed
form of :mod:`coap_lab.cli.memory` by exact integer equality; a mismatch exits with status 1, naming
the first parameter whose bytes differ.

Rows per size: AdamW fp32; COAP fp32 at the paper rank on attn+mlp, on every Linear and at rank ratio 4;
GaLore and Flora at the paper rank; AdamW bf16; COAP on bf16 weights with ``state_precision="auto"``
(bf16 low-rank states, full-rank parameters on torch's bf16 AdamW), ``"bf16"`` and ``"int8"``. ``saved``
is against AdamW in the same weight dtype, ``saved vs fp32`` against fp32 AdamW.

The official comparisons (:func:`official_comparisons`) put this library's own bytes next to the
reference's printed figures and split the difference exactly into steps, rounding streams, int8 scales
and float32-kept small tensors (:func:`coap_lab.cli.memory.decompose`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from coap_lab.cli import memory as mem
from coap_lab.cli.optimizers import availability, build_optimizer
from coap_lab.cli.report import format_table, metadata, write_csv, write_json
from coap_lab.models import LLAMA_CONFIGS, PAPER_RANKS, build_llama

__all__ = ["PAPER_TARGETS", "MemoryMismatchError", "Variant", "memory_rows", "official_comparisons",
           "run_memory", "variants"]  # fmt: skip

#: The paper's LLaMA setup projects the attention and MLP matrices only (not embeddings or lm_head).
PAPER_TARGETS = ("self_attn", "mlp")
MIB = 1024**2
#: The reference implementation's printed figures (show_memory_usage), in bytes.
OFFICIAL_FIGURES = {
    ("1b", "coap", 512): 1_042_460_672 * 2,
    ("7b", "coap-8bit", 1024): 3_762_823_168 + 939_524_096 * 2,
}
#: The paper's 8-bit headline saving (LLaVA-v1.5-7B fine-tuning), as a fraction.
PAPER_8BIT_SAVING = 0.81
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class MemoryMismatchError(AssertionError):
    """A measured optimizer-state size differs from the closed form."""


@dataclass(frozen=True)
class Variant:
    """One measured configuration: ``optimizer`` (a :func:`build_optimizer` name), the closed form's
    ``policy``, ``weights`` (``"fp32"``/``"bf16"``), ``states`` (how the moments are stored) and the
    closed form's :class:`~coap_lab.cli.memory.Accounting`."""

    optimizer: str
    policy: str
    label: str
    weights: str
    states: str
    acc: mem.Accounting
    kwargs: dict = field(default_factory=dict)


def variants(size: str) -> list[Variant]:
    """The rows measured for one model size (module docstring)."""
    r = PAPER_RANKS[size]
    paper = {"rank": r, "target_modules": PAPER_TARGETS}
    at = f"rank {r}, attn+mlp"
    return [
        Variant("adamw", "adamw", "full", "fp32", "fp32", mem.OURS),
        Variant("coap", "coap", at, "fp32", "fp32", mem.OURS, paper),
        Variant("coap", "coap", f"rank {r}, all Linear", "fp32", "fp32", mem.OURS, {"rank": r}),
        Variant("coap", "coap", "ratio 4, attn+mlp", "fp32", "fp32", mem.OURS,
                {"rank_ratio": 4.0, "target_modules": PAPER_TARGETS}),
        Variant("galore", "galore", at, "fp32", "fp32", mem.OURS, paper),
        Variant("flora", "flora", at, "fp32", "fp32", mem.OURS, paper),
        Variant("dct", "dct", at, "fp32", "fp32", mem.OURS, paper),
        Variant("adamw", "adamw", "full", "bf16", "bf16 (torch)", mem.ADAMW_BF16),
        Variant("coap", "coap", at, "bf16", "bf16 (auto)", mem.COAP_BF16_AUTO, paper),
        Variant("coap-bf16", "coap", at, "bf16", "bf16", mem.COAP_BF16, paper),
        Variant("coap-int8", "coap", at, "bf16", "int8", mem.COAP_INT8, paper),
    ]  # fmt: skip


def _official_acc(v: Variant) -> mem.Accounting | None:
    """The reference accounting of the same setting (galore/flora have no official figure)."""
    if v.policy in ("galore", "flora", "dct"):
        return None
    return mem.OFFICIAL_8BIT if v.states == "int8" else mem.OFFICIAL


def _model(size: str, weights: str, *, real: bool = False):
    model = build_llama(size, seed=0) if real else build_llama(size, device="meta")
    return model.to(_DTYPES[weights])


def _first_difference(planned: dict[str, int], closed: list[mem.ParamRow], acc: mem.Accounting) -> str:
    for row in closed:
        got = planned.get(row.name)
        if got != row.bytes(acc):
            want = row.bytes(acc)
            return f"; first differing parameter {row.name} {row.shape}: plan {got} B, closed form {want} B"
    extra = sorted(set(planned) - {r.name for r in closed})
    return f"; plan rows not in the closed form: {extra[:3]}" if extra else ""


def _measure(v: Variant, size: str) -> tuple[int | None, str, dict[str, int]]:
    """Measured state bytes on a meta model: the real state after one meta step, else ``memory_plan()``;
    also the plan's bytes per parameter (for mismatch reports)."""
    model = _model(size, v.weights)
    opt = build_optimizer(v.optimizer, model, lr=1e-3, **v.kwargs)
    plan = opt.memory_plan() if hasattr(opt, "memory_plan") else None
    per_param = {r.name: r.state_bytes for r in plan.rows} if plan is not None else {}
    planned = int(plan.total_bytes) if plan is not None else None
    try:
        mem.meta_step(model, opt)
        stepped: int | None = mem.measured_state_bytes(opt)
    except (NotImplementedError, RuntimeError):  # SVD/QR need data: projected optimizers can't step on meta
        stepped = None
    if planned is not None and stepped is not None and planned != stepped:
        raise MemoryMismatchError(
            f"{size} {v.optimizer} {v.kwargs}: memory_plan {planned} != meta step {stepped}"
        )
    if stepped is not None:
        return stepped, "state after one meta-device step" + (" = memory_plan" if planned else ""), per_param
    return planned, "memory_plan()" if planned is not None else "unmeasured", per_param


def _measure_real(v: Variant, size: str) -> int:
    """State bytes after one real CPU step with random gradients (allocates the model: small sizes only)."""
    from coap_compile.projection.dct import clear_shared_bases

    clear_shared_bases()  # count only the bases this run builds
    model = _model(size, v.weights, real=True)
    opt = build_optimizer(v.optimizer, model, lr=1e-3, **v.kwargs)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(p.dtype)
    opt.step()
    shared = 0
    if v.policy == "dct":  # the bases shared by same-width matrices live outside optimizer.state
        from coap_compile.projection.dct import shared_basis_builds

        shared = sum(4 * n * n for (n, dtype, _dev) in shared_basis_builds() if dtype == torch.float32)
    return mem.measured_state_bytes(opt) + shared


def memory_rows(sizes: list[str], real_sizes: tuple[str, ...] = ()) -> list[dict[str, object]]:
    """One row per (size, variant); raises :class:`MemoryMismatchError` on any inexact match.

    For sizes in ``real_sizes`` every variant also takes one real CPU step (column ``real_step_bytes``).
    """
    avail = availability(("coap", "galore", "flora"))
    rows: list[dict[str, object]] = []
    for size in sizes:
        model = build_llama(size, device="meta")
        n_params = sum(p.numel() for p in model.parameters())
        base: dict[str, int] = {}
        for v in variants(size):
            where = f"LLaMA-{size} {v.optimizer} ({v.label}, {v.weights} weights, {v.states} states)"
            rows_cf = mem.closed_form_rows(model, v.policy, **v.kwargs)
            closed = mem.total_bytes(rows_cf, v.acc)
            usable = avail[v.optimizer] is None
            measured, how, per_param = _measure(v, size) if usable else (None, "unavailable", {})
            if measured is not None and measured != closed:
                raise MemoryMismatchError(
                    f"{where}: measured {measured} B != closed form {closed} B "
                    f"(difference {measured - closed:+d} B){_first_difference(per_param, rows_cf, v.acc)}"
                )
            real = _measure_real(v, size) if size in real_sizes and usable else None
            if real is not None and real != closed:
                raise MemoryMismatchError(
                    f"{where}: state after a real CPU step {real} B != closed form {closed} B"
                )
            if v.optimizer == "adamw":
                base[v.weights] = closed
            official = _official_acc(v)
            rows.append(
                {
                    "model": f"llama-{size}",
                    "params": n_params,
                    "weights": v.weights,
                    "optimizer": v.optimizer,
                    "states": v.states,
                    "setting": v.label,
                    "projected": sum(1 for r in rows_cf if r.rank is not None),
                    "accounting": v.acc.name,
                    "closed_form_bytes": closed,
                    "measured_bytes": measured,
                    "measured_by": how,
                    "real_step_bytes": real,
                    "state_mib": closed / MIB,
                    "saved_pct": 100.0 * (1 - closed / base[v.weights]),
                    "saved_vs_fp32_pct": 100.0 * (1 - closed / base["fp32"]),
                    "official_mib": mem.total_bytes(rows_cf, official) / MIB if official else None,
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
        acc = mem.OFFICIAL if variant == "coap" else mem.OFFICIAL_8BIT
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


#: (size, rank, library optimizer, its accounting, official figure key, official accounting)
_COMPARISONS = (
    ("1b", 512, "coap", "bf16 (auto)", mem.COAP_BF16_AUTO, ("1b", "coap", 512), mem.OFFICIAL),
    ("1b", 512, "coap-bf16", "bf16", mem.COAP_BF16, ("1b", "coap", 512), mem.OFFICIAL),
    ("7b", 1024, "coap-int8", "int8", mem.COAP_INT8, ("7b", "coap-8bit", 1024), mem.OFFICIAL_8BIT),
)


def _meets(nbytes: int, adamw: int, saving: float = PAPER_8BIT_SAVING) -> bool:
    """``1 − nbytes/adamw ≥ saving`` in integers (saving in whole percent)."""
    return 100 * nbytes <= round(100 * (1 - saving)) * adamw


def _max_rank_meeting(size: str, acc: mem.Accounting, adamw: int) -> int | None:
    """Largest rank whose COAP (attn+mlp) closed form under ``acc`` saves ≥ 81 % against ``adamw`` bytes
    (bytes grow with the rank, so a bisection); None if even rank 1 does not."""
    model = build_llama(size, device="meta")

    def ok(r: int) -> bool:
        rows = mem.closed_form_rows(model, "coap", rank=r, target_modules=PAPER_TARGETS)
        return _meets(mem.total_bytes(rows, acc), adamw)

    hi = max(min(p.shape) for p in model.parameters() if p.ndim == 2)
    if not ok(1):
        return None
    lo = 1  # ok(lo) holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def official_comparisons() -> list[dict[str, object]]:
    """This library's own bytes (memory plan on the meta bf16 model = closed form) against the reference's
    printed figures, the difference split exactly into its parts, and the savings against AdamW."""
    out = []
    for size, rank, name, states, acc, key, off_acc in _COMPARISONS:
        v = Variant(name, "coap", f"rank {rank}, attn+mlp", "bf16", states, acc,
                    {"rank": rank, "target_modules": PAPER_TARGETS})  # fmt: skip
        model = build_llama(size, device="meta")
        rows = mem.closed_form_rows(model, "coap", **v.kwargs)
        adamw_rows = mem.closed_form_rows(model, "adamw")
        closed = mem.total_bytes(rows, acc)
        measured, _, per_param = _measure(v, size)
        if measured != closed:
            raise MemoryMismatchError(
                f"LLaMA-{size} {name} r={rank}: memory_plan {measured} B != closed form {closed} B"
                f"{_first_difference(per_param, rows, acc)}"
            )
        official = OFFICIAL_FIGURES[key]
        parts = mem.decompose(rows, acc)
        diff_parts = {k: b for k, b in parts["bytes"].items() if k != "elements"}
        adamw_bf16 = mem.total_bytes(adamw_rows, mem.ADAMW_BF16)
        adamw_fp32 = mem.total_bytes(adamw_rows, mem.OURS)
        off_adamw = mem.total_bytes(adamw_rows, mem.OFFICIAL)
        off_closed = mem.total_bytes(rows, off_acc)
        row: dict[str, object] = {
            "model": f"llama-{size}", "rank": rank, "optimizer": name, "weights": "bf16", "states": states,
            "library_bytes": measured, "library_mib": measured / MIB,
            "official_bytes": official, "official_mib": official / MIB,
            "official_accounting": off_acc.name,
            "difference_bytes": measured - official, "within_official": measured <= official,
            "elements_equal_official": parts["bytes"]["elements"] == official == off_closed,
            "difference_parts": diff_parts, "counts": parts["count"],
            "saved_vs_adamw_bf16_pct": 100 * (1 - measured / adamw_bf16),
            "saved_vs_adamw_fp32_pct": 100 * (1 - measured / adamw_fp32),
            "official_saved_vs_official_adamw_pct": 100 * (1 - official / off_adamw),
        }  # fmt: skip
        row["explained"] = (
            bool(row["elements_equal_official"]) and sum(diff_parts.values()) == measured - official
        )
        if states == "int8":
            r81 = _max_rank_meeting(size, acc, adamw_bf16)
            row["reaches_81pct_vs_adamw_bf16"] = _meets(measured, adamw_bf16)
            row["reaches_81pct_vs_adamw_fp32"] = _meets(measured, adamw_fp32)
            row["reaches_81pct_official_accounting"] = _meets(official, off_adamw)
            if r81 is not None:
                at = Variant(
                    name, "coap", "", "bf16", states, acc, {"rank": r81, "target_modules": PAPER_TARGETS}
                )
                got, _, _ = _measure(at, size)
                want = mem.total_bytes(mem.closed_form_rows(model, "coap", **at.kwargs), acc)
                if got != want:
                    raise MemoryMismatchError(f"LLaMA-{size} {name} r={r81}: memory_plan {got} B != {want} B")
                row["max_rank_for_81pct_vs_adamw_bf16"] = {
                    "rank": r81, "bytes": got, "saved_pct": 100 * (1 - got / adamw_bf16),
                }  # fmt: skip
        out.append(row)
    return out


def _describe(c: dict[str, object]) -> str:
    """One sentence: the library's bytes against the official figure and every byte of the difference."""
    n, b = c["counts"], c["difference_parts"]
    labels = {
        "step": f"{n['params']} step counters × 4 B",
        "rng": f"{n['rng_streams']} rounding streams × 16 B",
        "absmax": f"{n['absmax_scales']:,} int8 absmax scales × 4 B",
        "fp32_small": f"{n['fp32_small_elements']:,} elements of {n['fp32_small_tensors']} small moments "
        "kept float32 × 3 B",
        "policy_extras": "policy extras",
    }
    terms = " + ".join(f"{labels[k]} ({v:,})" for k, v in b.items() if v)
    return (
        f"LLaMA-{c['model'][6:].upper()} r={c['rank']} {c['optimizer']} ({c['states']} states, "
        "bf16 weights): "
        f"{c['library_bytes']:,} B = {c['library_mib']:.2f} MiB vs official {c['official_bytes']:,} B = "
        f"{c['official_mib']:.2f} MiB: {c['difference_bytes']:+,} B = {terms or '0'}"
        f" [{'explained exactly' if c['explained'] else 'NOT EXPLAINED'}]; "
        f"saved {c['saved_vs_adamw_bf16_pct']:.2f} % "
        f"vs AdamW bf16, {c['saved_vs_adamw_fp32_pct']:.2f} % vs AdamW fp32 (official accounting: "
        f"{c['official_saved_vs_official_adamw_pct']:.2f} % vs its AdamW)"
    )


MEMORY_COLUMNS = [
    ("model", "model"),
    ("weights", "weights"),
    ("optimizer", "optimizer"),
    ("states", "states"),
    ("setting", "setting"),
    ("projected", "proj."),
    ("closed_form_bytes", "closed-form bytes"),
    ("measured_bytes", "measured bytes"),
    ("real_step_bytes", "real-step bytes"),
    ("state_mib", "MiB"),
    ("saved_pct", "saved % (same dtype)"),
    ("saved_vs_fp32_pct", "saved % vs fp32"),
    ("official_mib", "official MiB"),
]


def run_memory(args: argparse.Namespace) -> int:
    """Print the memory table, write ``memory.{csv,json}``; exit 1 on any closed-form mismatch."""
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in LLAMA_CONFIGS] or ([] if sizes else ["(none)"])
    if bad:  # main() checks this first; kept for direct callers
        raise ValueError(f"--sizes: unknown model size {bad[0]!r}; choose from {', '.join(LLAMA_CONFIGS)}")
    avail = availability(("coap", "galore", "flora"))
    for name in ("coap", "galore", "flora"):
        if avail[name] is not None:
            print(f"note: {name}: {avail[name]}; showing the closed form only", file=sys.stderr)
    try:
        rows = memory_rows(sizes, tuple(x.strip().lower() for x in args.real.split(",") if x.strip()))
        comparisons = official_comparisons() if avail["coap"] is None else []
    except MemoryMismatchError as exc:
        print(f"coap-compile bench memory: MISMATCH: {exc}", file=sys.stderr)
        return 1
    checks = _official_checks()
    print(format_table(rows, MEMORY_COLUMNS))
    print("\nOfficial accounting (states and P in bf16 or 8-bit, step counters not counted):")
    print(format_table(checks, [(k, k) for k in ("model", "variant", "rank", "accounting", "bytes", "mib",
                                                 "reference_mib", "match")]))  # fmt: skip
    print("\nThis library's own bytes against the official figures:")
    for c in comparisons:
        print("* " + _describe(c))
        if "reaches_81pct_vs_adamw_bf16" in c:
            r81 = c.get("max_rank_for_81pct_vs_adamw_bf16")
            print(
                f"  -81 %: vs AdamW bf16 {c['reaches_81pct_vs_adamw_bf16']}, vs AdamW fp32 "
                f"{c['reaches_81pct_vs_adamw_fp32']}, "
                f"official accounting {c['reaches_81pct_official_accounting']}"
                + (f"; largest rank reaching -81 % vs AdamW bf16: {r81['rank']} ({r81['saved_pct']:.2f} %)"
                   if r81 else "")
            )  # fmt: skip
    meta = metadata("meta", getattr(args, "argv", None))
    out = Path(args.results_dir)
    write_csv(out / "memory.csv", rows, meta)
    accountings = (mem.OURS, mem.ADAMW_BF16, mem.COAP_BF16_AUTO, mem.COAP_BF16, mem.COAP_INT8, mem.OFFICIAL,
                   mem.OFFICIAL_8BIT)  # fmt: skip
    write_json(
        out / "memory.json",
        {
            "meta": meta,
            "accounting": {a.name: asdict(a) for a in accountings},
            "rows": rows,
            "official_checks": checks,
            "official_comparisons": comparisons,
        },
    )
    print(f"wrote {out / 'memory.csv'} and {out / 'memory.json'}")
    ok = all(c["match"] for c in checks) and all(c["explained"] for c in comparisons)
    return 0 if ok else 1
