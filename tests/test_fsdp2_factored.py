"""Factored bases under FSDP2 (issue 18, item 3): torch's Adafactor and transformers' Adafactor (with
``beta1``, the paper's base), and the Tucker refusal.

Their low-rank updates reduce over the rows of the ``M×r`` projected gradient (column statistics, the
row factor's mean, the update RMS) and over the weight (relative step's RMS(W));
:mod:`coap_compile.distributed.reductions` all-reduces exactly those over the shard group. The tiny
LM of test_fsdp2 (projected ``up`` 32×16, ``down`` 16×32, ``gate`` 6×16 — 4 ranks hold 2, 2, 2, 0 of
its rows —, ``back`` 16×6 and the 40×16 head) is trained on 2 and 4 gloo ranks for 9 steps (init,
correlation and SVD refreshes) and compared with one process running the same optimizer with
``projection_side="rows"`` on the whole batch. Also checked: the column factors are plain tensors,
identical on every rank; the row states are ``Shard(0)`` DTensors; per-rank bytes equal
``memory_plan()`` and the meta-device ``memory_plan(world_size=W, rank=k)``; Tucker's refusal.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import local_state_bytes, rel_err
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from transformers.optimization import Adafactor as HFAdafactor

import coap_compile
from coap_compile.distributed import CommLog, assert_replicated
from coap_lab.launch import run_distributed

VOCAB, DIM, HIDDEN, NARROW, SEQ, BATCH, RANK, STEPS = 40, 16, 32, 6, 7, 8, 4, 9
COAP = {"rank": RANK, "update_interval": 2, "reproject_factor": 2, "projection_side": "rows"}
BASES = {
    "torch": (torch.optim.Adafactor, {"lr": 1e-2}),
    "hf": (HFAdafactor, {"lr": None, "beta1": 0.9, "relative_step": True, "scale_parameter": True,
                         "warmup_init": False}),
}  # fmt: skip
COLUMNS = {"torch": "col_var", "hf": "exp_avg_sq_col"}
ROWS = {"torch": ("row_var", "coap_exp_avg"), "hf": ("exp_avg", "exp_avg_sq_row")}
TIMEOUT = 200.0


class TinyLM(nn.Module):
    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, device=device)
        self.up = nn.Linear(DIM, HIDDEN, device=device)
        self.down = nn.Linear(HIDDEN, DIM, device=device)
        self.gate = nn.Linear(DIM, NARROW, device=device)
        self.back = nn.Linear(NARROW, DIM, device=device)
        self.head = nn.Linear(DIM, VOCAB, device=device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.down(F.gelu(self.up(h))) + self.back(torch.tanh(self.gate(h)))
        return self.head(h)

    def projected(self) -> list[nn.Parameter]:
        return [self.up.weight, self.down.weight, self.gate.weight, self.back.weight, self.head.weight]


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def _optimizer(model: TinyLM, base: str) -> coap_compile.CoapOptimizer:
    cls, kw = BASES[base]
    return coap_compile.optimize(model.projected(), cls, **COAP, **kw)


def _train(model, opt, rows: slice) -> list[float]:
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        idx = _batch(step)[rows]
        loss = F.cross_entropy(model(idx[:, :-1]).reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker() -> dict:
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    per = BATCH // world
    rows = slice(dist.get_rank() * per, (dist.get_rank() + 1) * per)
    out = {}
    for base in BASES:
        torch.manual_seed(0)
        model = TinyLM()
        for m in (model.up, model.down, model.gate, model.back, model.head):
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = _optimizer(model, base)
        opt.comm_log = CommLog()
        losses = _train(model, opt, rows)
        kinds = {}
        for p in model.projected():
            st = opt.state[p]
            assert_replicated(st[COLUMNS[base]], name=COLUMNS[base])  # the same column factor everywhere
            proj = st["proj"]  # P sharded by rows like the weight (projection_sharding="sharded")
            assert isinstance(proj, DTensor) and tuple(proj.placements) == (Shard(0),), proj
            kinds.update({k: (type(v).__name__, tuple(getattr(v, "placements", ()))) for k, v in st.items()})
        out[base] = {
            "losses": losses,
            "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
            "kinds": kinds,
            "held": local_state_bytes(opt.state),
            "plan": opt.memory_plan().total_bytes,
            "comm": [(r.op, r.label, r.nbytes) for r in opt.comm_log.records],
        }
    return out


@pytest.fixture(scope="module")
def runs():
    out = {w: run_distributed(_worker, w, timeout=TIMEOUT) for w in (2, 4)}
    for base in BASES:
        torch.manual_seed(0)
        model = TinyLM()
        opt = _optimizer(model, base)
        out[base] = {"losses": _train(model, opt, slice(None))}
        out[base]["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("base", list(BASES))
def test_matches_the_single_process_rows_run(runs, base, world):
    ref = runs[base]
    ranks = runs[world]
    mean = [sum(r[base]["losses"][s] for r in ranks) / world for s in range(STEPS)]
    err = max(abs(a - b) / b for a, b in zip(mean, ref["losses"]))
    assert err < 2e-6, err  # the fp32 FSDP2 tests' tolerance
    for name, value in ref["params"].items():
        assert rel_err(ranks[0][base]["params"][name], value) < 2e-6, name


@pytest.mark.parametrize("base", list(BASES))
def test_row_states_sharded_column_factor_replicated(runs, base):
    kinds = runs[2][0][base]["kinds"]
    assert kinds[COLUMNS[base]] == ("Tensor", ())
    assert kinds["proj"] == ("DTensor", (Shard(0),))
    for name in ROWS[base]:
        assert kinds[name] == ("DTensor", (Shard(0),)), name


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("base", list(BASES))
def test_row_reductions_are_recorded_in_the_comm_log(runs, base, world):
    """The step's all-reduces over the rows (column statistics, RMS of the update) are in ``comm_log``
    with the refreshes' collectives, the same sequence on every rank."""
    logs = [r[base]["comm"] for r in runs[world]]
    assert all(log == logs[0] for log in logs)
    rows = [rec for rec in logs[0] if rec[1].startswith("row_")]
    assert rows and all(op == "all_reduce" for op, _, _ in rows)
    assert len(rows) % STEPS == 0  # as many every step (the projected weights' reductions)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("base", list(BASES))
def test_bytes_equal_the_plans(runs, base, world):
    meta = TinyLM(device="meta")
    opt = _optimizer(meta, base)
    for k, r in enumerate(runs[world]):
        assert r[base]["held"] == r[base]["plan"] == opt.memory_plan(world_size=world, rank=k).total_bytes, k


def test_tucker_refused_by_name_with_the_reason():
    conv = nn.Conv2d(33, 32, 3)  # 9504 > 9216 weights: a Tucker candidate
    opt = coap_compile.optimize(conv, torch.optim.AdamW, rank=RANK, conv_rank_ratio=2)
    with pytest.raises(ValueError) as e:
        opt.memory_plan(world_size=2)  # the checks an FSDP2-sharded conv weight gets at construction
    msg = str(e.value)
    for part in ("'weight'", "'tucker'", "TuckerPolicy", "sharded C_out", "conv_rank_ratio=None"):
        assert part in msg, (part, msg)
