"""Shared helpers for the ``benchmarks/`` scripts: the metadata block and the CLI bridge.

Each script is a thin wrapper around the same code the ``coap-compile bench ...`` command runs, so a
result file has the same columns and metadata whichever way it was produced.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from coap_lab.cli.main import main  # noqa: E402
from coap_lab.cli.report import metadata  # noqa: E402

__all__ = ["RESULTS", "metadata", "run_bench"]

RESULTS = ROOT / "benchmarks" / "results"


def run_bench(kind: str, argv: Sequence[str] | None = None) -> int:
    """``coap-compile bench <kind> [argv]`` with results going to ``benchmarks/results`` by default."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--results-dir" or a.startswith("--results-dir=") for a in args):
        args += ["--results-dir", str(RESULTS)]
    return main(["bench", kind, *args])
