"""Hugging Face Accelerate with its FSDP2 plugin (``fsdp_version=2``) on 2 gloo CPU ranks (issue 18, item 6).

A tiny model goes through ``Accelerator.prepare`` (Accelerate's own ``fsdp2_prepare_model``:
``fully_shard`` per ``nn.Linear`` by ``transformer_based_wrap``, then the root; the optimizer's
parameters switched to the DTensors) with ``coap_compile.optimize`` built on the plain model, as the
Accelerate docs build any optimizer. It trains 6 steps (init, correlation and SVD refreshes:
``update_interval=2, reproject_factor=2``), ``accelerator.save_state`` at step 3 (Accelerate's FSDP
path: ``save_fsdp_model``/``save_fsdp_optimizer``, sharded DCP checkpoints), and a fresh model and
optimizer ``load_state`` that checkpoint and train steps 3–5: losses, weights and every optimizer
state (``P`` a sharded DTensor) equal the uninterrupted run's bit for bit.

**CPU/gloo needs one line of setup.** Accelerate 1.16 selects ``DistributedType.FSDP`` only for
accelerator devices (``accelerate/state.py``: the ``fsdp_plugin`` branch lists MULTI_GPU, MULTI_XPU,
MULTI_NPU, … but not MULTI_CPU): with ``Accelerator(cpu=True, fsdp_plugin=...)`` it silently keeps
``MULTI_CPU`` and wraps the model in ``DistributedDataParallel``. The test therefore sets the state's
distributed type to FSDP (and its ``fsdp_plugin``) after constructing the Accelerator
(:func:`_fsdp_on_cpu`); everything after that is Accelerate's unmodified FSDP2 code (no mock). On GPUs
the plugin alone suffices.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import coap_compile
from coap_lab.launch import run_distributed

pytest.importorskip("accelerate")

TIMEOUT = 180.0
STEPS, SAVE_AT = 6, 3


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.down(torch.tanh(self.up(x))))


def _fsdp_on_cpu(acc, plugin) -> None:
    """Accelerate 1.16 ignores ``fsdp_plugin`` on MULTI_CPU (module docstring): select FSDP by hand."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _accelerated():
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Linear"],
        state_dict_type="SHARDED_STATE_DICT", reshard_after_forward=True,
    )  # fmt: skip
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    _fsdp_on_cpu(acc, plugin)
    torch.manual_seed(0)
    model = Tiny()
    opt = coap_compile.optimize(
        model, torch.optim.AdamW, rank=4, update_interval=2, reproject_factor=2, lr=1e-2
    )
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def _steps(acc, model, opt, steps) -> list[float]:
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(100 * step + dist.get_rank())
        x, y = torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _snapshot(model, opt) -> dict:
    inner = opt.optimizer  # Accelerate's AcceleratedOptimizer wraps the CoapOptimizer
    out = {f"param/{n}": p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in inner.state.items():
        for k, v in st.items():
            full = v.full_tensor() if isinstance(v, DTensor) else v
            out[f"state/{names[id(p)]}/{k}"] = full.detach().clone()
    return out


def _worker(path: str) -> dict:
    warnings.filterwarnings("ignore")
    rank, world = str(dist.get_rank()), str(dist.get_world_size())  # what torchrun would export
    os.environ.update({"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world,
                       "MASTER_ADDR": "127.0.0.1"})  # fmt: skip
    acc, model, opt = _accelerated()
    inner = opt.optimizer
    kinds = {
        "is_fsdp2": acc.is_fsdp2,
        "model": type(model).__name__,
        "weight": type(model.up.weight).__name__,
        "coap": type(inner).__name__,
        "projected": len(inner.projected_parameters()),
    }
    first = _steps(acc, model, opt, range(SAVE_AT))
    acc.save_state(path)
    kinds["saved"] = sorted(os.listdir(path))
    rest = _steps(acc, model, opt, range(SAVE_AT, STEPS))
    kinds["proj"] = type(inner.state[model.up.weight]["proj"]).__name__
    want = _snapshot(model, opt)
    acc2, model2, opt2 = _accelerated()
    acc2.load_state(path)
    resumed = _steps(acc2, model2, opt2, range(SAVE_AT, STEPS))
    return {"kinds": kinds, "losses": first + rest, "resumed": resumed, "want": want,
            "got": _snapshot(model2, opt2)}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("accelerate_fsdp2") / "ckpt")
    return run_distributed(_worker, 2, path, timeout=TIMEOUT)


def test_accelerate_fsdp2_prepares_coap_on_dtensors(runs):
    for r in runs:
        k = r["kinds"]
        assert k["is_fsdp2"] and k["model"].startswith("FSDP") and k["weight"] == "DTensor", k
        assert {"optimizer_0", "pytorch_model_fsdp_0"} <= set(k["saved"]), k  # Accelerate's FSDP (DCP) path
        assert k["coap"] == "CoapOptimizer" and k["projected"] == 3 and k["proj"] == "DTensor", k
    assert runs[0]["losses"][0] != runs[1]["losses"][0]  # different data per rank


def test_accelerate_save_and_load_state_resume_bit_identically(runs):
    for r in runs:
        assert r["resumed"] == r["losses"][SAVE_AT:]
        assert r["want"].keys() == r["got"].keys()
        assert any(k.endswith("/proj") for k in r["want"])
        for key, value in r["want"].items():
            assert torch.equal(r["got"][key], value), key
