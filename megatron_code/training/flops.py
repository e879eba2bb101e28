"""Model FLOPs counted the way Megatron-LM counts them (causal attention term halved), so MFU is
comparable with published Megatron numbers; the full count (attention over all s^2 pairs, as
NeMo/DGXC and PaLM-style MFU report it) is available for comparison with those."""
from __future__ import annotations

import torch

from megatron_code.model.config import ModelConfig

# Dense (no sparsity) peak TFLOP/s per accelerator, from the vendors' data sheets: H100 SXM and
# H200 (same compute die) 989 BF16 / 1979 FP8; H100 PCIe 756 / 1513; A100 312 BF16 (no FP8).
# Matched against torch.cuda.get_device_name() in order, so "H100 PCIe" precedes "H100".
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp8": 1513.0}),
    ("H100", {"bf16": 989.0, "fp8": 1979.0}),
    ("H200", {"bf16": 989.0, "fp8": 1979.0}),
    ("A100", {"bf16": 312.0}),
)

# DPO: one forward of the frozen reference per forward + backward of the policy (3 forward passes).
REFERENCE_FLOPS_SHARE = 1.0 / 3.0


def training_flops_per_token(config: ModelConfig, seq_length: int, padded_vocab_size: int,
                             causal: bool = True) -> float:
    """Forward + backward (3x forward) matmul FLOPs per trained token.

    Per layer, forward: 2 FLOPs per multiply-add over the QKV and output projections, the
    attention score and value products (2 * 2 * s * nq * d, halved when `causal`: only the lower
    triangle is computed), and the SwiGLU MLP (2 * 3 * h * ffn); plus the logit layer (2 * h * V).
    """
    h, d, L = config.hidden_size, config.head_dim, config.num_layers
    nq, nkv = config.num_attention_heads, config.num_kv_heads
    projections = 2 * h * d * (nq + 2 * nkv) + 2 * nq * d * h
    attention = 2 * 2 * seq_length * nq * d / (2 if causal else 1)
    mlp = 2 * 3 * h * config.ffn_hidden_size
    logits = 2 * h * padded_vocab_size
    return 3.0 * (L * (projections + attention + mlp) + logits)


def compute_precision(config: ModelConfig, bf16: bool) -> str:
    """The precision whose peak MFU is measured against: fp8, bf16 or fp32."""
    if config.fp8_format is not None:
        return "fp8"
    return "bf16" if bf16 else "fp32"


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """Peak dense TFLOP/s of this device at `precision`, or None when unknown (CPU, fp32,
    unlisted GPUs; pass --peak-tflops to set it)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks.get(precision)
    return None
