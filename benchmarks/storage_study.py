"""Measurements behind the state-storage defaults (``coap_compile.storage``).

Run from the repository root (each part stays under ~3 CPU-minutes on 2 cores)::

    python benchmarks/storage_study.py stagnation   # bf16 RN/SR on an EMA of g²: the half-ulp stall
    python benchmarks/storage_study.py regression   # noisy least squares, AdamW states fp32/bf16/int8
    python benchmarks/storage_study.py llama        # tiny LLaMA, reference COAP-AdamW, states per
                                                    # precision; saves the final fp32 moments for `int8`
    python benchmarks/storage_study.py int8         # int8 code map / layout choices on those moments
    python benchmarks/storage_study.py rng          # uniformity of the counter hash

Storage is emulated exactly: after every optimizer step each ``exp_avg``/``exp_avg_sq`` goes through
``store_`` and the next step reads ``load`` of it, which is what the integrated optimizer computes
(load → update in fp32 → store). ``--json PATH`` writes the numbers. The results quoted in the storage
module docstrings come from these commands (torch 2.13 CPU, 2-core VM).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from coap_compile.storage import get_storage
from coap_compile.storage.codemap import code_map
from coap_compile.storage.int8 import block_layout, dequantize, quantize_
from coap_compile.storage.rng import random_bits, stream_key

KIND = {"exp_avg": "first_moment", "exp_avg_sq": "second_moment"}
VARIANTS = {
    "fp32": ("fp32", {}),
    "bf16-rn": ("bf16", {"rounding": "nearest"}),
    "bf16-sr": ("bf16", {"rounding": "stochastic"}),
    "int8-sr": ("int8", {"rounding": "stochastic"}),
    "int8-rn": ("int8", {"rounding": "nearest"}),
    "int8-sr-signed-v": ("int8", {"rounding": "stochastic", "second_moment_map": "signed"}),
    "int8-rn-signed-v": ("int8", {"rounding": "nearest", "second_moment_map": "signed"}),
    "int8-rn-log": ("int8", {"rounding": "nearest", "style": "log"}),
    "int8-sr-log": ("int8", {"rounding": "stochastic", "style": "log"}),
}


class StoredStates:
    """Round the optimizer's moments through a storage after every step (exact emulation)."""

    def __init__(self, opt: torch.optim.Optimizer, variant: str):
        precision, options = VARIANTS[variant]
        self.opt, self.storage, self.stored = opt, get_storage(precision, **options), {}
        self.fp32 = precision == "fp32"

    @torch.no_grad()
    def after_step(self) -> None:
        if self.fp32:
            return
        for i, (p, state) in enumerate(self.opt.state.items()):
            for name, kind in KIND.items():
                if name not in state:
                    continue
                key = (id(p), name)
                if key not in self.stored:
                    self.stored[key] = self.storage.zeros(name, state[name].shape, "cpu", kind, seed=i)
                self.storage.store_(self.stored[key], name, state[name])
                state[name].copy_(self.storage.load(self.stored[key], name))


# ----------------------------------------------------------------------------------------- stagnation
def stagnation(steps: int = 3000, n: int = 4096, beta2: float = 0.999) -> dict:
    """v ← β₂v + (1−β₂)g² from v = 0, stored fp32 / bf16-RN / bf16-SR; g = 1 and g ~ N(0, 1)."""
    out: dict = {}
    gen = torch.Generator().manual_seed(0)
    for label, noisy in (("g=1", False), ("g~N(0,1)", True)):
        res: dict = {}
        for variant in ("fp32", "bf16-rn", "bf16-sr"):
            precision, options = VARIANTS[variant]
            st = get_storage(precision, **options)
            stored = st.zeros("v", (n,), "cpu", "second_moment")
            frozen_at, prev = None, None
            trace = {}
            g_gen = torch.Generator().manual_seed(1)
            for t in range(1, steps + 1):
                g = torch.randn(n, generator=g_gen) if noisy else torch.ones(n)
                v = st.load(stored, "v") * beta2 + (1 - beta2) * g * g
                st.store_(stored, "v", v)
                cur = st.load(stored, "v")
                first_repeat = not noisy and variant == "bf16-rn" and frozen_at is None and prev is not None
                if first_repeat and torch.equal(cur, prev):
                    frozen_at = t - 1
                prev = cur.clone()
                if t in (100, 300, 1000, 3000):
                    vhat = cur / (1 - beta2**t)
                    trace[t] = {
                        "v_mean": cur.mean().item(),
                        "vhat_mean": vhat.mean().item(),
                        "vhat_std": vhat.std().item(),
                    }
            res[variant] = {"trace": trace, "frozen_after_step": frozen_at}
        out[label] = res
    del gen
    return out


# ----------------------------------------------------------------------------------------- regression
def regression(variants: list[str], steps: int = 4000, seed: int = 0) -> dict:
    """Online noisy least squares: fresh ``x ~ N(0, I₂₅₆)`` each step, ``y = x W* + 0.1·ε`` (16 outputs),
    AdamW lr 1e-3 constant, β = (0.9, 0.999), batch 64. Reported: the excess risk ``‖W − W*‖²_F/16``
    (population loss minus the noise 0.01), mean over each 500-step window; at a constant lr its
    stationary level is set by the effective step size, which is what a biased ``v`` changes."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(256, 16, generator=gen) / 16
    out = {}
    for variant in variants:
        w = torch.zeros(256, 16, requires_grad=True)
        opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.0, foreach=False)
        emu = StoredStates(opt, variant)
        if variant.startswith("int8"):
            emu.storage.min_numel = 0
        bgen = torch.Generator().manual_seed(seed + 1)
        window, risks = [], []
        for t in range(steps):
            x = torch.randn(64, 256, generator=bgen)
            y = x @ w_true + 0.1 * torch.randn(64, 16, generator=bgen)
            loss = ((x @ w - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            emu.after_step()
            with torch.no_grad():
                window.append((w - w_true).pow(2).sum().item() / 16)
            if (t + 1) % 500 == 0:
                risks.append(sum(window) / len(window))
                window = []
        out[variant] = {"excess_risk_per_500": risks, "final_window": risks[-1]}
    return out


# ----------------------------------------------------------------------------------------- tiny LLaMA
def llama(variants: list[str], steps: int = 500, seed: int = 0, moments: Path | None = None) -> dict:
    """Tiny LLaMA (d=128, 2 layers, seq 64, batch 16) on the stdlib corpus, reference COAP-AdamW
    (q/k/v/o/gate/up/down projected at rank_ratio 4 → r = 32), lr 3e-3 warm-up + cosine, wd 0."""
    from coap_compile.reference import CoapAdamW
    from coap_lab.data import BatchSampler, load_corpus, validation_windows
    from coap_lab.models import build_llama, demo_config

    cfg = demo_config(hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4, max_seq_len=64)
    corpus = load_corpus(max_bytes=4_000_000)
    val = validation_windows(corpus.val, 64, 64)
    out = {}
    for variant in variants:
        model = build_llama(cfg, seed=seed)
        proj = [
            p for n, p in model.named_parameters() if p.ndim == 2 and (".self_attn." in n or ".mlp." in n)
        ]
        ids = {id(p) for p in proj}
        rest = [p for p in model.parameters() if id(p) not in ids]
        opt = CoapAdamW(
            [{"params": proj, "rank_ratio": 4}, {"params": rest, "project": False}], lr=3e-3, weight_decay=0.0
        )
        emu = StoredStates(opt, variant)
        sampler = BatchSampler(corpus.train, 16, 64, seed=seed)
        t0 = time.perf_counter()
        for step in range(steps):
            warm = min(1.0, (step + 1) / 30)
            cos = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - 30) / (steps - 30))))
            for g in opt.param_groups:
                g["lr"] = 3e-3 * (warm if step < 30 else cos)
            loss = model.loss(sampler.next())
            opt.zero_grad()
            loss.backward()
            opt.step()
            emu.after_step()
        with torch.no_grad():
            vl = sum(
                model.loss(val[i : i + 16]).item() * val[i : i + 16].shape[0] for i in range(0, len(val), 16)
            )
        out[variant] = {
            "val_loss": vl / len(val),
            "train_loss_last": loss.item(),
            "s": time.perf_counter() - t0,
        }
        print(variant, out[variant], flush=True)
        if moments is not None and variant == "fp32":
            saved = {}
            for i, st in enumerate(opt.state.values()):
                if "exp_avg" in st:
                    saved[f"{i}.m"], saved[f"{i}.v"] = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
                    saved[f"{i}.lowrank"] = torch.tensor("proj" in st)
            saved["step"] = torch.tensor(steps)
            torch.save(saved, moments)
    return out


# ----------------------------------------------------------------------------------------- int8 choices
def _q(
    x: torch.Tensor,
    signed: bool,
    style: str,
    floor: bool,
    flat: bool,
    block: int = 256,
    blocks: str = "tiles",
) -> torch.Tensor:
    lay = block_layout((x.numel(),) if flat else tuple(x.shape), block, blocks)
    cm = code_map(signed, style)
    codes = torch.zeros(x.shape, dtype=cm.code_dtype)
    absmax = torch.zeros(lay.grid)
    quantize_(x, codes, absmax, lay, cm, floor=floor)
    return dequantize(codes, absmax, lay, cm).view(x.shape)


def _direction(m: torch.Tensor, v: torch.Tensor, t: int, eps: float = 1e-8) -> torch.Tensor:
    return (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + eps)


def int8_choices(moments: Path) -> dict:
    """Error of the Adam direction m̂/(√v̂ + ε) when m and v are 8-bit, per code map / layout choice."""
    saved = torch.load(moments, weights_only=True)
    t = int(saved["step"])
    real = [
        (saved[f"{k[:-2]}.m"], saved[k], bool(saved[f"{k[:-2]}.lowrank"])) for k in saved if k.endswith(".v")
    ]
    # heavy-tailed synthetic moments (per-element gradient scale 10^N(0, 1.5)): v spans > 7 decades inside
    # a block, as for rarely-updated embedding rows; m is the matching noisy EMA
    gen = torch.Generator().manual_seed(0)
    scale = 10.0 ** (1.5 * torch.randn(512, 64, generator=gen)) * 1e-3
    m_syn = scale * (0.3 * torch.randn(512, 64, generator=gen))
    v_syn = scale**2 * (1 + 0.1 * torch.rand(512, 64, generator=gen))
    out_all = {}
    for dataset, pairs in (("real", real), ("heavy-tailed", [(m_syn, v_syn, True)])):
        out_all[dataset] = _int8_table(pairs, t, dataset)
    return out_all


def _int8_table(pairs: list, t: int, dataset: str) -> dict:
    configs = {
        "v signed (official COAP)": dict(v_signed=True, floor=False),
        "v unsigned": dict(v_signed=False, floor=False),
        "v unsigned + floor": dict(v_signed=False, floor=True),
    }
    out: dict = {}
    for style in ("decade", "log"):
        for flat in (False, True):
            for label, c in configs.items():
                key = f"{style} | {'flat 256' if flat else '2-D 16x16'} | {label}"
                num = den = 0.0
                worst = 0.0
                bad = total = 0
                num_v = 0.0
                for m, v, _ in pairs:
                    u = _direction(m, v, t)
                    mq = _q(m, True, style, False, flat)
                    vq = _q(v, c["v_signed"], style, c["floor"], flat)
                    uq = _direction(mq, vq, t)
                    num += (uq - u).pow(2).sum().item()
                    den += u.pow(2).sum().item()
                    num_v += (_direction(m, vq, t) - u).pow(2).sum().item()
                    worst = max(worst, ((uq - u).abs().max() / u.abs().max()).item())
                    bad += ((uq - u).abs() > 0.5 * u.abs() + 1e-3 * u.abs().max()).sum().item()
                    total += u.numel()
                out[key] = {
                    "rel_l2_direction": math.sqrt(num / den),
                    "rel_l2_v_only": math.sqrt(num_v / den),
                    "max_abs_err_over_max": worst,
                    "frac_elements_off_by_50pct": bad / total,
                }
                print(
                    f"{dataset:<12} {key:<55} " + " ".join(f"{k}={v:.4g}" for k, v in out[key].items()),
                    flush=True,
                )
    for block in (64, 256, 1024, 4096):  # the default map and layout at other block sizes
        num = den = 0.0
        for m, v, _ in pairs:
            u = _direction(m, v, t)
            uq = _direction(
                _q(m, True, "decade", False, False, block), _q(v, False, "decade", True, False, block), t
            )
            num += (uq - u).pow(2).sum().item()
            den += u.pow(2).sum().item()
        out[f"block {block}"] = {
            "rel_l2_direction": math.sqrt(num / den),
            "scale_bytes_per_element": 4 / block,
        }
        print(f"{dataset:<12} block {block:<5} rel_l2_direction={math.sqrt(num / den):.4g}", flush=True)
    for block in (64, 256):  # issue 18: 1×bw row blocks (FSDP2's layout) against the 16×16 tiles
        num = den = 0.0
        scales = elems = 0
        for m, v, _ in pairs:
            u = _direction(m, v, t)
            uq = _direction(
                _q(m, True, "decade", False, False, block, "rows"),
                _q(v, False, "decade", True, False, block, "rows"), t,
            )  # fmt: skip
            num += (uq - u).pow(2).sum().item()
            den += u.pow(2).sum().item()
            scales += math.prod(block_layout(tuple(m.shape), block, "rows").grid)
            elems += m.numel()
        out[f"rows {block}"] = {
            "rel_l2_direction": math.sqrt(num / den),
            "scale_bytes_per_element": 4 * scales / elems,
        }
        print(f"{dataset:<12} rows {block:<5} rel_l2_direction={math.sqrt(num / den):.4g}", flush=True)
    bf = {"num": 0.0, "den": 0.0}
    for m, v, _ in pairs:
        u = _direction(m, v, t)
        uq = _direction(m.bfloat16().float(), v.bfloat16().float(), t)
        bf["num"] += (uq - u).pow(2).sum().item()
        bf["den"] += u.pow(2).sum().item()
    out["bf16 (RN) for comparison"] = {"rel_l2_direction": math.sqrt(bf["num"] / bf["den"])}
    out["tensors"] = len(pairs)
    out["elements"] = sum(m.numel() for m, _, _ in pairs)
    print("bf16 RN", out["bf16 (RN) for comparison"])
    return out


# ----------------------------------------------------------------------------------------- rng
def rng_check(n: int = 1 << 20) -> dict:
    """χ² of the top 8 of the 16 random bits over 256 bins, for a few (seed, counter) streams."""
    out = {}
    for seed, counter in ((0, 0), (1, 0), (0, 1), (123456789, 98765)):
        bits = random_bits(stream_key(seed, counter), n)
        hist = torch.bincount((bits >> 8).long(), minlength=256).double()
        e = n / 256
        out[f"{seed},{counter}"] = ((hist - e) ** 2 / e).sum().item()
    out["chi2_255_q999"] = 330.5  # 99.9 % quantile of χ²(255)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["stagnation", "regression", "llama", "int8", "rng"])
    ap.add_argument("--variants", default="fp32,bf16-rn,bf16-sr,int8-rn,int8-sr")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--moments", type=Path, default=Path("/tmp/coap_storage_moments.pt"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.part == "stagnation":
        res = stagnation(args.steps or 3000)
    elif args.part == "regression":
        res = regression(args.variants.split(","), args.steps or 4000, args.seed)
    elif args.part == "llama":
        res = llama(args.variants.split(","), args.steps or 500, args.seed, args.moments)
    elif args.part == "int8":
        res = int8_choices(args.moments)
    else:
        res = rng_check()
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
