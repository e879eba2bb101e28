"""The decoder's shape and numerics, and the named presets built from it."""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch

from megatron_code.errors import ConfigError

ATTENTION_BACKENDS = ("sdpa", "flash", "te")
PARAMS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# How to get each optional backend; the error for a missing one quotes this.
_BACKEND_INSTALL = {
    "flash": ("flash_attn", "pip install flash-attn --no-build-isolation (needs CUDA; see docs/install.md)"),
    "te": ("transformer_engine", "pip install 'transformer-engine[pytorch]' (needs CUDA; see docs/install.md)"),
}


@dataclass
class ModelConfig:
    """A GQA + RoPE + SwiGLU + RMSNorm decoder (Llama architecture). Field names are Megatron-LM's
    argument names, so `--hidden-size` on the command line sets `hidden_size` here."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 256
    """Width of the residual stream."""
    ffn_hidden_size: int = 704
    """Width of the SwiGLU MLP's gate and up projections."""
    num_attention_heads: int = 4
    """Number of query heads."""
    group_query_attention: bool = False
    """Use grouped-query attention with `num_query_groups` key/value heads (else one per query head)."""
    num_query_groups: int | None = None
    """Number of key/value heads when `group_query_attention` is set."""
    kv_channels: int | None = None
    """Head dimension; defaults to hidden_size / num_attention_heads."""
    vocab_size: int | None = None
    """Tokenizer vocabulary size (unpadded). Normally taken from --tokenizer-model."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this times the tensor-parallel size (GEMM efficiency)."""
    max_position_embeddings: int = 1024
    """Longest sequence the model is configured for (RoPE itself has no table and no hard limit)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    use_rope_scaling: bool = False
    """Apply Llama-3.1-style frequency-dependent RoPE scaling (for long-context extension)."""
    rope_scaling_factor: float = 8.0
    """Llama-3.1 RoPE scaling factor: long wavelengths are stretched by this much."""
    rope_low_freq_factor: float = 1.0
    """Llama-3.1 RoPE scaling: wavelengths above original_max / low_freq_factor are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """Llama-3.1 RoPE scaling: wavelengths below original_max / high_freq_factor are left unscaled."""
    rope_original_max_position_embeddings: int = 8192
    """Llama-3.1 RoPE scaling: context length the model was pretrained with before extension."""
    norm_epsilon: float = 1e-5
    """Epsilon of RMSNorm."""
    init_method_std: float = 0.02
    """Std of the normal init; output projections use std / sqrt(2 * num_layers)."""
    untie_embeddings_and_output_weights: bool = False
    """Give the output layer its own weight instead of reusing the input embedding."""
    params_dtype: str = "float32"
    """Dtype the parameters are created in (float32, bfloat16, float16). Training keeps float32
    master weights and uses --bf16 autocast; bfloat16 params are for inference and conversion."""
    attention_backend: str = "sdpa"
    """Core attention kernel: sdpa (torch, any device), flash (flash-attn), te (Transformer Engine)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (Llama-style pretraining uses 0)."""
    hidden_dropout: float = 0.0
    """Dropout after the attention and MLP blocks, before the residual add."""

    # ---- derived quantities -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads

    @property
    def torch_params_dtype(self) -> torch.dtype:
        return PARAMS_DTYPES[self.params_dtype]

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Vocab rounded up to a multiple of make_vocab_size_divisible_by * TP (Megatron's rule)."""
        if self.vocab_size is None:
            raise ConfigError("vocab_size is unknown: pass --tokenizer-model (or --vocab-size).")
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError for the first inconsistent field, naming it and the fix."""
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{_flag(name)} must be positive, got {getattr(self, name)}.")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
                f"({self.num_attention_heads}); or set --kv-channels explicitly."
            )
        if self.group_query_attention:
            if not self.num_query_groups:
                raise ConfigError("--group-query-attention needs --num-query-groups (number of KV heads).")
            if self.num_attention_heads % self.num_query_groups:
                raise ConfigError(
                    f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                    f"--num-query-groups ({self.num_query_groups})."
                )
        if self.head_dim % 2:
            raise ConfigError(f"head dim must be even for RoPE, got {self.head_dim}.")
        if self.params_dtype not in PARAMS_DTYPES:
            raise ConfigError(f"--params-dtype must be one of {sorted(PARAMS_DTYPES)}, got {self.params_dtype!r}.")
        _check_attention_backend(self.attention_backend)

    def num_parameters(self, tensor_parallel_size: int = 1) -> int:
        """Exact parameter count of GPTModel built from this config (tested against the model)."""
        h, d, L = self.hidden_size, self.head_dim, self.num_layers
        attn = h * d * (self.num_attention_heads + 2 * self.num_kv_heads) + self.num_attention_heads * d * h
        mlp = 3 * h * self.ffn_hidden_size
        norms = 2 * h
        embed = self.padded_vocab_size(tensor_parallel_size) * h
        output = embed if self.untie_embeddings_and_output_weights else 0
        return L * (attn + mlp + norms) + h + embed + output


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_attention_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {backend!r}.")
    if backend in _BACKEND_INSTALL:
        module, how = _BACKEND_INSTALL[backend]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"--attention-backend {backend} needs the '{module}' package, which is not installed. "
                f"Install it with: {how}. Or use --attention-backend sdpa (works everywhere)."
            )
