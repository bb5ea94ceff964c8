"""The int8 code search as a cell-table lookup (:mod:`coap_compile.lowering.codesearch`) equals the
broadcast count ``#{k : fl(t_k·a) < |x|}`` (``≤`` for the stochastic bracket) bit for bit, also for
``|x|`` exactly at a product ``fl(t_k·a)`` and one float either side of it, where rounding decides."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from coap_compile.lowering.codesearch import CELLS, cell_tables, count
from coap_compile.storage.codemap import STYLES, code_map


def _broadcast_count(table: torch.Tensor, a: torch.Tensor, ax: torch.Tensor, right: bool) -> torch.Tensor:
    prod = table[None, :] * a[:, None]  # fl(t_k·a), as the storage's search forms it
    hit = prod <= ax[:, None] if right else prod < ax[:, None]
    return hit.sum(-1)


def _table(signed: bool, style: str, stochastic: bool) -> torch.Tensor:
    cm = code_map(signed, style)
    return (cm.levels if stochastic else cm.thresholds)[1 : cm.n + 1]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("stochastic", [False, True])
@given(seed=st.integers(0, 2**31 - 1))
def test_count_equals_the_search_at_every_boundary(style, signed, stochastic, seed):
    gen = torch.Generator().manual_seed(seed)
    table = _table(signed, style, stochastic)
    n = table.numel()
    per = 64
    # block scales over 30 decades, then |x| at every product fl(t_k·a) and its float neighbours
    a = torch.exp(torch.empty(per).uniform_(-69.0, 7.0, generator=gen)).float()
    prod = (table[None, :] * a[:, None]).flatten()
    ax = torch.cat([prod, prod.nextafter(torch.tensor(0.0)), prod.nextafter(torch.tensor(float("inf")))])
    rand = torch.rand(per, 3 * n, generator=gen).flatten() * a.repeat_interleave(3 * n)
    ax = torch.cat([ax, rand, torch.zeros(per)])
    a_el = torch.cat([a.repeat_interleave(n).repeat(3), a.repeat_interleave(3 * n), a])
    ax = torch.minimum(ax, a_el)  # |x| ≤ a: a is its block's absmax
    cells = cell_tables(signed, style, stochastic, "cpu")
    got = count(cells, a_el, ax, stochastic, n)
    want = _broadcast_count(table, a_el, ax, stochastic)
    assert torch.equal(got, want), int((got != want).sum())


def test_zero_scale_gives_the_search_answer():
    table = _table(True, "decade", False)
    n = table.numel()
    ax, a = torch.zeros(4), torch.zeros(4)
    nearest = count(cell_tables(True, "decade", False, "cpu"), a, ax, False, n)
    stochastic = count(cell_tables(True, "decade", True, "cpu"), a, ax, True, n)
    assert nearest.tolist() == [0] * 4 and stochastic.tolist() == [n] * 4


def test_tables_cover_every_cell_up_to_one():
    for stochastic in (False, True):
        cells = cell_tables(False, "decade", stochastic, "cpu")
        assert cells.base.shape == (CELLS,) and cells.base.dtype == torch.int32
        assert cells.crit.dtype == torch.float32
        # the cell of 1.0 counts every entry but the last (stochastic: ≤ 1.0 counts all)
        one = count(cells, torch.ones(1), torch.ones(1), stochastic, 255)
        assert int(one) == 255  # nearest: every threshold is below 1.0; stochastic: every level ≤ 1.0
