"""Host wrappers for the generated kernels, and their eager twins (the CPU path and the test oracle).

All functions work in the canonical orientation (:mod:`coap_compile.ir`): ``x`` and ``w_view`` are M×N
views with arbitrary strides (a transposed view for a wide "left"-side matrix; nothing is copied),
``p`` is N×r fp32, the states and ``D`` are M×r fp32, ``c`` is the fp32 vector of hoisted scalars. Math:

    g = X P;   s' = f(g, s, c);   D = h(g, s, s', c);   W ← decay·W + scale·D Pᵀ

:func:`fused_projected_update_` runs it as two Triton kernels (K1: ``X P`` + epilogue → states, ``D``;
K2: ``D Pᵀ`` + weight update); :func:`project_back_update_` is K2 alone, for updates whose low-rank
middle runs eagerly (Adafactor). ``eager_*`` do the same with torch ops and
:func:`~coap_compile.ir.evaluate_epilogue`.

**State storage.** Wherever an ``Epilogue`` is taken, a :class:`~coap_compile.kernels.variants.KernelVariant`
(the epilogue plus a storage mode per state) may be given instead; ``states`` is then the flat list of
every state's tensors (values; bf16: values + rng; int8: codes + absmax + rng, :mod:`.variants`). K1 loads
bf16/int8 states into fp32 registers, runs the unchanged epilogue and stores them back rounded/quantized
(int8: ``BLOCK_M`` raised to a multiple of the block height, :mod:`.stored`), then advances the rng
counters once; the eager twin does ``load → evaluate_epilogue → store_`` with the storage's own
arithmetic. An all-fp32 variant is exactly the plain epilogue (same kernel, same checks).

``input_precision`` (per kernel) selects the ``tl.dot`` arithmetic for fp32 operands:

* ``"auto"`` (the optimizer's default; :func:`resolve_input_precision`): torch's convention, read at
  every launch (users set it after building the optimizer) and mapped through a cache keyed by the
  setting. bf16 operands (K1: a bf16 gradient ``X``; K2: a bf16 weight ``W``) → ``"bf16"``; fp32 ones
  follow ``torch.get_float32_matmul_precision()`` (:data:`AUTO_PRECISION`): ``"highest"`` →
  ``"ieee"``, ``"high"`` → ``"tf32"``, ``"medium"`` → ``"bf16"``. ``"high"`` maps to ``"tf32"``, not
  ``"tf32x3"``: ``"high"`` is what makes torch's own CUDA fp32 matmuls run single-pass TF32, so the
  kernels then make the same accuracy/speed trade as every other matmul of the user's model; a user
  who wants ≈fp32 accuracy on tensor cores asks for ``"tf32x3"`` explicitly. Torch ≥ 2.9's per-backend
  API (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, after which the legacy getter raises)
  is read as the same three levels. Floors, H100 (SXM: 3.35 TB/s, dense 67 fp32 FMA / 495 TF32 /
  989 bf16 TFLOP/s), fp32 4096×4096 weight, r = 512: the two projection GEMMs are
  2 · 2·4096·4096·512 = 34.4 GFLOP → ≈ 514 µs at strict fp32 (``"ieee"``), ≈ 70 µs TF32, ≈ 35 µs bf16,
  against ≈ 57 µs to stream the bytes (read ``G``, read + write ``W``: 3 · 64 MiB at 3.35 TB/s): only
  TF32/bf16 keep the step near its memory floor; ``"ieee"`` makes it ≈ 9× slower than that floor.
* ``"ieee"`` (the kernels' default): fp32 FMA-exact products; matches torch fp32 matmul (~1e-7 relative).
* ``"tf32x3"``: three tf32 tensor-core passes (split operands), ≈ fp32 accuracy, 3× tf32's MMA work.
* ``"tf32"``: opt-in, fastest; 10-bit mantissa operands. Adam-like updates behave like ``sign(g)`` early
  on, so entries of ``g`` near zero flip: after 5 steps the weight update is off by ≈5–7 % of its size
  (compiler-techniques §6). Use it only when that is acceptable.
* ``"bf16"``: opt-in, casts both operands to bf16 (fp32 accumulation); lossier than tf32.

Under ``TRITON_INTERPRET=1`` the precision is ignored (numpy fp32 products, so CPU tests cannot see tf32
error), bf16 operands are multiplied after an exact upcast (the interpreter's bf16 ``tl.dot`` is wrong,
triton#11584), and fp32 → bf16 roundings (``"bf16"`` operands, bf16 ``W`` stores) are done explicitly
to nearest-even, because the interpreter's casts truncate. On GPUs the plain casts round to nearest even.

Cost model (H100, not measured): each kernel does 2r flops per streamed M×N element. ``"ieee"`` lowers
to FMA (no MMA in the PTX, checked by a test), ≈ 67 fp32 TFLOP/s against 3.35 TB/s, so K1 becomes
FMA-bound above r ≈ 40 (fp32 X) or 20 (bf16 X); ``"tf32x3"`` (MMA) stays memory-bound to r ≈ 100.
Benchmark ``"tf32x3"`` as the GPU default. Block defaults (BM = 64, BR = next_pow2(r) ≤ 128, BN = 64,
BK = 32, 4 warps, 3 stages) are untuned.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from collections.abc import Sequence
from typing import Any

import sympy
import torch
from torch import Tensor

from coap_compile.ir import Epilogue, evaluate_epilogue
from coap_compile.kernels import cache, codegen, counts, stored
from coap_compile.kernels.variants import KernelVariant

__all__ = [
    "AUTO_PRECISION",
    "INPUT_PRECISIONS",
    "eager_project_back_update_",
    "eager_projected_update_",
    "epilogue_decay",
    "fused_projected_update_",
    "project_back_update_",
    "projected_lowrank_",
    "resolve_input_precision",
    "torch_matmul_precision",
]

INPUT_PRECISIONS = ("auto", "ieee", "tf32x3", "tf32", "bf16")
#: ``"auto"`` for fp32 operands: ``torch.get_float32_matmul_precision()`` → ``tl.dot`` arithmetic.
AUTO_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "bf16"}
#: torch ≥ 2.9's per-backend values (``torch.backends.cuda.matmul.fp32_precision``) as the three levels.
_BACKEND_LEVEL = {"ieee": "highest", "tf32": "high", "bf16": "medium"}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def torch_matmul_precision() -> str:
    """torch's global float32 matmul precision: ``"highest"``, ``"high"`` or ``"medium"`` (about 1 µs).

    ``torch.get_float32_matmul_precision()``; when the user set torch ≥ 2.9's per-backend API that getter
    raises ("mix of the legacy and new APIs"), and ``torch.backends.cuda.matmul.fp32_precision`` (or the
    generic ``torch.backends.fp32_precision`` when that is ``"none"``) is read instead."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        matmul = torch.backends.cuda.matmul.fp32_precision
        if matmul == "none":
            matmul = torch.backends.fp32_precision
        return _BACKEND_LEVEL.get(matmul, "highest")


def resolve_input_precision(input_precision: str, operand_dtype: torch.dtype) -> str:
    """The ``tl.dot`` arithmetic a launch uses: ``input_precision`` itself, or for ``"auto"`` the mapping
    of the module docstring (bf16 operands → ``"bf16"``, else :data:`AUTO_PRECISION` of torch's setting),
    read now (so a later ``torch.set_float32_matmul_precision`` applies) and cached by the setting."""
    if input_precision != "auto":
        return input_precision
    return _resolve_auto(torch_matmul_precision(), operand_dtype)


@functools.cache
def _resolve_auto(level: str, operand_dtype: torch.dtype) -> str:
    if operand_dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    return AUTO_PRECISION.get(level, "ieee")


def _k1_kernel(ep: Epilogue | KernelVariant) -> Any:
    return _k1_cached(ep, cache.interpreting())


def _k2_kernel() -> Any:
    return _k2_cached(cache.interpreting())


@functools.cache
def _k1_cached(ep: Epilogue | KernelVariant, interpreting: bool) -> Any:  # per-step: no sympy/sha256
    gen = codegen.k1_source(ep.epilogue, ep.modes) if isinstance(ep, KernelVariant) else codegen.k1_source(ep)
    return cache.load_module(gen.name, gen.source).coap_k1


@functools.cache
def _k2_cached(interpreting: bool) -> Any:
    name, src = codegen.k2_source()
    return cache.load_module(name, src).coap_k2


def _launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """The single launch point (tests wrap it to inspect arguments; :func:`.counts.count_launches` counts)."""
    interp = type(kernel).__name__ == "InterpretedFunction"
    guard: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if interp:  # masked-off lanes may divide by zero in numpy; they are never stored
        import numpy as np

        guard = np.errstate(all="ignore")
    elif isinstance(args[0], Tensor) and args[0].is_cuda:  # launch on the tensors' device and its stream
        guard = torch.cuda.device(args[0].device)
    with guard:
        kernel[grid](*args, INTERPRET=interp, **meta)
    if counts.ACTIVE:
        counts.record(kernel)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, int(n) - 1).bit_length()))


def _check_block(name: str, v: int) -> int:
    if v < 16 or v & (v - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (tl.dot minimum), got {v}")
    return v


def _dot_meta(input_precision: str, operand_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    input_precision = resolve_input_precision(input_precision, operand_dtype)
    if input_precision == "bf16":
        return {"BF16_DOT": True, "INPUT_PRECISION": "ieee"}
    return {"BF16_DOT": False, "INPUT_PRECISION": input_precision}


def _check_matrix(name: str, t: Tensor, shape: tuple[int, int] | None, dtypes: Sequence[torch.dtype]) -> None:
    if not isinstance(t, Tensor) or t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _epilogue(kern: Epilogue | KernelVariant) -> Epilogue:
    return kern.epilogue if isinstance(kern, KernelVariant) else kern


def _stored(kern: Epilogue | KernelVariant) -> KernelVariant | None:
    """The variant when some state is not fp32 (the storage path), else None (the plain path)."""
    return kern if isinstance(kern, KernelVariant) and not kern.all_fp32 else None


def _check_lowrank(
    x: Tensor, p: Tensor, states: Sequence[Tensor], c: Tensor, kern: Epilogue | KernelVariant
) -> tuple[int, int, int]:
    ep = _epilogue(kern)
    _check_matrix("x", x, None, _FLOAT_DTYPES)
    m, n = x.shape
    _check_matrix("p", p, None, (torch.float32,))
    if p.shape[0] != n:
        raise ValueError(f"p has shape {tuple(p.shape)}, expected ({n}, r) for x of shape {(m, n)}")
    r = p.shape[1]
    variant = _stored(kern)
    if variant is not None:
        stored.check_states(variant, states, m, r)
        _check_scalars_devices(x, p, c, ep, states)
        return m, n, r
    if len(states) != len(ep.state_names):
        raise ValueError(f"epilogue has states {ep.state_names}, got {len(states)} tensors")
    for name, s in zip(ep.state_names, states):
        _check_matrix(f"state {name!r}", s, (m, r), (torch.float32,))
        if s.stride() != states[0].stride():
            raise ValueError(
                f"all states must share strides, {name!r} has {s.stride()} != {states[0].stride()}"
            )
    _check_scalars_devices(x, p, c, ep, states)
    return m, n, r


def _check_scalars_devices(x: Tensor, p: Tensor, c: Tensor, ep: Epilogue, states: Sequence[Tensor]) -> None:
    if not isinstance(c, Tensor) or c.ndim != 1 or c.dtype != torch.float32 or c.numel() < len(ep.scalars):
        raise ValueError(f"c must be a 1-D float32 tensor with >= {len(ep.scalars)} entries, got {c!r:.80}")
    devs = {t.device for t in (x, p, c, *states)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")


def _check_update(
    w_view: Tensor, x: Tensor, p: Tensor, states: Sequence[Tensor], c: Tensor, ep: Epilogue | KernelVariant
) -> tuple[int, int, int]:
    m, n, r = _check_lowrank(x, p, states, c, ep)
    _check_matrix("w_view", w_view, (m, n), _FLOAT_DTYPES)
    if w_view.device != x.device:
        raise ValueError(f"w_view is on {w_view.device}, x on {x.device}")
    return m, n, r


def epilogue_decay(ep: Epilogue) -> int | float | None:
    """K2's decay for ``ep``: an index into ``c``, a constant, or ``None`` (decay 1)."""
    d = sympy.sympify(ep.decay)
    if d == 1:
        return None
    if d in ep.scalar_symbols:
        return ep.scalar_symbols.index(d)
    if d.is_Number:
        return float(d)
    raise ValueError(f"decay must be a hoisted scalar symbol or a number, got {ep.decay}")


def _resolve_decay(decay: Tensor | int | float | None, c: Tensor | None, dev: torch.device) -> Tensor | None:
    if decay is None or (isinstance(decay, numbers.Real) and not isinstance(decay, int) and decay == 1.0):
        return None
    if isinstance(decay, int) and not isinstance(decay, bool):
        if c is None or not 0 <= decay < c.numel():
            raise ValueError(f"decay index {decay} needs c with more than {decay} entries")
        return c[decay]
    if isinstance(decay, numbers.Real):
        return torch.full((), float(decay), dtype=torch.float32, device=dev)
    if not isinstance(decay, Tensor) or decay.numel() != 1 or decay.dtype != torch.float32:
        raise ValueError(
            f"decay must be a 1-element float32 tensor, an index into c, or None, got {decay!r:.80}"
        )
    if decay.device != dev:
        raise ValueError(f"decay is on {decay.device}, weights on {dev}")
    return decay.reshape(())


def projected_lowrank_(
    x: Tensor, p: Tensor, states: Sequence[Tensor], c: Tensor, epilogue: Epilogue | KernelVariant, *,
    out: Tensor | None = None, input_precision: str = "ieee", block_m: int = 64, block_r: int | None = None,
    block_k: int = 32, group_m: int = 8, num_warps: int = 4, num_stages: int = 3,
) -> Tensor:  # fmt: skip
    """K1: ``g = X P``, states updated in place, returns ``D`` (written into ``out`` when given).
    With a storage variant ``block_m`` is raised to the largest int8 block height if it is smaller."""
    m, n, r = _check_lowrank(x, p, states, c, epilogue)
    variant = _stored(epilogue)
    d = torch.empty((m, r), dtype=torch.float32, device=x.device) if out is None else out
    if out is not None and (
        tuple(out.shape) != (m, r) or out.dtype != torch.float32 or out.device != x.device
    ):
        raise ValueError(f"scratch must be a ({m}, {r}) float32 tensor on {x.device}, got {tuple(out.shape)}")
    if m == 0 or r == 0:
        if variant is not None:  # an empty store still advances the counters, as eagerly
            stored.advance_rng_(variant, variant.split(states))
        return d
    br = _check_block("block_r", block_r or _pow2(r, 16, 128))
    bm, bk = _check_block("block_m", block_m), _check_block("block_k", block_k)
    args, s0 = list(states), states[0] if states else d
    if variant is not None:
        groups = variant.split(states)
        args, (bh, bw) = stored.state_args(variant, groups, x.device)
        bm, br = max(bm, bh), max(br, bw)  # tiles own whole blocks (all powers of two)
    grid = (_cdiv(m, bm) * _cdiv(r, br),)
    _launch(
        _k1_kernel(epilogue), grid, x, p, d, c if c.numel() else d, *args, m, n, r,
        *x.stride(), *p.stride(), *d.stride(), *s0.stride(),
        BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
        **_dot_meta(input_precision, x.dtype),
    )  # fmt: skip
    if variant is not None:
        stored.advance_rng_(variant, groups)
    return d


def project_back_update_(
    w_view: Tensor, d: Tensor, p: Tensor, decay: Tensor | int | float | None, scale: float, *,
    c: Tensor | None = None, input_precision: str = "ieee", block_m: int = 64, block_n: int = 64,
    block_k: int = 32, group_m: int = 8, num_warps: int = 4, num_stages: int = 3,
) -> None:  # fmt: skip
    """K2: ``W ← decay·W + scale·D Pᵀ`` in place; ``decay``: 1-element fp32 tensor, index into ``c``, None."""
    _check_back(w_view, d, p)
    m, n = w_view.shape
    r = p.shape[1]
    dec = _resolve_decay(decay, c, w_view.device)
    if w_view.numel() == 0 or r == 0:
        return eager_project_back_update_(w_view, d, p, dec, scale)
    bm, bn, bk = (
        _check_block(k, v) for k, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k))
    )
    grid = (_cdiv(m, bm) * _cdiv(n, bn),)
    _launch(
        _k2_kernel(), grid, w_view, d, p, d if dec is None else dec, float(scale), m, n, r,
        *w_view.stride(), *d.stride(), *p.stride(),
        HAS_DECAY=dec is not None, W_BF16=w_view.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
        **_dot_meta(input_precision, w_view.dtype),
    )  # fmt: skip


def fused_projected_update_(
    w_view: Tensor, x: Tensor, p: Tensor, states: Sequence[Tensor], c: Tensor,
    epilogue: Epilogue | KernelVariant, *, scratch: Tensor | None = None,
    input_precision: str | tuple[str, str] = "ieee", block_m: int = 64, block_r: int | None = None,
    block_n: int = 64, block_k: int = 32, num_warps: int = 4, num_stages: int = 3,
) -> None:  # fmt: skip
    """K1 then K2 (see the module docstring). ``input_precision`` may be a ``(K1, K2)`` pair."""
    m, n, r = _check_update(w_view, x, p, states, c, epilogue)
    if m == 0 or n == 0 or r == 0:
        return eager_projected_update_(w_view, x, p, states, c, epilogue, scratch=scratch)
    ip1, ip2 = (input_precision, input_precision) if isinstance(input_precision, str) else input_precision
    d = projected_lowrank_(
        x, p, states, c, epilogue, out=scratch, input_precision=ip1, block_m=block_m, block_r=block_r,
        block_k=block_k, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    ep = _epilogue(epilogue)
    project_back_update_(
        w_view, d, p, epilogue_decay(ep), ep.scale, c=c, input_precision=ip2, block_m=block_m,
        block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def _check_back(w_view: Tensor, d: Tensor, p: Tensor) -> None:
    _check_matrix("w_view", w_view, None, _FLOAT_DTYPES)
    m, n = w_view.shape
    _check_matrix("p", p, None, (torch.float32,))
    if p.shape[0] != n:
        raise ValueError(f"p has shape {tuple(p.shape)}, expected ({n}, r) for w_view of shape {(m, n)}")
    _check_matrix("d", d, (m, p.shape[1]), (torch.float32,))
    if len({w_view.device, d.device, p.device}) != 1:
        raise ValueError(
            f"w_view, d and p must be on one device, got {w_view.device}, {d.device}, {p.device}"
        )


def eager_project_back_update_(
    w_view: Tensor, d: Tensor, p: Tensor, decay: Tensor | int | float | None, scale: float, *,
    c: Tensor | None = None,
) -> None:  # fmt: skip
    """Torch twin of :func:`project_back_update_` (same fp32 operation order, one rounding to W's dtype)."""
    _check_back(w_view, d, p)
    dec = _resolve_decay(decay, c, w_view.device)
    upd = torch.mm(d, p.t()).mul_(float(scale))
    upd.add_(w_view.float() * dec if dec is not None else w_view)
    w_view.copy_(upd)


def eager_projected_update_(
    w_view: Tensor, x: Tensor, p: Tensor, states: Sequence[Tensor], c: Tensor,
    epilogue: Epilogue | KernelVariant, *, scratch: Tensor | None = None,
) -> None:  # fmt: skip
    """Torch twin of :func:`fused_projected_update_` (``g = X.float() @ P``, :func:`evaluate_epilogue`;
    storage variants: load → epilogue → ``store_``, :func:`.stored.eager_lowrank_`)."""
    m, _n, r = _check_update(w_view, x, p, states, c, epilogue)
    variant = _stored(epilogue)
    if variant is not None:
        d = stored.eager_lowrank_(x, p, variant.split(states), c, variant)
        if scratch is not None:
            scratch.copy_(d)
        ep = variant.epilogue
        eager_project_back_update_(w_view, d, p, epilogue_decay(ep), ep.scale, c=c)
        return
    epilogue = _epilogue(epilogue)
    g = torch.mm(x.float(), p)
    new, d = evaluate_epilogue(epilogue, g, list(states), c)
    # Outputs may alias an old state (e.g. ``D = exp_avg``): materialize before any state is overwritten.
    outs = [
        torch.broadcast_to(torch.as_tensor(v, dtype=torch.float32, device=g.device), (m, r))
        for v in (*new, d)
    ]
    outs = [v.clone() if any(v.data_ptr() == s.data_ptr() for s in states) else v for v in outs]
    for s, v in zip(states, outs):
        s.copy_(v)
    d = outs[-1]
    if scratch is not None:
        scratch.copy_(d)
    eager_project_back_update_(w_view, d.contiguous(), p, epilogue_decay(epilogue), epilogue.scale, c=c)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
