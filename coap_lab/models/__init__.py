"""Models used by the demo and the benchmarks: a LLaMA-style causal LM and its size configs, and a small
DDPM UNet noise-prediction model with its schedule, loss and samplers (:mod:`coap_lab.models.unet`)."""

from __future__ import annotations

from coap_lab.models.llama import (
    LLAMA_CONFIGS,
    PAPER_RANKS,
    LlamaConfig,
    LlamaForCausalLM,
    build_llama,
    demo_config,
)
from coap_lab.models.unet import (
    DDPMSchedule,
    UNet,
    UNetConfig,
    build_unet,
    conv_weights_above_threshold,
    ddpm_loss,
    ddpm_sample,
    demo_unet_config,
    denoise_one_step,
    smoke_unet_config,
    tiny_unet_config,
)

__all__ = [
    "LLAMA_CONFIGS",
    "PAPER_RANKS",
    "DDPMSchedule",
    "LlamaConfig",
    "LlamaForCausalLM",
    "UNet",
    "UNetConfig",
    "build_llama",
    "build_unet",
    "conv_weights_above_threshold",
    "ddpm_loss",
    "ddpm_sample",
    "demo_config",
    "demo_unet_config",
    "denoise_one_step",
    "smoke_unet_config",
    "tiny_unet_config",
]
