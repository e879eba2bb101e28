"""Rotary position embedding: inverse frequencies (optionally Llama-3.1-scaled) and cos/sin tables."""
from __future__ import annotations

import math

import torch
from torch import nn

from megatron_code.model.config import ModelConfig


def rope_inverse_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """inv_freq[j] = base^(-2j / d) for j < d/2, in fp64 then fp32 (exact for long contexts)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (1.0 / base**exponents).float()


def llama3_scale_frequencies(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Llama-3.1 long-context scaling: leave high frequencies alone, divide low frequencies by
    `factor`, and interpolate smoothly in between (same rule as HF's rope_type="llama3")."""
    factor = config.rope_scaling_factor
    original = config.rope_original_max_position_embeddings
    low_wavelen = original / config.rope_low_freq_factor
    high_wavelen = original / config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(is_medium, interpolated, scaled)


class RotaryEmbedding(nn.Module):
    """Turns position ids into the cos/sin tables shared by every layer of one forward pass."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq = rope_inverse_frequencies(config.head_dim, config.rotary_base)
        if config.use_rope_scaling:
            inv_freq = llama3_scale_frequencies(inv_freq, config)
        # Not persistent: derived from the config, so checkpoints never carry a stale copy.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: [b, s] -> (cos, sin), each [s, b, 1, d] in fp32."""
        angles = position_ids.t().float()[..., None] * self.inv_freq  # [s, b, d/2]
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # [s, b, 1, d]
        return angles.cos(), angles.sin()
