"""A small LLaMA-style causal language model and the GaLore-paper size configurations.

The architecture follows the LLaMA family as used by the GaLore/COAP pre-training examples: pre-norm
decoder blocks with RMSNorm, rotary position embeddings applied to queries and keys, causal
multi-head self-attention and a SwiGLU feed-forward block. Parameter names mirror the HuggingFace
layout (``model.layers.{i}.self_attn.q_proj.weight``, ``...mlp.gate_proj.weight``, ``lm_head.weight``)
so that name-based projection rules ("attn"/"mlp" modules) select the same matrices as the paper.

Every module can be built on the ``meta`` device (``build_llama(cfg, device="meta")``): parameters get
shapes and dtypes but no storage, which is what the memory benchmark needs for the 7B configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LLAMA_CONFIGS",
    "PAPER_RANKS",
    "LlamaConfig",
    "LlamaForCausalLM",
    "RMSNorm",
    "apply_rotary",
    "build_llama",
    "demo_config",
    "rotary_tables",
]


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a LLaMA-style model.

    Attributes:
        vocab_size: number of token ids (256 for the byte-level demo, 32000 for the paper configs).
        hidden_size: model width ``d``.
        intermediate_size: SwiGLU inner width.
        num_layers: number of decoder blocks.
        num_heads: attention heads; ``hidden_size`` must be divisible by it and the head dim even.
        max_seq_len: longest sequence the rotary tables are precomputed for.
        tie_embeddings: share ``lm_head.weight`` with the token embedding.
        rms_eps: RMSNorm epsilon.
        rope_theta: rotary base frequency.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_seq_len: int = 1024
    tie_embeddings: bool = False
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "max_seq_len",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size {self.hidden_size} must split into {self.num_heads} heads of even size"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


#: GaLore-paper LLaMA configurations (vocab 32000, untied head), keyed by nominal size.
LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    "60m": LlamaConfig(32000, 512, 1376, 8, 8),
    "130m": LlamaConfig(32000, 768, 2048, 12, 12),
    "350m": LlamaConfig(32000, 1024, 2736, 24, 16),
    "1b": LlamaConfig(32000, 2048, 5461, 24, 32),
    "7b": LlamaConfig(32000, 4096, 11008, 32, 32, max_seq_len=2048),
}

#: The ranks the GaLore/COAP papers use for each configuration.
PAPER_RANKS: dict[str, int] = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}


def demo_config(**overrides: int | bool) -> LlamaConfig:
    """The byte-level demo model: d=256, 4 layers, 4 heads, SwiGLU 688, vocab 256, seq 128 (≈3.3 M params)."""
    base = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, max_seq_len=128
    )
    return replace(base, **overrides)


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x²) + eps) · w``, computed in float32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, device: torch.device | str | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rotary_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """``cos``/``sin`` tables of shape ``(seq_len, head_dim // 2)`` for angles ``t · θ^(−2i/head_dim)``."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive halves of the head dim of ``x`` (``B×H×T×D``) by the position angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary queries/keys and no biases."""

    def __init__(self, cfg: LlamaConfig, device=None):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False, device=device)
        self.k_proj = nn.Linear(d, d, bias=False, device=device)
        self.v_proj = nn.Linear(d, d, bias=False, device=device)
        self.o_proj = nn.Linear(d, d, bias=False, device=device)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(heads(self.k_proj(x)), cos, sin)
        out = F.scaled_dot_product_attention(q, k, heads(self.v_proj(x)), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) · up(x))``."""

    def __init__(self, cfg: LlamaConfig, device=None):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False, device=device)
        self.up_proj = nn.Linear(d, f, bias=False, device=device)
        self.down_proj = nn.Linear(f, d, bias=False, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: LlamaConfig, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, device=device)
        self.self_attn = Attention(cfg, device=device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, device=device)
        self.mlp = MLP(cfg, device=device)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Backbone(nn.Module):
    def __init__(self, cfg: LlamaConfig, device=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, device=device) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, device=device)


class LlamaForCausalLM(nn.Module):
    """Token ids ``B×T`` → next-token logits ``B×T×V``; ``loss(ids)`` is the shifted cross-entropy."""

    def __init__(self, cfg: LlamaConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = cfg
        self.model = _Backbone(cfg, device=device)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rotary_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if torch.device(device or "cpu").type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, 0.02) for matrices and embeddings (output projections: / √(2·layers)); norms 1."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.config.num_layers))
            else:
                p.normal_(0.0, std)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[-1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {ids.shape[-1]} > max_seq_len {self.config.max_seq_len}")
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        return self.lm_head(self.model.norm(x))

    def loss(self, ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats) of ``ids`` (``B×(T+1)``).

        Inputs are ``ids[:, :-1]``, targets ``ids[:, 1:]``.
        """
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def build_llama(
    cfg: LlamaConfig | str, *, device: torch.device | str = "cpu", seed: int | None = None
) -> LlamaForCausalLM:
    """Build a model from a config or a key of :data:`LLAMA_CONFIGS`; ``seed`` makes the init reproducible.

    On ``device="meta"`` nothing is allocated and no initialisation runs.
    """
    if isinstance(cfg, str):
        try:
            cfg = LLAMA_CONFIGS[cfg.lower()]
        except KeyError:
            raise ValueError(f"unknown LLaMA size {cfg!r}; choose from {sorted(LLAMA_CONFIGS)}") from None
    if seed is None:
        return LlamaForCausalLM(cfg, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg, device=device)
