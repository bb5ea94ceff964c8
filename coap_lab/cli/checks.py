"""Usage errors and the option checks shared by the commands (:mod:`.main`, :mod:`.vision`,
:mod:`.distributed_demo`).

A leaf of the command line: every check reports through ``fail(message)`` (the caller's, which raises
:class:`UsageError` naming the command), and :func:`require_matplotlib` refuses a plotting command
up front when matplotlib (the ``demo`` extra) is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "MATPLOTLIB_HINT",
    "RESULTS_DIR",
    "RESULTS_HELP",
    "UsageError",
    "check_device",
    "check_folder",
    "check_list",
    "given",
    "matplotlib_missing",
    "require_matplotlib",
]

#: Where ``bench`` commands write unless ``--results-dir`` says otherwise: a folder of the current directory,
#: never the source tree's committed ``benchmarks/results`` (regenerating those files passes
#: ``--results-dir benchmarks/results`` explicitly, as ``benchmarks/*.py`` and the README's commands do).
RESULTS_DIR = "coap_results"
RESULTS_HELP = "output folder (default ./coap_results; the committed results: benchmarks/results)"

#: How to get matplotlib, quoted by every error about its absence.
MATPLOTLIB_HINT = "install the demo extra: pip install 'coap-compile[demo]' (or pip install matplotlib)"


class UsageError(ValueError):
    """A bad command-line value; reported as one line with exit status 2."""


def given(args: argparse.Namespace, option: str) -> bool:
    """Whether ``option`` was on the command line (not a default)."""
    return any(a == option or a.startswith(option + "=") for a in getattr(args, "argv", []))


def check_device(args: argparse.Namespace, fail) -> None:
    """``args.device`` (if any) exists on this machine; ``fail(message)`` otherwise."""
    device = getattr(args, "device", None)
    if device is None or device == "cpu":
        return
    how = "" if given(args, "--device") else " (the default)"
    if not torch.cuda.is_available():
        fail(
            f"--device {device}{how}: CUDA is not available on this machine "
            f"(torch {torch.__version__}); use --device cpu"
        )
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        fail(
            f"--device {device}: this machine has {count} CUDA device{'s' * (count != 1)} "
            f"(cuda:0..cuda:{count - 1})"
        )


def check_folder(option: str, path: str, fail) -> None:
    """``path`` is a folder, or can be created as one, and is writable."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        fail(f"{option} {path}: exists and is not a folder")
    ancestor = target
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        fail(f"{option} {path}: {ancestor} is a file, so the folder cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        fail(f"{option} {path}: {ancestor} is not writable")


def check_list(option: str, what: str, text: str, allowed: Sequence[str], fail, lower: bool = False):
    """Comma-separated values of ``option`` (blanks dropped), each in ``allowed``; returns them."""
    values = [v.strip().lower() if lower else v.strip() for v in text.split(",") if v.strip()]
    for v in values:
        if v not in allowed:
            where = f" in {text!r}" if len(values) > 1 else ""
            fail(f"{option}: unknown {what} {v!r}{where}; choose from {', '.join(allowed)}")
    return values


def matplotlib_missing() -> bool:
    """True when matplotlib cannot be imported here (not installed, or blocked in ``sys.modules``)."""
    try:
        return importlib.util.find_spec("matplotlib") is None
    except (ImportError, ValueError):
        return True


def require_matplotlib(what: str, fail) -> None:
    """``fail`` with one line when ``what`` (e.g. ``"writing demo.png"``) needs matplotlib and it is not
    installed."""
    if matplotlib_missing():
        fail(f"{what} needs matplotlib, which is not installed; {MATPLOTLIB_HINT}")
