"""Named run presets: the model shape plus the training defaults that go with it.

A preset is a flat mapping of config field names (the same names as the command-line flags) to
values. `--preset NAME` applies it first; a `--config FILE.yaml` overrides it; explicit flags
override both. Vocabulary size is never part of a preset: it comes from the tokenizer.
"""
from __future__ import annotations

from megatron_code.errors import ConfigError

PRESETS: dict[str, dict] = {
    # Trains on 2 CPU cores in minutes; CI's golden loss curve uses it. ~3M non-embedding params.
    "tiny": dict(
        num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
        group_query_attention=True, num_query_groups=2, max_position_embeddings=1024,
        rotary_base=10000.0, untie_embeddings_and_output_weights=True,
        seq_length=256, micro_batch_size=8, global_batch_size=8,
        lr=2e-3, min_lr=2e-4, lr_warmup_iters=30, lr_decay_style="cosine", weight_decay=0.1,
    ),
    # GPT-2-small-sized Llama: a quick single-GPU sanity run.
    "125m": dict(
        num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12,
        group_query_attention=True, num_query_groups=4, max_position_embeddings=4096,
        rotary_base=10000.0, untie_embeddings_and_output_weights=True,
        seq_length=2048, micro_batch_size=8, global_batch_size=256,
        lr=6e-4, min_lr=6e-5, lr_warmup_iters=2000, lr_decay_style="cosine", weight_decay=0.1,
    ),
    # Llama-3.2-1B-like proportions.
    "1b": dict(
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
        group_query_attention=True, num_query_groups=8, max_position_embeddings=8192,
        rotary_base=500000.0, untie_embeddings_and_output_weights=True,
        seq_length=4096, micro_batch_size=4, global_batch_size=512,
        lr=3e-4, min_lr=3e-5, lr_warmup_iters=2000, lr_decay_style="cosine", weight_decay=0.1,
    ),
    # The 7B target (Llama-3-8B block shape): 32 x 4096, 32 query heads / 8 KV groups, head dim
    # 128, SwiGLU 14336. 6.98B parameters in the blocks + 2 x vocab x 4096 untied embeddings
    # (7,382,241,280 in all with a 49,152-token vocab). See docs/model.md.
    "7b": dict(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        group_query_attention=True, num_query_groups=8, max_position_embeddings=131072,
        rotary_base=500000.0, untie_embeddings_and_output_weights=True, norm_epsilon=1e-5,
        seq_length=8192, micro_batch_size=1, global_batch_size=1024,
        lr=3e-4, min_lr=3e-5, lr_warmup_iters=2000, lr_decay_style="WSD", weight_decay=0.1,
    ),
    # Long-context extension of the 7B model to 128K: Llama-3.1 RoPE scaling from 8K.
    "7b-128k": dict(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        group_query_attention=True, num_query_groups=8, max_position_embeddings=131072,
        rotary_base=500000.0, untie_embeddings_and_output_weights=True, norm_epsilon=1e-5,
        use_rope_scaling=True, rope_scaling_factor=16.0, rope_original_max_position_embeddings=8192,
        seq_length=131072, micro_batch_size=1, global_batch_size=64,
        lr=3e-5, min_lr=3e-6, lr_warmup_iters=200, lr_decay_style="cosine", weight_decay=0.1,
    ),
}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return dict(PRESETS[name])
