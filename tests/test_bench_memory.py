"""The closed forms of ``coap_lab.cli.memory`` for bf16 / int8 / fp32 states against the library.

Three independent sides are compared by exact integer equality: the closed form (written from the
documented rules, never calling the storage code), the library's ``memory_plan()`` and the tensors
really held after a CPU step. The small configurations are chosen so each rule of the closed form
matters: int8 moments of exactly 4096 elements (the float32 threshold), rank 6 (``bw = next_pow2(6) = 8``,
not 6) and rank 8 on tall ``M×r`` moments (swapping to ``r×M`` changes the scale count), edge blocks that
do not divide the rows, norms kept float32, ``quant_block_size`` 64 and an fp32 ``P`` with int8 states.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import coap_compile
from coap_compile.storage import get_storage
from coap_lab.cli import bench
from coap_lab.cli import memory as mem
from coap_lab.cli.bench import PAPER_TARGETS, MemoryMismatchError, memory_rows, official_comparisons
from coap_lab.models import build_llama, demo_config

#: A: mlp moments 700×6 = 4200 (int8, C = 6), attention 64×6 (float32: < 4096), embeddings 256×64.
#: B: mlp moments 512×8 and embeddings/head 256×16: exactly 4096 elements each (int8), norms of 16.
CONFIGS = {
    "A": (demo_config(hidden_size=64, intermediate_size=700, num_layers=1, num_heads=2, max_seq_len=8), 6),
    "B": (demo_config(hidden_size=16, intermediate_size=512, num_layers=1, num_heads=2, max_seq_len=8), 8),
}
#: (weights dtype, optimize() precision keywords or None for torch AdamW, the closed form's accounting)
PRECISIONS = {
    "fp32": (torch.float32, {}, mem.OURS),
    "adamw-bf16": (torch.bfloat16, None, mem.ADAMW_BF16),
    "bf16-auto": (torch.bfloat16, {}, mem.COAP_BF16_AUTO),
    "bf16": (torch.bfloat16, {"state_precision": "bf16"}, mem.COAP_BF16),
    "int8": (torch.bfloat16, {"state_precision": "int8"}, mem.COAP_INT8),
    "int8-b64-pfp32": (
        torch.float32,
        {"state_precision": "int8", "quant_block_size": 64, "projection_precision": "fp32"},
        dataclasses.replace(mem.COAP_INT8, block=64, proj=4),
    ),
}


def _held_bytes(state: dict) -> int:
    """Bytes of one parameter's state tensors: ``numel · element_size`` (a grouped update's states are
    views of one buffer per group, runtime/grouped.py; :func:`_storage_bytes` checks there is no slack)."""
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def _storage_bytes(states) -> int:
    """Bytes of every distinct storage the states hold (what the allocator really keeps)."""
    seen, total = set(), 0
    for state in states:
        for t in state.values():
            if isinstance(t, torch.Tensor):
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_closed_form_equals_plan_and_real_state_per_parameter(config, precision):
    cfg, rank = CONFIGS[config]
    dtype, kwargs, acc = PRECISIONS[precision]
    model = build_llama(cfg, seed=0).to(dtype)
    if kwargs is None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        rows = mem.closed_form_rows(model, "adamw")
    else:
        opt = coap_compile.optimize(
            model, torch.optim.AdamW, rank=rank, target_modules=list(PAPER_TARGETS), lr=1e-3, **kwargs
        )
        rows = mem.closed_form_rows(model, "coap", rank=rank, target_modules=PAPER_TARGETS)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)
    opt.step()
    params = dict(model.named_parameters())
    want = {r.name: r.bytes(acc) for r in rows}
    held = {name: _held_bytes(opt.state[p]) for name, p in params.items()}
    assert held == want
    assert _storage_bytes(opt.state.values()) == sum(want.values())  # views: no hidden or shared slack
    if kwargs is not None:
        assert {r.name: r.state_bytes for r in opt.memory_plan().rows} == want
        assert opt.memory_plan().total_bytes == mem.total_bytes(rows, acc)
        assert sum(r.rank is not None for r in rows) == 7
    assert mem.measured_state_bytes(opt) == mem.total_bytes(rows, acc)


@given(
    rows=st.integers(1, 300),
    cols=st.integers(1, 70),
    vector=st.booleans(),
    block=st.sampled_from([16, 64, 256, 1024]),
    kind=st.sampled_from(["first_moment", "second_moment"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_moment_closed_forms_equal_the_stored_tensors(rows, cols, vector, block, kind, seed):
    shape = (rows * cols,) if vector else (rows, cols)
    value = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    acc = dataclasses.replace(mem.COAP_INT8, block=block)
    # the runtime keeps 1-D states fp32 with row blocks (runtime/precision.py): that storage for vectors
    int8 = get_storage("int8", quant_block_size=block, min_numel=1 << 62 if vector else 4096)
    stores = {"int8": int8, "bf16": get_storage("bf16")}
    for name, storage in stores.items():
        stored = storage.from_value(
            "exp_avg", value.abs() if kind == "second_moment" else value, kind, seed=seed
        )
        assert mem.moment_bytes(shape, name, acc) == _held_bytes(stored), (name, shape, sorted(stored))
    assert mem.moment_bytes(shape, "plain", mem.ADAMW_BF16) == 2 * value.numel()


def test_int8_rules_by_hand():
    acc = mem.COAP_INT8  # quant_blocks="rows" (the default): 1×min(B, next_pow2(C), 128) blocks in a row
    assert mem.moment_bytes((4095,), "int8", acc) == 4 * 4095  # below the threshold: float32, no stream
    assert mem.moment_bytes((4096,), "int8", acc) == 4 * 4096  # a vector: float32 with row blocks
    assert mem.moment_bytes((700, 6), "int8", acc) == 4200 + 4 * 700 + 16  # 1×8: one block per row
    assert mem.moment_bytes((512, 8), "int8", acc) == 4096 + 4 * 512 + 16  # 1×8
    assert mem.moment_bytes((8, 512), "int8", acc) == 4096 + 4 * 32 + 16  # 1×128: 4 blocks per row
    assert mem.moment_bytes((3, 40, 50), "int8", acc) == 6000 + 4 * 120 + 16  # R = 120, 1×64
    acc = dataclasses.replace(mem.COAP_INT8, blocks="tiles")
    assert mem.moment_bytes((4096,), "int8", acc) == 4096 + 4 * 16 + 16  # 1-D blocks of 256
    assert mem.moment_bytes((700, 6), "int8", acc) == 4200 + 4 * 22 + 16  # bw 8, bh 32: ⌈700/32⌉ = 22
    assert mem.moment_bytes((512, 8), "int8", acc) == 4096 + 4 * 16 + 16  # 16×1 blocks of 32×8
    assert mem.moment_bytes((8, 512), "int8", acc) == 4096 + 4 * 32 + 16  # 1×32 blocks of 16×16
    assert mem.moment_bytes((3, 40, 50), "int8", acc) == 6000 + 4 * 8 * 4 + 16  # R = 120, C = 50
    assert mem.moment_bytes((10, 10), "bf16", acc) == 216
    with pytest.raises(ValueError, match="storage must be one of"):
        mem.moment_bytes((4,), "fp8", acc)
    with pytest.raises(ValueError, match="Accounting.storage"):
        mem.Accounting("x", 1, 1, 0, storage="fp8")
    with pytest.raises(ValueError, match="Accounting.block"):
        mem.Accounting("x", 1, 1, 0, block=100)
    with pytest.raises(ValueError, match="Accounting.blocks"):
        mem.Accounting("x", 1, 1, 0, blocks="cols")


def test_bench_rows_cover_every_precision_and_match():
    rows = memory_rows(["60m"])
    got = [(r["weights"], r["optimizer"], r["states"]) for r in rows]
    assert got[-4:] == [
        ("bf16", "adamw", "bf16 (torch)"),
        ("bf16", "coap", "bf16 (auto)"),
        ("bf16", "coap-bf16", "bf16"),
        ("bf16", "coap-int8", "int8"),
    ]
    for r in rows:
        assert r["measured_bytes"] == r["closed_form_bytes"], r
    by = {(r["weights"], r["optimizer"], r["setting"]): r for r in rows}
    adamw16, int8 = by[("bf16", "adamw", "full")], by[("bf16", "coap-int8", "rank 128, attn+mlp")]
    n = adamw16["params"]
    assert adamw16["closed_form_bytes"] == 4 * n + 4 * 75  # bf16 exp_avg + exp_avg_sq + a float32 step
    assert adamw16["saved_vs_fp32_pct"] == pytest.approx(100 * (1 - (4 * n + 300) / (8 * n + 300)))
    assert int8["saved_pct"] == pytest.approx(
        100 * (1 - int8["closed_form_bytes"] / adamw16["closed_form_bytes"])
    )


def test_official_comparisons_explain_every_byte():
    rows = {(c["model"], c["optimizer"]): c for c in official_comparisons()}
    auto = rows[("llama-1b", "coap")]  # 168 projected matrices × 2 streams, 219 steps; nothing else
    assert auto["official_bytes"] == 1_042_460_672 * 2 and auto["explained"]
    assert auto["difference_bytes"] == 168 * 2 * 16 + 219 * 4 == 6252
    assert auto["library_bytes"] == auto["official_bytes"] + 6252 and not auto["within_official"]
    explicit = rows[("llama-1b", "coap-bf16")]  # + one stream per full-rank moment (51 parameters)
    assert explicit["difference_bytes"] == 6252 + 51 * 2 * 16
    int8 = rows[("llama-7b", "coap-int8")]
    # 7B: every moment has ≥ 4096 elements (norms: exactly 4096) and every matrix moment's last dimension
    # is a multiple of 128, so row blocks (the default) give one scale per 128 codes of the 2-D moments;
    # the 65 norms' vectors (2 × 65 × 4096 elements) stay float32 with row blocks (3 more bytes each, no
    # stream); two streams per other parameter (226 of 291), a float32 step each.
    codes, vec = 3_762_823_168, 2 * 65 * 4096
    assert int8["official_bytes"] == codes + 939_524_096 * 2 and int8["explained"]
    assert int8["difference_bytes"] == 4 * ((codes - vec) // 128) + 3 * vec + 226 * 2 * 16 + 291 * 4
    assert int8["counts"]["fp32_small_tensors"] == 130
    assert int8["reaches_81pct_vs_adamw_fp32"] and not int8["reaches_81pct_vs_adamw_bf16"]
    r81 = int8["max_rank_for_81pct_vs_adamw_bf16"]
    assert r81["saved_pct"] >= 81.0
    model = build_llama("7b", device="meta")
    adamw = mem.total_bytes(mem.closed_form_rows(model, "adamw"), mem.ADAMW_BF16)
    above = mem.closed_form_rows(model, "coap", rank=r81["rank"] + 1, target_modules=PAPER_TARGETS)
    assert 1 - mem.total_bytes(above, mem.COAP_INT8) / adamw < 0.81


def test_a_broken_closed_form_fails_the_bench(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(mem, "RNG_BYTES", 8)
    with pytest.raises(MemoryMismatchError, match=r"first differing parameter model\.layers\.0\.self_attn"):
        memory_rows(["60m"])
    args = bench.argparse.Namespace(sizes="60m", real="", results_dir=str(tmp_path))
    assert bench.run_memory(args) == 1
    assert "MISMATCH" in capsys.readouterr().err


def test_measured_bytes_count_the_inner_tensors_of_torchao_8bit_states():
    """torchao's AdamW8bit keeps wrapper subclasses (no storage of their own): their int8 codes, float32
    block scales and code maps are what is counted (the quality benchmark's torchao row)."""
    torchao_optim = pytest.importorskip("torchao.optim")  # optional peer (extra "bench")
    from coap_lab.cli.memory import measured_state_bytes

    model = torch.nn.Linear(512, 512)  # weight: 8-bit (≥ 4096 elements), bias: float32 states
    opt = torchao_optim.AdamW8bit(model.parameters(), lr=1e-3)
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    state = opt.state[model.weight]
    inner = [getattr(state["exp_avg"], n) for n in state["exp_avg"].__tensor_flatten__()[0]]
    codes, scales = 512 * 512, 512 * 512 // 256 * 4  # per moment: 1 B per element, a float32 per block
    qmaps = {
        t.untyped_storage().data_ptr(): t.nbytes
        for s in (state["exp_avg"], state["exp_avg_sq"])
        for t in (getattr(s, n) for n in s.__tensor_flatten__()[0])
        if t.dtype == torch.float32 and t.numel() == 256
    }
    bias = 2 * 512 * 4
    assert len(inner) == 3 and sum(qmaps.values()) == 2 * 256 * 4
    assert measured_state_bytes(opt) == 2 * (codes + scales) + sum(qmaps.values()) + bias + 2 * 4  # + 2 steps
