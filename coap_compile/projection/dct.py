"""DCT projection: ``P`` = ``r`` columns of a fixed orthonormal DCT-II basis, chosen by the gradient.

From "SVD-free low-rank adaptive gradient optimization": instead of an SVD, project onto the ``r`` columns
of a fixed orthogonal basis that carry the most gradient energy. Here the basis is the orthonormal DCT-II of
size ``N`` (canonical orientation ``X ∈ ℝ^{M×N}``, :mod:`coap_compile.projection.base`)::

    B[j, k] = w_k cos(π (2j + 1) k / (2N)),   w_0 = √(1/N),  w_k = √(2/N) (k > 0)      (N×N, BᵀB = I)

    k = 0                              init:     S = top-r_k ‖X B_k‖₂   (one matmul X·B, column norms, top-k)
    k > 0, k ≡ 0 (mod update_interval) "select": S ← the same choice for the current X (slots kept, below)
    otherwise                          S unchanged
    P = B[:, S]                        (N×r, orthonormal columns; materialised by :meth:`DctPolicy.basis`)

**Why top-k.** ``B`` is orthonormal, so for an index set ``S`` the projection residual is
``‖X − X B_S B_Sᵀ‖² = ‖X‖² − Σ_{k∈S} ‖X B_k‖²``: the ``r`` columns with the largest norms of ``X B`` are the
exact best index set for the MSE of COAP's correlation loss (brute force check in ``tests/test_dct.py``).

**Slots.** The moments are stored in the coordinates of ``P``'s columns, and without ``restore_state`` they
are reused as they are across a refresh (spec §5). A column that stays selected therefore keeps its slot (its
moments stay exact); the columns that enter take the slots of those that leave, in descending score order.
With ``restore_state`` (:meth:`DctPolicy.remap_moments`) the map ``M ← M P_oldᵀ P_new`` is, for column
subsets of one orthonormal basis, exactly "keep the kept slots, zero the entered ones" (the same for ``√V``),
applied without any ``N×r`` product.

**COAP's correlation step does not apply** to an index set: ``B_S − 0.1 ∇`` is no longer a set of DCT columns
(rounding it back to the nearest columns would be a different rule), and the top-k choice already minimises
the MSE factor exactly. ``projection="dct"`` therefore uses only ``update_interval`` (a selection at every
``k ≡ 0 (mod update_interval)``); ``reproject_factor`` has no meaning for it.

**State** (tensors only): ``dct_index`` (``r`` int64 column indices, in slot order) and ``dct_basis_key``, an
*empty* ``0×N`` tensor in the working dtype on the state's device: its shape, dtype and device name the shared
basis without a host read (so :meth:`DctPolicy.basis` never synchronises) and it takes 0 bytes. A key cast to
bf16/fp16 by a generic ``load_state_dict`` still means float32 (the working-dtype rule). Per matrix that is
``8 r`` bytes instead of ``4 N r`` for a dense ``P``. The shared
``N×N`` basis is built once per process per distinct ``(N, dtype, device)`` (:func:`shared_basis`) and is
counted once by :meth:`DctPolicy.shared_state_layout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from .base import LOCAL, Comm, Layout, ProjectionPolicy, RefreshKind
from .coap import UPDATE_INTERVAL
from .linalg import check_positive_int, work_dtype

__all__ = [
    "DctPolicy",
    "clear_shared_bases",
    "dct_basis",
    "select_columns",
    "shared_basis",
    "shared_basis_builds",
]

_CACHE: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
_BUILDS: dict[tuple[int, torch.dtype, torch.device], int] = {}
#: Score columns of ``X B`` in blocks so the temporary stays ≤ 2**24 elements (64 MiB float32).
_SCORE_BLOCK_ELEMS = 1 << 24


def dct_basis(n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The orthonormal DCT-II matrix ``B`` (``N×N``, module docstring), columns = frequencies.

    Computed in float64 from exact integer phases ``(2j + 1) k mod 4N`` (so large ``N`` loses no accuracy
    in the cosine argument), then cast to ``dtype`` and moved to ``device``. Not cached: see
    :func:`shared_basis`.
    """
    n = check_positive_int("n", n)
    j = torch.arange(n, dtype=torch.int64)
    phase = torch.remainder((2 * j[:, None] + 1) * j[None, :], 4 * n)
    b = torch.cos(phase.to(torch.float64) * (torch.pi / (2 * n)))
    b *= (2.0 / n) ** 0.5
    b[:, 0] = (1.0 / n) ** 0.5
    return b.to(dtype=dtype, device=device)


def _key(n: int, dtype: torch.dtype, device: torch.device | str) -> tuple[int, torch.dtype, torch.device]:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return int(n), dtype, dev


def shared_basis(n: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The process-wide DCT-II basis for ``(n, dtype, device)``: built on first use, then returned as is.

    Every matrix of canonical width ``n`` shares it. Treat it as read-only. ``"cuda"`` and
    ``"cuda:<current>"`` are the same key. :func:`shared_basis_builds` counts the builds per key (each is
    built once).
    """
    key = _key(n, dtype, device)
    basis = _CACHE.get(key)
    if basis is None:
        with torch.no_grad():
            basis = _CACHE[key] = dct_basis(key[0], dtype=dtype, device=key[2])
        _BUILDS[key] = _BUILDS.get(key, 0) + 1
    return basis


def shared_basis_builds() -> dict[tuple[int, torch.dtype, torch.device], int]:
    """``{(n, dtype, device): number of times built}`` since the process started (or the last clear)."""
    return dict(_BUILDS)


def clear_shared_bases() -> None:
    """Drop the cached bases and the build counts (tests; frees the memory when no state refers to them)."""
    _CACHE.clear()
    _BUILDS.clear()


def select_columns(x: Tensor, basis: Tensor, rank: int) -> Tensor:
    """Indices (int64, descending score) of the ``rank`` columns ``k`` of ``basis`` maximising ``‖X B_k‖₂``.

    One matmul ``X B`` (evaluated in column blocks so its ``M×N`` result is never held whole when large) and a
    top-k of the column norms.
    """
    n = basis.shape[1]
    if not 1 <= rank <= n:
        raise ValueError(f"rank must be in [1, {n}] for a basis with {n} columns, got rank={rank}")
    x = x.to(basis.dtype)
    block = max(1, _SCORE_BLOCK_ELEMS // max(1, x.shape[0]))
    scores = torch.cat(
        [torch.linalg.vector_norm(x @ basis[:, i : i + block], dim=0) for i in range(0, n, block)]
    )
    return torch.topk(scores, rank).indices


def _keep_slots(old: Tensor, new: Tensor) -> Tensor:
    """``new``'s set in ``old``'s slot order: kept indices stay, entrants fill the vacated slots."""
    kept = torch.isin(old, new)
    out = old.clone()
    out[~kept] = new[~torch.isin(new, old)]
    return out


class DctPolicy(ProjectionPolicy):
    """DCT-II column selection (module docstring).

    Args:
        update_interval: steps between selections (int > 0, default 32).
        restore_state: stored flag (read by the optimizer, as for :class:`CoapPolicy`); the mapping itself is
            :meth:`remap_moments`.
    """

    name: ClassVar[str] = "dct"
    needs_first_moment: ClassVar[bool] = False

    def __init__(self, update_interval: int = UPDATE_INTERVAL, restore_state: bool = False) -> None:
        self.update_interval = check_positive_int("update_interval", update_interval)
        self.restore_state = bool(restore_state)

    def __repr__(self) -> str:
        return f"DctPolicy(update_interval={self.update_interval}, restore_state={self.restore_state})"

    def init_state(self, x: Tensor, rank: int, comm: Comm = LOCAL) -> dict[str, Tensor]:
        n, dtype = x.shape[1], work_dtype(x)
        index = select_columns(x, shared_basis(n, dtype, x.device), rank)
        return {"dct_index": index, "dct_basis_key": torch.empty(0, n, dtype=dtype, device=x.device)}

    def refresh_kind(self, k: int) -> RefreshKind:
        if k == 0:
            return "init"
        return "select" if k % self.update_interval == 0 else ""

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
        kind = self.refresh_kind(k)
        if kind == "":
            return False
        index = state["dct_index"]
        new = select_columns(x, self.shared(state), index.shape[0])
        new = new if kind == "init" else _keep_slots(index, new)
        changed = not torch.equal(new, index)
        index.copy_(new)
        return changed

    def shared(self, state: dict[str, Tensor]) -> Tensor:
        """The shared ``N×N`` basis this state's indices refer to."""
        key = state["dct_basis_key"]
        return shared_basis(key.shape[1], work_dtype(key), state["dct_index"].device)

    def state_shape(self, state: dict[str, Tensor]) -> tuple[int, int]:
        return state["dct_basis_key"].shape[1], state["dct_index"].shape[0]

    def basis(self, state: dict[str, Tensor]) -> Tensor:
        """``P = B[:, dct_index]`` (a fresh ``N×r`` gather; ``dct_index`` order = moment slot order)."""
        return self.shared(state).index_select(1, state["dct_index"])

    def snapshot(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"dct_index": state["dct_index"].clone(), "dct_basis_key": state["dct_basis_key"]}

    def remap_moments(
        self,
        old: dict[str, Tensor],
        state: dict[str, Tensor],
        *,
        first: Sequence[Tensor] = (),
        second: Sequence[Tensor] = (),
    ) -> None:
        """Exactly ``M ← M P_oldᵀ P_new`` and ``V ← ((√V P_oldᵀ) P_new)²`` for column subsets of one
        orthonormal basis (``P_oldᵀ P_new`` is a partial permutation): a slot whose column was selected before
        takes that column's old entries, the others are set to zero. With the slot order of :meth:`refresh`
        that is "keep the kept slots, zero the entered ones"."""
        old_index, new_index = old["dct_index"], state["dct_index"]
        pos = {int(c): i for i, c in enumerate(old_index.tolist())}
        src = torch.tensor([pos.get(int(c), -1) for c in new_index.tolist()], device=new_index.device)
        present = src >= 0
        for t in (*first, *second):
            t.copy_(torch.where(present, t.index_select(1, src.clamp_min(0)), 0.0))

    def state_layout(self, n: int, rank: int, dtype: torch.dtype) -> Layout:
        return {"dct_index": ((rank,), torch.int64), "dct_basis_key": ((0, n), dtype)}

    def shared_state_layout(self, n: int, dtype: torch.dtype) -> Layout:
        return {f"dct_basis[n={n},{dtype}]": ((n, n), dtype)}
