"""Checkpoint conversion between our torch.distributed.checkpoint format and Hugging Face.

    mcode-convert to-hf CHECKPOINT OUT_DIR      ours -> LlamaForCausalLM safetensors + tokenizer
    mcode-convert from-hf HF_DIR OUT_DIR        Llama / Qwen2 -> ours (for --load ... --finetune)
    mcode-convert verify CHECKPOINT HF_DIR      ours vs transformers logits

See docs/convert.md. Python API: `to_hf`, `from_hf`, `verify_logits`.
"""
from checkpoints_convert.errors import ConvertError, VerifyError
from checkpoints_convert.from_hf import from_hf
from checkpoints_convert.to_hf import to_hf
from checkpoints_convert.verify import verify_logits

__all__ = ["ConvertError", "VerifyError", "from_hf", "to_hf", "verify_logits"]
