"""Result files and console tables: the metadata block, aligned text tables, CSV/JSON writers, plots.

Every result file carries :func:`metadata` (machine, CPU count, torch/triton/python versions, git
commit, UTC timestamp and the exact command), so a number can always be traced to what produced it.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from coap_lab.cli.checks import MATPLOTLIB_HINT

__all__ = ["format_table", "metadata", "pyplot", "save_figure", "write_csv", "write_json"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out


def metadata(device: str = "cpu", argv: Sequence[str] | None = None) -> dict[str, object]:
    """Where and how a result was produced (no host names or user names).

    Call it when the measured work *starts*: the git commit and dirty flag then describe the code that
    ran (``timestamp_utc`` is the start time; long commands add ``finished_utc``).
    """
    try:
        import triton

        triton_version: str | None = triton.__version__
    except Exception:
        triton_version = None
    extras = {}
    for dist in ("galore-torch", "apollo-torch"):
        try:
            extras[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            extras[dist] = None
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    meta: dict[str, object] = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(list(argv if argv is not None else [Path(sys.argv[0]).name, *sys.argv[1:]])),
        "machine": f"{platform.system()} {platform.machine()}, {_cpu_model()}",
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        **extras,
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return meta


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """Aligned plain-text table. ``columns`` are ``(key, header)``; numbers right-aligned, text left."""
    cells = [[h for _, h in columns]]
    for row in rows:
        cells.append([_fmt(row.get(k)) for k, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    numeric = [all(_is_num(row.get(k)) for row in rows) for k, _ in columns]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _is_num(v: object) -> bool:
    return (
        v is None
        or (isinstance(v, int | float) and not isinstance(v, bool))
        or (isinstance(v, str) and v[:1].isdigit())
    )


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def write_json(path: Path, payload: Mapping[str, object]) -> Path:
    """Write ``payload`` as indented JSON (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def write_csv(path: Path, rows: Sequence[Mapping[str, object]], meta: Mapping[str, object]) -> Path:
    """Write ``rows`` as CSV; the metadata goes into ``# key: value`` comment lines at the top."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with path.open("w", newline="") as fh:
        for k, v in meta.items():
            fh.write(f"# {k}: {v}\n")
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend. matplotlib is the optional ``demo`` extra:
    without it this raises a ``ModuleNotFoundError`` that says how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"plotting needs matplotlib, which is not installed; {MATPLOTLIB_HINT}", name="matplotlib"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG (parents created) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
