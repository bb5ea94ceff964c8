"""Issue 19 items 2 and 4 on the rows side: null directions and overflow-safe refreshes for
``projection_side="rows"`` (single process, :data:`~coap_compile.projection.ROWS`) and the FSDP2 row shard
(:class:`~coap_compile.distributed.fsdp.ShardComm`, 2 gloo ranks against the single-process reference).

Before this change (b44c986) the rows side kept every direction of ``P`` (``Comm.basis_sv`` returned no
singular values there): a rank-8 gradient at rank 16 moved the weight along rounding noise; and the
sharded low-cost SVD and correlation step formed ``X P`` and Gram products of a finite 1e18 gradient
unscaled, so ``P`` came back non-finite.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import randn, rel_err, seeds
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import coap_compile
from coap_compile.distributed import correlation_step, normalized_correlation_step, orthogonal_basis
from coap_compile.projection import ROWS
from coap_compile.projection import correlation_step as sp_correlation_step
from coap_compile.projection import normalized_correlation_step as sp_normalized_step
from coap_compile.projection import orthogonal_basis as sp_orthogonal_basis
from coap_compile.projection.coap import CoapPolicy
from coap_compile.projection.linalg import align_signs
from coap_lab.launch import run_distributed

RUN = dict(rank=16, update_interval=8, reproject_factor=3, lr=1e-3, weight_decay=0.0)
SHAPES = [(64, 48), (48, 96), (96, 96)]
WORLD = 2
TIMEOUT = 120.0


def _low_rank(seed: int, shape: tuple[int, int], batch: int) -> torch.Tensor:
    """``G = δᵀ A``: a Linear layer's gradient over ``batch`` rows (rank ``batch``)."""
    return randn(seed, batch, shape[0]).t() @ randn(seed + 1, batch, shape[1])


def _first_update(w0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p = nn.Parameter(w0.clone())
    opt = coap_compile.optimize([p], torch.optim.AdamW, projection_side="rows", **RUN)
    p.grad = g.clone()
    opt.step()
    return p.detach() - w0


@given(seed=seeds, shape=st.sampled_from(SHAPES))
@example(seed=0, shape=(64, 48))
def test_rows_side_null_directions_get_no_update(seed, shape):
    """Gradient rank 8 < r = 16 on the rows side (``X = G`` whatever the aspect ratio): a 1e-7 relative
    perturbation changes the first update by ≤ 1e-3 and ≤ 1e-3 of the update lies outside ``G``'s row
    space. On b44c986: 0.3–0.6 of the update outside, perturbation changes of order 1."""
    g = _low_rank(seed, shape, 8)
    noise = randn(seed + 2, *shape)
    g2 = g + 1e-7 * g.norm() / noise.norm() * noise
    w0 = randn(seed + 3, *shape)
    u, u2 = _first_update(w0, g), _first_update(w0, g2)
    assert rel_err(u2, u) <= 1e-3
    v = torch.linalg.svd(g.double(), full_matrices=False).Vh[:8]  # the row space of X = G (rank 8)
    outside = u.double() - (u.double() @ v.t()) @ v
    assert float(outside.norm() / u.double().norm()) <= 1e-3


@pytest.mark.parametrize("correlation", ["paper", "normalized"])
@pytest.mark.parametrize("magnitude", [1e15, 1e18])
def test_rows_side_huge_finite_gradients_stay_finite(correlation, magnitude):
    """Entries of ``magnitude`` at the init, the correlation steps and the SVD refresh on the rows side:
    the weights stay finite, like torch AdamW's."""
    w0 = randn(0, 48, 64)
    p, q = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt = coap_compile.optimize([p], torch.optim.AdamW, rank=8, update_interval=2, reproject_factor=3,
                                correlation=correlation, projection_side="rows")  # fmt: skip
    ref = torch.optim.AdamW([q])
    for k in range(8):
        g = randn(k + 1, 48, 64, scale=magnitude if k % 2 == 0 else 1.0)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert torch.isfinite(q).all() and torch.isfinite(p).all(), f"step {k}"


# ---- the FSDP2 row shard: ShardComm on 2 gloo ranks ---------------------------------------------------

M, N, R, BATCH = 40, 24, 8, 3  # a rank-3 gradient at rank 8 (40 rows: 20 per rank)


def _shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    c = -(-t.shape[0] // world)
    return t[min(rank * c, t.shape[0]) : min((rank + 1) * c, t.shape[0])]


def _shard_comm(rows: int, local_rows: int, offset: int):
    from coap_compile.distributed.fsdp import ShardComm, ShardSpec

    spec = ShardSpec(mesh=None, placements=(), group=dist.group.WORLD, rows=rows, row_offset=offset,
                     local_rows=local_rows)  # fmt: skip
    return ShardComm(spec)


def _policy_refreshes(comm_for, x: torch.Tensor, mo: torch.Tensor, shard) -> list[torch.Tensor]:
    """``P`` after the init, a correlation step (k = 2) and an SVD refresh (k = 4) of COAP's policy."""
    policy = CoapPolicy(update_interval=2, reproject_factor=2)
    xs, ms = shard(x), shard(mo)
    comm = comm_for(xs)
    state = policy.init_state(xs, R, comm)
    out = [state["proj"].clone()]
    policy.refresh(state, xs, 2, first_moment=ms, transposed=False, comm=comm)
    out.append(state["proj"].clone())
    policy.refresh(state, xs, 4, first_moment=ms, transposed=False, comm=comm)
    out.append(state["proj"].clone())
    return out


def _huge_inputs():
    x = randn(11, M, N) * 1e18
    mo = randn(12, M, R) * 1e18
    p = sp_orthogonal_basis(randn(13, M, N), R) + 0.05 * randn(14, N, R)
    return x, mo, p


def _worker():
    rank, world = dist.get_rank(), dist.get_world_size()

    def shard(t):
        return _shard(t, rank, world)

    c = -(-M // world)
    x = _low_rank(5, (M, N), BATCH)
    mo = randn(7, M, R)
    null = _policy_refreshes(lambda xs: _shard_comm(M, xs.shape[0], rank * c), x, mo, shard)
    hx, hmo, hp = _huge_inputs()
    huge = (
        orthogonal_basis(shard(hx), R),
        correlation_step(hp, shard(hx), shard(hmo), global_rows=M, transposed=False),
        normalized_correlation_step(hp, shard(hx), shard(hmo), global_rows=M, transposed=False),
    )
    return null, huge


@pytest.fixture(scope="module")
def sharded():
    return run_distributed(_worker, WORLD, timeout=TIMEOUT)


def test_fsdp2_shard_null_directions_match_the_rows_reference(sharded):
    """ShardComm zeroes the null directions of a rank-3 gradient at r = 8 (init and SVD refresh), as the
    single-process rows reference does, and the correlation step leaves them zero; the live columns
    agree with the reference (float32, different QR paths: observed ≤ 3e-6)."""
    x = _low_rank(5, (M, N), BATCH)
    mo = randn(7, M, R)
    ref = _policy_refreshes(lambda xs: ROWS, x, mo, lambda t: t)
    for got_rank in sharded:
        for got, want, what in zip(got_rank[0], ref, ("init", "correlation", "svd")):
            live_got, live_want = got.abs().amax(0) > 0, want.abs().amax(0) > 0
            assert int(live_want.sum()) == BATCH, what  # the reference drops the 5 null directions
            assert torch.equal(live_got, live_want), what
            assert rel_err(align_signs(got, want), want) < 1e-4, what
    assert torch.equal(sharded[0][0][2], sharded[1][0][2])  # replicated


def test_fsdp2_shard_refreshes_of_huge_finite_gradients_stay_finite(sharded):
    """A finite 1e18 gradient (and first moment) at the sharded low-cost SVD and correlation steps: ``P``
    is finite and equals the single-process result (itself overflow-safe); on b44c986 NaN/inf."""
    x, mo, p = _huge_inputs()
    basis, step, normalized = sharded[0][1]
    for t in (basis, step, normalized):
        assert torch.isfinite(t).all()
    want = sp_orthogonal_basis(x, R)
    assert rel_err(align_signs(basis, want), want) < 1e-5  # observed ≤ 1e-6 (QR paths differ)
    ref_step = sp_correlation_step(p, x, mo, transposed=False)
    assert rel_err(step - p, ref_step - p) < 2e-5  # the bounds of test_distributed_linalg's cases
    ref_norm = sp_normalized_step(p, x, mo, transposed=False)
    assert rel_err(normalized - p, ref_norm - p) < 4e-5
    for other in sharded[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other[1], sharded[0][1]))
