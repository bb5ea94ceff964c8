"""``torch.ops.coap_compile`` custom ops around the projected update, traceable by ``torch.compile``.

* ``coap_compile::fused_projected_update(w, g, p, states, c, epilogue_id, transposed, backend,
  input_precision)``: ``X = g`` (``gᵀ`` if ``transposed``), ``W = w`` (``wᵀ``); the states are updated and
  ``W ← decay·W + scale·D Pᵀ`` in place (see :mod:`coap_compile.kernels.launch`). Mutates ``w``, ``states``.
* ``coap_compile::project_back_update(w, d, p, decay, scale, transposed, backend, input_precision)``:
  ``W ← decay·W + scale·D Pᵀ`` (K2 alone). Mutates ``w``.
* ``coap_compile::grouped_fused_projected_update(ws, gs, ps, states, c, epilogue_id, transposed, backend,
  input_precision)``: the first op for ``K`` members with equal ``M×r`` states and one ``c``
  (``transposed``: one flag per member; ``states``: the members' op tensors one after the other) in one
  grouped K1 and one grouped K2 launch (:mod:`coap_compile.kernels.grouped`), each member bit-identical
  to the first op on it. Mutates ``ws``, ``states``.

An op cannot take an :class:`~coap_compile.ir.Epilogue`, so epilogues live in a process-level registry:
:func:`register_epilogue` returns a stable id (a hash of ``Epilogue.key()``) that is passed as a string.
Register before compiling (hashing sympy inside a compiled region would graph-break).

**Storage variants.** :func:`register_variant` registers an epilogue together with the storage mode of each
state (:class:`~coap_compile.kernels.variants.KernelVariant`) and returns its id (``kv_…``, a hash of the
epilogue key and the mode tags), passed as the same ``epilogue_id`` argument; the op's ``states`` is then
the flat list of every state's tensors (fp32: values; bf16: values [+ rng]; int8: codes + absmax [+ rng];
:mod:`.variants`), all mutated in place (values/codes/scales written, rng counters advanced). A variant
whose states are all fp32 gets the plain epilogue's id, so that path is unchanged. The code tables are
not arguments (constants, taken from ``CodeMap.tables(device)`` inside the op).

Dispatch on ``backend``: ``"eager"`` → the torch twin; ``"auto"`` → Triton for CUDA tensors, the twin on
CPU; ``"triton"`` → Triton (on CPU only under ``TRITON_INTERPRET=1``). When Triton cannot be used (not
installed, no driver, a kernel that fails to generate or compile) the op falls back to the twin and
``warnings.warn``-s once per process and reason. Both ops have fake implementations (no outputs), so
``torch.compile`` traces them without graph breaks; Inductor functionalizes and re-inplaces them.
"""

import hashlib
import threading
import warnings
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from coap_compile.ir import Epilogue
from coap_compile.kernels import cache, env, grouped, launch
from coap_compile.kernels.variants import KernelVariant, StateMode

__all__ = [
    "BACKENDS",
    "fused_projected_update",
    "get_epilogue",
    "get_kernel",
    "grouped_fused_projected_update",
    "project_back_update",
    "register_epilogue",
    "register_variant",
    "reset_fallback_warnings",
]

BACKENDS = ("auto", "triton", "eager")
_EPILOGUES: dict[str, Epilogue] = {}
_VARIANTS: dict[str, KernelVariant] = {}
_WARNED: set[str] = set()
_FAILED: dict[str, str] = {}  # kernel key -> reason Triton failed for it (not retried)
_LOCK = threading.Lock()


def register_epilogue(ep: Epilogue) -> str:
    """Register ``ep`` for the ops and return its id (stable across processes: a hash of ``ep.key()``)."""
    eid = "ep_" + hashlib.sha256(ep.key().encode()).hexdigest()[:16]
    with _LOCK:
        _EPILOGUES.setdefault(eid, ep)
    return eid


def register_variant(ep: Epilogue | KernelVariant, modes: tuple[StateMode, ...] | None = None) -> str:
    """Register ``ep`` with the storage ``modes`` of its states (or a :class:`KernelVariant`) and return
    the op id: :func:`register_epilogue`'s id when every state is fp32, else ``kv_`` + a hash of
    :meth:`KernelVariant.key` (stable across processes)."""
    variant = ep if isinstance(ep, KernelVariant) else KernelVariant(ep, tuple(modes or ()))
    if variant.all_fp32:
        return register_epilogue(variant.epilogue)
    vid = "kv_" + hashlib.sha256(variant.key().encode()).hexdigest()[:16]
    with _LOCK:
        _VARIANTS.setdefault(vid, variant)
    return vid


def get_epilogue(epilogue_id: str) -> Epilogue:
    """The epilogue of an id from :func:`register_epilogue` or :func:`register_variant`."""
    kern = get_kernel(epilogue_id)
    return kern.epilogue if isinstance(kern, KernelVariant) else kern


def get_kernel(epilogue_id: str) -> Epilogue | KernelVariant:
    """What an op id names: an :class:`Epilogue` (all states fp32) or a storage :class:`KernelVariant`."""
    kern = _EPILOGUES.get(epilogue_id) or _VARIANTS.get(epilogue_id)
    if kern is None:
        raise KeyError(
            f"unknown epilogue id {epilogue_id!r}: call coap_compile.kernels.register_epilogue(ep) (or "
            "register_variant(ep, modes)) in this process before running the op"
        )
    return kern


def reset_fallback_warnings() -> None:
    """Forget which fallback warnings were shown and which kernels failed (for tests)."""
    with _LOCK:
        _WARNED.clear()
        _FAILED.clear()


def _warn_once(reason: str) -> None:
    with _LOCK:
        if reason in _WARNED:
            return
        _WARNED.add(reason)
    warnings.warn(f"coap_compile: falling back to the eager kernels: {reason}", RuntimeWarning, stacklevel=3)


def _triton_usable(device: torch.device, backend: str, input_precision: str) -> bool:
    """Whether to run Triton for tensors on ``device``; warns (once) when it was wanted but can't be."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if input_precision not in launch.INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {launch.INPUT_PRECISIONS}, got {input_precision!r}")
    if backend == "eager" or (backend == "auto" and device.type != "cuda"):
        return False
    if not env.HAS_TRITON:
        _warn_once("triton is not installed")
        return False
    if device.type == "cpu":
        if not cache.interpreting():
            _warn_once("Triton on CPU tensors needs TRITON_INTERPRET=1 (set before import)")
            return False
        return True
    if device.type != "cuda":
        _warn_once(f"no Triton kernels for device type {device.type!r}")
        return False
    return True


def _try_triton(key: str, fn, *args, **kwargs) -> bool:
    """Run a Triton launch; on failure remember it, warn once, and return False (nothing was mutated)."""
    if key in _FAILED:
        return False
    try:
        fn(*args, **kwargs)
        return True
    except Exception as e:  # compile errors, missing driver, code generation errors
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        with _LOCK:
            _FAILED[key] = reason
        _warn_once(f"Triton kernel {key} failed ({reason})")
        return False


@torch.library.custom_op("coap_compile::fused_projected_update", mutates_args=("w", "states"))
def _fused_op(
    w: Tensor,
    g: Tensor,
    p: Tensor,
    states: list[Tensor],
    c: Tensor,
    epilogue_id: str,
    transposed: bool = False,
    backend: str = "auto",
    input_precision: str = "ieee",
) -> None:
    kern = get_kernel(epilogue_id)
    ep = kern.epilogue if isinstance(kern, KernelVariant) else kern
    w_view, x = (w.t(), g.t()) if transposed else (w, g)
    launch._check_update(w_view, x, p, states, c, kern)
    if not _triton_usable(w.device, backend, input_precision):
        launch.eager_projected_update_(w_view, x, p, states, c, kern)
        return
    d = torch.empty((x.shape[0], p.shape[1]), dtype=torch.float32, device=x.device)
    if not _try_triton(
        f"K1[{epilogue_id}, {x.dtype}]",
        launch.projected_lowrank_,
        x,
        p,
        states,
        c,
        kern,
        out=d,
        input_precision=input_precision,
    ):
        launch.eager_projected_update_(w_view, x, p, states, c, kern)
        return
    decay = launch.epilogue_decay(ep)
    if not _try_triton(
        f"K2[{w.dtype}]",
        launch.project_back_update_,
        w_view,
        d,
        p,
        decay,
        ep.scale,
        c=c,
        input_precision=input_precision,
    ):
        launch.eager_project_back_update_(w_view, d, p, decay, ep.scale, c=c)


@_fused_op.register_fake
def _fused_fake(w, g, p, states, c, epilogue_id, transposed=False, backend="auto", input_precision="ieee"):
    return None


@torch.library.custom_op("coap_compile::project_back_update", mutates_args=("w",))
def _back_op(
    w: Tensor,
    d: Tensor,
    p: Tensor,
    decay: Optional[Tensor],  # noqa: UP045 (custom_op schema inference on torch 2.11)
    scale: float,
    transposed: bool = False,
    backend: str = "auto",
    input_precision: str = "ieee",
) -> None:
    w_view = w.t() if transposed else w
    launch._check_back(w_view, d, p)
    launch._resolve_decay(decay, None, w.device)  # user errors raise here, not as a "Triton failure"
    if _triton_usable(w.device, backend, input_precision) and _try_triton(
        f"K2[{w.dtype}]",
        launch.project_back_update_,
        w_view,
        d,
        p,
        decay,
        scale,
        input_precision=input_precision,
    ):
        return
    launch.eager_project_back_update_(w_view, d, p, decay, scale)


@_back_op.register_fake
def _back_fake(w, d, p, decay, scale, transposed=False, backend="auto", input_precision="ieee"):
    return None


@torch.library.custom_op("coap_compile::grouped_fused_projected_update", mutates_args=("ws", "states"))
def _grouped_op(
    ws: list[Tensor],
    gs: list[Tensor],
    ps: list[Tensor],
    states: list[Tensor],
    c: Tensor,
    epilogue_id: str,
    transposed: list[bool],
    backend: str = "auto",
    input_precision: str = "ieee",
) -> None:
    kern = get_kernel(epilogue_id)
    ep = kern.epilogue if isinstance(kern, KernelVariant) else kern
    kk = len(ws)
    if not kk or len(transposed) != kk or len(states) % kk:
        raise ValueError(
            f"{kk} weights, {len(transposed)} transposed flags and {len(states)} state tensors: need K >= 1 "
            "members, one flag each and the same number of state tensors each"
        )
    n = len(states) // kk
    sts = [states[k * n : (k + 1) * n] for k in range(kk)]
    w_views = [w.t() if t else w for w, t in zip(ws, transposed)]
    xs = [g.t() if t else g for g, t in zip(gs, transposed)]
    m, r = grouped.check_members(w_views, xs, ps, sts, c, kern)

    def eager() -> None:
        for k in range(kk):
            launch.eager_projected_update_(w_views[k], xs[k], ps[k], sts[k], c, kern)

    if not _triton_usable(ws[0].device, backend, input_precision):
        return eager()
    d = torch.empty((kk, m, r), dtype=torch.float32, device=xs[0].device)
    kwargs = {"out": d, "input_precision": input_precision, "checked": True}  # check_members ran above
    if not _try_triton(f"grouped K1[{epilogue_id}, {xs[0].dtype}]", grouped.grouped_lowrank_, xs, ps, sts, c,
                       kern, **kwargs):  # fmt: skip
        return eager()
    decay = launch.epilogue_decay(ep)
    if not _try_triton(f"grouped K2[{ws[0].dtype}]", grouped.grouped_project_back_, w_views, d, ps, decay,
                       ep.scale, c=c, input_precision=input_precision, checked=True):  # fmt: skip
        for k in range(kk):
            launch.eager_project_back_update_(w_views[k], d[k], ps[k], decay, ep.scale, c=c)


@_grouped_op.register_fake
def _grouped_fake(ws, gs, ps, states, c, epilogue_id, transposed, backend="auto", input_precision="ieee"):
    return None


def grouped_fused_projected_update(
    ws: Sequence[Tensor],
    gs: Sequence[Tensor],
    ps: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    c: Tensor,
    epilogue: Union[Epilogue, KernelVariant, str],  # noqa: UP007
    *,
    transposed: Sequence[bool],
    backend: str = "auto",
    input_precision: str = "ieee",
) -> None:
    """Call ``torch.ops.coap_compile.grouped_fused_projected_update`` (``states[k]``: member ``k``'s op
    tensors; ``epilogue`` as :func:`fused_projected_update`)."""
    if isinstance(epilogue, str):
        eid = epilogue
    elif isinstance(epilogue, KernelVariant):
        eid = register_variant(epilogue)
    else:
        eid = register_epilogue(epilogue)
    flat = [t for s in states for t in s]
    torch.ops.coap_compile.grouped_fused_projected_update(
        list(ws), list(gs), list(ps), flat, c, eid, [bool(t) for t in transposed], backend, input_precision
    )


def fused_projected_update(
    w: Tensor,
    g: Tensor,
    p: Tensor,
    states: Sequence[Tensor],
    c: Tensor,
    epilogue: Union[Epilogue, KernelVariant, str],  # noqa: UP007
    *,
    transposed: bool = False,
    backend: str = "auto",
    input_precision: str = "ieee",
) -> None:
    """Call ``torch.ops.coap_compile.fused_projected_update`` (``epilogue``: an id, an Epilogue or a
    storage :class:`KernelVariant`, whose ``states`` are then the flat tensor list)."""
    if isinstance(epilogue, str):
        eid = epilogue
    elif isinstance(epilogue, KernelVariant):
        eid = register_variant(epilogue)
    else:
        eid = register_epilogue(epilogue)
    torch.ops.coap_compile.fused_projected_update(
        w, g, p, list(states), c, eid, transposed, backend, input_precision
    )


def project_back_update(
    w: Tensor,
    d: Tensor,
    p: Tensor,
    decay: Optional[Tensor],  # noqa: UP045
    scale: float,
    *,
    transposed: bool = False,
    backend: str = "auto",
    input_precision: str = "ieee",
) -> None:
    """Call ``torch.ops.coap_compile.project_back_update`` (``decay``: 1-element fp32 tensor or None)."""
    torch.ops.coap_compile.project_back_update(
        w, d, p, decay, float(scale), transposed, backend, input_precision
    )
