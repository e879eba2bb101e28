"""The decoder-only language model:

    embedding -> N x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> output layer

Activations are [s, b, h] (sequence first, as in Megatron-LM) so that sequence and context
parallelism split a contiguous leading dimension. Parameter names follow Megatron-core
(embedding.word_embeddings, decoder.layers.N.self_attention.linear_qkv, ...).
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from megatron_code.model.attention import SelfAttention
from megatron_code.model.config import ModelConfig
from megatron_code.model.mlp import SwiGLUMLP
from megatron_code.model.norm import RMSNorm
from megatron_code.model.rope import RotaryEmbedding
from megatron_code.parallel.layers import (
    SINGLE, VocabParallelEmbedding, column_parallel_input, mark_tensor_parallel, vocab_parallel_cross_entropy,
)
from megatron_code.parallel.state import ParallelState


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState = SINGLE):
        super().__init__()
        sp = parallel.sequence_parallel
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon, sp)
        self.self_attention = SelfAttention(config, parallel)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon, sp)
        self.mlp = SwiGLUMLP(config, parallel)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x, rotary_cos, rotary_sin, segment_ids=None):
        """x: [s, b, h] -> [s, b, h] ([s/tp, b, h] under sequence parallelism)."""
        attn = self.self_attention(self.input_layernorm(x), rotary_cos, rotary_sin, segment_ids)
        x = x + F.dropout(attn, self.hidden_dropout, self.training)
        mlp = self.mlp(self.pre_mlp_layernorm(x))
        return x + F.dropout(mlp, self.hidden_dropout, self.training)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState = SINGLE):
        super().__init__()
        # A ModuleDict keyed by global layer index keeps parameter names stable when a pipeline
        # stage keeps only some of the layers.
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, parallel) for i in range(config.num_layers)})
        self.final_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon, parallel.sequence_parallel)

    def forward(self, x, rotary_cos, rotary_sin, segment_ids=None):
        for layer in self.layers.values():
            x = layer(x, rotary_cos, rotary_sin, segment_ids)
        return self.final_layernorm(x)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState = SINGLE):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(vocab_size, hidden_size, parallel)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [b, s] -> [s, b, h] ([s/tp, b, h] under sequence parallelism)."""
        return self.word_embeddings(tokens)


class GPTModel(nn.Module):
    """The decoder. `parallel` gives the tensor-parallel layout (default: one process);
    `init_seed` fixes the initial weights, which do not depend on the layout."""

    def __init__(self, config: ModelConfig, parallel: ParallelState = SINGLE, init_seed: int = 0):
        super().__init__()
        config.validate()
        self.config, self.parallel = config, parallel
        self.vocab_size = config.padded_vocab_size(parallel.tp)
        self.embedding = Embedding(self.vocab_size, config.hidden_size, parallel)
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.decoder = TransformerBlock(config, parallel)
        self.output_layer = None
        if config.untie_embeddings_and_output_weights:
            weight = nn.Parameter(torch.empty(self.vocab_size // parallel.tp, config.hidden_size))
            self.output_layer = nn.Module()
            self.output_layer.weight = mark_tensor_parallel(weight, 0)  # column parallel over the vocabulary
        self.reset_parameters(init_seed)
        self.to(config.torch_params_dtype)

    @torch.no_grad()
    def reset_parameters(self, init_seed: int = 0) -> None:
        """Normal(0, std) for matrices, std / sqrt(2L) for the two projections that write into the
        residual stream (keeps its variance independent of depth), ones for norm weights.

        Each parameter is drawn in full from its own generator, seeded by (init_seed, name), and
        this rank keeps its tensor-parallel slice: the same model results under any layout."""
        std = self.config.init_method_std
        scaled_std = std / math.sqrt(2.0 * self.config.num_layers)
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
                continue
            dim = param.tensor_parallel_dim
            full_shape = list(param.shape)
            if dim is not None:
                full_shape[dim] *= self.parallel.tp
            generator = torch.Generator().manual_seed(init_seed * 1_000_003 + zlib.crc32(name.encode()))
            is_output_projection = name.endswith(("linear_proj.weight", "linear_fc2.weight"))
            full = torch.empty(full_shape).normal_(0.0, scaled_std if is_output_projection else std, generator=generator)
            param.copy_(full if dim is None else full.chunk(self.parallel.tp, dim)[self.parallel.tp_rank])

    def output_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def forward(self, tokens, position_ids=None, segment_ids=None, labels=None):
        """tokens, position_ids, segment_ids, labels: [b, s].

        Returns logits [b, s, V / tp] (this rank's vocabulary slice) when labels is None, else the
        per-token cross-entropy [b, s] in fp32 (the caller masks and reduces it, as Megatron's
        loss_func does). Full-vocabulary logits are never gathered.
        """
        b, s = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=tokens.device).expand(b, s)
        cos, sin = self.rotary_pos_emb(position_ids)
        hidden = self.decoder(self.embedding(tokens), cos, sin, segment_ids)  # [s(/tp), b, h]
        hidden = column_parallel_input(hidden, self.parallel)  # [s, b, h]
        logits = F.linear(hidden, self.output_weight())  # [s, b, V / tp]
        if labels is None:
            return logits.transpose(0, 1)
        vocab_start = self.parallel.tp_rank * logits.shape[-1]
        losses = vocab_parallel_cross_entropy(logits, labels.t(), vocab_start, self.parallel)  # [s, b]
        return losses.t()
