"""argparse value types of the command line (:mod:`.main`): each raises ``ArgumentTypeError`` with a
message naming the value given and what is allowed, which ``main`` prints as one line (exit status 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

from coap_lab.cli.demo import positive_int
from coap_lab.cli.optimizers import OPTIMIZER_NAMES

__all__ = [
    "DEVICES",
    "_device",
    "_names",
    "_overhead_cases",
    "_positive_float",
    "_positive_int",
    "_rank_args",
    "_ratio",
    "_seed",
    "_lr_grid",
    "_non_negative_int",
    "_seeds",
    "name_list",
]

DEVICES = "cpu, cuda, cuda:N"
_positive_int = positive_int


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
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
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {v}")
    return v


def _device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (whether CUDA is present is checked in :func:`_validate`)."""
    name = text.strip().lower()
    kind, colon, index = name.partition(":")
    if name == "cpu" or (kind == "cuda" and (not colon or index.isdigit())):
        return name
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose from {DEVICES}")


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {v}")
    return v


def name_list(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of distinct names from ``allowed`` (lower-cased)."""

    def _names(text: str) -> list[str]:
        names = [n.strip().lower() for n in text.split(",") if n.strip()]
        for n in names:
            if n not in allowed:
                raise argparse.ArgumentTypeError(
                    f"unknown optimizer {n!r} (choose from {', '.join(allowed)})"
                )
        if not names:
            raise argparse.ArgumentTypeError(f"no optimizer given (choose from {', '.join(allowed)})")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"optimizer {twice[0]!r} given twice in {text!r}")
        return names

    return _names


_names = name_list(OPTIMIZER_NAMES)


def _seeds(text: str) -> list[int]:
    seeds = []
    for s in text.split(","):
        if s.strip():
            try:
                seeds.append(_seed(s))
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"seed {s.strip()!r} in {text!r}: {exc}") from None
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"seed {twice[0]} given twice in {text!r}")
    return seeds


def _lr_grid(text: str) -> list[float]:
    """``--lr-grid``: comma-separated positive finite learning rates, at least two, no repeats."""
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        what = f"learning rate {part.strip()!r} in {text!r}"
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: not a number") from None
        if not (v > 0 and v < float("inf")):
            raise argparse.ArgumentTypeError(f"{what}: must be > 0 and finite")
        if v in out:
            raise argparse.ArgumentTypeError(f"learning rate {v:g} given twice in {text!r}")
        out.append(v)
    if len(out) < 2:
        raise argparse.ArgumentTypeError(f"--lr-grid needs at least two learning rates, got {text!r}")
    return out


def _rank_args(p: argparse.ArgumentParser, default_ratio: float = 4.0) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=_positive_int, help="projection rank r = min(RANK, min(m, n))")
    g.add_argument("--rank-ratio", type=_ratio, help=f"r = min(m, n) // RATIO (default {default_ratio:g})")


def _overhead_cases(text: str) -> str:
    from coap_lab.cli.overhead import OVERHEAD_CASES

    bad = [c for c in text.split(",") if c.strip() and c.strip() not in OVERHEAD_CASES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown case {bad[0]!r}; choose from {', '.join(OVERHEAD_CASES)}")
    return text
