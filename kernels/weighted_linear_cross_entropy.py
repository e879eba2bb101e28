"""The fused output projection + cross-entropy for a loss that is a weighted sum of the tokens'
cross-entropies with the weights known up front: sum_n w_n CE_n, the trainer's loss (w = loss mask
/ loss tokens of the global batch).

kernels/linear_cross_entropy.py returns per-token losses and leaves the weights to the caller, so
its backward must recompute every block's logits (8 N V h FLOPs in all). Knowing w in the forward,
each block's logits serve first the statistics and then, once the block's log-sum-exp is known,
the two gradient GEMMs: nothing is recomputed (6 N V h, the model FLOPs). The logits of one token
block over this rank's whole vocabulary are alive at once (at most LOGITS_BLOCK_ELEMENTS, as the
other op's blocks), cut into vocabulary chunks only where the weight is cast chunk by chunk.

The weight gradient goes into weight.grad (fp32, the gradient-accumulation fusion of
megatron_code/parallel/fused_wgrad.py) during the forward; autograd gets none. The backward hands
back the hidden states' gradient computed in the forward. Both assume the scalar's gradient is 1
(loss.backward()): the backward checks that on the device, without a host sync.
"""
from __future__ import annotations

import math

import torch

from kernels.grad_accumulation import fp32_gradient, has_fp32_gradient
from kernels.linear_cross_entropy import (
    LOGITS_BLOCK_ELEMENTS, Blocking, VocabShard, _chunk_targets, _combine_shards, _initial_stats, _matmul_into,
    _merge_stats, _token_blocks, _vocab_chunks, prepare_call,
)


def weighted_blocking(n_tokens: int, vocab_rows: int) -> Blocking:
    """Equal token blocks whose logits over all vocab_rows fit LOGITS_BLOCK_ELEMENTS (the whole
    local vocabulary in one chunk)."""
    blocks = max(1, math.ceil(n_tokens * vocab_rows / LOGITS_BLOCK_ELEMENTS))
    return Blocking(max(1, math.ceil(n_tokens / blocks)), vocab_rows)


class WeightedLinearCrossEntropy(torch.autograd.Function):
    """hidden [N, h], weight [V_local, h] (an fp32 leaf), targets [N], loss_weights [N] ->
    (sum_n w_n CE_n: an fp32 scalar, the per-token CE [N] fp32, not differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, loss_weights, shard: VocabShard, ops, compute_dtype,
                blocking: Blocking, weight_lp=None):
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            local = _chunk_targets(targets, shard.start, shard.size)
            weights = loss_weights.float().contiguous()
            grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
            # the first token block writes the weight gradient, the others add
            grad_w, fresh = fp32_gradient(weight)
            losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            for rows in _token_blocks(h.shape[0], blocking):
                grads = (grad_h[rows], grad_w, not fresh or rows.start > 0)
                losses[rows] = _block_losses_and_grads(h[rows], weight, local[rows], weights[rows], shard, ops,
                                                       blocking, weight_lp, grads)
        ctx.save_for_backward(grad_h.to(hidden.dtype))
        ctx.mark_non_differentiable(losses)
        return (losses * weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_total, _):
        (grad_h,) = ctx.saved_tensors
        torch._assert_async(grad_total == 1, "WeightedLinearCrossEntropy: backward must start from the "
                                             "weighted loss itself (gradient 1): its weight gradient was added unscaled")
        return grad_h, None, None, None, None, None, None, None, None


def _block_losses_and_grads(h, weight, local, weights, shard: VocabShard, ops, blocking: Blocking, weight_lp,
                            grads) -> torch.Tensor:
    """One token block: its logits chunk by chunk (kept), the statistics merged over chunks and TP
    ranks, then per chunk the logits turned into w (softmax - onehot) in place and the gradient
    GEMMs: grad_h (+)= dlogits W, grad_w[chunk] (+)= dlogits^T h. Returns the block's CE [T]."""
    grad_h, grad_w, accumulate_w = grads
    stats = _initial_stats(h.shape[0], h.device)
    kept = []
    for cols, w, valid in _vocab_chunks(weight, shard, blocking, h.dtype, weight_lp):
        chunk_targets = _chunk_targets(local, cols.start, cols.stop - cols.start)
        logits = h @ w.t()  # [T, chunk]
        _merge_stats(stats, ops.stats(logits, chunk_targets, valid, keep_logits=True))
        kept.append((logits, chunk_targets))
    lse, target_logit = _combine_shards(*stats, shard.group)
    # a second pass over the chunks: the cast ones are cast again rather than all kept at once
    for i, ((cols, w, valid), (logits, chunk_targets)) in enumerate(
            zip(_vocab_chunks(weight, shard, blocking, h.dtype, weight_lp), kept)):
        grad_logits = ops.grad(logits, chunk_targets, valid, lse, weights)
        _matmul_into(grad_h, grad_logits, w, accumulate=i > 0)
        _matmul_into(grad_w[cols], grad_logits.t(), h, accumulate=accumulate_w)
        kept[i] = None  # this chunk's logits are no longer needed
    return lse - target_logit


def weighted_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                  loss_weights: torch.Tensor, *, vocab_size: int | None = None, vocab_start: int = 0,
                                  group=None, impl: str = "auto", chunk_tokens: int | None = None,
                                  chunk_vocab: int | None = None,
                                  weight_lp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of loss_weights x per-token cross-entropy of softmax(hidden @ weight^T): an fp32 scalar,
    the per-token cross-entropy [...] without gradient), gradients made in the forward.

    Operands as kernels.linear_cross_entropy.linear_cross_entropy's; loss_weights [...] like
    targets; weight must be a leaf with an fp32 gradient (kernels/grad_accumulation.py: its .grad,
    or the main_grad of a bf16 parameter), which the gradient accumulates into (in the
    forward). Call backward on the scalar itself: its gradient must be 1."""
    call = prepare_call(hidden, weight, targets, vocab_size, vocab_start, group, impl, weight_lp)
    if loss_weights.shape != targets.shape:
        raise ValueError(f"weighted_linear_cross_entropy: loss_weights {tuple(loss_weights.shape)} must have the "
                         f"targets' shape {tuple(targets.shape)}.")
    if not has_fp32_gradient(weight):
        raise ValueError("weighted_linear_cross_entropy: the weight must be an fp32 leaf, or a leaf with an fp32 "
                         f"main_grad (its gradient is accumulated there); got {weight.dtype}, leaf: {weight.is_leaf}.")
    default = weighted_blocking(call.hidden.shape[0], weight.shape[0])
    blocking = Blocking(chunk_tokens or default.tokens, chunk_vocab or default.vocab)
    total, losses = WeightedLinearCrossEntropy.apply(call.hidden, weight, call.targets, loss_weights.reshape(-1),
                                                     call.shard, call.ops, call.compute_dtype, blocking, weight_lp)
    return total, losses.view(targets.shape)
