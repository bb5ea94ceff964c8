"""The gradient finiteness verdict (:func:`coap_compile.runtime.validate.all_finite`).

A finite sum proves every element finite; a non-finite sum is confirmed element-wise (``aminmax``), so
finite gradients whose sum overflows still pass. Checked for every dtype a weight may have, with one
non-finite value planted anywhere, on one thread and on the member pool.
"""

from __future__ import annotations

import pytest
import torch
from helpers import seeds
from hypothesis import given, settings
from hypothesis import strategies as st

from coap_compile.runtime import threads
from coap_compile.runtime.validate import all_finite

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _tensors(seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(17, 5), (3,), (40, 33), (1,), (2, 3, 4)]
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pool", [False, True], ids=["serial", "pool"])
@settings(max_examples=6, deadline=None)
@given(seed=seeds, bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]), data=st.data())
def test_one_non_finite_element_anywhere_is_found(dtype, pool, seed, bad, data):
    ts = _tensors(seed, dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads.intra_op_threads(1 if pool else None):
            assert all_finite(ts)
            i = data.draw(st.integers(0, len(ts) - 1))
            j = data.draw(st.integers(0, ts[i].numel() - 1))
            ts[i].view(-1)[j] = bad
            assert not all_finite(ts)
            assert not all_finite([ts[i]]) and all(all_finite([t]) for k, t in enumerate(ts) if k != i)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_finite_values_whose_sum_overflows_pass(dtype):
    big = torch.finfo(dtype).max
    t = torch.full((64,), big, dtype=dtype)
    assert not torch.isfinite(t.sum())  # the fast check alone would refuse it
    assert all_finite([t, torch.ones(3, dtype=dtype)])
    t[5] = float("inf")
    assert not all_finite([t])


def test_empty_tensors_and_lists():
    assert all_finite([])
    assert all_finite([torch.empty(0), torch.ones(2)])
