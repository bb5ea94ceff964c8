"""A tiny dependency-free progress bar written to stderr.

On a terminal it redraws one line (at most ten times a second); otherwise (CI logs, pipes) it prints
a plain line at every 10 % so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, "adamw") as bar: bar.update(loss=...)``."""

    def __init__(
        self, total: int, label: str, *, stream: TextIO | None = None, enabled: bool = True, width: int = 24
    ):
        self.total, self.label, self.width, self.enabled = max(1, total), label, width, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.count, self.start, self._last_draw, self._last_decile = 0, time.perf_counter(), 0.0, -1
        self.info = ""

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1, **info: float) -> None:
        """Advance by ``n`` and show ``key=value`` pairs (floats with 4 significant digits)."""
        self.count = min(self.total, self.count + n)
        if info:
            self.info = " ".join(f"{k}={v:.4g}" for k, v in info.items())
        self._draw()

    def close(self) -> None:
        if not self.enabled:
            return
        self._draw(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False

    def _line(self) -> str:
        frac = self.count / self.total
        filled = round(frac * self.width)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.count * (self.total - self.count) if self.count else float("nan")
        bar = "#" * filled + "." * (self.width - filled)
        return (
            f"{self.label:>14} [{bar}] {self.count}/{self.total} "
            f"{elapsed:5.1f}s eta {eta:5.1f}s {self.info}".rstrip()
        )

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if force or now - self._last_draw >= 0.1 or self.count == self.total:
                self.stream.write("\r\033[K" + self._line())
                self.stream.flush()
                self._last_draw = now
            return
        decile = self.count * 10 // self.total
        if force and self.count == 0 and self._last_decile < 0:
            self._last_decile = 0
            return
        if decile > self._last_decile:
            self._last_decile = decile
            self.stream.write(self._line() + "\n")
            self.stream.flush()
