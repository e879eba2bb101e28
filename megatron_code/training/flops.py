"""Model FLOPs counted the way Megatron-LM counts them (causal attention term halved), so MFU is
comparable with published Megatron numbers."""
from __future__ import annotations

import torch

from megatron_code.model.config import ModelConfig

# Dense peak TFLOP/s per device (SXM parts), by (device-name substring, precision).
PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0, ("H200", "fp8"): 1979.0,
    ("H100", "bf16"): 989.0, ("H100", "fp8"): 1979.0,
    ("A100", "bf16"): 312.0,
}


def training_flops_per_token(config: ModelConfig, seq_length: int, padded_vocab_size: int) -> float:
    """Forward + backward (3x forward) matmul FLOPs per trained token.

    Per layer, forward: 2 FLOPs per multiply-add over the QKV/output projections
    (2 h d (nq + nkv) + ... written out below), the attention score and value products
    (2 * 2 * s * nq * d, halved for causality), and the SwiGLU MLP (2 * 3 * h * ffn);
    plus the logit layer (2 * h * V).
    """
    h, d, L = config.hidden_size, config.head_dim, config.num_layers
    nq, nkv = config.num_attention_heads, config.num_kv_heads
    projections = 2 * h * d * (nq + 2 * nkv) + 2 * nq * d * h
    attention = 2 * 2 * seq_length * nq * d / 2
    mlp = 2 * 3 * h * config.ffn_hidden_size
    logits = 2 * h * padded_vocab_size
    return 3.0 * (L * (projections + attention + mlp) + logits)


def peak_tflops(device: torch.device, bf16: bool, override: float | None) -> float | None:
    """Peak dense TFLOP/s of this device for MFU, or None when unknown (CPU, unlisted GPUs)."""
    if override:
        return override
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    for (key, precision), value in PEAK_TFLOPS.items():
        if key in name and precision == "bf16":
            return value
    return None
