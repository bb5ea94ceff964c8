"""Launch count of a steady step on the kernel path (issue 22): a LLaMA-shaped model whose decoder layers
repeat three state shapes' worth of matrices must launch at most two Triton kernels per distinct state
shape (one grouped K1, one grouped K2) when no refresh is due; per matrix (``grouped=False``) it launches
two per matrix, which this bound rejects. (Shapes are counted per param group: a group's matrices
share their hyperparameters, so one vector of hoisted scalars serves a launch.) The finite check is a
host read, not a launch (``tests/test_host_reads.py`` counts those).

Counted with :func:`coap_compile.kernels.count_launches` (every kernel goes through
``kernels.launch._launch``), under the Triton interpreter on CPU (``backend="triton"``).
"""

from __future__ import annotations

import os

import pytest
import torch

import coap_compile
from coap_compile.kernels import count_launches
from coap_lab.models.llama import LlamaConfig, build_llama

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="backend='triton' on CPU needs TRITON_INTERPRET=1")

#: 3 decoder layers: q/k/v/o 32×32 (M×r states 32×8), gate/up 64×32 and down 32×64 (64×8): 21 projected
#: matrices, 2 distinct state shapes.
CONFIG = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2,
                     max_seq_len=16)  # fmt: skip


def _model_and_optimizer(grouped: bool, state_precision: str):
    torch.manual_seed(0)
    model = build_llama(CONFIG)
    named = list(model.named_parameters())
    proj = [p for n, p in named if ".layers." in n and p.ndim == 2]
    rest = [p for n, p in named if not (".layers." in n and p.ndim == 2)]
    opt = coap_compile.optimize(
        [{"params": proj, "project": True}, {"params": rest, "project": False}], torch.optim.AdamW,
        rank=8, lr=1e-3, update_interval=100, backend="triton", grouped=grouped,
        state_precision=state_precision,
    )  # fmt: skip
    return model, proj, opt


def _step(model, opt, gen):
    ids = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=gen)
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize(("grouped", "state_precision"), [(True, "fp32"), (True, "bf16"), (False, "fp32")])
def test_steady_step_launches_two_kernels_per_state_shape(grouped, state_precision):
    model, proj, opt = _model_and_optimizer(grouped, state_precision)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # step 0 initializes (refresh), step 1 is the first steady one
        _step(model, opt, gen)
    with count_launches() as counts:
        _step(model, opt, gen)  # k = 2: nothing due (update_interval = 100)
    shapes = {(mg.rows, mg.rank) for mg in opt.plan.matrix_groups}
    n = sum(counts.values())
    if grouped:
        assert len(proj) == 21 and len(shapes) == 2
        assert n <= 2 * len(shapes), counts
        assert sorted(counts.values()) == [2, 2] and all(k.endswith("grouped") for k in counts), counts
    else:  # the per-matrix path: two launches per matrix, far above the bound
        assert n == 2 * len(proj) > 2 * 2, counts


def test_scratch_cap_cuts_runs_into_chunks_bit_identically(monkeypatch):
    """A run whose K×M×r fp32 ``D`` scratch would exceed ``SCRATCH_BYTES`` is cut into chunks of whole
    members (two launches each), and the chunked step equals the uncut one bit for bit."""
    from coap_compile.runtime import grouped_kernels

    results = []
    for cap in (grouped_kernels.SCRATCH_BYTES, 4 * 64 * 8 * 4):  # the default; 4 members of the 64×8 shape
        monkeypatch.setattr(grouped_kernels, "SCRATCH_BYTES", cap)
        model, proj, opt = _model_and_optimizer(True, "fp32")
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            _step(model, opt, gen)
        with count_launches() as counts:
            _step(model, opt, gen)
        results.append((sum(counts.values()), [p.detach().clone() for p in proj]))
    (n_default, w_default), (n_cut, w_cut) = results
    assert n_default == 4
    # 64×8 states: 9 members in chunks of 4 → 3 pairs; 32×8 states: 12 members, 8 per chunk → 2 pairs
    assert n_cut == 2 * (3 + 2), n_cut
    assert all(torch.equal(a, b) for a, b in zip(w_default, w_cut))
