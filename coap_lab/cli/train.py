"""The training loop shared by ``coap-compile demo`` and ``bench quality``.

Every run of a comparison uses the same model initialisation (``build_llama(cfg, seed=seed)``), the
same batches in the same order (:class:`~coap_lab.data.BatchSampler` seeded with ``seed``), the
same learning-rate schedule (linear warm-up, then cosine to ``min_lr_ratio · lr``) and the same
validation windows; only the optimizer differs.

:func:`load_training_corpus` reads ``--corpus`` and checks, before any model is built, that it holds
enough text for ``--seq-len``; its messages name both options, the sizes found and the sizes needed
(``T + 2`` training and ``T + 1`` validation bytes, :func:`coap_lab.data.required_bytes`; the batch
size does not enter because windows are drawn with replacement).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor

from coap_lab.cli.memory import measured_state_bytes, plan_total_bytes
from coap_lab.cli.optimizers import build_optimizer
from coap_lab.cli.progress import Progress
from coap_lab.data import (
    BatchSampler,
    Corpus,
    CorpusError,
    load_corpus,
    min_single_file_bytes,
    required_bytes,
    validation_windows,
)
from coap_lab.models import LlamaConfig, LlamaForCausalLM, build_llama

__all__ = [
    "RunResult",
    "TrainConfig",
    "check_corpus_fits",
    "evaluate",
    "load_training_corpus",
    "lr_factor",
    "train_run",
]


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings (everything except the optimizer name)."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    rank: int | None = None
    rank_ratio: float | None = 4.0
    update_interval: int = 32
    reproject_factor: int = 5
    eval_every: int = 25
    eval_windows: int = 64
    seed: int = 0
    device: str = "cpu"


@dataclass
class RunResult:
    """What one run measured. Times are seconds; bytes are exact tensor sizes."""

    optimizer: str
    seed: int
    steps: int
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    opt_step_times: list[float] = field(default_factory=list)
    state_bytes: int = 0
    plan_bytes: int | None = None
    param_bytes: int = 0
    grad_bytes: int = 0
    peak_bytes: int = 0
    peak_kind: str = ""
    wall_s: float = 0.0

    @property
    def final_train_loss(self) -> float:
        """Mean training loss over the last 10 % of steps (at least 1) — less noisy than the last batch."""
        k = max(1, len(self.train_loss) // 10)
        return statistics.fmean(self.train_loss[-k:])

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1]

    @property
    def median_step_ms(self) -> float:
        return 1e3 * statistics.median(self.step_times)

    @property
    def median_opt_step_ms(self) -> float:
        return 1e3 * statistics.median(self.opt_step_times)

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.update(
            final_train_loss=self.final_train_loss,
            final_val_loss=self.final_val_loss,
            median_step_ms=self.median_step_ms,
            median_opt_step_ms=self.median_opt_step_ms,
        )
        return d


def _corpus_label(path: str | Path | None) -> str:
    return "--corpus (default: the standard library's .py files)" if path is None else f"--corpus {path}"


def check_corpus_fits(corpus: Corpus, seq_len: int, path: str | Path | None = None) -> None:
    """Raise :class:`CorpusError` naming ``--corpus``/``--seq-len`` when ``corpus`` is too short for
    ``seq_len`` (sizes found, sizes needed, and the largest ``--seq-len`` that would fit)."""
    need_train, need_val = required_bytes(seq_len)
    train, val = corpus.train.numel(), corpus.val.numel()
    if train >= need_train and val >= need_val:
        return
    fits = min(train - 2, val - 1)
    if corpus.num_files == 1:
        split = (
            f"{train + val:,} bytes of text, split into {train:,} training and {val:,} validation bytes "
            f"(the last 5% of a single file)"
        )
        more = f"a file of at least {min_single_file_bytes(seq_len):,} bytes"
    else:
        split = (
            f"{corpus.num_files} files, split by a hash of their paths into "
            f"{corpus.num_files - corpus.num_val_files} training files ({train:,} bytes) and "
            f"{corpus.num_val_files} validation files ({val:,} bytes)"
        )
        more = "more text"
    smaller = f"--seq-len {fits} or less" if fits >= 1 else "no --seq-len fits this corpus"
    raise CorpusError(
        f"{_corpus_label(path)}: {split}; --seq-len {seq_len} needs at least {need_train:,} training and "
        f"{need_val:,} validation bytes: give {more}, or {smaller}"
    )


def load_training_corpus(path: str | Path | None, seq_len: int, *, log: TextIO | None = None) -> Corpus:
    """:func:`~coap_lab.data.load_corpus` for the CLI: errors name ``--corpus`` (and ``--seq-len``
    when it is too short, :func:`check_corpus_fits`); a folder's skipped suffixes get a one-line note."""
    try:
        corpus = load_corpus(path)
    except CorpusError as exc:
        raise CorpusError(f"{_corpus_label(path)}: {exc}") from None
    note = corpus.skipped_note() if path is not None else None
    if note:
        print(f"note: {_corpus_label(path)}: {note}", file=log if log is not None else sys.stderr)
    check_corpus_fits(corpus, seq_len, path)
    return corpus


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, windows: Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token loss (nats) over ``windows`` (``K × (T+1)``), each window weighted equally."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, windows.shape[0], batch_size):
        chunk = windows[i : i + batch_size].to(device)
        total += model.loss(chunk).item() * chunk.shape[0]
    model.train(was_training)
    return total / windows.shape[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def train_run(
    optimizer: str, model_cfg: LlamaConfig, corpus: Corpus, cfg: TrainConfig, *, progress: bool = True
) -> RunResult:
    """Train a fresh model with ``optimizer`` and return the measurements.

    Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the run; on CPU the counted bytes of
    parameters + gradients + optimizer state after the last step (``peak_kind`` says which).
    """
    device = torch.device(cfg.device)
    model = build_llama(model_cfg, seed=cfg.seed).to(device)
    model.train()
    opt = build_optimizer(
        optimizer,
        model,
        rank=cfg.rank,
        rank_ratio=cfg.rank_ratio,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        update_interval=cfg.update_interval,
        reproject_factor=cfg.reproject_factor,
    )
    sampler = BatchSampler(corpus.train, cfg.batch_size, model_cfg.max_seq_len, seed=cfg.seed)
    val = validation_windows(corpus.val, model_cfg.max_seq_len, cfg.eval_windows)
    res = RunResult(optimizer=optimizer, seed=cfg.seed, steps=cfg.steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with Progress(cfg.steps, f"{optimizer} s{cfg.seed}", enabled=progress) as bar:
        for step in range(cfg.steps):
            batch = sampler.next().to(device)
            _set_lr(opt, cfg.lr * lr_factor(step, cfg.steps, cfg.warmup, cfg.min_lr_ratio))
            _sync(device)
            t0 = time.perf_counter()
            loss = model.loss(batch)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            _sync(device)
            t1 = time.perf_counter()
            opt.step()
            _sync(device)
            t2 = time.perf_counter()
            if step == cfg.steps - 1:  # gradients are still alive: count the training-time footprint
                res.grad_bytes = _tensor_bytes(p.grad for p in model.parameters())
            opt.zero_grad(set_to_none=True)
            res.step_times.append(t2 - t0)
            res.opt_step_times.append(t2 - t1)
            res.train_loss.append(float(loss.item()))
            if not math.isfinite(res.train_loss[-1]):
                raise FloatingPointError(
                    f"{optimizer} (seed {cfg.seed}): the training loss became {res.train_loss[-1]} at step "
                    f"{step + 1}; the peak learning rate --lr {cfg.lr:g} may be too large"
                )
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                res.val_steps.append(step + 1)
                res.val_loss.append(evaluate(model, val, cfg.batch_size, device))
            bar.update(loss=res.train_loss[-1], **({"val": res.val_loss[-1]} if res.val_loss else {}))
    res.wall_s = time.perf_counter() - start
    res.state_bytes = measured_state_bytes(opt)
    res.plan_bytes = plan_total_bytes(opt)
    res.param_bytes = _tensor_bytes(model.parameters())
    if device.type == "cuda":
        res.peak_bytes, res.peak_kind = (
            int(torch.cuda.max_memory_allocated(device)),
            "cuda max_memory_allocated",
        )
    else:
        res.peak_bytes = res.param_bytes + res.grad_bytes + res.state_bytes
        res.peak_kind = "params+grads+optimizer state (counted tensors, CPU)"
    return res
