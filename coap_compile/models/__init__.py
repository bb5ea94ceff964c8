"""Models used by the demo and the benchmarks (a LLaMA-style causal LM and its size configs)."""

from __future__ import annotations

from coap_compile.models.llama import (
    LLAMA_CONFIGS,
    PAPER_RANKS,
    LlamaConfig,
    LlamaForCausalLM,
    build_llama,
    demo_config,
)

__all__ = ["LLAMA_CONFIGS", "PAPER_RANKS", "LlamaConfig", "LlamaForCausalLM", "build_llama", "demo_config"]
