"""The GQA + RoPE + SwiGLU + RMSNorm decoder."""
from megatron_code.model.config import ModelConfig
from megatron_code.model.gpt import GPTModel

__all__ = ["ModelConfig", "GPTModel"]
