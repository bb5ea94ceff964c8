"""Command line: ``coap-compile {demo, bench memory|quality|step, optimizers}``.

Also available as ``python -m coap_compile``.

User errors (a bad option value, an unknown optimizer, a missing or empty corpus, CUDA asked for but
absent) exit with status 2 and one line on stderr, never a traceback. A benchmark whose measured
numbers contradict the closed form exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from coap_compile.cli.demo import DEMO_DEFAULTS, add_model_args, cuda_ok, model_config_from_args
from coap_compile.cli.optimizers import OPTIMIZER_NAMES, PROJECTED, UnknownOptimizerError, availability
from coap_compile.cli.stepbench import parse_shapes
from coap_compile.data import CorpusError
from coap_compile.models import LLAMA_CONFIGS

__all__ = ["UsageError", "build_parser", "main"]

PROG = "coap-compile"


class UsageError(ValueError):
    """A bad command-line value; reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}") from None
    if not v >= 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (rank = min dim / ratio), got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _names(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in OPTIMIZER_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {n!r} (choose from {', '.join(OPTIMIZER_NAMES)})"
            )
    if not names:
        raise argparse.ArgumentTypeError("no optimizer given")
    return names


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _rank_args(p: argparse.ArgumentParser, default_ratio: float = 4.0) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=_positive_int, help="projection rank r = min(RANK, min(m, n))")
    g.add_argument("--rank-ratio", type=_ratio, help=f"r = min(m, n) // RATIO (default {default_ratio:g})")


def _common_train(p: argparse.ArgumentParser, *, steps: int, eval_every: int) -> None:
    p.add_argument(
        "--corpus", help="text file or folder of text files (default: this Python's stdlib .py files)"
    )
    p.add_argument(
        "--steps", type=_positive_int, default=steps, help="optimizer steps per run (default %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEMO_DEFAULTS["batch_size"],
        help="sequences per step (default %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=DEMO_DEFAULTS["lr"],
        help="peak learning rate (default %(default)s)",
    )
    p.add_argument(
        "--eval-every",
        type=_positive_int,
        default=eval_every,
        help="validation interval in steps (default %(default)s)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N (default %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _rank_args(p)
    add_model_args(p)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    parser = _Parser(prog=PROG, description="COAP optimizers compiled from torch.optim: demo and benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="train a small LLaMA with AdamW and COAP-AdamW and compare",
        description="Train a byte-level LLaMA (3.3 M parameters) with AdamW and with COAP-AdamW from the "
        "same initial weights on the same batches (default corpus: this Python's standard library), then "
        "print state memory, step time and losses, and write demo.png and results.json. About 2 minutes on "
        "2 CPU cores with the defaults.",
    )
    _common_train(demo, steps=DEMO_DEFAULTS["steps"], eval_every=DEMO_DEFAULTS["eval_every"])
    demo.add_argument(
        "--optimizers", type=_names, default=["adamw", "coap"], help="comma-separated (default adamw,coap)"
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="model init and data order seed (default %(default)s)"
    )
    demo.add_argument(
        "--out", default="out/demo", help="output folder for demo.png/results.json (default %(default)s)"
    )

    bench = sub.add_parser("bench", help="benchmarks writing results files").add_subparsers(
        dest="bench", required=True, parser_class=_Parser
    )
    m = bench.add_parser(
        "memory", help="optimizer-state bytes of the LLaMA-60M…7B configurations (meta device)"
    )
    m.add_argument(
        "--sizes", default="60m,130m,350m,1b,7b", help="comma-separated sizes (default %(default)s)"
    )
    m.add_argument(
        "--real",
        default="60m",
        help="sizes that also take one real CPU step to measure allocated state "
        "(default %(default)s; '' for none)",
    )
    m.add_argument("--results-dir", default="benchmarks/results", help="(default %(default)s)")

    q = bench.add_parser("quality", help="final validation loss over seeds for each optimizer")
    _common_train(q, steps=300, eval_every=50)
    q.add_argument(
        "--optimizers",
        type=_names,
        default=None,
        help="comma-separated (default adamw,coap,galore,flora + galore-torch,apollo-torch if installed)",
    )
    q.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    q.add_argument("--results-dir", default="benchmarks/results", help="(default %(default)s)")

    s = bench.add_parser("step", help="optimizer.step() time at a few matrix shapes")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    s.add_argument("--shapes", default=None, help="MxN:RANK,... (default: LLaMA 130M–1B matrices)")
    s.add_argument("--optimizers", type=_names, default=["adamw", "coap"], help="(default adamw,coap)")
    s.add_argument(
        "--warmup", type=_positive_int, default=None, help="untimed steps (default 3; CUDA: do_bench ms, 25)"
    )
    s.add_argument(
        "--repeat", type=_positive_int, default=None, help="timed steps (default 20; CUDA: do_bench ms, 100)"
    )
    s.add_argument("--results-dir", default="benchmarks/results", help="(default %(default)s)")

    k = bench.add_parser(
        "kernels",
        help="CUDA: fused AdamW vs eager/Inductor low-rank vs generated kernels, with floors (GPU benchmark)",
    )
    k.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    k.add_argument(
        "--cases", default=None, help="MxN:RANK,... (default: LLaMA-1B shapes × r ∈ {128, 256, 512})"
    )
    k.add_argument("--dtypes", default="fp32,bf16", help="weight dtypes (default %(default)s)")
    k.add_argument("--variants", default=None, help="comma-separated subset of the variants (default all)")
    k.add_argument("--results-dir", default="benchmarks/results", help="(default %(default)s)")

    sub.add_parser("optimizers", help="list optimizer names and whether each is usable here")
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Checks that need more than one option; raise UsageError."""
    device = getattr(args, "device", "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise UsageError(f"{PROG}: unknown device {device!r}") from None
    if not cuda_ok(device):
        raise UsageError(f"{PROG}: device {device!r} requested but CUDA is not available")
    if hasattr(args, "dim"):
        try:
            model_config_from_args(args)
        except ValueError as exc:
            raise UsageError(f"{PROG}: {exc}") from None
    corpus = getattr(args, "corpus", None)
    if corpus is not None and not Path(corpus).exists():
        raise CorpusError(f"corpus not found: {corpus}")
    if hasattr(args, "rank_ratio") and args.rank is None and args.rank_ratio is None:
        args.rank_ratio = 4.0
    names = getattr(args, "optimizers", None)
    if args.command == "bench" and args.bench == "memory":
        sizes = [x.strip().lower() for x in args.sizes.split(",") if x.strip()]
        bad = [x for x in sizes if x not in LLAMA_CONFIGS] or ([] if sizes else ["(none)"])
        if bad:
            raise UsageError(f"{PROG}: unknown model size {bad[0]!r}; choose from {', '.join(LLAMA_CONFIGS)}")
    if args.command == "bench" and args.bench == "kernels":
        from coap_compile.cli.kernelbench import VARIANTS

        if args.cases:
            try:
                parse_shapes(args.cases)
            except ValueError as exc:
                raise UsageError(f"{PROG}: --cases: {exc}") from None
        for v in (args.variants or "").split(","):
            if v.strip() and v.strip() not in VARIANTS:
                raise UsageError(f"{PROG}: unknown variant {v.strip()!r}; choose from {', '.join(VARIANTS)}")
        for d in args.dtypes.split(","):
            if d.strip() not in ("fp32", "bf16"):
                raise UsageError(f"{PROG}: unknown dtype {d.strip()!r}; choose from fp32, bf16")
    if args.command == "bench" and args.bench == "step" and args.shapes:
        try:
            parse_shapes(args.shapes)
        except ValueError as exc:
            raise UsageError(f"{PROG}: --shapes: {exc}") from None
    if args.command == "bench" and args.bench == "quality":
        args.optimizers_default = names is None
        names = args.optimizers = names or ["adamw", *PROJECTED]
        if not args.seeds:
            raise UsageError(f"{PROG}: --seeds: at least one seed is needed")
    if names and args.command == "demo":
        avail = availability()
        for n in names:
            if avail[n] is not None:
                raise UsageError(f"{PROG}: optimizer {n!r} is unavailable: {avail[n]}")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from coap_compile.cli.demo import run_demo

        return run_demo(args)
    if args.command == "optimizers":
        for name, why in availability().items():
            print(f"{name:14} {'ok' if why is None else 'unavailable: ' + why}")
        return 0
    from coap_compile.cli import bench, kernelbench, quality, stepbench

    runners = {
        "memory": bench.run_memory,
        "quality": quality.run_quality,
        "step": stepbench.run_step,
        "kernels": kernelbench.run_kernels,
    }
    return runners[args.bench](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 benchmark check failed, 2 usage error)."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.argv = [PROG, *argv]  # recorded verbatim in every result file
        _validate(args)
        return _dispatch(args)
    except (UsageError, CorpusError, UnknownOptimizerError) as exc:
        msg = " ".join(str(exc).split())
        print(msg if msg.startswith(PROG) else f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
