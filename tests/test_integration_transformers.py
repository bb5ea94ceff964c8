"""COAP in a real Hugging Face ``Trainer`` (tiny ``LlamaForCausalLM`` from a config, no download).

References: a hand-written loop that replays the exact batches the Trainer fed the model, with an
independently built ``CoapOptimizer`` and transformers' own scheduler (bit-identical); an uninterrupted
run (resume); ``coap_compile.optimize(model)`` (selection); Trainer's own decay rule; ``memory_plan``
against the bytes the optimizer really holds.

``python tests/test_integration_transformers.py [steps]`` prints the AdamW-vs-COAP comparison on the
tiny model used for the README's "Use with Hugging Face" section.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network: everything is built from a config
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, get_scheduler
from transformers.optimization import Adafactor

import coap_compile
from coap_compile import CoapOptimizer
from coap_compile.integrations.transformers import (
    base_optimizer_from_args,
    coap_optimizer_cls_and_kwargs,
    create_coap_optimizer,
    parse_optim_args,
)

VOCAB, T = 64, 16
OPTIM_ARGS = "rank=8, update_interval=2, reproject_factor=2"  # correlation step at k=2, 6; SVD at k=4, 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is 5-10x faster than two on the shared 2-core machine (measured 10 ms vs
    50-150 ms per step under load), and the result does not depend on it (each test compares runs made
    with the same setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2 * T, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


class Arithmetic(torch.utils.data.Dataset):
    """Sequences ``x_t = (a + b·t) mod V``: learnable from the first two tokens, so the loss falls."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randint(0, VOCAB, (n, 1), generator=g), torch.randint(1, 8, (n, 1), generator=g)
        self.x = (a + b * torch.arange(T)) % VOCAB

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def training_args(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=8, learning_rate=3e-3, weight_decay=0.1,
        warmup_steps=2, lr_scheduler_type="cosine", logging_steps=1000, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, optim_args=OPTIM_ARGS,
    )  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def coap_trainer(model, args, **kw) -> Trainer:
    return Trainer(
        model=model, args=args, train_dataset=Arithmetic(),
        optimizer_cls_and_kwargs=coap_optimizer_cls_and_kwargs(args, **kw),
    )  # fmt: skip


def inner(opt) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)  # Trainer wraps it in accelerate's AcceleratedOptimizer


# -- optim_args ----------------------------------------------------------------------------------------
def test_parse_optim_args_types_and_whitespace():
    assert parse_optim_args(None) == {} and parse_optim_args("  ") == {}
    got = parse_optim_args(
        " rank=8, rank_ratio=4 ,update_interval=16,reproject_factor=3,scale=0.25,projection=dct "
    )
    want = dict(rank=8, rank_ratio=4.0, update_interval=16, reproject_factor=3, scale=0.25, projection="dct")
    assert got == want
    assert type(got["rank"]) is int and type(got["rank_ratio"]) is float
    precision = parse_optim_args("state_precision=int8,projection_precision=bf16,quant_block_size=128")
    assert precision == dict(state_precision="int8", projection_precision="bf16", quant_block_size=128)


@pytest.mark.parametrize(
    "text, message",
    [
        ("rank=8,foo=1", r"unknown key 'foo'.*allowed keys: rank, rank_ratio"),
        ("rank=8,rank=4", r"key 'rank' given twice"),
        ("rank", r"entry 'rank' .* is not key=value"),
        ("rank=8,", r"entry '' .* is not key=value"),
        ("rank=", r"entry 'rank=' .* is not key=value"),
        ("rank=1.5", r"rank must be an integer, got '1.5'"),
        ("rank=0", r"rank must be a positive int, got 0"),
        ("scale=abc", r"scale must be a number, got 'abc'"),
        ("scale=inf", r"scale must be a finite number, got 'inf'"),
        ("rank_ratio=-2", r"rank_ratio must be a positive number, got -2.0"),
        ("update_interval=0", r"update_interval must be a positive int, got 0"),
        ("projection=svd", r"unknown projection 'svd'"),
        ("update_proj_gap=200", r"'update_proj_gap' is a GaLore/APOLLO argument \(use update_interval=200\)"),
        ("layerwise=maybe", r"layerwise must be true or false, got 'maybe'"),
        ("state_precision=fp8", r"state_precision must be one of \('auto', .*'int8'\), got 'fp8'"),
        ("quant_block_size=100", r"quant_block_size must be a power of two"),
    ],
)
def test_parse_optim_args_refuses_bad_input_naming_it(text, message):
    with pytest.raises(ValueError, match=message):
        parse_optim_args(text)


def test_keyword_settings_conflicting_with_optim_args_are_refused(tmp_path):
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match="'rank' is given both in args.optim_args and as a keyword"):
        coap_optimizer_cls_and_kwargs(args, rank=4)
    with pytest.raises(TypeError, match="unknown setting 'rnak'"):
        coap_optimizer_cls_and_kwargs(args, rnak=4)


LAYERWISE = OPTIM_ARGS + ",layerwise=true"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({}, r"max_grad_norm=1.0 cannot clip by the global norm .* set max_grad_norm=0"),
        ({"max_grad_norm": 0, "gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2 is not"),
    ],
)
def test_layerwise_refuses_what_it_cannot_honour(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        coap_optimizer_cls_and_kwargs(training_args(tmp_path, optim_args=LAYERWISE, **kw))


def test_layerwise_trainer_is_bit_identical_and_resumes(tmp_path):
    """``layerwise=true`` in a real Trainer: the gradients are stepped and freed inside backward, and the
    run (8 steps, P refreshes at k = 2, 4, 6, cosine schedule) equals the same Trainer without
    ``layerwise`` bit for bit; resuming it from checkpoint-4 equals the uninterrupted layer-wise run."""

    def live_gradients(model) -> list[int]:  # sampled before the optimizer's hooks (registered later)
        seen: list[int] = []
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(
                lambda _: seen.append(sum(q.grad is not None for q in model.parameters()))
            )
        return seen

    model, ref = tiny_model(), tiny_model()
    alive, alive_ref = live_gradients(model), live_gradients(ref)
    normal = coap_trainer(ref, training_args(tmp_path / "n", max_grad_norm=0))
    normal.train()
    args = training_args(
        tmp_path / "a", max_grad_norm=0, optim_args=LAYERWISE, save_strategy="steps", save_steps=4
    )
    layerwise = coap_trainer(model, args)
    layerwise.train()
    assert isinstance(inner(layerwise.optimizer), CoapOptimizer)
    n = len(list(model.parameters()))
    assert len(alive) == len(alive_ref) == 8 * n
    assert max(alive_ref) == n and max(alive) == 1  # one gradient at a time inside backward
    for (n, a), b in zip(normal.model.named_parameters(), layerwise.model.parameters()):
        assert torch.equal(a, b), n
    sd_n, sd_l = inner(normal.optimizer).state_dict(), inner(layerwise.optimizer).state_dict()
    assert sd_n["state"].keys() == sd_l["state"].keys()
    for k, entry in sd_n["state"].items():
        assert all(torch.equal(v, sd_l["state"][k][name]) for name, v in entry.items()), k
    resumed_args = training_args(tmp_path / "b", max_grad_norm=0, optim_args=LAYERWISE)
    resumed = coap_trainer(tiny_model(seed=1), resumed_args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    for (n, a), b in zip(layerwise.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n


# -- base optimizer ------------------------------------------------------------------------------------
def test_base_optimizer_is_built_from_training_arguments(tmp_path):
    args = training_args(tmp_path, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.05)
    assert base_optimizer_from_args(args) == (
        torch.optim.AdamW,
        dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05),
    )
    opt = create_coap_optimizer(tiny_model(), args)
    assert opt.config.base is torch.optim.AdamW
    for g in opt.param_groups:
        assert (g["lr"], g["betas"], g["eps"], g["fused"]) == (3e-3, (0.8, 0.95), 1e-7, None)
    ada = training_args(tmp_path, optim="adafactor")
    assert base_optimizer_from_args(ada) == (
        Adafactor,
        dict(lr=3e-3, scale_parameter=False, relative_step=False, weight_decay=0.1),
    )
    with pytest.raises(ValueError, match=r"optim='sgd' has no COAP form here; supported: adamw_torch"):
        base_optimizer_from_args(training_args(tmp_path, optim="sgd"))


def test_adafactor_is_transformers_adafactor_as_trainer_builds_it(tmp_path):
    """optim='adafactor': transformers' Adafactor(lr, scale_parameter=False, relative_step=False) with
    Trainer's decay groups; after one step the full-rank parameters equal transformers' Adafactor
    itself on the same gradients (they run the unmodified base), and the projected ones moved."""
    args = training_args(tmp_path, optim="adafactor")
    model, ref = tiny_model(), tiny_model()
    opt = create_coap_optimizer(model, args)
    assert opt.config.base is Adafactor
    for g in opt.param_groups:
        flags = (g["lr"], g["scale_parameter"], g["relative_step"], g["warmup_init"])
        assert flags == (3e-3, False, False, False)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}
    batch = Arithmetic()[0]["input_ids"][None]
    for m in (model, ref):
        m(input_ids=batch, labels=batch).loss.backward()
    full = {id(p) for p in model.parameters()} - {id(p) for p in opt.projected_parameters()}
    names = dict(ref.named_parameters())
    ref_groups = [
        {
            "params": [names[n] for n, p in model.named_parameters() if id(p) in ids],
            "weight_decay": g["weight_decay"],
        }
        for g in opt.param_groups
        if (ids := {id(p) for p in g["params"]} & full)
    ]
    ref_opt = Adafactor(ref_groups, lr=3e-3, scale_parameter=False, relative_step=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    ref_opt.step()
    for n, p in model.named_parameters():
        if id(p) in full:
            # transformers' Adafactor keeps an int step and an RMS float, so COAP runs its full-rank
            # parameters through the compiled port (tensor-only state): equal to rounding (the port
            # matches transformers to 4.4e-8 in float32, tests/test_hf_adafactor_adapter.py).
            torch.testing.assert_close(p, names[n], rtol=1e-6, atol=1e-7, msg=n)
        else:
            assert not torch.equal(p, before[n]), n
    torch_ada = create_coap_optimizer(tiny_model(), args, base_optim=torch.optim.Adafactor)  # the alternative
    assert torch_ada.config.base is torch.optim.Adafactor
    assert {g["lr"] for g in torch_ada.param_groups} == {3e-3}


# -- parameter selection -------------------------------------------------------------------------------
def _projected_names(model, opt) -> set[str]:
    ids = {id(p) for p in inner(opt).projected_parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("target", [None, "all-linear", "all_linear"])
def test_default_selection_equals_optimize_and_decay_equals_trainer(tmp_path, tie, target):
    model = tiny_model(tie=tie)
    args = training_args(tmp_path, optim_target_modules=target)
    trainer = coap_trainer(model, args)
    opt = trainer.create_optimizer()
    reference = coap_compile.optimize(model, torch.optim.AdamW, rank=8, lr=1e-3)
    assert _projected_names(model, opt) == _projected_names(model, reference)
    assert "model.embed_tokens.weight" not in _projected_names(model, opt)
    assert ("lm_head.weight" in _projected_names(model, opt)) == (not tie)  # a tied head stays full-rank
    decay = set(trainer.get_decay_parameter_names(model))  # the Trainer instance's own rule
    names = {id(p): n for n, p in model.named_parameters()}
    for g in inner(opt).param_groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.1 if names[id(p)] in decay else 0.0), names[id(p)]
    assert sum(len(g["params"]) for g in inner(opt).param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "target, expected",
    [
        (["q_proj", "v_proj"], r"\.(q|v)_proj\.weight$"),  # substrings (transformers' list rule)
        ([r".*\.mlp\.(gate|up)_proj"], r"\.mlp\.(gate|up)_proj\.weight$"),  # fullmatch regex in a list
        (r".*layers\.1\..*", r"layers\.1\..*_proj\.weight$"),  # a string: one fullmatch regex
        (["embed_tokens", "k_proj"], r"\.k_proj\.weight$"),  # an Embedding matched by name is ignored
    ],
)
def test_optim_target_modules_follow_transformers_matching(tmp_path, target, expected):
    import re

    model = tiny_model()
    opt = create_coap_optimizer(model, training_args(tmp_path, optim_target_modules=target))
    want = {n for n, _ in model.named_parameters() if re.search(expected, n)}
    assert want and _projected_names(model, opt) == want


def test_optim_target_modules_errors(tmp_path):
    with pytest.raises(ValueError, match=r"target_modules=\['nothing_here'\] matched no module"):
        create_coap_optimizer(tiny_model(), training_args(tmp_path, optim_target_modules=["nothing_here"]))
    with pytest.raises(ValueError, match="given both in args.optim_target_modules and as a keyword"):
        args = training_args(tmp_path, optim_target_modules=["q_proj"])
        coap_optimizer_cls_and_kwargs(args, target_modules=["x"])


# -- training --------------------------------------------------------------------------------------------
def _record_batches(model) -> list[dict]:
    seen: list[dict] = []

    def hook(_module, args, kwargs):
        seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_trainer_step_equals_a_replayed_manual_loop(tmp_path):
    """The Trainer's updates are exactly COAP's: a hand loop on the same batches (recorded from the
    Trainer's forward calls), with groups built by hand, transformers' scheduler and the same clipping,
    ends bit-identical."""
    model = tiny_model()
    seen = _record_batches(model)
    args = training_args(tmp_path, max_steps=6)
    coap_trainer(model, args).train()
    assert len(seen) == 6

    ref = tiny_model()
    names = dict(ref.named_parameters())
    norms = [p for n, p in names.items() if "norm" in n]
    embed = [names["model.embed_tokens.weight"]]
    linear = [p for n, p in names.items() if n.endswith("_proj.weight") or n == "lm_head.weight"]
    assert len(norms) + len(embed) + len(linear) == len(names)
    opt = CoapOptimizer(
        [{"params": embed, "project": False}, {"params": norms, "project": False, "weight_decay": 0.0},
         {"params": linear}],
        torch.optim.AdamW, rank=8, update_interval=2, reproject_factor=2, lr=3e-3, betas=(0.9, 0.999),
        eps=1e-8, weight_decay=0.1,
    )  # fmt: skip
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=6)
    for kwargs in seen:
        ref(**kwargs).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), n


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    """8 steps uninterrupted vs 4 steps, save, new Trainer resumed from checkpoint-4 for 4 more (P
    refreshes at k = 2, 4 before and 6, 8 after the checkpoint; cosine schedule with warm-up)."""
    args = training_args(tmp_path / "a", save_strategy="steps", save_steps=4)
    full = coap_trainer(tiny_model(), args)
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-4"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)  # tensors only
    assert state["coap"]["base"] == "torch.optim.AdamW"

    resumed = coap_trainer(tiny_model(seed=1), training_args(tmp_path / "b"))  # other init: from the ckpt
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    sd_a, sd_b = inner(full.optimizer).state_dict(), inner(resumed.optimizer).state_dict()
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for k in sd_a["state"]:
        for name, v in sd_a["state"][k].items():
            assert torch.equal(v, sd_b["state"][k][name]), (k, name)
    assert full.lr_scheduler.get_last_lr() == resumed.lr_scheduler.get_last_lr()
    assert [g["lr"] for g in sd_a["param_groups"]] == [g["lr"] for g in sd_b["param_groups"]]


def _state_bytes(opt) -> int:
    tensors = [v for s in inner(opt).state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(v.numel() * v.element_size() for v in tensors)


def test_memory_plan_is_the_real_state_and_below_adamw(tmp_path):
    trainer = coap_trainer(tiny_model(), training_args(tmp_path, max_steps=2))
    trainer.train()
    plan = inner(trainer.optimizer).memory_plan()
    assert plan.total_bytes == _state_bytes(trainer.optimizer)
    adamw = Trainer(model=tiny_model(), args=training_args(tmp_path, max_steps=1, optim="adamw_torch"),
                    train_dataset=Arithmetic())  # fmt: skip
    adamw.train()
    assert plan.base_bytes == _state_bytes(adamw.optimizer)  # the plan's AdamW column is AdamW's real state
    assert plan.total_bytes < 0.5 * plan.base_bytes
    # optim_args reaches the storage: bf16 states, planned and held exactly, below the fp32 plan.
    args16 = training_args(
        tmp_path, max_steps=2, warmup_steps=0, optim_args=OPTIM_ARGS + ",state_precision=bf16"
    )
    bf16 = coap_trainer(tiny_model(), args16)
    bf16.train()
    plan16 = inner(bf16.optimizer).memory_plan()
    assert plan16.total_bytes == _state_bytes(bf16.optimizer) < plan.total_bytes


def test_state_precision_with_a_warmup_from_lr_zero(tmp_path):
    """Full-rank parameters with an explicit precision run the derived update (lr in the numerator): a
    warm-up from lr = 0 with zero gradient entries (unused embedding rows) stays finite. (torch's
    capturable arithmetic divides by −lr/bias_correction1 and gave NaN here before.)"""
    args = training_args(tmp_path, max_steps=2, optim_args=OPTIM_ARGS + ",state_precision=bf16")
    trainer = coap_trainer(tiny_model(), args)
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# -- the README measurement --------------------------------------------------------------------------------
def compare(steps: int = 300, optim_args: str = "rank_ratio=4", seed: int = 0, out: str = "/tmp/coap_hf"):
    """AdamW vs COAP-AdamW through Trainer on the tiny model: final train loss and state bytes."""
    rows = []
    for name in ("adamw", "coap"):
        args = training_args(f"{out}/{name}", max_steps=steps, warmup_steps=steps // 10, optim="adamw_torch",
                             logging_steps=steps // 10, optim_args=optim_args, seed=seed)  # fmt: skip
        data = Arithmetic(n=512)
        model = tiny_model(seed)
        if name == "adamw":
            trainer = Trainer(model=model, args=args, train_dataset=data)
        else:
            trainer = Trainer(model=model, args=args, train_dataset=data,
                              optimizer_cls_and_kwargs=coap_optimizer_cls_and_kwargs(args))  # fmt: skip
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        row = {
            "optimizer": name, "optim_args": optim_args if name == "coap" else "", "seed": seed,
            "steps": steps,
            "final_loss": losses[-1], "state_bytes": _state_bytes(trainer.optimizer),
        }  # fmt: skip
        if name == "coap":
            plan = inner(trainer.optimizer).memory_plan()
            row.update(plan_bytes=plan.total_bytes, plan_base_bytes=plan.base_bytes)
        rows.append(row)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    for r in compare(*(int(sys.argv[1]),) if len(sys.argv) > 1 else (), *sys.argv[2:3]):
        print(r)
