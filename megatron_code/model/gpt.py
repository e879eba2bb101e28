"""The decoder-only language model:

    embedding -> N x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> output layer

Activations are [s, b, h] (sequence first, as in Megatron-LM) so that sequence and context
parallelism split a contiguous leading dimension. Parameter names follow Megatron-core
(embedding.word_embeddings, decoder.layers.N.self_attention.linear_qkv, ...).
"""
from __future__ import annotations

import functools
import math
import zlib
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.linear_cross_entropy import fused_loss_impl, linear_cross_entropy
from kernels.weighted_linear_cross_entropy import weighted_linear_cross_entropy
from megatron_code.model.attention import SelfAttention
from megatron_code.model.config import ModelConfig
from megatron_code.model.fp8 import enable_fp8
from megatron_code.model.te_linear import fp8_region
from megatron_code.parallel.fused_wgrad import StepWeightCasts, fusable
from megatron_code.parallel.param_gather import wait_until_gathered
from megatron_code.model.mlp import SwiGLUMLP
from megatron_code.model.norm import RMSNorm
from megatron_code.model.rope import RotaryEmbedding
from megatron_code.parallel.context import LocalChunks, local_chunks, slice_local
from megatron_code.parallel.layers import (
    SINGLE, VocabParallelEmbedding, column_parallel_input, mark_tensor_parallel, vocab_parallel_cross_entropy,
)
from megatron_code.parallel.state import ParallelState


class LossHead(NamedTuple):
    """The operands of the fused loss head (GPTModel._loss_head)."""
    hidden: torch.Tensor
    weight: torch.Tensor
    weight_lp: torch.Tensor | None
    fused_wgrad: bool


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState = SINGLE):
        super().__init__()
        sp = parallel.sequence_parallel
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon, sp, config.rmsnorm_impl)
        self.self_attention = SelfAttention(config, parallel)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon, sp, config.rmsnorm_impl)
        self.mlp = SwiGLUMLP(config, parallel)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x, rotary_cos, rotary_sin, segment_ids=None, cp_chunks=None, delta=None, add_output=True):
        """x: [s, b, h] -> [s, b, h] ([s/tp, b, h] under sequence parallelism).

        The layer runs on the residual stream x + delta, where delta (or None) is the previous
        layer's MLP output not yet added. add_output=False returns (the stream after attention,
        this layer's MLP output) for the next layer to add: each residual add then runs inside the
        norm that reads the sum (add_rms_norm: one pass each way, where an add, then the norm,
        take two, and the backward one more to add the residual's gradient)."""
        if delta is None:
            normed = self.input_layernorm(x)
        else:
            x, normed = self.input_layernorm(x, delta)
        attn = self.self_attention(normed, rotary_cos, rotary_sin, segment_ids, cp_chunks)
        x, normed = self.pre_mlp_layernorm(x, F.dropout(attn, self.hidden_dropout, self.training))
        mlp = F.dropout(self.mlp(normed), self.hidden_dropout, self.training)
        return x + mlp if add_output else (x, mlp)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState, layer_indices: range, post_process: bool):
        super().__init__()
        # A ModuleDict keyed by global layer index keeps parameter names stable when a pipeline
        # stage keeps only some of the layers.
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, parallel) for i in layer_indices})
        self.final_layernorm = None
        if post_process:
            self.final_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon, parallel.sequence_parallel,
                                           config.rmsnorm_impl)
        self.recompute_method = config.recompute_method if config.recompute_granularity == "full" else None
        self.recompute_num_layers = config.recompute_num_layers
        self.fp8_region = nullcontext  # te.autocast under --fp8-backend te (GPTModel sets it)

    def layer_groups(self) -> list[tuple[int, int, bool]]:
        """(start, end, recompute) runs of this block's layers, Megatron's full-recompute rules:
        uniform checkpoints every group of recompute_num_layers layers (only its input is kept);
        block recomputes the first recompute_num_layers layers of this stage, one at a time."""
        n, k = len(self.layers), self.recompute_num_layers
        if self.recompute_method is None or not (self.training and torch.is_grad_enabled()):
            return [(0, n, False)]
        if self.recompute_method == "uniform":
            return [(start, min(start + k, n), True) for start in range(0, n, k)]
        return [(i, i + 1, i < k) for i in range(n)]

    def forward(self, x, rotary_cos, rotary_sin, segment_ids=None, cp_chunks=None):
        layers = list(self.layers.values())
        args = (rotary_cos, rotary_sin, segment_ids, cp_chunks)
        with self.fp8_region():  # one region per forward: TE reduces the amaxes when it exits
            for start, end, recompute in self.layer_groups():
                run = functools.partial(_run_layers, layers[start:end])
                # Non-reentrant checkpoint restores the RNG state (dropout masks) and autocast for the rerun.
                x = checkpoint(run, x, *args, use_reentrant=False) if recompute else run(x, *args)
        return x if self.final_layernorm is None else self.final_layernorm(x)


def _run_layers(layers, x, *args):
    """x through `layers`; each layer's MLP output is added to the stream by the next layer's
    first norm (TransformerLayer.forward's add_output), the last one's here."""
    delta = None
    for layer in layers:
        x, delta = layer(x, *args, delta=delta, add_output=False)
    return x + delta


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState = SINGLE,
                 fp32_residual_connection: bool = False):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(vocab_size, hidden_size, parallel)
        self.fp32_residual_connection = fp32_residual_connection

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [b, s] -> [s, b, h] ([s/tp, b, h] under sequence parallelism). This starts the
        residual stream: under autocast it is kept in the autocast dtype (the blocks' outputs
        have it, so the adds stay in it) unless fp32_residual_connection, which keeps it in fp32
        (also when the table itself is bf16: --params-dtype bfloat16)."""
        hidden = self.word_embeddings(tokens)
        if self.fp32_residual_connection:
            return hidden.float()
        if torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        return hidden


class GPTModel(nn.Module):
    """The decoder. `parallel` gives the tensor/context-parallel layout (default: one process);
    `init_seed` fixes the initial weights, which do not depend on the layout.

    A pipeline stage is a GPTModel that holds only `layer_indices` (global numbering, so parameter
    names stay those of the whole model), the embedding only if `pre_process` (first stage) and
    the final norm and output layer only if `post_process` (last stage), as in Megatron-LM."""

    def __init__(self, config: ModelConfig, parallel: ParallelState = SINGLE, init_seed: int = 0,
                 layer_indices: range | None = None, pre_process: bool = True, post_process: bool = True):
        super().__init__()
        config.validate()
        self.config, self.parallel = config, parallel
        self.pre_process, self.post_process = pre_process, post_process
        self.vocab_size = config.padded_vocab_size(parallel.tp)
        self.embedding = (Embedding(self.vocab_size, config.hidden_size, parallel, config.fp32_residual_connection)
                          if pre_process else None)
        self.rotary_pos_emb = RotaryEmbedding(config)
        layer_indices = range(config.num_layers) if layer_indices is None else layer_indices
        self.decoder = TransformerBlock(config, parallel, layer_indices, post_process)
        fp8_layers = enable_fp8(self.decoder.layers, config, parallel)
        self.decoder.fp8_region = fp8_region(config, parallel, fp8_layers)
        self.set_gradient_accumulation_fusion(config.gradient_accumulation_fusion)
        self.output_layer = None
        if config.untie_embeddings_and_output_weights and post_process:
            weight = nn.Parameter(torch.empty(self.vocab_size // parallel.tp, config.hidden_size))
            self.output_layer = nn.Module()
            self.output_layer.weight = mark_tensor_parallel(weight, 0)  # column parallel over the vocabulary
        self.reset_parameters(init_seed)
        with torch.no_grad():  # parameters only: buffers (RoPE's inv_freq) keep fp32
            for param in self.parameters():
                param.data = param.data.to(config.torch_params_dtype)

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

    def context_parallel_slice(self, per_token: torch.Tensor) -> torch.Tensor:
        """[b, s] -> this rank's [b, s / cp] tokens, matching forward()'s outputs."""
        if self.parallel.cp == 1:
            return per_token
        return slice_local(per_token, self.parallel.cp, self.parallel.cp_rank)

    def set_gradient_accumulation_fusion(self, enabled: bool) -> None:
        """Give the attention and MLP linears a shared per-step weight-cast cache and the embedding
        its in-place gradient accumulation (fused_wgrad.py), or take them away (autograd's weight
        gradients)."""
        self.weight_casts = StepWeightCasts() if enabled else None
        for module in self.decoder.modules():
            if hasattr(module, "weight_casts"):
                module.weight_casts = self.weight_casts
        if self.embedding is not None:  # its gradient accumulates in place too
            self.embedding.word_embeddings.fused_grad = enabled

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight (the embedding's when tied); read by the loss head, outside
        its owner's forward, so it waits for its parameter all-gather here (param_gather.py)."""
        weight = self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight
        return wait_until_gathered(weight)

    def cp_chunks(self, local_seq_len: int, device) -> LocalChunks | None:
        """Where this rank's tokens sit in the sequence under context parallelism (None without CP)."""
        if self.parallel.cp == 1:
            return None
        return local_chunks(local_seq_len * self.parallel.cp, self.parallel.cp, self.parallel.cp_rank, device)

    def run_layers(self, hidden, position_ids, segment_ids=None):
        """This model's (or stage's) layers: hidden [s(/tp), b, h] with this rank's position ids
        [b, s/cp] -> [s(/tp), b, h] (normalized on the last stage)."""
        cos, sin = self.rotary_pos_emb(position_ids)
        cp_chunks = self.cp_chunks(position_ids.shape[1], position_ids.device)
        return self.decoder(hidden, cos, sin, segment_ids, cp_chunks)

    def output_logits(self, hidden):
        """Last stage: [s(/tp), b, h] -> this rank's vocabulary slice of the logits [s, b, V / tp].

        Logits of the padding rows (ids >= the tokenizer's vocabulary) are -inf: padded ids get
        zero probability and no gradient, so the loss does not depend on how much padding the
        layout adds (128 x TP) and equals that of the unpadded Hugging Face model."""
        logits = F.linear(column_parallel_input(hidden, self.parallel), self.output_weight())
        first_padding = self.config.vocab_size - self.vocab_start()  # local column of the first padded id
        if first_padding < logits.shape[-1]:
            logits[..., max(first_padding, 0):] = float("-inf")
        return logits

    def vocab_start(self) -> int:
        return self.parallel.tp_rank * (self.vocab_size // self.parallel.tp)

    def forward(self, tokens, position_ids=None, segment_ids=None, labels=None, loss_weights=None):
        """tokens, position_ids, segment_ids, labels, loss_weights: [b, s] (whole samples on every rank).

        Returns logits [b, s, V / tp] (this rank's vocabulary slice) when labels is None, else the
        per-token cross-entropy [b, s] in fp32 (the caller masks and reduces it, as Megatron's
        loss_func does), or with loss_weights the fp32 scalar sum of loss_weights x cross-entropy
        (weighted_loss). Full-vocabulary logits are never gathered. Under context parallelism
        all cover only this rank's s / cp tokens (`context_parallel_slice` selects the same
        tokens of other per-token tensors such as the loss mask).
        """
        b, s = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=tokens.device).expand(b, s)
        tokens, position_ids = self.context_parallel_slice(tokens), self.context_parallel_slice(position_ids)
        hidden = self.run_layers(self.embedding(tokens), position_ids, segment_ids)  # [s(/tp), b, h]
        if labels is None:
            return self.output_logits(hidden).transpose(0, 1)  # [b, s, V / tp]
        if loss_weights is not None:
            return self.weighted_loss(hidden, self.context_parallel_slice(labels),
                                      self.context_parallel_slice(loss_weights))
        return self.token_losses(hidden, self.context_parallel_slice(labels))

    def weighted_loss(self, hidden, labels, loss_weights):
        """Last stage: sum over this rank's tokens of loss_weights [b, s] x cross-entropy, an fp32
        scalar (the trainer's loss: the loss mask over the global batch's loss tokens). Training
        through the fused head with gradient-accumulation fusion, the gradients are made in the
        forward, where the weights are known (kernels/weighted_linear_cross_entropy.py: the
        backward recomputes no logits), and backward must start from this scalar (gradient 1).
        Otherwise: the per-token losses, weighted and summed."""
        fused = fused_loss_impl(self.config.cross_entropy_impl, hidden.device)
        if fused is not None and self._head_fuses_wgrad(hidden):
            head = self._loss_head(hidden, fuse=True)
            total, _ = weighted_linear_cross_entropy(
                head.hidden, head.weight, labels.t(), loss_weights.t(), vocab_size=self.config.vocab_size,
                vocab_start=self.vocab_start(), group=self.parallel.tp_group, impl=fused, weight_lp=head.weight_lp)
            return total
        return (self.token_losses(hidden, labels) * loss_weights).sum()

    def token_losses(self, hidden, labels):
        """Last stage: final hidden states [s(/tp), b, h] and this rank's labels [b, s] -> the
        per-token cross-entropy [b, s] in fp32, through the fused loss head when
        --cross-entropy-impl selects it, else logits + vocab-parallel cross-entropy."""
        fused = fused_loss_impl(self.config.cross_entropy_impl, hidden.device)
        if fused is not None:
            return self.output_losses(hidden, labels, fused)
        logits = self.output_logits(hidden)  # [s, b, V / tp]
        losses = vocab_parallel_cross_entropy(logits, labels.t(), self.vocab_start(), self.parallel)  # [s, b]
        return losses.t()

    def output_losses(self, hidden, labels, impl: str):
        """Last stage, fused loss head: hidden [s(/tp), b, h], labels [b, s] -> per-token loss
        [b, s] in fp32 from the output GEMM and cross-entropy fused block by block
        (kernels/linear_cross_entropy.py); the [s, b, V / tp] logits never exist. Padding ids get
        zero probability, as in output_logits."""
        head = self._loss_head(hidden)
        losses = linear_cross_entropy(head.hidden, head.weight, labels.t(), vocab_size=self.config.vocab_size,
                                      vocab_start=self.vocab_start(), group=self.parallel.tp_group, impl=impl,
                                      weight_lp=head.weight_lp, accumulate_wgrad=head.fused_wgrad)
        return losses.t()

    def _loss_head(self, hidden, fuse: bool | None = None) -> LossHead:
        """The fused loss head's operands: hidden gathered over TP ([s, b, h]; the backward sums
        the TP partial grads), the output weight, and under gradient-accumulation fusion its
        per-step bf16 copy (fused_wgrad.py: the weight gradient then accumulates in fp32 in place).
        `fuse`: _head_fuses_wgrad(hidden), when the caller already knows it."""
        fuse = self._head_fuses_wgrad(hidden) if fuse is None else fuse
        hidden = column_parallel_input(hidden, self.parallel)
        weight = self.output_weight()
        weight_lp = self.weight_casts.cast(weight, torch.get_autocast_dtype(hidden.device.type)) if fuse else None
        return LossHead(hidden, weight, weight_lp, fuse)

    def _head_fuses_wgrad(self, hidden) -> bool:
        """Whether the loss head runs under gradient-accumulation fusion (decided before the hidden
        states are gathered over TP: it depends only on the step, not on them)."""
        return self.weight_casts is not None and fusable(hidden, self.output_weight())
