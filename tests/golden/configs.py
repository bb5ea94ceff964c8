"""The golden-trajectory configurations, shared by ``tests/golden/record.py`` and ``tests/test_golden.py``.

Every configuration is built from a fixed seed, trained on tiny deterministic data (one seeded
``torch.Generator`` per micro-batch) and summarised by :func:`snapshot`: every parameter and every tensor
of ``opt.state_dict()["state"]`` (``P``, moments, step counters and the storage companions: bf16
rounding streams ``.rng``, int8 codes ``.q8`` and scales ``.absmax``). Only the public API of
``coap_compile`` is used (``optimize``, ``CoapOptimizer``, ``step_in_backward``, ``state_dict``,
``load_state_dict``), so the recorded trajectories survive a redesign of ``coap_compile/runtime``.

The schedule, ``update_interval=2, reproject_factor=3`` over ``STEPS = 12`` steps (``k = 0 … 11``
completed steps before each step): COAP initialises ``P`` at ``k = 0``, takes correlation steps at
``k = 2, 4, 8, 10`` and a low-cost SVD at ``k = 6``; GaLore's SVD, Flora's resampling and DCT's column
selection run at every even ``k > 0``; the Tucker factors follow COAP's schedule. ``record.py`` checks
this against the recorded ``P`` (see its docstring).

Models (``rank < min(m, n)`` for every projected weight; a tall, a wide and two equal square weights, so
that the grouped update has groups of two; every Linear has a 1-D bias, which stays full-rank):

* :class:`MLP` ``small`` (``d = 12, h = 24``, rank 4) for fp32/bf16: square ``12×12`` twice, tall
  ``24×12``, wide ``12×24`` (tall and wide share the ``24×4`` low-rank state shape, so they group too).
* :class:`MLP` ``int8`` (``d = 17, h = 256``, rank 16) for int8: int8 quantizes only states with
  ≥ 4096 elements (smaller ones stay float32, ``coap_compile/runtime/precision.py``), so the tall
  ``256×17`` and wide ``17×256`` weights get ``256×16`` states that are really stored as 8-bit codes.
* :class:`ConvNet` for the Tucker projection: ``32×33×3×3`` (9504 > 9216 elements: two modes) and
  ``98×32×3×1`` (9408 elements, ``kw = 1``: mode 0 only), then a pooled wide Linear head.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import coap_compile

STEPS = 12
#: Old-format checkpoints are taken after this many steps and continued to ``STEPS``.
CHECKPOINT_AT = 6
#: Hyperparameter edits are applied after this many completed steps (before step ``k = EDIT_AT``).
EDIT_AT = 5
SEED = 0
F32 = torch.float32  # explicit everywhere: independent of torch.set_default_dtype
BATCH = 8
SCHEDULE = {"update_interval": 2, "reproject_factor": 3}
#: The refreshes of each policy under SCHEDULE, ``k -> kind`` (checked by record.py on the recorded P).
REFRESHES = {
    "coap": {0: "init", 2: "correlation", 4: "correlation", 6: "svd", 8: "correlation", 10: "correlation"},
    "galore": {0: "init", **{k: "svd" for k in range(2, STEPS, 2)}},
    "flora": {0: "init", **{k: "resample" for k in range(2, STEPS, 2)}},
    "dct": {0: "init", **{k: "select" for k in range(2, STEPS, 2)}},
}
POLICIES = ("coap", "galore", "flora", "dct")
PRECISIONS = ("fp32", "bf16", "int8")


def hf_adafactor() -> type[torch.optim.Optimizer]:
    """transformers' Adafactor (imported lazily: only the configurations that use it need transformers)."""
    from transformers.optimization import Adafactor

    return Adafactor


#: base name -> (class or a function returning it, base keyword arguments).
BASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.01}),
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
    "adam-l2": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.05}),  # L2: X = G + λW
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.1}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3}),
    "rmsprop-momentum": (torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5}),  # int8: refused (below)
    "adafactor": (torch.optim.Adafactor, {"lr": 1e-2, "weight_decay": 0.01}),
    # transformers' defaults: relative step size, parameter scaling, no first moment (beta1=None)
    "hf-adafactor": (hf_adafactor, {}),
    "hf-adafactor-beta1": (hf_adafactor, {"lr": 1e-2, "relative_step": False, "beta1": 0.9}),
}


def base_class(name: str) -> type[torch.optim.Optimizer]:
    cls = BASES[name][0]
    return cls if isinstance(cls, type) else cls()


# ---------------------------------------------------------------------------------------------------------
# models and data


class MLP(nn.Module):
    """``x → sq_a → sq_b → tall → wide`` (tanh between), see the module docstring."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.sq_a = nn.Linear(d, d, dtype=F32)
        self.sq_b = nn.Linear(d, d, dtype=F32)
        self.tall = nn.Linear(d, h, dtype=F32)  # weight h×d
        self.wide = nn.Linear(h, d, dtype=F32)  # weight d×h

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.sq_a(x))
        x = torch.tanh(self.sq_b(x))
        return self.wide(torch.tanh(self.tall(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(33, 32, 3, padding=1, dtype=F32)  # 9504 elements: Tucker, two modes
        # 9408 elements, kw = 1: Tucker, mode 0 only
        self.conv_b = nn.Conv2d(32, 98, (3, 1), padding=(1, 0), dtype=F32)
        self.head = nn.Linear(98, 8, dtype=F32)  # 8×98, wide, rank 4

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.conv_b(torch.tanh(self.conv_a(x))))
        return self.head(x.mean(dim=(2, 3)))


SIZES = {"small": (12, 24, 4), "int8": (17, 256, 16)}  # d, h, rank


def mlp(size: str = "small") -> MLP:
    torch.manual_seed(SEED)
    d, h, _ = SIZES[size]
    return MLP(d, h)


def _gen(i: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED * 100_003 + 1000 + i)


def mlp_loss(model: nn.Module, i: int) -> Tensor:
    """Micro-batch ``i``: regress a fixed nonlinear target of a seeded input."""
    d = model.sq_a.in_features
    x = torch.randn(BATCH, d, generator=_gen(i), dtype=F32)
    target = torch.sin(3.0 * x.flip(1)) + 0.5 * x
    return F.mse_loss(model(x), target)


def conv_loss(model: nn.Module, i: int) -> Tensor:
    gen = _gen(i)
    x = torch.randn(2, 33, 5, 5, generator=gen, dtype=F32)
    target = torch.randn(2, 8, generator=gen, dtype=F32)
    return F.mse_loss(model(x), target)


# ---------------------------------------------------------------------------------------------------------
# configurations


@dataclass(frozen=True)
class Case:
    """One golden configuration.

    ``build()`` returns a freshly seeded ``(model, optimizer)``; ``loss(model, i)`` is micro-batch ``i``'s
    loss; ``before_step(opt, k)`` (optional) edits ``param_groups`` before step ``k``; ``accumulation``:
    None for the normal path (``backward`` then ``opt.step()``), else ``step_in_backward(model, opt,
    accumulation_steps=accumulation)`` with that many micro-batches per step.
    """

    name: str
    build: Callable[[], tuple[nn.Module, torch.optim.Optimizer]]
    loss: Callable[[nn.Module, int], Tensor] = mlp_loss
    before_step: Callable[[torch.optim.Optimizer, int], None] | None = None
    accumulation: int | None = None
    policy: str | None = None  # the projection whose refresh schedule record.py checks
    checkpoint: bool = False  # part of the old-format checkpoint set


def _product_case(base: str, policy: str, precision: str, grouped: bool) -> Case:
    size = "int8" if precision == "int8" else "small"

    def build():
        model = mlp(size)
        kw = BASES[base][1]
        opt = coap_compile.optimize(
            model, base_class(base), rank=SIZES[size][2], projection=policy, state_precision=precision,
            grouped=grouped, **SCHEDULE, **kw,
        )  # fmt: skip
        return model, opt

    name = f"{base}/{policy}/{precision}/{'grouped' if grouped else 'ungrouped'}"
    ckpt = grouped and policy == "coap" and (base == "adamw" or (base == "adafactor" and precision == "fp32"))
    return Case(name, build, policy=policy, checkpoint=ckpt)


#: Bases recorded over the full product policy × precision × grouped; the others over REDUCED.
FULL_PRODUCT = ("adamw", "adafactor")
#: (policy, precision, grouped) of the other bases: every policy in fp32, COAP in bf16 and int8, all
#: grouped, and COAP fp32 ungrouped too (on CPU the grouped update is bit-identical to the per-matrix one;
#: the full product of FULL_PRODUCT records both everywhere).
REDUCED = (
    *((policy, "fp32", True) for policy in POLICIES),
    ("coap", "fp32", False),
    ("coap", "bf16", True),
    ("coap", "int8", True),
)


def product_cases() -> list[Case]:
    """The base × policy × precision × grouped matrix (full for FULL_PRODUCT, REDUCED for the others)."""
    out = []
    for base in BASES:
        if base in FULL_PRODUCT:
            triples = [(a, b, g) for a in POLICIES for b in PRECISIONS for g in (True, False)]
        else:
            triples = REDUCED
        out += [_product_case(base, a, b, g) for a, b, g in triples]
    return out


def _tucker(base: str, precision: str, checkpoint: bool = False) -> Case:
    def build():
        torch.manual_seed(SEED)
        model = ConvNet()
        opt = coap_compile.optimize(
            model, base_class(base), rank=4, conv_rank_ratio=4, state_precision=precision, **SCHEDULE,
            **BASES[base][1],
        )  # fmt: skip
        return model, opt

    return Case(f"tucker/{base}/{precision}", build, loss=conv_loss, policy="coap", checkpoint=checkpoint)


def _fullrank_bias_bf16():
    """Projected weights fp32; the biases' own group asks for bf16: torch's AdamW cannot store that, so the
    biases run the captured (derived) update with bf16 storage."""
    model = mlp()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = coap_compile.CoapOptimizer(
        [{"params": weights}, {"params": biases, "state_precision": "bf16"}], torch.optim.AdamW, rank=4,
        state_precision="fp32", lr=1e-2, weight_decay=0.01, **SCHEDULE,
    )  # fmt: skip
    return model, opt


class DenseNet(nn.Module):
    """A 64×64 weight kept full-rank (``project=False``) whose int8 states (4096 elements) are quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.sq_a = nn.Linear(12, 64, dtype=F32)  # 64×12, projected (tall)
        self.dense = nn.Linear(64, 64, dtype=F32)  # full-rank (project=False), 4096 elements
        self.wide = nn.Linear(64, 12, dtype=F32)  # 12×64, projected (wide)

    def forward(self, x: Tensor) -> Tensor:
        return self.wide(torch.tanh(self.dense(torch.tanh(self.sq_a(x)))))


def _fullrank_dense_int8():
    torch.manual_seed(SEED)
    model = DenseNet()
    opt = coap_compile.CoapOptimizer(
        [
            {"params": [model.sq_a.weight, model.wide.weight], "project": True},
            {"params": [model.dense.weight], "project": False},
            {"params": [model.sq_a.bias, model.dense.bias, model.wide.bias]},
        ],
        torch.optim.AdamW, rank=4, state_precision="int8", lr=1e-2, weight_decay=0.01, **SCHEDULE,
    )  # fmt: skip
    return model, opt


def _fullrank_adafactor(base: str):
    def build():
        model = mlp()  # sq_a/sq_b not targeted: 2-D full-rank weights, factored second moment, bf16 storage
        opt = coap_compile.optimize(
            model, base_class(base), rank=4, target_modules=["tall", "wide"], state_precision="bf16",
            **SCHEDULE, **BASES[base][1],
        )  # fmt: skip
        return model, opt

    return build


def _edit(coap_key: str, coap_value: Any, base: str = "adamw") -> Case:
    def build():
        model = mlp()
        return model, coap_compile.optimize(model, base_class(base), rank=4, **SCHEDULE, **BASES[base][1])

    def before_step(opt, k):
        if k != EDIT_AT:
            return
        for g in opt.param_groups:
            g["lr"] = g["lr"] * 0.3
            if "betas" in g:
                g["betas"] = (0.8, 0.99)
                g["weight_decay"] = 0.05
            if "momentum" in g:
                g["momentum"] = 0.7
            if coap_key == "state_precision" and g.get("project") is False:
                continue  # see the note in other_cases
            g[coap_key] = coap_value

    # policy None: the edit changes the schedule (and a rank change re-bases P at k = EDIT_AT)
    return Case(f"edit/{base}/{coap_key}={coap_value}", build, before_step=before_step)


def _two_groups_adamw():
    model = mlp()
    first = [model.sq_a.weight, model.sq_b.weight, *(m.bias for m in (model.sq_a, model.sq_b))]
    second = [model.tall.weight, model.wide.weight, model.tall.bias, model.wide.bias]
    opt = coap_compile.CoapOptimizer(
        [
            {"params": first},
            {"params": second, "rank": 3, "lr": 5e-3, "betas": (0.8, 0.95), "weight_decay": 0.0,
             "correlation": "normalized", "state_precision": "bf16", "update_interval": 3},
        ],
        torch.optim.AdamW, rank=4, lr=1e-2, weight_decay=0.01, **SCHEDULE,
    )  # fmt: skip
    return model, opt


def _two_groups_sgd():
    model = mlp()
    first = [model.sq_a.weight, model.sq_b.weight, model.tall.weight]
    second = [model.wide.weight]
    biases = [m.bias for m in (model.sq_a, model.sq_b, model.tall, model.wide)]
    opt = coap_compile.CoapOptimizer(
        [
            {"params": first + biases},
            {"params": second, "projection": "dct", "rank": 2, "momentum": 0.5, "lr": 0.02},
        ],
        torch.optim.SGD, rank=4, lr=0.05, momentum=0.9, **SCHEDULE,
    )  # fmt: skip
    return model, opt


def _in_backward(base: str, precision: str, accumulation: int, schedule: bool) -> Case:
    def build():
        model = mlp()
        opt = coap_compile.optimize(
            model, base_class(base), rank=4, state_precision=precision, **SCHEDULE, **BASES[base][1]
        )
        return model, opt

    def lr_schedule(opt, k):  # LambdaLR(lambda k: 1 / (1 + k)) written out: part of the trajectory
        for g in opt.param_groups:
            g["lr"] = BASES[base][1]["lr"] / (1 + k)

    return Case(
        f"inbackward/{base}/{precision}/acc{accumulation}", build,
        before_step=lr_schedule if schedule else None, accumulation=accumulation, policy="coap",
    )  # fmt: skip


def other_cases() -> list[Case]:
    return [
        _tucker("adamw", "fp32", checkpoint=True),
        _tucker("adamw", "bf16"),
        _tucker("adafactor", "fp32"),
        Case("fullrank/adamw/bias-bf16", _fullrank_bias_bf16, policy="coap", checkpoint=True),
        Case("fullrank/adamw/dense-int8", _fullrank_dense_int8, policy="coap", checkpoint=True),
        Case("fullrank/adafactor/bf16", _fullrank_adafactor("adafactor"), policy="coap"),
        Case("fullrank/hf-adafactor/bf16", _fullrank_adafactor("hf-adafactor"), policy="coap"),
        _edit("rank", 3),
        _edit("update_interval", 3),
        # Applied to the projected group only: the same edit on optimize()'s full-rank group (biases on
        # torch's own AdamW, fp32 states) makes the next step raise "ValueError: bf16 state 'exp_avg' has
        # dtype torch.float32" (coap_compile/storage/bf16.py, reached from runtime/fullrank.py).
        _edit("state_precision", "bf16"),
        _edit("projection", "flora", base="sgd-momentum"),
        Case("twogroups/adamw", _two_groups_adamw),
        Case("twogroups/sgd-momentum", _two_groups_sgd),
        _in_backward("adamw", "fp32", 2, schedule=True),
        _in_backward("adam-l2", "bf16", 3, schedule=False),
        _in_backward("sgd-momentum", "fp32", 1, schedule=False),
    ]


def all_cases() -> dict[str, Case]:
    cases = product_cases() + other_cases()
    out = {c.name: c for c in cases}
    assert len(out) == len(cases), "duplicate case names"
    return out


# ---------------------------------------------------------------------------------------------------------
# running and snapshots


def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor (FSDP2): this rank's shard
    return (to_local() if to_local is not None else t).detach().clone()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """``param/<name>`` for every parameter, ``state/<index>/<key>`` for every optimizer state tensor."""
    out = {f"param/{n}": _local(p) for n, p in model.named_parameters()}
    for index, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"state {index}/{key} is not a tensor: {value!r}")
            out[f"state/{index}/{key}"] = _local(value)
    return out


def setup(case: Case) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt = case.build()
    if case.accumulation is not None:
        coap_compile.step_in_backward(model, opt, accumulation_steps=case.accumulation)
    return model, opt


def train(case: Case, model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int, each=None) -> None:
    """Steps ``k = start … stop-1``; ``each(k)`` (optional) is called after every step."""
    micro = case.accumulation or 1
    for k in range(start, stop):
        if case.before_step is not None:
            case.before_step(opt, k)
        for i in range(micro):
            loss = case.loss(model, k * micro + i)
            (loss / micro if micro > 1 else loss).backward()
        opt.step()  # in-backward: every gradient was already stepped and freed, nothing left to do
        opt.zero_grad()
        if each is not None:
            each(k)


def run_case(case: Case, steps: int = STEPS) -> dict[str, Tensor]:
    model, opt = setup(case)
    train(case, model, opt, 0, steps)
    return snapshot(model, opt)


def checkpoint_at(case: Case) -> dict[str, Any]:
    """The old-format checkpoint: ``opt.state_dict()`` and the model parameters after CHECKPOINT_AT steps."""
    model, opt = setup(case)
    train(case, model, opt, 0, CHECKPOINT_AT)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"optimizer": opt.state_dict(), "model": params}


def unshared(obj: Any) -> Any:
    """A copy of a nested checkpoint in which every tensor has its own storage, as in a checkpoint written by
    ``torch.save(opt.state_dict())``: ``copy.deepcopy`` would keep two equal tensors that a file stored once
    (or a caller shared) aliased, and torch's ``load_state_dict`` keeps ``step`` tensors as given, so an
    aliased ``step`` would be incremented once per parameter sharing it."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: unshared(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unshared(v) for v in obj)
    return obj


def resume(case: Case, saved: dict[str, Any]) -> dict[str, Tensor]:
    """A fresh build loads ``saved`` (model parameters, then the optimizer checkpoint), continues to STEPS."""
    model, opt = setup(case)
    params = dict(model.named_parameters())
    assert params.keys() == saved["model"].keys()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved["model"][n])
    opt.load_state_dict(unshared(saved["optimizer"]))
    train(case, model, opt, CHECKPOINT_AT, STEPS)
    return snapshot(model, opt)


# ---------------------------------------------------------------------------------------------------------
# FSDP2 on 2 gloo ranks

FSDP_WORLD = 2
FSDP_TIMEOUT = 120.0
#: name -> (base, optimize() keywords). Under FSDP2 COAP takes X = G for every weight, the rows side
#: (``projection_side="rows"``, as tests/test_fsdp2.py); int8, GaLore, DCT, Tucker and Adafactor are refused.
FSDP_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "fsdp2/adamw/coap/fp32": ("adamw", {}),
    "fsdp2/adamw/coap/bf16": ("adamw", {"state_precision": "bf16"}),
    "fsdp2/adamw/coap-normalized/fp32": ("adamw", {"correlation": "normalized"}),
    "fsdp2/sgd-momentum/coap/fp32": ("sgd-momentum", {}),
    "fsdp2/adamw/flora/fp32": ("adamw", {"projection": "flora"}),
}


def _fsdp_case(name: str, mesh) -> tuple[nn.Module, torch.optim.Optimizer, slice]:
    from torch.distributed.fsdp import fully_shard

    base, extra = FSDP_CASES[name]
    model = mlp()
    for m in (model.sq_a, model.sq_b, model.tall, model.wide):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = coap_compile.optimize(
        model, base_class(base), rank=4, projection_side="rows", **SCHEDULE, **{**BASES[base][1], **extra}
    )
    rank, per = mesh.get_local_rank(), BATCH // mesh.size()
    return model, opt, slice(rank * per, (rank + 1) * per)


def _fsdp_loss(rows: slice):
    def loss(model: nn.Module, i: int) -> Tensor:
        x = torch.randn(BATCH, model.sq_a.in_features, generator=_gen(i), dtype=F32)
        target = torch.sin(3.0 * x.flip(1)) + 0.5 * x
        return F.mse_loss(model(x[rows]), target[rows])

    return loss


def _fsdp_worker(rank: int, port: int, out_dir: str, names: list[str]) -> None:
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if "GLOO_SOCKET_IFNAME" not in os.environ and "lo" in [n for _, n in socket.if_nameindex()]:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback: gloo never depends on the host name resolving
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=FSDP_TIMEOUT)
    store = dist.TCPStore("127.0.0.1", port, FSDP_WORLD, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=FSDP_WORLD, timeout=timeout)
    try:
        mesh = init_device_mesh("cpu", (FSDP_WORLD,))
        for name in names:
            model, opt, rows = _fsdp_case(name, mesh)
            train(Case(name, build=None, loss=_fsdp_loss(rows)), model, opt, 0, STEPS)
            torch.save(snapshot(model, opt), os.path.join(out_dir, f"{name.replace('/', '+')}.{rank}.pt"))
    finally:
        dist.destroy_process_group()


class FsdpRun:
    """The FSDP2 cases on FSDP_WORLD local gloo ranks, started in the background.

    ``FsdpRun(names).start()`` launches the ranks and returns at once (the caller may do other work, e.g.
    the single-process goldens, meanwhile); ``result()`` waits and returns ``{name: {"rank<r>/<key>": local
    tensor}}``; ``close()`` kills ranks still alive and removes the output folder.

    As ``coap_compile/distributed/launch.py`` (written out here, so that the goldens depend on nothing but
    the public optimizer API): the parent holds the rendezvous ``TCPStore`` on a kernel-chosen free port of
    127.0.0.1; ``spawn`` workers (fresh interpreters: ``start`` returns at once and their imports overlap
    the caller's work; no fork of a process with threads); one deadline (``timeout`` seconds from
    ``start``) for the whole run, after which the ranks are killed and RuntimeError is raised, as it is
    when a rank exits with an error.
    """

    def __init__(self, names: list[str] | None = None, timeout: float = FSDP_TIMEOUT) -> None:
        self.names = list(FSDP_CASES) if names is None else list(names)
        self.timeout = timeout
        self.procs: list = []
        self.out: dict[str, dict[str, Tensor]] | None = None

    def start(self) -> FsdpRun:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.deadline = time.monotonic() + self.timeout
        self.store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)  # holds the free port
        self.dir = tempfile.TemporaryDirectory(prefix="coap_golden_fsdp_")
        port = self.store.port
        self.procs = [
            ctx.Process(
                target=_fsdp_worker, args=(r, port, self.dir.name, self.names), name=f"golden-rank{r}"
            )
            for r in range(FSDP_WORLD)
        ]
        for p in self.procs:
            p.start()
        return self

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        if self.procs:
            self.dir.cleanup()
            self.store = None
            self.procs = []

    def result(self) -> dict[str, dict[str, Tensor]]:
        if self.out is not None:
            return self.out
        try:
            for p in self.procs:
                p.join(max(0.0, self.deadline - time.monotonic()))
            late = [p.name for p in self.procs if p.is_alive()]
            if late:
                raise RuntimeError(f"FSDP2 golden run exceeded {self.timeout:.0f} s (killed: {late})")
            failed = {p.name: p.exitcode for p in self.procs if p.exitcode != 0}
            if failed:
                raise RuntimeError(f"FSDP2 golden ranks failed (exit codes {failed}); traceback on stderr")
            out: dict[str, dict[str, Tensor]] = {}
            for name in self.names:
                out[name] = {}
                for r in range(FSDP_WORLD):
                    path = os.path.join(self.dir.name, f"{name.replace('/', '+')}.{r}.pt")
                    for k, v in torch.load(path, weights_only=True).items():
                        out[name][f"rank{r}/{k}"] = v
            self.out = out
            return out
        finally:
            self.close()


def run_fsdp(names: list[str] | None = None, timeout: float = FSDP_TIMEOUT) -> dict[str, dict[str, Tensor]]:
    """:class:`FsdpRun` in the foreground."""
    return FsdpRun(names, timeout).start().result()
