"""Command line: ``coap-compile {demo, bench memory|quality|step|kernels|compile, optimizers}``.

Also available as ``python -m coap_lab``.

User errors (a bad option value, an unknown optimizer, a missing, empty or too short corpus, CUDA
asked for but absent) exit with status 2 and one line on stderr, never a traceback. The line names the
command, the option, the value given and what is allowed, e.g.
``coap-compile demo: error: argument --device: unknown device 'gpu'; choose from cpu, cuda, cuda:N``.
A benchmark whose measured numbers contradict the closed form, or a training run whose loss becomes
non-finite, exits with status 1 (one line, naming ``--lr`` for the latter).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from coap_lab.cli import compilebench
from coap_lab.cli.argtypes import (
    _device,
    _lr_grid,
    _names,
    _non_negative_int,
    _overhead_cases,
    _positive_float,
    _positive_int,
    _rank_args,
    _seed,
    _seeds,
)
from coap_lab.cli.checks import (
    RESULTS_DIR,
    RESULTS_HELP,
    UsageError,
    check_device,
    check_folder,
    check_list,
    require_matplotlib,
)
from coap_lab.cli.demo import DEMO_DEFAULTS, add_model_args, model_config_from_args
from coap_lab.cli.optimizers import PROJECTED, UnknownOptimizerError, availability
from coap_lab.cli.stepbench import parse_shapes
from coap_lab.data import CorpusError, ImageDataError
from coap_lab.models import LLAMA_CONFIGS

__all__ = ["UsageError", "build_parser", "main"]

PROG = "coap-compile"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(f"{self.prog}: error: {message}")


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
        type=_device,
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
        "print state memory, step time and losses, and write demo.png and results.json. About 3 minutes on "
        "one CPU core with the defaults (measured: README, Demo timing).",
    )
    _common_train(demo, steps=DEMO_DEFAULTS["steps"], eval_every=DEMO_DEFAULTS["eval_every"])
    demo.add_argument(
        "--optimizers", type=_names, default=["adamw", "coap"], help="comma-separated (default adamw,coap)"
    )
    demo.add_argument(
        "--seed", type=_seed, default=0, help="model init and data order seed (default %(default)s)"
    )
    demo.add_argument(
        "--out", default="out/demo", help="output folder for demo.png/results.json (default %(default)s)"
    )
    demo.add_argument(
        "--task",
        choices=["lm", "vision"],
        default="lm",
        help="lm: this LLaMA demo; vision: the conv denoiser (options: coap-compile demo --task vision -h)",
    )
    g = demo.add_argument_group("distributed (torch.distributed.run; coap_lab.cli.distributed_demo)")
    g.add_argument(
        "--nproc", type=_positive_int, default=None, help="local processes (default 2 with --strategy)"
    )
    g.add_argument(
        "--strategy", choices=["ddp", "fsdp2"], default=None, help="data parallelism (default ddp)"
    )
    g.add_argument(
        "--in-backward", action="store_true", help="DDP: step COAP optimizers in the backward (no clipping)"
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
    m.add_argument("--results-dir", default=RESULTS_DIR, help=RESULTS_HELP)

    q = bench.add_parser("quality", help="final validation loss over seeds for each optimizer")
    _common_train(q, steps=300, eval_every=50)
    q.add_argument(
        "--optimizers",
        type=_names,
        default=None,
        help="comma-separated (default adamw,coap,galore,flora + galore-torch,apollo-torch if installed)",
    )
    q.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    q.add_argument(
        "--tune-lr",
        action="store_true",
        help="per optimizer: run --lr-grid with the first seed, keep the lr with the lowest final validation "
        "loss, then run every seed at that lr (the table reports each optimizer at its own best lr)",
    )
    q.add_argument(
        "--lr-grid", type=_lr_grid, default=[1e-3, 3e-3, 1e-2], help="with --tune-lr (default 1e-3,3e-3,1e-2)"
    )
    q.add_argument(
        "--lr-extend",
        type=_non_negative_int,
        default=2,
        help="with --tune-lr: while an optimizer's best lr is at an edge of its grid, run up to this many "
        "more points beyond that edge, one grid step each (default %(default)s)",
    )
    q.add_argument("--results-dir", default=RESULTS_DIR, help=RESULTS_HELP)

    s = bench.add_parser("step", help="optimizer.step() time at a few matrix shapes")
    s.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    s.add_argument("--shapes", default=None, help="MxN:RANK,... (default: LLaMA 130M–1B matrices)")
    s.add_argument("--optimizers", type=_names, default=["adamw", "coap"], help="(default adamw,coap)")
    s.add_argument(
        "--warmup", type=_positive_int, default=None, help="untimed steps (default 3; CUDA: do_bench ms, 25)"
    )
    s.add_argument(
        "--repeat", type=_positive_int, default=None, help="timed steps (default 20; CUDA: do_bench ms, 100)"
    )
    s.add_argument(
        "--overhead",
        type=_overhead_cases,
        default="demo,64x64x16",
        help="whole-step overhead cases, comma-separated, or '' for none: demo (step-only), demo-train (each "
        "step after an untimed forward/backward), 64x64x16 (default %(default)s)",
    )
    s.add_argument(
        "--overhead-optimizers",
        type=_names,
        default=None,
        help="optimizers of the overhead cases (default adamw,adamw-foreach,coap,coap-per-matrix and the "
        "installed peers; e.g. coap-bf16,coap-int8-inductor for the storage precisions and lowerings)",
    )
    s.add_argument("--results-dir", default=RESULTS_DIR, help=RESULTS_HELP)

    k = bench.add_parser(
        "kernels",
        help="CUDA: fused AdamW vs eager/Inductor low-rank vs generated kernels, with floors (GPU benchmark)",
    )
    k.add_argument("--device", type=_device, default="cuda", help="cuda (default) or cpu for a smoke run")
    k.add_argument(
        "--cases", default=None, help="MxN:RANK,... (default: LLaMA-1B shapes × r ∈ {128, 256, 512})"
    )
    k.add_argument("--dtypes", default="fp32,bf16", help="weight dtypes (default %(default)s)")
    k.add_argument("--variants", default=None, help="comma-separated subset of the variants (default all)")
    k.add_argument("--results-dir", default=RESULTS_DIR, help=RESULTS_HELP)

    compilebench.add_parser(bench, _positive_int, _device)

    from coap_lab.cli.vision import add_vision_args

    add_vision_args(
        bench.add_parser("vision", help="conv denoiser on matplotlib's sample images: 5 optimizers × seeds"),
        bench=True,
    )

    sub.add_parser("optimizers", help="list optimizer names and whether each is usable here")
    return parser


def _prog(args: argparse.Namespace) -> str:
    """``coap-compile demo`` / ``coap-compile bench memory``: the command a message is about."""
    return " ".join([PROG, args.command, *([args.bench] if args.command == "bench" else [])])


def _validate(args: argparse.Namespace) -> None:
    """Checks that need more than one option or the machine; raise :class:`UsageError` naming the option."""
    prog = _prog(args)

    def fail(message: str):
        raise UsageError(f"{prog}: error: {message}")

    if getattr(args, "task", None) == "vision" or getattr(args, "bench", None) == "vision":
        from coap_lab.cli.vision import validate_args

        return validate_args(args, fail)
    check_device(args, fail)
    if hasattr(args, "dim"):
        try:
            model_config_from_args(args)
        except ValueError as exc:
            fail(str(exc))
    corpus = getattr(args, "corpus", None)
    if corpus is not None and not Path(corpus).exists():
        fail(f"--corpus {corpus}: not found (give a text file or a folder of text files)")
    for option in ("out", "results_dir"):
        if getattr(args, option, None) is not None:
            check_folder("--" + option.replace("_", "-"), getattr(args, option), fail)
    if hasattr(args, "rank_ratio") and args.rank is None and args.rank_ratio is None:
        args.rank_ratio = 4.0
    if args.command == "demo" and (args.nproc or args.strategy):
        args.nproc, args.strategy = args.nproc or 2, args.strategy or "ddp"
    elif getattr(args, "in_backward", False):
        fail("--in-backward: needs --strategy ddp (the single-process demo clips gradients before the step)")
    if args.command == "demo" and not (args.strategy or _in_launcher()):
        require_matplotlib("the demo's plot (demo.png)", fail)
    if args.command == "bench" and args.bench == "quality":
        require_matplotlib("bench quality's plot (quality.png)", fail)
    names = getattr(args, "optimizers", None)
    if args.command == "bench" and args.bench == "memory":
        sizes = check_list("--sizes", "model size", args.sizes, list(LLAMA_CONFIGS), fail, lower=True)
        if not sizes:
            fail(f"--sizes: no model size given; choose from {', '.join(LLAMA_CONFIGS)}")
        for size in check_list("--real", "model size", args.real, list(LLAMA_CONFIGS), fail, lower=True):
            if size not in sizes:
                fail(f"--real: size {size!r} is not among --sizes {args.sizes!r}")
    if args.command == "bench" and args.bench == "kernels":
        from coap_lab.cli.kernelbench import VARIANTS

        if args.cases:
            try:
                parse_shapes(args.cases)
            except ValueError as exc:
                fail(f"--cases: {exc}")
        variants = check_list("--variants", "variant", args.variants or "", list(VARIANTS), fail)
        args.variants = ",".join(variants) or None  # blanks dropped: kernelbench splits on commas
        dtypes = check_list("--dtypes", "dtype", args.dtypes, ["fp32", "bf16"], fail)
        if not dtypes:
            fail("--dtypes: no dtype given; choose from fp32, bf16")
        args.dtypes = ",".join(dtypes)
    if args.command == "bench" and args.bench == "step" and args.shapes:
        try:
            parse_shapes(args.shapes)
        except ValueError as exc:
            fail(f"--shapes: {exc}")
    if args.command == "bench" and args.bench == "quality":
        args.optimizers_default = names is None
        names = args.optimizers = names or ["adamw", *PROJECTED]
        if not args.seeds:
            fail("--seeds: at least one seed is needed (comma-separated integers, e.g. 0,1,2)")
    if names and (args.command == "demo" or getattr(args, "bench", None) == "step"):
        avail = availability(names)
        for n in names:
            if avail[n] is not None:
                fail(f"--optimizers: optimizer {n!r} is unavailable: {avail[n]}")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo" and args.task == "vision":
        from coap_lab.cli.vision import run_demo as run_vision_demo

        return run_vision_demo(args)
    if getattr(args, "bench", None) == "vision":
        from coap_lab.cli.vision import run_bench

        return run_bench(args)
    if args.command == "demo" and (args.strategy or _in_launcher()):
        from coap_lab.cli.distributed_demo import run_distributed_demo

        args.strategy = args.strategy or "ddp"
        return run_distributed_demo(args)
    if args.command == "demo":
        from coap_lab.cli.demo import run_demo

        return run_demo(args)
    if args.command == "optimizers":
        status = availability()
        width = max(map(len, status)) + 2
        for name, why in status.items():
            print(f"{name:{width}}{'ok' if why is None else 'unavailable: ' + why}")
        return 0
    from coap_lab.cli import bench, kernelbench, quality, stepbench

    runners = {
        "memory": bench.run_memory,
        "quality": quality.run_quality,
        "step": stepbench.run_step,
        "kernels": kernelbench.run_kernels,
        "compile": compilebench.run_compile,
    }
    return runners[args.bench](args)


def _in_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ  # started by torchrun


def _vision_demo(argv: list[str]) -> argparse.Namespace | None:
    """``demo --task vision …`` parsed with the vision demo's own options (None for other commands)."""
    from coap_lab.cli.vision import parse_demo_argv

    return parse_demo_argv(argv, _Parser)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 benchmark check failed or training diverged,
    2 usage error)."""
    prog = PROG
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = _vision_demo(argv) or build_parser().parse_args(argv)
        args.argv = [PROG, *argv]  # recorded verbatim in every result file
        prog = _prog(args)
        _validate(args)
        return _dispatch(args)
    except (UsageError, CorpusError, ImageDataError, UnknownOptimizerError, FloatingPointError) as exc:
        msg = " ".join(str(exc).split())
        print(msg if msg.startswith(PROG) else f"{prog}: error: {msg}", file=sys.stderr)
        return 1 if isinstance(exc, FloatingPointError) else 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
