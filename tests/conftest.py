"""Test configuration shared by the whole suite.

``TRITON_INTERPRET=1`` must be set before any Triton kernel module is imported (the ``triton.jit``
decorator reads it), so it is set here, at conftest import time, unless a CUDA device is present
(then the CUDA-marked tests run the real kernels).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Generated kernel sources go to a per-run temporary folder, not the user's cache.
os.environ.setdefault("COAP_COMPILE_CACHE_DIR", tempfile.mkdtemp(prefix="coap_compile_kernels_"))

from hypothesis import HealthCheck, settings

# `ci`: derandomized so every CI run draws the same examples; `dev`: more, random examples.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=12,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs CUDA (GPU verification, issue #4): run on a GPU machine, README 'GPU checks'"
    )
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture
def two_threads():
    """torch's intra-op thread count at 2 for one test (the caller's count a small step lowers to 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
