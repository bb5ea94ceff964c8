"""COAP: correlation-aware updates of ``P`` between occasional low-cost SVD recalibrations.

Schedule (``k`` = completed optimizer steps, ``T_u`` = ``update_interval``, ``λ`` = ``reproject_factor``)::

    k = 0                               init:        P = orthogonal_basis(X, r, Ω ~ 𝒩(0,1), seed 3407)
    k > 0, k ≡ 0 (mod T_u·λ)            "svd":       P ← orthogonal_basis(X, r, Ω = P)
    k > 0, k ≡ 0 (mod T_u), otherwise   "correlation": one step on P (below)
    otherwise                           P unchanged

Correlation step (spec §4), in the canonical orientation ``X ∈ ℝ^{M×N}``, ``P ∈ ℝ^{N×r}`` and the
low-rank first moment ``M ∈ ℝ^{M×r}`` (the value *before* this step's moment update)::

    X̂ = (X P) Pᵀ,   M̂ = M Pᵀ
    L(P) = mean((X̂ − X)²) · (1 − mean_i cos(M̂_i, X_i))
    "paper":      ∇ = ∂L/∂P,  ∇ ← ∇ · min(1, 1/(‖∇‖_F + 1e-6)),  P ← P − 0.1 ∇
    "normalized": P ← polar(P − t (I − P Pᵀ) ∇),  t such that span P turns by exactly θ

``∂L/∂P`` is evaluated in closed form (:mod:`coap_compile.projection.correlation`: derivation, pass count and
the normalized step's math). The official code takes the cosine along dim 1 of the *original* ``m×n`` matrix
for both sides, so in the canonical orientation it runs along dim 1 when not transposed and along dim 0 when
``transposed``.

**The angle θ of the normalized step** (``DEFAULT_ANGLE`` = 30°) was chosen with the study
:func:`coap_lab.studies.projection.main` (``coap_lab/studies/projection.py`` in this repository, on the demo
side, outside the library; ``python -m coap_lab.studies.projection`` prints the table below): the gradients of
the demo model (d = 256, 4 layers, AdamW, lr 3e-3 with warm-up and cosine, batch 8 × 128 bytes, seed 0),
layers 0 and 3 (14 matrices, r = 64 by rank ratio 4), 112 steps replayed through each schedule with
``T_u = 16``, ``λ = 5`` (correlation steps at k = 16, 32, 48, 64, 96, SVD at 80) and an Adam first moment
(β₁ = 0.9). ``residual`` = mean ``‖X − X P Pᵀ‖²/‖X‖²`` over all steps and matrices, ``loss`` = mean
``residual·(1 − c̄)`` (COAP's correlation loss made scale-free), angles in degrees (median over refreshes and
matrices; largest / mean principal angle)::

    schedule           correlation step: largest / mean    SVD refresh: largest / mean   loss    residual
    paper              6.3e-09 / 4.9e-10                   85.86 / 49.47                 0.3131  0.3074
    off (SVD only)     -                                   85.86 / 49.47                 0.3131  0.3073
    normalized 0.5°    0.5 / -                             85.86 / -                     0.3101  0.3043
    normalized 2°      2 / 0.054                           85.85 / 49.32                 0.3012  0.2953
    normalized 10°     10 / 0.28                           85.81 / 48.71                 0.2569  0.2512
    normalized 20°     20 / 0.58                           85.79 / 48.08                 0.2211  0.2163
    normalized 30°     30 / 0.87                           85.77 / 47.61                 0.2097  0.2056
    normalized 45°     45 / 1.31                           85.74 / 47.10                 0.2189  0.2153
    normalized 60°     60 / 1.99                           85.71 / 46.67                 0.2449  0.2418
    dct (T_u = 16)     selection: 90 / 47.8                -                             0.5971  0.5961

Findings: at training-scale gradients the paper's step turns ``span P`` by 6e-9 degrees, so "paper" and
"off" are the same schedule to 4 digits (issue 13's observation, here per refresh); the SVD refresh turns it
by 86° at worst (49° on average) every 80 steps. The normalized step lowers the loss on the *following*
gradients up to θ ≈ 30° and then overshoots; the mean angle stays small (0.9° at θ = 30°) because ``H``'s
spectrum is dominated by a few directions. 30° is the measured minimum (20–45° are within 6 %). This ranks
subspace fit only. **The default mode was decided by training quality** (``bench quality``, the demo model,
300 steps, rank ratio 4, 3 seeds, commit e37b7fb; ``benchmarks/results/refresh/quality.json``), final
validation loss mean ± std::

    paper        1.8977 ± 0.0286        normalized 30°   1.9297 ± 0.0224
    off          1.9003 ± 0.0257        (GaLore policy   1.8811 ± 0.0068;  DCT 1.9322 ± 0.0107)

The lower subspace residual of the normalized step did not turn into a lower loss: it ends 0.032 *above*
"paper" (more than one standard deviation), and "paper" equals "off" within 0.003, as its 6e-9° turn
predicts. The default stays ``"paper"``: the published algorithm, as good as any mode measured here, and its
cost is the correlation refresh measured in ``bench step`` (no dearer than the SVD refresh).

**Basis continuity** (``basis``, issue 19). The moments are kept across a refresh (``restore_state=False``),
so the orientation of the new basis matters: a column whose sign flips reverses its direction's momentum,
and LAPACK fixes no signs. ``basis="signs"`` (default) flips each column of an SVD refresh onto its
predecessor and the init's onto ``Ω`` (:func:`~.linalg.align_signs`); ``"rotation"`` takes the Procrustes
basis of the new span closest to the old ``P`` (:func:`~.linalg.align_rotation`); ``"official"`` leaves
LAPACK's signs (the official code, bit for bit; on the rows side the signs stay aligned, the FSDP2
convention). Measured with the setup of ``tests/test_stable_refresh.py``'s property (one ulp on
one entry of the gradient at the SVD refresh ``k = 24``, 100 AdamW steps, ``r = 16``, ``T_u = 8``, ``λ = 3``,
shapes 64×48, 48×96, 96×96 × seeds 0–2; relative change of the accumulated update, max / median over
the 9 runs, 2-core Xeon)::

    official   0.26     / 4.5e-6      (48×96 seeds 1, 2: 0.15, 0.23 — flipped columns)
    signs      9.8e-6   / 4.2e-6
    rotation   2.2e-6   / 1.7e-6

Both meet the 1e-3 target. ``"signs"`` is the default: it keeps the singular-vector coordinates in which
Adam normalises per coordinate (the paper's basis; a rotation mixes coordinates whose second moments
differ) and it is already the rows side's convention, so FSDP2 needs no change. Not yet measured: their
training quality on the demo LM (``bench quality --tune-lr`` with ``coap``, ``coap-rotation``,
``coap-official``; the demo LM ran at 7.6 s/step on the shared 2-core CPU where this was decided).

**Null directions** (:func:`~.linalg.drop_null`): at the init and every SVD refresh, columns whose singular
value is ``≤ ε·σ₁·max(M, N)`` are zeroed (not with ``"official"``), on every side: the rows side and FSDP2's
row shard judge the singular values of their (sharded) ``B`` against the whole ``X``'s ``M×N``
(:meth:`~.base.Comm.global_shape`); correlation steps move the live columns only, so the null ones stay
zero until the next SVD refresh recomputes them from the gradient.
"""

from __future__ import annotations

import math
from typing import ClassVar

from torch import Tensor

from .base import LOCAL, Comm, ProjectionPolicy, RefreshKind
from .correlation import (
    CORRELATION_LR,
    CORRELATION_MAX_NORM,
    COSINE_EPS,
    DEFAULT_ANGLE,
    correlation_step,
)
from .linalg import (
    BASES,
    OMEGA_SEED,
    align_signs,
    check_positive_int,
    draw_omega,
    drop_null,
    orient,
    restore_moments,
)

__all__ = [
    "CORRELATION_LR",
    "CORRELATION_MAX_NORM",
    "CORRELATION_MODES",
    "DEFAULT_BASIS",
    "COSINE_EPS",
    "REPROJECT_FACTOR",
    "UPDATE_INTERVAL",
    "CoapPolicy",
    "correlation_step",
    "restore_moments",
]

#: Default of ``CoapPolicy(basis=...)`` / ``CoapSettings.basis`` (the measurement is in the module docstring).
DEFAULT_BASIS = "signs"
#: Values of ``CoapPolicy(correlation=...)``.
CORRELATION_MODES = ("paper", "normalized", "off")


#: COAP's schedule as the paper and the official code use it: ``T_u`` and ``λ`` (the defaults of every
#: policy and of :class:`coap_compile.runtime.settings.CoapSettings`).
UPDATE_INTERVAL = 32
REPROJECT_FACTOR = 5


class CoapPolicy(ProjectionPolicy):
    """COAP projection (schedule and updates in the module docstring).

    Args:
        update_interval: ``T_u``, steps between refreshes of ``P``.
        reproject_factor: ``λ``; every ``λ``-th refresh is a low-cost SVD instead of a correlation step.
        restore_state: stored flag read by the optimizer, which then maps its moments into the new basis
            with :func:`restore_moments` after each refresh (the policy never touches the moments).
        seed: seed of the private generator drawing the initial Ω (3407 in the official code).
        correlation: ``"paper"`` (default: the official clipped gradient step, lr 0.1), ``"normalized"``
            (turn ``span P`` by ``correlation_angle`` down the same loss; ``P`` stays orthonormal) or
            ``"off"`` (no correlation steps: ``P`` changes only at the SVD refreshes, every ``T_u·λ`` steps;
            the ablation "SVD-only schedule").
        correlation_angle: ``θ`` of the normalized step in radians, ``0 < θ < π/2`` (default
            :data:`~coap_compile.projection.correlation.DEFAULT_ANGLE`, 30°; measurement in the module
            docstring).
    """

    name: ClassVar[str] = "coap"
    needs_first_moment: ClassVar[bool] = True
    supports_sharding: ClassVar[bool] = True  # through a sharded Comm (coap_compile.distributed.fsdp)

    def __init__(
        self,
        update_interval: int = UPDATE_INTERVAL,
        reproject_factor: int = REPROJECT_FACTOR,
        restore_state: bool = False,
        seed: int = OMEGA_SEED,
        correlation: str = "paper",
        correlation_angle: float = DEFAULT_ANGLE,
        basis: str = DEFAULT_BASIS,
    ) -> None:
        if not isinstance(basis, str) or basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got basis={basis!r}")
        self.basis_rule = basis
        self.update_interval = check_positive_int("update_interval", update_interval)
        self.reproject_factor = check_positive_int("reproject_factor", reproject_factor)
        self.restore_state = bool(restore_state)
        self.seed = int(seed)
        if not isinstance(correlation, str) or correlation not in CORRELATION_MODES:
            raise ValueError(
                f"correlation must be one of {CORRELATION_MODES}, got correlation={correlation!r}"
            )
        self.correlation = correlation
        if isinstance(correlation_angle, bool) or not isinstance(correlation_angle, (int, float)):
            raise TypeError(
                f"correlation_angle must be a float in (0, π/2) radians, got {correlation_angle!r} of type "
                f"{type(correlation_angle).__name__}"
            )
        if not 0.0 < correlation_angle < math.pi / 2:
            raise ValueError(
                f"correlation_angle must be in (0, π/2) radians, got correlation_angle={correlation_angle!r}"
            )
        self.correlation_angle = float(correlation_angle)

    def __repr__(self) -> str:
        return (
            f"CoapPolicy(update_interval={self.update_interval}, reproject_factor={self.reproject_factor}, "
            f"restore_state={self.restore_state}, seed={self.seed}, correlation={self.correlation!r}, "
            f"correlation_angle={self.correlation_angle!r}, basis={self.basis_rule!r})"
        )

    def init_state(self, x: Tensor, rank: int, comm: Comm = LOCAL) -> dict[str, Tensor]:
        """``P = orthogonal_basis(X, r)`` with the seeded ``Ω``, each column's sign following ``Ω``
        (``basis="official"``: LAPACK's signs, except on the rows side, :class:`~.base.Comm`), null
        directions zeroed (:func:`~.linalg.drop_null`; not with ``"official"``)."""
        p, sv = comm.basis_sv(x, rank, seed=self.seed)
        if self.basis_rule != "official" or comm.aligned:
            p = align_signs(p, draw_omega(x.shape[1], rank, self.seed, x.device)).contiguous()
        return {"proj": self._drop_null(p, sv, comm.global_shape(x))}

    def _drop_null(self, p: Tensor, sv: Tensor | None, shape) -> Tensor:
        return p if self.basis_rule == "official" else drop_null(p, sv, shape)

    def orientation(self, comm: Comm) -> str:
        """The :func:`~.linalg.orient` rule of an SVD refresh: ``basis``, and signs on the rows side
        whatever ``basis`` (its sharded QR fixes other signs than LAPACK's; FSDP2 equals its reference)."""
        if self.basis_rule == "official":
            return "signs" if comm.aligned else "official"
        return self.basis_rule

    def refresh_kind(self, k: int) -> RefreshKind:
        if k == 0:
            return "init"
        if k % self.update_interval != 0:
            return ""
        if k % (self.update_interval * self.reproject_factor) == 0:
            return "svd"
        return "" if self.correlation == "off" else "correlation"

    def refresh(
        self,
        state: dict[str, Tensor],
        x: Tensor,
        k: int,
        *,
        first_moment: Tensor | None,
        transposed: bool,
        comm: Comm = LOCAL,
    ) -> bool:
        """The refresh due at ``k`` in place: the init basis, the low-cost SVD seeded with the current
        ``P`` (signs aligned to it with an aligned ``comm``), or the correlation step."""
        kind = self.refresh_kind(k)
        p = state["proj"]
        if kind == "":
            return False
        if kind == "init":
            p.copy_(self.init_state(x, p.shape[1], comm)["proj"])
        elif kind == "svd":
            new, sv = comm.basis_sv(x, p.shape[1], omega=p)
            p.copy_(orient(self._drop_null(new, sv, comm.global_shape(x)), p, self.orientation(comm)))
        else:
            if first_moment is None:
                raise ValueError(
                    f"the COAP correlation step at k={k} needs the low-rank first moment, "
                    "got first_moment=None"
                )
            angle = None if self.correlation == "paper" else self.correlation_angle
            live = p.abs().amax(0) > 0
            if bool(live.all()):
                p.copy_(comm.correlation_step(p, x, first_moment, transposed=transposed, angle=angle))
            elif bool(live.any()):  # null directions stay null until the next SVD refresh
                f = first_moment[:, live]
                p[:, live] = comm.correlation_step(p[:, live], x, f, transposed=transposed, angle=angle)
        return True
