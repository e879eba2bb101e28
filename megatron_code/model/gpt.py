"""The decoder-only language model:

    embedding -> N x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> output layer

Activations are [s, b, h] (sequence first, as in Megatron-LM) so that sequence and context
parallelism split a contiguous leading dimension. Parameter names follow Megatron-core
(embedding.word_embeddings, decoder.layers.N.self_attention.linear_qkv, ...).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_code.model.attention import SelfAttention
from megatron_code.model.config import ModelConfig
from megatron_code.model.mlp import SwiGLUMLP
from megatron_code.model.norm import RMSNorm
from megatron_code.model.rope import RotaryEmbedding


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.self_attention = SelfAttention(config)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.mlp = SwiGLUMLP(config)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x, rotary_cos, rotary_sin, segment_ids=None):
        """x: [s, b, h] -> [s, b, h]."""
        attn = self.self_attention(self.input_layernorm(x), rotary_cos, rotary_sin, segment_ids)
        x = x + F.dropout(attn, self.hidden_dropout, self.training)
        mlp = self.mlp(self.pre_mlp_layernorm(x))
        return x + F.dropout(mlp, self.hidden_dropout, self.training)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # A ModuleDict keyed by global layer index keeps parameter names stable when a pipeline
        # stage keeps only some of the layers.
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config) for i in range(config.num_layers)})
        self.final_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon)

    def forward(self, x, rotary_cos, rotary_sin, segment_ids=None):
        for layer in self.layers.values():
            x = layer(x, rotary_cos, rotary_sin, segment_ids)
        return self.final_layernorm(x)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [b, s] -> [s, b, h]."""
        return self.word_embeddings(tokens.t())


class GPTModel(nn.Module):
    def __init__(self, config: ModelConfig, tensor_parallel_size: int = 1):
        super().__init__()
        config.validate()
        self.config = config
        self.vocab_size = config.padded_vocab_size(tensor_parallel_size)
        self.embedding = Embedding(self.vocab_size, config.hidden_size)
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.decoder = TransformerBlock(config)
        self.output_layer = None
        if config.untie_embeddings_and_output_weights:
            self.output_layer = nn.Linear(config.hidden_size, self.vocab_size, bias=False)
        self.reset_parameters()
        self.to(config.torch_params_dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, std) for matrices, std / sqrt(2L) for the two projections that write into the
        residual stream (keeps its variance independent of depth), ones for norm weights."""
        std = self.config.init_method_std
        scaled_std = std / math.sqrt(2.0 * self.config.num_layers)
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
            elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                param.normal_(0.0, scaled_std)
            else:
                param.normal_(0.0, std)

    def output_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def forward(self, tokens, position_ids=None, segment_ids=None, labels=None):
        """tokens, position_ids, segment_ids, labels: [b, s].

        Returns logits [b, s, vocab] when labels is None, else the per-token cross-entropy [b, s]
        in fp32 (the caller applies the loss mask and reduces, as Megatron's loss_func does).
        """
        b, s = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=tokens.device).expand(b, s)
        cos, sin = self.rotary_pos_emb(position_ids)
        hidden = self.decoder(self.embedding(tokens), cos, sin, segment_ids)  # [s, b, h]
        logits = F.linear(hidden, self.output_weight())  # [s, b, V]
        if labels is None:
            return logits.transpose(0, 1)
        losses = F.cross_entropy(logits.float().flatten(0, 1), labels.t().flatten(), reduction="none")
        return losses.view(s, b).t()  # [s * b] -> [b, s]
