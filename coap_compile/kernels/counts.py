"""Counting Triton launches: :func:`count_launches`, fed by :func:`coap_compile.kernels.launch._launch`.

Every kernel of this package is launched by ``launch._launch`` (per-matrix and grouped K1/K2), so the
counts are every Triton launch the optimizer makes: what ``tests/test_launch_count.py`` bounds (two per
distinct state shape in a steady step on the kernel path). Inactive cost: one list test per launch.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["ACTIVE", "count_launches", "kernel_name", "record"]

#: The counters of the open :func:`count_launches` blocks.
ACTIVE: list[collections.Counter] = []


@contextlib.contextmanager
def count_launches() -> Iterator[collections.Counter]:
    """Count the Triton launches completed while the block runs, by kernel: ``{name: launches}`` with
    the generated module's name (:func:`kernel_name`). Counts launches from all threads."""
    c: collections.Counter = collections.Counter()
    ACTIVE.append(c)
    try:
        yield c
    finally:
        ACTIVE.remove(c)


def kernel_name(kernel: Any) -> str:
    """``coap_k1_<epilogue hash>[__<storage tags>][__grouped]`` or ``coap_k2[_grouped]`` for a generated
    kernel (its module name without the cache's prefix and source digest), else the function's name."""
    module = getattr(getattr(kernel, "fn", kernel), "__module__", "") or ""
    stem = module.removeprefix("coap_compile_generated_").removesuffix("_interp")
    if stem == module:
        return getattr(kernel, "__name__", repr(kernel))
    return stem.rsplit("_", 1)[0]


def record(kernel: Any) -> None:
    """One completed launch of ``kernel`` in every open counter."""
    name = kernel_name(kernel)
    for c in ACTIVE:
        c[name] += 1
