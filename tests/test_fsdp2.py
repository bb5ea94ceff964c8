"""COAP on FSDP2 (``fully_shard``, DTensor parameters), gloo on CPU (issue 10, item 1).

A tiny LM (an embedding, five projected ``nn.Linear`` weights: tall ``up``/``head``, wide ``down``/
``back``, and ``gate`` with 6 rows, so 4 ranks hold shards of 2, 2, 2 and 0 rows) is sharded with
``fully_shard`` on 2 and 4 gloo ranks (and on a 2×2 HSDP mesh) and trained with
``coap_compile.optimize(model, base, projection_side="rows")`` for 9 steps: init (k=0), correlation
(k=2, 6) and SVD (k=4, 8) refreshes. Each rank trains on its slice of a shared global batch; FSDP2
averages the gradients, so the reference is one process training the same model with
``projection_side="rows"`` on the whole batch (the same side and basis convention). Two bases:
AdamW with ``correlation="normalized"`` and SGD with momentum with ``correlation="paper"`` (SGD's
``momentum_buffer`` is the first moment the correlation step reads; both updates are elementwise, so
they stay shard-local; Adafactor's factored moment is tested in ``test_fsdp2_factored.py``).

Checked: losses and weights against the reference; ``P`` bit-identical across ranks at every step
(``assert_replicated`` in the workers) and changed exactly at the refreshes; state DTensors with the
parameter's mesh and placements, ``P`` too (sharded by its rows, :mod:`coap_compile.distributed.basis`;
compared here gathered); per-rank state bytes = ``memory_plan()`` = the
closed form with ``torch.chunk`` row counts; the collectives of every refresh against the closed forms
of :mod:`coap_compile.distributed.comm`; a DCP checkpoint saved on 2 ranks resumed on 2 ranks
(bit-identical) and on 4 (resharded); bf16 states (DTensors, replicated rounding streams, bit-identical
resume); ``correlation="off"``; Flora; a single-process checkpoint loaded into an FSDP2 optimizer;
clear errors for what is not supported; non-finite gradients refused on every rank together.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from helpers import rel_err
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import coap_compile
from coap_compile.distributed import CommLog, assert_replicated, fsdp, refresh_bytes
from coap_compile.errors import NonFiniteGradientError
from coap_lab.launch import run_distributed

VOCAB, DIM, HIDDEN, NARROW, SEQ, BATCH = 40, 16, 32, 6, 7, 8
STEPS, SAVE_AT, RANK = 9, 5, 4
COAP = {"rank": RANK, "update_interval": 2, "reproject_factor": 2, "projection_side": "rows"}
BASES = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.01, "correlation": "normalized"}),
    "sgd": (torch.optim.SGD, {"lr": 2e-4, "momentum": 0.9, "correlation": "paper"}),
}
#: The paper's correlation step moves P by ∝ ‖G‖² (2e-6 here at loss scale 1: invisible next to rounding);
#: SGD's update is linear in G, so loss × 1000 with lr / 1000 is the same training with a visible step.
LOSS_SCALE = {"adamw": 1.0, "sgd": 1000.0}
REFRESH = {0: "init", 2: "correlation", 4: "svd", 6: "correlation", 8: "svd"}
PROJECTED = ("up.weight", "down.weight", "gate.weight", "back.weight", "head.weight")  # refresh order
TIMEOUT = 150.0


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.up = nn.Linear(DIM, HIDDEN)  # 32×16, tall
        self.down = nn.Linear(HIDDEN, DIM)  # 16×32, wide: P is 32×r on the rows side
        self.gate = nn.Linear(DIM, NARROW)  # 6×16: 4 ranks hold 2, 2, 2, 0 rows
        self.back = nn.Linear(NARROW, DIM)  # 16×6
        self.head = nn.Linear(DIM, VOCAB)  # 40×16

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.down(F.gelu(self.up(h))) + self.back(torch.tanh(self.gate(h)))
        return self.head(h)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def _loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(idx[:, :-1]).reshape(-1, VOCAB), idx[:, 1:].reshape(-1))


def _optimizer(model: nn.Module, base: str, **extra) -> coap_compile.CoapOptimizer:
    cls, kw = BASES[base]
    opt = coap_compile.optimize(model, cls, **{**COAP, **kw, **extra})
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in opt.projected_parameters()) == sorted(PROJECTED)
    return opt


def _projected(model: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in PROJECTED}


def _train(model, opt, steps: range, rows: slice, check=None, scale: float = 1.0) -> dict:
    """Train ``steps``; per step the loss, each ``P`` and (with a CommLog) the collectives issued."""
    losses, projs, comm = [], [], []
    for step in steps:
        opt.zero_grad()
        loss = _loss(model, _batch(step)[rows])
        (loss * scale).backward()
        if opt.comm_log is not None:
            opt.comm_log.clear()
        opt.step()
        if opt.comm_log is not None:
            comm.append(
                (step, [(r.op, r.label, r.nbytes) for r in opt.comm_log.records], list(opt.comm_log.qr_paths))
            )
        losses.append(loss.item())
        projs.append({n: _full_p(opt.state[p]["proj"]) for n, p in _projected(model).items()})
        if check is not None:
            check(opt)
    return {"losses": losses, "projs": projs, "comm": comm}


def _reference(base: str, **extra) -> dict:
    torch.manual_seed(0)
    model = TinyLM()
    run = _train(model, _optimizer(model, base, **extra), range(STEPS), slice(None), scale=LOSS_SCALE[base])
    run["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return run


# ---------------------------------------------------------------------------------------------------
# workers (run on every rank)


def _sharded(mesh) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM()
    for m in (model.up, model.down, model.gate, model.back, model.head):
        fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _rows(world_rows: int) -> slice:
    """This rank's slice of the global batch (``world_rows``: the data-parallel size)."""
    rank = dist.get_rank()
    per = BATCH // world_rows
    return slice(rank * per, (rank + 1) * per)


def _full_p(v: torch.Tensor) -> torch.Tensor:
    """``P`` in full: a sharded one (a DTensor, :mod:`coap_compile.distributed.basis`) gathered."""
    return (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()


def _assert_proj_replicated(opt) -> None:
    for p in opt.projected_parameters():
        assert_replicated(_full_p(opt.state[p]["proj"]), name="proj")


def _full(model) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _full_state(model, opt) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"{names[id(p)]}/{k}"] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
    return out


def _layout_and_bytes(model, opt) -> dict:
    """Per projected weight: each state's type, placements and local shape; held and planned bytes."""
    plan = {row.name: row for row in opt.memory_plan().rows}
    out = {}
    for n, p in _projected(model).items():
        st = opt.state[p]
        held = 0
        kinds = {}
        for k, v in st.items():
            if isinstance(v, DTensor):
                kinds[k] = ("dtensor", tuple(v.placements), v.device_mesh is p.device_mesh, tuple(v.shape))
                v = v.to_local()
            else:
                kinds[k] = ("plain", None, None, tuple(v.shape))
            held += v.numel() * v.element_size()
        out[n] = {
            "kinds": kinds,
            "held": held,
            "plan": plan[n].state_bytes,
            "base": plan[n].base_bytes,
            "local_rows": p.to_local().shape[0],
        }
    return out


def _save(model, opt, path: str) -> None:
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(sd, checkpoint_id=path)


def _resume(mesh, base: str, path: str, rows: slice, **extra) -> dict:
    model = _sharded(mesh)
    opt = _optimizer(model, base, **extra)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}  # inits opt
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    run = _train(model, opt, range(SAVE_AT, STEPS), rows, _assert_proj_replicated)
    run["params"], run["state"] = _full(model), _full_state(model, opt)
    return run


def _errors(mesh) -> dict[str, str]:
    """The messages of what must be refused (caught here, compared in the parent)."""
    out = {}

    def catch(key, fn):
        try:
            fn()
            out[key] = "no error"
        except (ValueError, TypeError) as exc:
            out[key] = f"{type(exc).__name__}: {exc}"

    tiles = {"state_precision": "int8", "quant_blocks": "tiles"}  # rows blocks: tests/test_fsdp2_int8.py
    catch("int8", lambda: _optimizer(_sharded(mesh), "adamw", **tiles))  # emb.weight first
    model = _sharded(mesh)
    up = [model.up.weight]
    catch("int8_projected", lambda: coap_compile.optimize(up, rank=RANK, **tiles))
    catch("galore", lambda: _optimizer(_sharded(mesh), "adamw", projection="galore"))
    catch("dct", lambda: _optimizer(_sharded(mesh), "adamw", projection="dct"))
    catch("adafactor", lambda: coap_compile.optimize(_sharded(mesh), torch.optim.Adafactor, rank=RANK))
    w = nn.Parameter(distribute_tensor(torch.randn(12, 10), mesh, [Shard(1)]))
    catch("shard1", lambda: coap_compile.optimize([w], torch.optim.AdamW, rank=RANK))
    conv = nn.Conv2d(33, 32, 3)  # 9504 > 9216 weights: a Tucker candidate
    fully_shard(conv, mesh=mesh)
    catch("tucker", lambda: coap_compile.optimize(conv, torch.optim.AdamW, rank=RANK, conv_rank_ratio=2))
    return out


def _non_finite(mesh) -> dict:
    """Rank 1's gradient of ``up.weight`` gets an inf: every rank must raise, and change nothing."""
    model = _sharded(mesh)
    opt = _optimizer(model, "adamw")
    _train(model, opt, range(1), _rows(dist.get_world_size()))
    before = (_full(model), _full_state(model, opt))
    opt.zero_grad()
    _loss(model, _batch(1)[_rows(dist.get_world_size())]).backward()
    if dist.get_rank() == 1:
        model.up.weight.grad.to_local()[0, 0] = float("inf")
    try:
        opt.step()
        message = "no error"
    except NonFiniteGradientError as exc:
        message = str(exc)
    after = (_full(model), _full_state(model, opt))
    unchanged = all(torch.equal(a[k], b[k]) for a, b in zip(before, after) for k in a)
    return {"message": message, "unchanged": unchanged}


def _state_layout(model, opt) -> dict:
    """Every parameter's states: ``(kind, placements, dtype, local shape)``."""
    out = {}
    for n, p in model.named_parameters():
        kinds = {}
        for k, v in opt.state[p].items():
            if isinstance(v, DTensor):
                kinds[k] = ("dtensor", tuple(v.placements), v.dtype, tuple(v.to_local().shape))
            else:
                kinds[k] = ("plain", None, v.dtype, tuple(v.shape))
        out[n] = kinds
    return out


def _bf16(mesh, path: str, rows: slice) -> dict:
    """bf16 states everywhere (projected: the low-rank moments; full-rank: the captured AdamW update on
    the local shard): trained, saved at SAVE_AT, continued, and resumed from the checkpoint."""
    model = _sharded(mesh)
    opt = _optimizer(model, "adamw", state_precision="bf16")
    first = _train(model, opt, range(SAVE_AT), rows, _assert_proj_replicated)
    _save(model, opt, path)
    rest = _train(model, opt, range(SAVE_AT, STEPS), rows, _assert_proj_replicated)
    run = {k: first[k] + rest[k] for k in first}
    run["params"], run["state"] = _full(model), _full_state(model, opt)
    run["layout"] = _state_layout(model, opt)
    run["resume"] = _resume(mesh, "adamw", path, rows, state_precision="bf16")
    return run


def _from_single_process(mesh, rows: slice) -> dict:
    """A single-process checkpoint (plain full ``m×r`` states) loaded into an FSDP2 optimizer: each rank
    cuts its rows (``fsdp.shard_value``); both then train on. Only projected weights are optimized (a
    full-rank parameter left to torch's own AdamW would get plain full states, which torch cannot mix
    with DTensor parameters)."""
    kw = {**COAP, **BASES["adamw"][1]}
    torch.manual_seed(0)
    ref = TinyLM()
    ref_opt = coap_compile.optimize([ref.up.weight, ref.down.weight], torch.optim.AdamW, **kw)
    model = _sharded(mesh)
    opt = coap_compile.optimize([model.up.weight, model.down.weight], torch.optim.AdamW, **kw)

    def train(m, o, step, part):
        o.zero_grad()
        _loss(m, _batch(step)[part]).backward()
        o.step()

    for step in range(3):
        train(ref, ref_opt, step, slice(None))
    with torch.no_grad():  # the same weights (the single-process run moved them)
        for (_, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
            spec = fsdp.shard_spec(b, "w", matrix=False)
            b.to_local().copy_(a[spec.row_offset : spec.row_offset + spec.local_rows])
    opt.load_state_dict(ref_opt.state_dict())
    kinds = {k: type(v).__name__ for k, v in opt.state[model.up.weight].items()}
    for step in range(3, 6):
        train(ref, ref_opt, step, slice(None))
        train(model, opt, step, rows)
    want = {n: p.detach().clone() for n, p in ref.named_parameters() if n in ("up.weight", "down.weight")}
    got = {n: p.full_tensor() for n, p in model.named_parameters() if n in want}
    return {"kinds": kinds, "want": want, "got": got}


def _worker(path: str) -> dict:
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # the logits view (harmless here)
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = _rows(world)
    out: dict = {}
    for base in BASES:
        model = _sharded(mesh)
        opt = _optimizer(model, base)
        opt.comm_log = CommLog()
        if base == "adamw" and world == 2:
            first = _train(model, opt, range(SAVE_AT), rows, _assert_proj_replicated)
            _save(model, opt, os.path.join(path, "fp32"))
            rest = _train(model, opt, range(SAVE_AT, STEPS), rows, _assert_proj_replicated)
            run = {k: first[k] + rest[k] for k in first}
            run["after_save"] = {"params": _full(model), "state": _full_state(model, opt)}
        else:
            run = _train(model, opt, range(STEPS), rows, _assert_proj_replicated, LOSS_SCALE[base])
        run["params"] = _full(model)
        run["layout"] = _layout_and_bytes(model, opt)
        out[base] = run
    if world == 2:
        out["resume"] = _resume(mesh, "adamw", os.path.join(path, "fp32"), rows)
        out["bf16"] = _bf16(mesh, os.path.join(path, "bf16"), rows)
        model = _sharded(mesh)
        out["off"] = _train(model, _optimizer(model, "adamw", correlation="off"), range(STEPS), rows)
        out["off"]["params"] = _full(model)
        model = _sharded(mesh)
        out["flora"] = _train(model, _optimizer(model, "adamw", projection="flora"), range(STEPS), rows)
        out["flora"]["params"] = _full(model)
        out["from_single"] = _from_single_process(mesh, rows)
        out["errors"] = _errors(mesh)
        out["non_finite"] = _non_finite(mesh)
    else:
        out["resume"] = _resume(mesh, "adamw", os.path.join(path, "fp32"), rows)  # the 2-rank one, resharded
        hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        model = _sharded(hsdp)
        opt = _optimizer(model, "adamw")
        run = _train(model, opt, range(STEPS), _rows(world), _assert_proj_replicated)
        run["params"] = _full(model)
        w = model.up.weight
        run["placements"] = tuple(w.placements), tuple(opt.state[w]["exp_avg"].placements)
        out["hsdp"] = run
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fsdp2_dcp"))
    out = {2: run_distributed(_worker, 2, path, timeout=TIMEOUT)}
    out[4] = run_distributed(_worker, 4, path, timeout=TIMEOUT)
    out["reference"] = {base: _reference(base) for base in BASES}
    out["reference"]["bf16"] = _reference("adamw", state_precision="bf16")
    out["reference"]["off"] = _reference("adamw", correlation="off")
    out["reference"]["flora"] = _reference("adamw", projection="flora")
    return out


# ---------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("base", list(BASES))
def test_matches_single_process(runs, base, world):
    ref = runs["reference"][base]
    ranks = runs[world]
    mean_losses = [sum(r[base]["losses"][s] for r in ranks) / world for s in range(STEPS)]
    assert ranks[0][base]["losses"][0] != ranks[1][base]["losses"][0]  # different data per rank
    # the mean of per-rank mean losses is the global mean loss (equal slices): observed ≤ 2.6e-7 relative
    assert max(abs(a - b) / b for a, b in zip(mean_losses, ref["losses"])) < 2e-6
    for name, value in ref["params"].items():
        # gradients are averaged in another order (reduce-scatter), refreshes use CholeskyQR2/TSQR and
        # sharded sums instead of Householder QR: observed ≤ 2.1e-7 after 9 steps with 4 refreshes
        assert rel_err(ranks[0][base]["params"][name], value) < 2e-6, name
    for r in ranks:  # every rank's P equals the reference's at every step (and each other's bits)
        for step in range(STEPS):
            for name, proj in ref["projs"][step].items():
                assert rel_err(r[base]["projs"][step][name], proj) < 2e-5, (step, name)


@pytest.mark.parametrize("world", [2, 4])
def test_projection_identical_across_ranks_and_changes_at_refreshes(runs, world):
    for base in BASES:
        ranks = runs[world]
        for step in range(STEPS):
            for name in PROJECTED:
                p0 = ranks[0][base]["projs"][step][name]
                assert all(torch.equal(r[base]["projs"][step][name], p0) for r in ranks), (base, step, name)
                if step:
                    moved = float((p0 - ranks[0][base]["projs"][step - 1][name]).norm())
                    # a refresh moves P visibly (≥ 1e-4: the comparison above then tests it)
                    assert (moved > 1e-4) == (step in REFRESH), (base, step, name, moved)


@pytest.mark.parametrize("world", [2, 4])
def test_states_are_dtensors_and_bytes_are_closed_form_per_shard(runs, world):
    shapes = dict(zip(PROJECTED, [(HIDDEN, DIM), (DIM, HIDDEN), (NARROW, DIM), (DIM, NARROW), (VOCAB, DIM)]))
    for rank, r in enumerate(runs[world]):
        for base, names in (("adamw", ("exp_avg", "exp_avg_sq")), ("sgd", ("momentum_buffer",))):
            for name, info in r[base]["layout"].items():
                m, n = shapes[name]
                chunk = -(-m // world)
                rows = max(0, min(m, (rank + 1) * chunk) - min(m, rank * chunk))  # torch.chunk's rows
                assert info["local_rows"] == rows
                # P sharded by its n rows (torch.chunk) on the weight's mesh: coap_compile.distributed.basis
                assert info["kinds"]["proj"] == ("dtensor", (Shard(0),), True, (n, RANK))
                p_rows = max(0, min(n, (rank + 1) * -(-n // world)) - min(n, rank * -(-n // world)))
                assert info["kinds"]["step"][0] == "plain"
                for s in names:
                    assert info["kinds"][s] == ("dtensor", (Shard(0),), True, (m, RANK)), (name, s)
                closed = 4 * p_rows * RANK + 4 * len(names) * rows * RANK + 4  # P slice + states + step
                assert info["held"] == info["plan"] == closed, (base, name)
                torch_bytes = 4 * len(names) * rows * n + (4 if base == "adamw" else 0)
                assert info["base"] == torch_bytes, (base, name)  # torch's own optimizer on the shard


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_per_refresh_equal_the_closed_forms(runs, world):
    widths = dict(zip(PROJECTED, [DIM, HIDDEN, DIM, NARROW, DIM]))  # N = n on the rows side
    for r in runs[world]:
        for base in BASES:
            steps = r[base]["comm"]
            assert [s for s, _, _ in steps] == list(range(STEPS))
            for step, records, paths in steps:
                kind = REFRESH.get(step)
                labels = [lab for _, lab, _ in records]
                assert labels.count("finite_flag") == 1  # one int32 per step on a 1-D mesh
                # the settings check: one 8-byte digest all-gather at the plan's first step (one shard group)
                assert labels.count("settings_digest") == (1 if step == 0 else 0), (base, step)
                # the sharded P's gathers (one per weight and update, two more per refresh with a P) are
                # counted in tests/test_fsdp2_sharded_p.py
                quiet = ("finite_flag", "settings_digest", "p_gather")
                refresh = [(op, lab, b) for op, lab, b in records if lab not in quiet]
                if kind is None:
                    assert refresh == [], (base, step)  # no communication between refreshes
                    continue
                fallbacks = iter(None if q == "cholqr2" else q for q in paths)
                expected = 0
                for name in PROJECTED:
                    fb = next(fallbacks) if kind != "correlation" else None
                    expected += refresh_bytes(kind, widths[name], RANK, fallback=fb)
                assert sum(b for _, _, b in refresh) == expected, (base, step, kind)


def test_dcp_checkpoint_resumes_bit_identically_on_two_ranks(runs):
    for r in runs[2]:
        want, got = r["adamw"]["after_save"], r["resume"]
        assert got["losses"] == r["adamw"]["losses"][SAVE_AT:]
        for kind in ("params", "state"):
            assert want[kind].keys() == got[kind].keys()
            for key, value in want[kind].items():
                assert torch.equal(got[kind][key], value), (kind, key)


def test_dcp_checkpoint_from_two_ranks_resumes_resharded_on_four(runs):
    want = runs[2][0]["adamw"]["after_save"]
    mean = [sum(r["resume"]["losses"][i] for r in runs[4]) / 4 for i in range(STEPS - SAVE_AT)]
    want_mean = [sum(r["adamw"]["losses"][SAVE_AT + i] for r in runs[2]) / 2 for i in range(STEPS - SAVE_AT)]
    assert max(abs(a - b) / b for a, b in zip(mean, want_mean)) < 2e-6  # observed ≤ 1.2e-7
    got = runs[4][0]["resume"]
    for kind in ("params", "state"):
        assert want[kind].keys() == got[kind].keys()
        for key, value in want[kind].items():
            # other reduction orders from step 5 on (4 SVD/correlation-free steps and one SVD refresh)
            assert rel_err(got[kind][key], value) < 2e-5, (kind, key)


def test_bf16_states_are_dtensors_and_resume_bit_identically(runs):
    """bf16 storage under FSDP2: every row state (projected low-rank moments and the full-rank AdamW
    states updated on the shard) is a bf16 DTensor with the weight's placements, its rounding stream
    ``<name>.rng`` a plain (replicated) tensor; a DCP resume on the same mesh is bit-identical."""
    ref = runs["reference"]["bf16"]
    for rank, r in enumerate(runs[2]):
        run = r["bf16"]
        for name, kinds in run["layout"].items():
            rows = {n: k for n, k in kinds.items() if n in ("exp_avg", "exp_avg_sq")}
            assert len(rows) == 2, (name, kinds)
            for n, k in rows.items():
                assert k[:3] == ("dtensor", (Shard(0),), torch.bfloat16), (name, n, k)
                assert kinds[n + ".rng"][:3] == ("plain", None, torch.int64), (name, n)
            assert kinds["step"][0] == "plain"
            if name in PROJECTED:
                assert kinds["proj"][:3] == ("dtensor", (Shard(0),), torch.float32), name  # sharded P, fp32
        # the streams are replicated: every rank stored every state once per step
        for key, value in run["state"].items():
            if key.endswith(".rng") or key.endswith("/proj"):
                assert torch.equal(value, runs[2][0]["bf16"]["state"][key]), (rank, key)
        got = run["resume"]
        assert got["losses"] == run["losses"][SAVE_AT:]
        for kind in ("params", "state"):
            assert run[kind].keys() == got[kind].keys()
            for key, value in run[kind].items():
                assert torch.equal(got[kind][key], value), (rank, kind, key)
    for name, value in ref["params"].items():
        # other stochastic-rounding bits per shard (fsdp docstring): observed ≤ 1.4e-3 against the
        # single-process bf16 run; bf16 against fp32 states differ by up to 5.4e-3 on this model, so
        # this bound only catches structural errors (wrong rows, unwrapped or lost states)
        assert rel_err(runs[2][0]["bf16"]["params"][name], value) < 1e-2, name


def test_correlation_off_matches_single_process(runs):
    """``correlation="off"``: P changes at the init and the SVD refreshes only, as on one process."""
    ref = runs["reference"]["off"]
    for r in runs[2]:
        run = r["off"]
        for step in range(1, STEPS):
            for name in PROJECTED:
                moved = float((run["projs"][step][name] - run["projs"][step - 1][name]).norm())
                assert (moved > 1e-4) == (REFRESH.get(step) == "svd"), (step, name, moved)
                assert rel_err(run["projs"][step][name], ref["projs"][step][name]) < 2e-5, (step, name)
        for name, value in ref["params"].items():
            assert rel_err(run["params"][name], value) < 2e-6, name  # observed ≤ 5.6e-7


def test_flora_matches_single_process(runs):
    """Flora's ``P`` is a function of the seed and ``N`` only: no collective, the same ``P`` everywhere."""
    ref = runs["reference"]["flora"]
    for r in runs[2]:
        run = r["flora"]
        for step in range(STEPS):
            for name in PROJECTED:
                assert torch.equal(run["projs"][step][name], ref["projs"][step][name]), (step, name)
        assert any(not torch.equal(run["projs"][0][n], run["projs"][2][n]) for n in PROJECTED)  # resampled
        for name, value in ref["params"].items():
            assert rel_err(run["params"][name], value) < 2e-6, name  # reduction order only: observed 8.2e-8


def test_single_process_checkpoint_loads_into_fsdp2(runs):
    for r in runs[2]:
        out = r["from_single"]
        assert out["kinds"]["exp_avg"] == "DTensor" and out["kinds"]["proj"] == "Tensor"
        for name, value in out["want"].items():
            # the same training from the loaded state (other reduction orders): observed 6.3e-8
            assert rel_err(out["got"][name], value) < 2e-6, name


def test_hsdp_matches_single_process(runs):
    ref = runs["reference"]["adamw"]
    run = runs[4][0]["hsdp"]
    assert run["placements"][0] == run["placements"][1] and len(run["placements"][0]) == 2
    for name, value in ref["params"].items():
        assert rel_err(run["params"][name], value) < 2e-6, name  # observed ≤ 2e-7


def test_unsupported_configurations_are_refused_by_name(runs):
    for r in runs[2]:
        err = r["errors"]
        for key, name in (("int8", "'emb.weight' (param group 0)"), ("int8_projected", "'param[(32, 16)]'")):
            assert err[key].startswith("ValueError") and "state_precision='int8'" in err[key], err[key]
            assert name in err[key] and "straddle shard boundaries" in err[key], err[key]
        assert "projection='galore'" in err["galore"] and "projection='dct'" in err["dct"]
        assert err["adafactor"] == "no error"  # issue 18: its row reductions are all-reduced
        assert "Shard(dim=1)" in err["shard1"] and "placements" in err["shard1"]
        assert "Tucker" in err["tucker"] and "conv_rank_ratio" in err["tucker"]


def test_non_finite_gradient_refused_on_every_rank(runs):
    first, second = (r["non_finite"] for r in runs[2])
    assert "of parameter 'up.weight'" in second["message"]  # rank 1 holds the inf
    assert "on another rank" in first["message"]  # rank 0's gradients are finite, it still refuses
    assert first["unchanged"] and second["unchanged"]


# ---------------------------------------------------------------------------------------------------
# single process: the rows side


def test_projection_side_is_validated():
    model = TinyLM()
    with pytest.raises(ValueError, match="projection_side must be one of \\('auto', 'rows'\\), got 'cols'"):
        coap_compile.optimize(model, torch.optim.AdamW, rank=RANK, projection_side="cols")
    opt = coap_compile.optimize(model, torch.optim.AdamW, rank=RANK)
    _loss(model, _batch(0)).backward()
    opt.step()
    opt.param_groups[-1]["projection_side"] = "rows"  # down.weight is wide: its P would change shape
    with pytest.raises(ValueError, match="projection_side='rows' would change its P's shape"):
        opt.step()


def test_rows_side_grouped_is_bit_identical_to_per_matrix():
    """On the rows side a wide weight's states are ``m×r``: the matrix groups key on that ``M``."""
    out = []
    for grouped in (True, False):
        torch.manual_seed(0)
        model = TinyLM()
        opt = _optimizer(model, "adamw", grouped=grouped)
        run = _train(model, opt, range(5), slice(None))
        out.append((run, dict(model.named_parameters()), len(opt.plan.matrix_groups)))
    (a, pa, groups), (b, pb, _) = out
    assert groups == 1  # down.weight (16×32) and back.weight (16×6): M = 16 on the rows side
    assert a["losses"] == b["losses"]
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_rows_side_on_one_process():
    """``X = G`` for the wide ``down.weight`` (16×32): ``P`` is 32×r and the moments 16×r."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = coap_compile.optimize(model, torch.optim.AdamW, rank=RANK, projection_side="rows")
    _loss(model, _batch(0)).backward()
    opt.step()
    st = opt.state[model.down.weight]
    assert st["proj"].shape == (HIDDEN, RANK) and st["exp_avg"].shape == (DIM, RANK)
    row = next(r for r in opt.memory_plan().rows if r.name == "down.weight")
    assert row.state_bytes == 4 * (HIDDEN * RANK + 2 * DIM * RANK) + 4
    auto = coap_compile.optimize(TinyLM(), torch.optim.AdamW, rank=RANK)
    row = next(r for r in auto.memory_plan().rows if r.name == "down.weight")
    assert row.state_bytes == 4 * (DIM * RANK + 2 * HIDDEN * RANK) + 4  # the canonical side
