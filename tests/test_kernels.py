"""Generated Triton kernels (run by the interpreter on CPU) == eager twin == float64 reference.

Tolerances: states and D are compared norm-wise at 2e-5 (fp32 accumulation over ≤ 96 terms and three
steps gives ≈1e-6). W is compared elementwise with :func:`kernel_epilogues.w_tolerance`: 2e-5 of the
largest update entry plus 2 fp32 ulps (fp32 W) or half a bf16 ulp (bf16 W: one round-to-nearest per step; the
interpreter truncates fp32 -> bf16 casts, so the kernels round explicitly there).

Skips, each for one precisely identified reason (anything else fails):

* the whole module, off Linux when Triton is not installed (Triton is a dependency on Linux only; on
  Linux its absence is an install error and fails at import);
* kernel tests without a Triton target (no CUDA and ``TRITON_INTERPRET`` unset), ``needs_kernels``;
* the JIT-key check of :func:`test_new_step_and_lr_do_not_respecialize`, when the installed Triton
  lacks the internal binder API it uses (``GPUTarget``, ``make_backend``,
  ``create_function_from_signature``: present in Triton 3.9); the argument check before it still runs;
* :func:`test_generated_kernels_compile_for_sm90`, when Triton has no NVIDIA backend or no ``ptxas``
  can be found (bundled, ``TRITON_PTXAS_PATH`` or ``PATH``).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch
from helpers import assert_rel_close, randn, rel_err, seeds
from hypothesis import given
from hypothesis import strategies as st
from kernel_epilogues import (
    EPILOGUES,
    adamw,
    initial_states,
    is_close_w,
    lion_like,
    reference_step,
    sgd_momentum,
)

from coap_compile.ir import Epilogue, evaluate_scalars
from coap_compile.kernels import cache, codegen, launch
from coap_compile.kernels.launch import (
    eager_project_back_update_,
    eager_projected_update_,
    fused_projected_update_,
    project_back_update_,
)

if sys.platform == "linux":
    import triton  # a declared dependency on Linux (pyproject): missing there is an error, not a skip
else:
    triton = pytest.importorskip("triton", reason=f"Triton is a dependency on Linux only, not {sys.platform}")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernels = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="no Triton target")
SMALL = {"block_m": 16, "block_r": 16, "block_n": 16, "block_k": 16}


def matrix(seed: int, m: int, n: int, dtype: torch.dtype, layout: str, device: str = DEVICE) -> torch.Tensor:
    """An m×n view with the given memory layout (the base tensor stays alive through the view)."""
    if layout == "transposed":
        return randn(seed, n, m, dtype=dtype).to(device).t()
    if layout == "strided":
        return randn(seed, m, 2 * n, dtype=dtype).to(device)[:, ::2]
    return randn(seed, m, n, dtype=dtype).to(device)


def projection(seed: int, n: int, r: int, layout: str = "contig", device: str = DEVICE) -> torch.Tensor:
    q = torch.linalg.qr(randn(seed, n, r, dtype=torch.float64))[0].float().to(device)
    return q.t().contiguous().t() if layout == "transposed" else q


def run_case(
    name: str, m: int, n: int, r: int, layouts: tuple[str, str, str], dtype: torch.dtype, lr: float,
    steps: int, seed: int, blocks: dict[str, int], ep: Epilogue | None = None, device: str = DEVICE,
) -> None:  # fmt: skip
    """``steps`` kernel steps and twin steps, each checked against the float64 reference."""
    ep = ep or EPILOGUES[name]
    x_layout, w_layout, p_layout = layouts
    w_k, w_e = (matrix(seed, m, n, dtype, w_layout, device) for _ in range(2))
    p = projection(seed + 1, n, r, p_layout, device)
    s_k = [s.to(device) for s in initial_states(ep, m, r, seed + 2)]
    s_e = [s.clone() for s in s_k]
    s_ref = [s.double() for s in s_k]
    for t in range(1, steps + 1):
        x = matrix(seed + 10 + t, m, n, dtype, x_layout, device)
        c = evaluate_scalars(ep, torch.tensor(float(t), device=device), torch.tensor(lr, device=device))
        decay, upd, s_ref, d_ref = reference_step(ep, x, p, s_ref, t, lr)
        wk0, we0 = w_k.clone(), w_e.clone()
        d_k = torch.full((m, r), float("nan"), device=device)  # poisoned: every element must be written
        d_e = torch.full((m, r), float("nan"), device=device)
        fused_projected_update_(w_k, x, p, s_k, c, ep, scratch=d_k, **blocks)
        eager_projected_update_(w_e, x, p, s_e, c, ep, scratch=d_e)
        where = f"{name} {m}x{n} r={r} {layouts} {dtype} lr={lr} step {t}"
        assert not d_k.isnan().any(), f"{where}: D not fully written"
        assert_rel_close(d_k.cpu(), d_ref, 2e-5, f"{where}: D kernel vs fp64")
        assert_rel_close(d_e.cpu(), d_ref, 2e-5, f"{where}: D eager vs fp64")
        for sname, sk, se, sr in zip(ep.state_names, s_k, s_e, s_ref):
            assert_rel_close(sk.cpu(), sr, 2e-5, f"{where}: {sname} kernel vs fp64")
            assert_rel_close(se.cpu(), sr, 2e-5, f"{where}: {sname} eager vs fp64")
        for label, w, w0 in (("kernel", w_k, wk0), ("eager", w_e, we0)):
            ok, worst = is_close_w(w.cpu(), w0.cpu(), decay, upd)
            assert ok, f"{where}: W {label} vs fp64, worst err/tol {worst:.2f}"
        if lr == 0.0:
            assert torch.equal(w_k, wk0), f"{where}: lr=0 changed W"


@needs_kernels
@pytest.mark.parametrize(
    "name, m, n, r, layouts, dtype, lr",
    [
        ("adamw", 37, 21, 5, ("contig", "contig", "contig"), torch.float32, 1e-2),
        ("adamw", 48, 33, 1, ("transposed", "transposed", "contig"), torch.float32, 3e-2),
        ("adamw", 40, 24, 24, ("strided", "strided", "transposed"), torch.bfloat16, 1e-2),
        ("adamw", 23, 17, 7, ("contig", "contig", "contig"), torch.float32, 0.0),
        ("sgd_momentum", 65, 31, 31, ("transposed", "transposed", "contig"), torch.bfloat16, 1e-1),
        ("rmsprop_like", 50, 19, 3, ("contig", "strided", "contig"), torch.float32, 1e-2),
    ],
)
def test_fused_matches_reference(name, m, n, r, layouts, dtype, lr):
    run_case(name, m, n, r, layouts, dtype, lr, steps=3, seed=1234, blocks=SMALL)


@st.composite
def cases(draw):
    m = draw(st.integers(1, 96))
    n = draw(st.integers(1, m))
    r = draw(st.one_of(st.just(1), st.just(n), st.integers(1, n)))
    layout = st.sampled_from(["contig", "transposed", "strided"])
    blocks = {k: draw(st.sampled_from([16, 32])) for k in SMALL}
    return dict(
        name=draw(st.sampled_from(sorted(EPILOGUES))), m=m, n=n, r=r,
        layouts=(draw(layout), draw(layout), draw(st.sampled_from(["contig", "transposed"]))),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        lr=draw(st.sampled_from([0.0, 1e-3, 3e-2])), steps=draw(st.integers(1, 3)), seed=draw(seeds),
        blocks=blocks,
    )  # fmt: skip


@needs_kernels
@given(case=cases())
def test_fused_matches_reference_hypothesis(case):
    run_case(**case)


@needs_kernels
def test_identity_projection_reproduces_adamw():
    """r = N with a permutation P is exactly AdamW (up to fp32 rounding)."""
    m, n, steps, lr = 24, 16, 3, 1e-2
    w0 = randn(0, m, n)
    perm = torch.eye(n)[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([ref], lr=lr, weight_decay=0.01, foreach=False)
    w = w0.clone().to(DEVICE)
    ep, p = adamw(), perm.to(DEVICE)
    states = [torch.zeros(m, n, device=DEVICE) for _ in range(2)]
    for t in range(1, steps + 1):
        grad = randn(100 + t, m, n)
        ref.grad = grad.clone()
        opt.step()
        c = evaluate_scalars(ep, torch.tensor(float(t)), torch.tensor(lr)).to(DEVICE)
        fused_projected_update_(w, grad.to(DEVICE), p, states, c, ep, **SMALL)
    assert_rel_close((w.cpu() - w0), (ref.detach() - w0), 1e-5, "W update vs torch.optim.AdamW")
    assert_rel_close(states[0].cpu(), opt.state[ref]["exp_avg"] @ perm, 1e-6, "exp_avg")


@needs_kernels
@pytest.mark.parametrize("decay_kind", ["none", "index", "tensor", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_back_update_alone(decay_kind, dtype):
    m, n, r = 41, 29, 6
    p = projection(3, n, r, "transposed")
    d = randn(4, m, r).to(DEVICE)
    c = torch.tensor([0.5, 0.97], device=DEVICE)
    decay = {"none": None, "index": 1, "tensor": c[1:], "float": 0.97}[decay_kind]
    dec = 1.0 if decay is None else 0.97
    w_k, w_e = matrix(5, m, n, dtype, "transposed"), matrix(5, m, n, dtype, "transposed")
    w0 = w_k.clone()
    project_back_update_(w_k, d, p, decay, -0.25, c=c, block_m=16, block_n=32, block_k=16)
    eager_project_back_update_(w_e, d, p, decay, -0.25, c=c)
    upd = -0.25 * (d.double() @ p.double().T).cpu()
    for w in (w_k, w_e):
        ok, worst = is_close_w(w.cpu(), w0.cpu(), float(torch.tensor(dec).float()), upd)
        assert ok, f"worst err/tol {worst:.2f}"


@needs_kernels
def test_output_aliasing_an_old_state():
    """``D = old state`` and an unchanged state: the kernel reads before it writes, like the twin."""
    b, b2 = sp.symbols("momentum_buffer buf_new")
    g = sp.Symbol("g")
    ep = Epilogue(("momentum_buffer", "keep"), (), ((b2, 0.5 * b + g),), (b2, sp.Symbol("keep")), b, 1, -1.0)
    m, n, r = 20, 18, 4
    x, p = matrix(1, m, n, torch.float32, "contig"), projection(2, n, r)
    old = [randn(3, m, r).to(DEVICE), randn(4, m, r).to(DEVICE)]
    for run in (fused_projected_update_, eager_projected_update_):
        states, d, w = (
            [s.clone() for s in old],
            torch.full((m, r), float("nan"), device=DEVICE),
            x.clone() * 0,
        )
        kw = SMALL if run is fused_projected_update_ else {}
        run(w, x, p, states, torch.zeros(0, device=DEVICE), ep, scratch=d, **kw)
        assert torch.equal(d, old[0]) and torch.equal(states[1], old[1])
        assert_rel_close(states[0].cpu(), (0.5 * old[0] + x @ p).cpu(), 1e-6, "new buffer")


def _integer_problem(m: int = 33, n: int = 20, r: int = 5):
    """Data on which every fp32 operation of the lion-like step is exact (ties at 0 included)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (m, n), generator=gen).float().to(DEVICE)
    p = torch.randint(-1, 2, (n, r), generator=gen).float().to(DEVICE)
    w = torch.randint(-8, 9, (m, n), generator=gen).float().to(DEVICE)
    return x, p, w, torch.tensor([0.5, 0.75], device=DEVICE), [torch.zeros(m, r, device=DEVICE)]


@needs_kernels
def test_sign_epilogue_exact_on_integer_data():
    """sign() and a hoisted decay: D = c0·sign(0.1·g), W ← c1·W − D Pᵀ, all exact here."""
    x, p, w, c, states = _integer_problem()
    d, w0 = torch.empty(x.shape[0], p.shape[1], device=DEVICE), w.clone()
    fused_projected_update_(w, x, p, states, c, lion_like(), scratch=d, **SMALL)
    assert torch.equal(d, 0.5 * torch.sign(x @ p)) and (d == 0).any()
    assert torch.equal(w, 0.75 * w0 - d @ p.T)
    assert_rel_close(states[0].cpu(), (0.01 * (x @ p)).cpu(), 1e-6, "exp_avg")


def test_sign_epilogue_eager_twin():
    x, p, w, c, states = _integer_problem()
    w0 = w.clone()
    eager_projected_update_(w, x, p, states, c, lion_like())
    assert torch.equal(w, 0.75 * w0 - 0.5 * torch.sign(x @ p) @ p.T)


@needs_kernels
def test_bf16_input_precision_is_emulated():
    """``input_precision="bf16"`` rounds both dot operands to bf16; the interpreter upcasts exactly."""
    ep, m, n, r = sgd_momentum(), 32, 48, 16
    x, p = matrix(1, m, n, torch.float32, "contig"), projection(2, n, r)
    c, st = torch.tensor([1.0], device=DEVICE), [torch.zeros(m, r, device=DEVICE)]
    d = torch.empty(m, r, device=DEVICE)
    launch.projected_lowrank_(x, p, st, c, ep, out=d, input_precision="bf16", block_m=16, block_k=16)
    emulated = x.bfloat16().double() @ p.bfloat16().double()
    assert rel_err(d.cpu(), emulated.cpu()) < 1e-6 < rel_err(d.cpu(), (x.double() @ p.double()).cpu())


class _TL:  # numpy stand-in for triton.language, to evaluate printed expressions
    sqrt, abs, exp, log, where = np.sqrt, np.abs, np.exp, np.log, np.where

    class PropagateNan:
        ALL = "all"

    @staticmethod
    def maximum(a, b, propagate_nan=None):
        return np.maximum(a, b)

    @staticmethod
    def minimum(a, b, propagate_nan=None):
        return np.minimum(a, b)


def test_printer_semantics_match_sympy():
    a, b, c = sp.symbols("a b c")
    exprs = [
        a / 3 - b, (a + b) ** 2, 1 / (a + b), (a * b) ** -1, (a + c) ** -2, a / sp.sqrt(b + c),
        a * (b + c) ** sp.Rational(-1, 2), sp.Max(a, b, 0), sp.Min(1, a) - sp.Max(-a, c), sp.sign(a - b) * c,
        sp.Abs(a) ** 2 / (sp.sqrt(sp.Abs(b)) + 1e-3), a ** sp.Float(-0.5) + sp.exp(-b) * sp.log(c),
        sp.Float(0.09999999999999998) * a + 0.999 * b * c,
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    vals = {"a": rng.uniform(0.1, 2, 64), "b": rng.normal(size=64), "c": rng.uniform(0.5, 3, 64)}
    vals["b"][:4] = vals["a"][:4]  # sign(a - b) == 0 ties
    printer = codegen.TritonPrinter({"a": "a", "b": "b", "c": "c"})
    for e in exprs:
        code = printer.doprint(e)
        assert "**" not in code, code
        with np.errstate(invalid="ignore"):  # sqrt of negatives: NaN on both sides
            got = eval(code, {"tl": _TL}, dict(vals))
            want = sp.lambdify((a, b, c), e, "numpy")(vals["a"], vals["b"], vals["c"])
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"{e} -> {code}")
    assert printer.doprint(sp.Float(1 - 0.9) * a) == "0.09999999999999998*a"


@pytest.mark.parametrize(
    "expr",
    [sp.Symbol("g") ** 3, sp.sin(sp.Symbol("g")), sp.Symbol("g") ** sp.Symbol("c0"), sp.oo * sp.Symbol("g")],
)
def test_codegen_rejects_unsupported(expr):
    d = sp.Symbol("d")
    ep = Epilogue((), ((sp.Symbol("c0"), sp.Symbol("lr")),), ((d, expr),), (), d, 1, -1.0)
    with pytest.raises(codegen.CodegenError):
        codegen.k1_source(ep)


@pytest.mark.parametrize("ep", [*EPILOGUES.values(), lion_like()], ids=[*EPILOGUES, "lion_like"])
def test_generated_source_is_valid_python(ep):
    src = codegen.k1_source(ep).source
    ast.parse(src)
    body = src.split("# Epilogue (printed")[1]
    assert "**" not in body and "tl.store(d_ptr" in body
    assert body.count("tl.store(s") == len(ep.state_names)
    ast.parse(codegen.k2_source()[1])


@needs_kernels
def test_source_lands_in_cache_dir_and_loads_once(tmp_path, monkeypatch):
    monkeypatch.setenv("COAP_COMPILE_CACHE_DIR", str(tmp_path))
    ep = adamw(beta1=0.8123)  # used by no other test: not yet imported in this process
    gen = codegen.k1_source(ep)
    loads = []
    real = importlib.util.spec_from_file_location
    monkeypatch.setattr(importlib.util, "spec_from_file_location", lambda n, p: loads.append(p) or real(n, p))
    m, n, r = 20, 16, 3
    for t in (1, 2):
        c = evaluate_scalars(ep, torch.tensor(float(t)), torch.tensor(1e-3)).to(DEVICE)
        st = [torch.zeros(m, r, device=DEVICE) for _ in range(2)]
        w, x = matrix(0, m, n, torch.float32, "contig"), matrix(1, m, n, torch.float32, "contig")
        fused_projected_update_(w, x, projection(2, n, r), st, c, ep, **SMALL)
    path = cache.source_path(gen.name, gen.source)
    assert path.parent == tmp_path and path.name.startswith(gen.name + "_")
    assert path.read_text() == gen.source
    assert [p for p in loads if str(p) == str(path)] == [path]
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_rewrites_a_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setenv("COAP_COMPILE_CACHE_DIR", str(tmp_path))
    src = "VALUE = 42\n# test_cache_rewrites_a_corrupt_file\n"
    path = cache.source_path("probe", src)
    path.write_text("VALUE = ")  # e.g. a crashed writer without os.replace
    assert cache.load_module("probe", src).VALUE == 42
    assert path.read_text() == src
    assert cache.load_module("probe", src) is cache.load_module("probe", src)


@needs_kernels
def test_new_step_and_lr_do_not_respecialize(monkeypatch):
    """Scalars travel in the tensor ``c``: the JIT specialization key is the same for every step."""
    calls = []
    real = launch._launch
    monkeypatch.setattr(
        launch, "_launch", lambda k, grid, *a, **kw: calls.append((k, a, kw)) or real(k, grid, *a, **kw)
    )
    ep, m, n, r = adamw(), 24, 20, 5
    w, p = matrix(0, m, n, torch.float32, "contig"), projection(1, n, r)
    st = [torch.zeros(m, r, device=DEVICE) for _ in range(2)]
    for t, lr in ((1, 1e-3), (2, 3e-4), (1000, 0.0)):
        c = evaluate_scalars(ep, torch.tensor(float(t)), torch.tensor(lr)).to(DEVICE)
        fused_projected_update_(w, matrix(t, m, n, torch.float32, "contig"), p, st, c, ep, **SMALL)
    k1, k2 = calls[0::2], calls[1::2]
    for group in (k1, k2):
        plain = [[a for a in args if not isinstance(a, torch.Tensor)] for _, args, _ in group]
        assert all(pl == plain[0] for pl in plain), "a Python scalar argument changed between steps"
        assert all(kw == group[0][2] for _, _, kw in group)
    assert any(a is not None and isinstance(a, torch.Tensor) and a.numel() == 3 for a in k1[0][1])
    keys = _jit_keys(k1) + _jit_keys(k2)
    assert keys[0] == keys[1] == keys[2] and keys[3] == keys[4] == keys[5]


def _jit_keys(group) -> list:
    """The specialization each launch would get from the real (non-interpreted) JIT binder.

    Skips only when this Triton lacks the internal names used here (module docstring); any error while
    building or calling the binder fails the test.
    """
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as e:
        pytest.skip(f"triton {triton.__version__} lacks the internal JIT binder API used here: {e}")
    kernel = group[0][0]
    fn = getattr(kernel, "fn", kernel)
    jit_kwargs = {k: v for k, v in getattr(kernel, "kwargs", {}).items() if k.startswith("do_not")}
    jf = JITFunction(fn, **jit_kwargs)
    binder = create_function_from_signature(jf.signature, jf.params, make_backend(GPUTarget("cuda", 90, 32)))
    return [str(binder(*a, INTERPRET=False, **kw)[1]) for _, a, kw in group]


_AOT_SCRIPT = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions (the interpreter must be off at import)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from triton.runtime.jit import JITFunction
from kernel_epilogues import adamw
from coap_compile.kernels import launch

ints1 = ["M", "N", "R", "stride_xm", "stride_xn", "stride_pn", "stride_pr", "stride_dm", "stride_dr"]
ints2 = ["M", "N", "R", "stride_wm", "stride_wn", "stride_dm", "stride_dr", "stride_pn", "stride_pr"]
sig1 = {"x_ptr": "*bf16", "p_ptr": "*fp32", "d_ptr": "*fp32", "c_ptr": "*fp32", "s0_ptr": "*fp32",
        "s1_ptr": "*fp32", **dict.fromkeys(ints1 + ["stride_sm", "stride_sr"], "i32")}
sig2 = {"w_ptr": "*bf16", "d_ptr": "*fp32", "p_ptr": "*fp32", "decay_ptr": "*fp32", "scale": "fp32",
        **dict.fromkeys(ints2, "i32")}
k1, k2 = launch._k1_kernel(adamw()), launch._k2_kernel()
assert isinstance(k1, JITFunction) and isinstance(k2, JITFunction)  # decorated from the source *file*
for precision in sys.argv[1:]:
    meta = {"GROUP_M": 8, "INTERPRET": False, **launch._dot_meta(precision)}
    c1 = {"BLOCK_M": 64, "BLOCK_R": 128, "BLOCK_K": 32, **meta}
    c2 = {"HAS_DECAY": True, "W_BF16": True, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, **meta}
    for name, jf, sig, consts in (("K1", k1, sig1, c1), ("K2", k2, sig2, c2)):
        src = ASTSource(fn=jf, signature={**sig, **dict.fromkeys(consts, "constexpr")},
                        constexprs={(jf.arg_names.index(k),): v for k, v in consts.items()})
        out = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        print(name, precision, "cubin" in out.asm, "mma" in out.asm["ptx"])
"""


def _sm90_toolchain_missing() -> str | None:
    """Why this Triton cannot compile for sm_90 here (no NVIDIA backend, no ptxas), or None."""
    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None or spec.origin is None:
        return f"triton {triton.__version__} has no NVIDIA backend (triton.backends.nvidia)"
    names = ("ptxas", "ptxas-blackwell")  # Triton 3.9 uses the second for sm_90 and newer
    bundled = [Path(spec.origin).parent / "bin" / n for n in names]
    given = [os.environ.get(f"TRITON_{n.upper().replace('-', '_')}_PATH") for n in names]
    found = [*bundled, *(Path(g) for g in given if g), *(Path(w) for w in map(shutil.which, names) if w)]
    if not any(f.is_file() for f in found):
        return f"no ptxas: none of {names} bundled in {bundled[0].parent}, in TRITON_*_PATH or on PATH"
    return None


def test_generated_kernels_compile_for_sm90(tmp_path):
    """The real (non-interpreted) JIT path, compiled ahead of time for sm_90: no GPU needed."""
    import subprocess

    missing = _sm90_toolchain_missing()
    if missing is not None:
        pytest.skip(missing)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    env["COAP_COMPILE_CACHE_DIR"] = str(tmp_path)
    precisions = ["ieee", "tf32x3", "bf16"]
    out = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT, *precisions], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {tuple(line.split()[:2]): line.split()[2:] for line in out.stdout.splitlines()}
    for prec in precisions:
        for kernel in ("K1", "K2"):
            cubin, mma = lines[(kernel, prec)]
            assert cubin == "True"
            assert mma == str(prec != "ieee"), (kernel, prec)  # tensor cores except for "ieee" (FMA)


def test_validation_errors():
    ep, m, n, r = adamw(), 8, 6, 2
    w, x, p = torch.zeros(m, n), torch.zeros(m, n), torch.zeros(n, r)
    st, c = [torch.zeros(m, r), torch.zeros(m, r)], torch.zeros(3)
    with pytest.raises(ValueError, match="p has shape"):
        fused_projected_update_(w, x, torch.zeros(n + 1, r), st, c, ep)
    with pytest.raises(TypeError, match="p must have dtype"):
        fused_projected_update_(w, x, p.double(), st, c, ep)
    with pytest.raises(ValueError, match="epilogue has states"):
        eager_projected_update_(w, x, p, st[:1], c, ep)
    with pytest.raises(ValueError, match="c must be"):
        fused_projected_update_(w, x, p, st, torch.zeros(2), ep)
    with pytest.raises(ValueError, match="one device"):
        fused_projected_update_(w, x, p, st, torch.zeros(3, device="meta"), ep)
    with pytest.raises(ValueError, match="power of two"):
        fused_projected_update_(w, x, p, st, c, ep, block_m=24)
    with pytest.raises(ValueError, match="input_precision"):
        fused_projected_update_(w, x, p, st, c, ep, input_precision="fp8")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1024, 512, 128), (512, 1376, 64), (2048, 1024, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_llama_shapes_vs_float64(shape, dtype):
    """LLaMA-like projections scaled down (the wide one runs as the transposed "left" case)."""
    rows, cols, r = shape
    m, n = max(rows, cols), min(rows, cols)
    layout = "transposed" if rows < cols else "contig"
    run_case(
        "adamw", m, n, r, (layout, layout, "contig"), dtype, 1e-3, steps=3, seed=7, blocks={}, device="cuda"
    )


@pytest.mark.cuda
def test_cuda_input_precision_error_report(record_property):
    """ieee / tf32x3 stay at fp32 accuracy; tf32 is reported (≈5–7 % of the update expected)."""
    ep, m, n, r, steps = adamw(), 1024, 512, 128, 5
    x_all = [matrix(10 + t, m, n, torch.float32, "contig", "cuda") for t in range(steps)]
    p = projection(1, n, r, device="cuda")
    errs = {}
    for prec in ("ieee", "tf32x3", "tf32"):
        w = matrix(0, m, n, torch.float32, "contig", "cuda")
        w0, st = w.clone(), [torch.zeros(m, r, device="cuda") for _ in range(2)]
        s_ref, w_ref = [torch.zeros(m, r, dtype=torch.float64) for _ in range(2)], w0.double().cpu()
        for t in range(1, steps + 1):
            c = evaluate_scalars(ep, torch.tensor(float(t), device="cuda"), torch.tensor(1e-3, device="cuda"))
            fused_projected_update_(w, x_all[t - 1], p, st, c, ep, input_precision=prec)
            decay, upd, s_ref, _ = reference_step(ep, x_all[t - 1].cpu(), p.cpu(), s_ref, t, 1e-3)
            w_ref = decay * w_ref + upd
        errs[prec] = rel_err(w.cpu() - w0.cpu(), w_ref - w0.double().cpu())
        record_property(f"rel_err_{prec}", errs[prec])
    print(f"\nW-update relative error after {steps} steps: {errs}")
    assert errs["ieee"] < 1e-5 and errs["tf32x3"] < 1e-5 and errs["tf32"] < 0.5


@pytest.mark.cuda
def test_cuda_no_recompile_across_steps():
    ep, m, n, r = adamw(), 256, 128, 32
    w, p = matrix(0, m, n, torch.float32, "contig", "cuda"), projection(1, n, r, device="cuda")
    st = [torch.zeros(m, r, device="cuda") for _ in range(2)]
    counts = []
    for t in range(1, 6):
        c = evaluate_scalars(ep, torch.tensor(float(t), device="cuda"), torch.tensor(1e-3 / t, device="cuda"))
        fused_projected_update_(w, matrix(t, m, n, torch.float32, "contig", "cuda"), p, st, c, ep)
        kernel = launch._k1_kernel(ep)
        # device_caches[device][0] is the compiled-kernel cache (Triton 3.9); without it nothing is counted
        assert hasattr(kernel, "device_caches"), f"triton {triton.__version__}: no JITFunction.device_caches"
        counts.append(sum(len(v[0]) for v in kernel.device_caches.values()))
    assert counts[0] >= 1 and counts == [counts[0]] * len(counts), counts
