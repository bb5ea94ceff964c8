"""Row-sharded refresh linear algebra (``coap_compile.distributed``) against the single-process code.

Multi-process tests run 2 and 4 gloo ranks through ``run_distributed``; every worker builds the full
matrices from a seed and keeps its FSDP2-style shard (``torch.chunk`` row blocks, trailing ranks may be
empty), the parent compares with the single-process functions on the full matrices.

Sign convention: CholeskyQR's ``R`` has a positive diagonal and Householder's need not, so the
distributed ``P'`` equals the single-process one only up to column signs (linalg module docstring).
The tests flip the distributed columns onto the reference with ``align_signs`` and then compare
*element-wise*, which is stronger than comparing subspaces (it checks each singular vector) and is
well defined because the test matrices have distinct, well-separated singular values.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import randn, rel_err, seeds
from hypothesis import given
from hypothesis import strategies as st

from coap_compile.distributed import (
    CommLog,
    align_rotation,
    align_signs,
    assert_replicated,
    cholesky_qr,
    correlation_loss_and_grad,
    correlation_step,
    naive_gather_bytes,
    normalized_correlation_step,
    orthogonal_basis,
    refresh_bytes,
)
from coap_compile.distributed.linalg import ORTHOGONALITY_TOLERANCE
from coap_compile.projection import correlation_step as sp_correlation_step
from coap_compile.projection import normalized_correlation_step as sp_normalized_step
from coap_compile.projection import orthogonal_basis as sp_orthogonal_basis
from coap_compile.projection.linalg import OMEGA_SEED
from coap_lab.launch import DistributedRunError, run_distributed

WORLD_SIZES = (2, 4)
TIMEOUT = 60.0


def _shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """FSDP2's dim-0 shard: ``ceil(M/W)`` rows per rank, the last ones shorter or empty."""
    c = -(-t.shape[0] // world)
    return t[min(rank * c, t.shape[0]) : min((rank + 1) * c, t.shape[0])]


def _spectral(seed: int, m: int, n: int, decay: float, dtype=torch.float32) -> torch.Tensor:
    """``U diag(decay^i) Vᵀ``: distinct singular values with relative gaps ``1 − decay``."""
    k = min(m, n)
    u = torch.linalg.qr(randn(seed, m, k, dtype=torch.float64)).Q
    v = torch.linalg.qr(randn(seed + 1, n, k, dtype=torch.float64)).Q
    s = decay ** torch.arange(k, dtype=torch.float64)
    return ((u * s) @ v.t()).to(dtype)


def _subspace_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, qb = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    return float((qa @ qa.t() - qb @ qb.t()).norm())


# ---------------------------------------------------------------------------------------------------
# launcher


def _rank_value(scale: float) -> tuple[torch.Tensor, str, int]:
    t = torch.full((3,), float(dist.get_rank() + 1)) * scale
    dist.all_reduce(t)
    return t, os.environ.get("COAP_LAUNCH_TEST", ""), torch.get_num_threads()


def _fail_on_rank_1() -> int:
    if dist.get_rank() == 1:
        raise KeyError("boom-on-rank-1")
    dist.barrier()  # rank 0 waits for a peer that is gone: it must be reported and stopped, not hang
    return 0


def _hang() -> None:
    time.sleep(60)


def _exit_rank_0() -> None:
    if dist.get_rank() == 0:
        os._exit(3)
    time.sleep(60)


def test_launcher_returns_results_in_rank_order():
    for world in WORLD_SIZES:
        out = run_distributed(_rank_value, world, 2.0, timeout=TIMEOUT, env={"COAP_LAUNCH_TEST": str(world)})
        total = 2.0 * world * (world + 1) / 2
        assert [(t.tolist(), flag, threads) for t, flag, threads in out] == [
            ([total] * 3, str(world), 1)
        ] * world


def test_launcher_reports_each_failure_with_its_stack():
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_fail_on_rank_1, 2, timeout=TIMEOUT)
    err = info.value
    assert "boom-on-rank-1" in err.failures[1] and "_fail_on_rank_1" in err.failures[1]
    assert "KeyError" in str(err) and 0 in err.failures  # rank 0 was stuck in the barrier
    assert time.monotonic() - start < 20.0
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_exit_rank_0, 2, timeout=TIMEOUT)
    assert "exited with code 3" in info.value.failures[0]


def test_launcher_times_out_and_kills_stragglers():
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_hang, 2, timeout=4.0)
    assert info.value.timed_out == [0, 1]
    assert time.monotonic() - start < 12.0  # 4 s deadline + terminate/kill grace


def test_launcher_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        run_distributed(_hang, 0)
    with pytest.raises(ValueError, match="timeout"):
        run_distributed(_hang, 2, timeout=-1)
    with pytest.raises(ValueError, match="backend"):
        run_distributed(_hang, 2, backend="tcp")


# ---------------------------------------------------------------------------------------------------
# low-cost SVD and range finder

#: (seed, M, N, r, dtype): tall, uneven (13 rows on 4 ranks: 4,4,4,1), empty shard (5 rows on 4: 2,2,1,0),
#: wide (the non-canonical side FSDP2 Shard(0) needs for m < n), float64.
SVD_CASES = [
    (11, 24, 10, 3, torch.float32),
    (12, 13, 8, 4, torch.float32),
    (13, 5, 5, 2, torch.float32),
    (14, 6, 20, 3, torch.float32),
    (15, 30, 12, 5, torch.float64),
]
SVD_DECAY = 0.7


def _svd_worker(cases):
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for seed, m, n, r, dtype in cases:
        x = _shard(_spectral(seed, m, n, SVD_DECAY, dtype), rank, world)
        init_log, svd_log = CommLog(), CommLog()
        p0 = orthogonal_basis(x, r, comm=init_log)  # the init refresh: Ω seeded on every rank
        p1 = orthogonal_basis(x, r, omega=p0, comm=svd_log)  # the recalibration, Ω = P
        out.append((p0, p1, init_log, svd_log))
    return out


def _all_workers(svd_cases, qr_cases, corr_cases):
    """One launch per world size for the three families (process start-up dominates on 2 cores)."""
    return {"svd": _svd_worker(svd_cases), "qr": _qr_worker(qr_cases), "corr": _corr_worker(corr_cases)}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def sharded_results(request):
    out = run_distributed(_all_workers, request.param, SVD_CASES, _qr_cases(), CORR_CASES, timeout=TIMEOUT)
    return {key: [rank_out[key] for rank_out in out] for key in ("svd", "qr", "corr")}


def test_orthogonal_basis_matches_single_process_and_is_replicated(sharded_results):
    results = sharded_results["svd"]
    for i, (seed, m, n, r, dtype) in enumerate(SVD_CASES):
        x = _spectral(seed, m, n, SVD_DECAY, dtype)
        p0, p1, init_log, svd_log = results[0][i]
        for other in results[1:]:  # bit-identical on every rank
            assert torch.equal(other[i][0], p0) and torch.equal(other[i][1], p1), (seed, "not replicated")
        ref0 = sp_orthogonal_basis(x, r)
        ref1 = sp_orthogonal_basis(x, r, omega=p0)  # same Ω as the distributed recalibration
        # float32: observed ≤ 6e-7 (singular-vector error ≈ u·σ₁/gap, gaps ≥ 0.3·0.7^(r-1) here);
        # float64: observed ≤ 1e-15.
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert rel_err(align_signs(p0, ref0), ref0) < tol, (seed, "init")
        assert rel_err(align_signs(p1, ref1), ref1) < tol, (seed, "svd")
        # The Procrustes convention needs no knowledge of the reference result: both paths agree.
        assert rel_err(align_rotation(p1, p0), align_rotation(ref1, p0)) < tol, (seed, "procrustes")
        assert p0.dtype == dtype and p1.dtype == dtype
        # The test can fail: another Ω gives a basis farther than the tolerance from the reference.
        assert _subspace_gap(sp_orthogonal_basis(x, r, seed=OMEGA_SEED + 1), ref0) > 100 * tol
        item = 8 if dtype == torch.float64 else 4
        for log, kind in ((init_log, "init"), (svd_log, "svd")):
            assert log.qr_paths == ["cholqr2"]
            assert log.total_bytes == refresh_bytes(kind, n, r, itemsize=item)
            assert [rec.label for rec in log.records] == ["scale", "gram1", "gram2", "b"]


def _qr_worker(cases):
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for name, y in cases:
        log = CommLog()
        q = cholesky_qr(_shard(y, rank, world), comm=log)
        out.append((name, q, log))
    return out


def _qr_cases():
    well = _spectral(21, 40, 6, 0.6)
    ill = _spectral(22, 40, 6, 0.05)  # κ = 20^5 ≈ 3e6: the first Cholesky breaks down
    low = _spectral(23, 40, 6, 0.6).clone()
    low[:, 5] = low[:, 0] * 0.5 + low[:, 1] * 0.25  # exactly rank 5 (up to rounding)
    return [("well", well), ("ill", ill), ("rank-deficient", low), ("zero", torch.zeros(40, 6))]


def test_cholesky_qr_falls_back_to_tsqr_and_stays_orthonormal(sharded_results):
    cases = _qr_cases()
    results = sharded_results["qr"]
    for i, (name, y) in enumerate(cases):
        q = torch.cat([res[i][1] for res in results])
        paths = {tuple(res[i][2].qr_paths) for res in results}
        assert len(paths) == 1, (name, paths)  # every rank took the same branch
        (path,) = next(iter(paths))
        assert (path == "cholqr2") == (name == "well"), (name, path)
        orth = float((q.double().t() @ q.double() - torch.eye(6, dtype=torch.float64)).norm())
        assert orth < 1e-5, (name, path, orth)  # observed ≤ 5e-7 (Householder QR of the same Y: ~1e-6)
        yd, qd = y.double(), q.double()
        assert float((yd - qd @ (qd.t() @ yd)).norm()) <= 1e-5 * max(float(yd.norm()), 1.0), name
        fallback = None if path == "cholqr2" else path
        qr_bytes = refresh_bytes("svd", 1, 6, fallback=fallback) - 4 * (6 + 2)  # without B (6×1) and scale
        assert all(res[i][2].total_bytes == qr_bytes for res in results), name


def test_cholesky_qr_check_catches_silent_loss_of_orthogonality():
    """A rank-deficient Y where plain CholeskyQR2 returns a non-orthonormal Q without any error."""
    y = _spectral(33, 64, 8, 0.3).double()
    y[:, 7] = y[:, 0] - 2.0 * y[:, 3]
    y = (y + 1e-7 * randn(133, 64, 8, dtype=torch.float64) * y.norm() / 64).float()
    eye = torch.eye(8)
    r1 = torch.linalg.cholesky(y.t() @ y).t()  # succeeds: rounding makes the Gram "positive definite"
    q1 = torch.linalg.solve_triangular(r1, y, upper=True, left=False)
    dev = float((q1.t() @ q1 - eye).norm())
    r2 = torch.linalg.cholesky(q1.t() @ q1).t()  # succeeds too
    q_plain = torch.linalg.solve_triangular(r2, q1, upper=True, left=False)
    # The premise: plain CholeskyQR2 returns a clearly non-orthonormal Q without an error. How far off
    # depends on the LAPACK build and the CPU's kernels: ‖QᵀQ − I‖ seen 3.2 on one machine, 0.88 on
    # another (2026-12-07, same torch 2.13 wheel); either is far above the tolerance the check uses.
    assert dev > ORTHOGONALITY_TOLERANCE
    assert float((q_plain.t() @ q_plain - eye).norm()) > ORTHOGONALITY_TOLERANCE
    log = CommLog()
    q = cholesky_qr(y, comm=log)  # one process: the same code, collectives are identities
    assert log.qr_paths == ["tsqr-pass2"] and float((q.t() @ q - eye).norm()) < 1e-5


@given(seed=seeds, m=st.integers(1, 40), r=st.integers(1, 8), log_kappa=st.floats(0.0, 9.0))
def test_cholesky_qr_single_process_matches_householder_span(seed, m, r, log_kappa):
    m = max(m, r)
    u = torch.linalg.qr(randn(seed, m, r, dtype=torch.float64)).Q
    v = torch.linalg.qr(randn(seed + 1, r, r, dtype=torch.float64)).Q
    y = ((u * torch.logspace(0, -log_kappa, r, dtype=torch.float64)) @ v.t()).float()
    q = cholesky_qr(y)
    eye = torch.eye(r, dtype=torch.float64)
    assert float((q.double().t() @ q.double() - eye).norm()) < 1e-5  # observed ≤ 2e-6
    resid = y.double() - q.double() @ (q.double().t() @ y.double())
    assert float(resid.norm()) < 1e-5 * float(y.double().norm())


# ---------------------------------------------------------------------------------------------------
# correlation step

#: (seed, M, N, r, transposed, special): uneven/empty shards; "zero-rows" puts zero rows in X and Mo.
CORR_CASES = [
    (41, 24, 10, 3, False, ""),
    (42, 24, 10, 3, True, ""),
    (43, 13, 7, 2, False, "zero-rows"),
    (44, 13, 7, 2, True, "zero-rows"),
    (45, 5, 6, 2, False, ""),
    (46, 6, 16, 3, True, ""),
]


def _corr_inputs(seed, m, n, r, special):
    x = randn(seed, m, n)
    mo = randn(seed + 1, m, r)
    if special == "zero-rows":
        x[2] = 0.0
        mo[3] = 0.0
    p = sp_orthogonal_basis(x, r) + 0.05 * randn(seed + 2, n, r)  # not exactly orthonormal
    return x, mo, p


def _corr_worker(cases):
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for seed, m, n, r, transposed, special in cases:
        x, mo, p = _corr_inputs(seed, m, n, r, special)
        xs, ms = _shard(x, rank, world), _shard(mo, rank, world)
        kw = {"global_rows": m, "transposed": transposed}
        logs = [CommLog() for _ in range(3)]
        loss, grad = correlation_loss_and_grad(p, xs, ms, comm=logs[0], **kw)
        step = correlation_step(p, xs, ms, comm=logs[1], **kw)
        normalized = normalized_correlation_step(p, xs, ms, comm=logs[2], **kw)
        out.append((loss, grad, step, normalized, [log.total_bytes for log in logs]))
    return out


def _autograd_reference(p, x, mo, transposed):
    """The loss with torch's own ops and autograd, in float64 (an oracle independent of both codes)."""
    q = p.double().requires_grad_(True)
    xd, md = x.double(), mo.double()
    cos = F.cosine_similarity(md @ q.t(), xd, dim=0 if transposed else 1, eps=1e-8)
    loss = F.mse_loss((xd @ q) @ q.t(), xd) * (1.0 - cos.mean())
    (grad,) = torch.autograd.grad(loss, q)
    return loss.detach(), grad


def test_correlation_step_matches_single_process_and_is_replicated(sharded_results):
    results = sharded_results["corr"]
    for i, (seed, m, n, r, transposed, special) in enumerate(CORR_CASES):
        x, mo, p = _corr_inputs(seed, m, n, r, special)
        loss, grad, step, normalized, nbytes = results[0][i]
        for other in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(other[i][:4], results[0][i][:4])), seed
        ref_loss, ref_grad = _autograd_reference(p, x, mo, transposed)
        # float32 against float64: observed ≤ 1.6e-7 (loss) and ≤ 3e-7 (gradient).
        assert abs(float(loss) - float(ref_loss)) <= 2e-6 * abs(float(ref_loss)), seed
        assert rel_err(grad, ref_grad) < 2e-6, seed
        # The displacements P' − P (2–10 % of P) against the single-process float32 code (closed form,
        # Gram-based MSE): observed ≤ 1.4e-6 (paper step) and ≤ 3.9e-6 (normalized: eigh of AᵀA).
        ref_step = sp_correlation_step(p, x, mo, transposed=transposed)
        assert rel_err(step - p, ref_step - p) < 2e-5, seed
        ref_norm = sp_normalized_step(p, x, mo, transposed=transposed)
        assert rel_err(normalized - p, ref_norm - p) < 4e-5, seed
        expected = refresh_bytes("correlation", n, r, transposed=transposed)
        # correlation_loss_and_grad alone skips the steps' overflow-scale MAX all-reduce (2 elements)
        assert nbytes == [expected - 4 * 2, expected, expected], seed


@given(seed=seeds, m=st.integers(2, 30), n=st.integers(2, 12), transposed=st.booleans())
def test_correlation_gradient_single_process_matches_autograd(seed, m, n, transposed):
    r = max(1, min(n - 1, 3))
    x = randn(seed, m, n) * 0.1
    mo = randn(seed + 1, m, r) * 0.02
    p = randn(seed + 2, n, r)
    loss, grad = correlation_loss_and_grad(p, x, mo, global_rows=m, transposed=transposed)
    ref_loss, ref_grad = _autograd_reference(p, x, mo, transposed)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)) + 1e-12
    assert rel_err(grad, ref_grad) < 1e-4  # float32 vs float64: observed ≤ 1e-5 (random, unnormalised P)


@given(seed=seeds, n=st.integers(2, 12), r=st.integers(1, 6))
def test_basis_conventions_depend_on_the_subspace_only(seed, n, r):
    r = min(r, n)
    p = torch.linalg.qr(randn(seed, n, r, dtype=torch.float64)).Q
    ref = p + 0.3 * randn(seed + 1, n, r, dtype=torch.float64)
    q = torch.linalg.qr(randn(seed + 2, r, r, dtype=torch.float64)).Q  # any orthogonal r×r
    signs = torch.where(randn(seed + 3, r) < 0, -1.0, 1.0).double()
    aligned = align_rotation(p, ref)
    assert rel_err(align_rotation(p @ q, ref), aligned) < 1e-10  # observed ~1e-15
    assert rel_err(aligned.t() @ aligned, torch.eye(r, dtype=torch.float64)) < 1e-12
    assert _subspace_gap(aligned, p) < 1e-10
    assert (aligned - ref).norm() <= (align_signs(p, ref) - ref).norm() + 1e-12  # Procrustes is closest
    flipped = align_signs(p * signs, ref)
    assert torch.equal(flipped, align_signs(p, ref))  # sign flips only: exact
    assert bool(((flipped * ref).sum(0) >= 0).all())


# ---------------------------------------------------------------------------------------------------
# broadcast, replication check, closed forms, errors


def _src_worker():
    world = dist.get_world_size()
    rank = dist.get_rank()
    x = _shard(_spectral(51, 16, 8, SVD_DECAY), rank, world)
    mo = _shard(randn(52, 16, 3) * 0.01, rank, world)
    logs = CommLog(), CommLog()
    p = orthogonal_basis(x, 3, src=world - 1, comm=logs[0])
    q = correlation_step(p, x, mo, global_rows=16, transposed=False, src=0, comm=logs[1])
    assert_replicated(q, name="P")
    caught = ""
    try:
        assert_replicated(torch.full((2,), float(rank)), name="rank-dependent")
    except AssertionError as exc:
        caught = str(exc)
    return p, q, [log.total_bytes for log in logs], caught


def test_broadcast_source_and_replication_check():
    results = run_distributed(_src_worker, 2, timeout=TIMEOUT)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    for _, _, nbytes, caught in results:
        assert nbytes == [
            refresh_bytes("svd", 8, 3, broadcast_result=True),
            refresh_bytes("correlation", 8, 3, broadcast_result=True),
        ]
        assert "rank-dependent differs across ranks" in caught


def test_closed_forms_and_naive_gather():
    s, r, n = 4, 64, 1024
    # every refresh opens with the 2-element MAX all-reduce of the overflow scale (issue 19)
    assert refresh_bytes("init", n, r) == refresh_bytes("svd", n, r) == s * (2 + 2 * r * r + r * n)
    assert refresh_bytes("svd", n, r, fallback="tsqr-pass2") == s * (2 + 3 * r * r + r * n)
    assert refresh_bytes("correlation", n, r) == s * (4 + r * n)
    assert refresh_bytes("correlation", n, r, transposed=True) == s * (3 + 3 * n + r * n)
    sent, held = naive_gather_bytes(512, 4096, n)
    assert (sent, held) == (s * 512 * n, s * 4096 * n)
    assert refresh_bytes("svd", n, r) / held < 2 * r / 4096  # ≈ r/M of the naive port's gathered X
    with pytest.raises(ValueError, match="kind"):
        refresh_bytes("qr", n, r)
    with pytest.raises(ValueError, match="fallback"):
        refresh_bytes("svd", n, r, fallback="householder")
    with pytest.raises(ValueError, match="fallback"):
        refresh_bytes("correlation", n, r, fallback="tsqr-pass1")


def test_bad_inputs_name_the_argument():
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="rank"):
        orthogonal_basis(x, 5)
    with pytest.raises(TypeError, match="rank"):
        orthogonal_basis(x, 2.0)
    with pytest.raises(ValueError, match="omega"):
        orthogonal_basis(x, 2, omega=torch.randn(3, 2))
    with pytest.raises(ValueError, match="x must be a 2-D"):
        orthogonal_basis(torch.randn(6), 1)
    p, mo = torch.randn(4, 2), torch.randn(6, 2)
    with pytest.raises(ValueError, match="global_rows"):
        correlation_step(p, x, mo, global_rows=3, transposed=False)
    with pytest.raises(ValueError, match="shapes do not match"):
        correlation_step(p, x, torch.randn(5, 2), global_rows=6, transposed=False)
    with pytest.raises(ValueError, match="angle"):
        normalized_correlation_step(p, x, mo, global_rows=6, transposed=False, angle=math.pi)
    with pytest.raises(ValueError, match="same shape"):
        align_signs(p, torch.randn(4, 3))
    with pytest.raises(ValueError, match="same shape"):
        align_rotation(p, torch.randn(4, 3))
