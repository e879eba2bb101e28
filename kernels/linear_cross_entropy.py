"""Cross-entropy fused with the output projection: per-token losses from the final hidden states
without ever holding the full [N, V] logits.

The logits are produced block by block: vocabulary chunks of `chunk_vocab` rows of W times token
blocks of up to `chunk_tokens` rows, each block a torch/cuBLAS GEMM (hidden_block @ W_chunk^T).
One pass over a block reduces each row to (max, sum of exp, target logit) - in torch for the
'reference' implementation, in Triton for 'triton' (kernels/triton_linear_cross_entropy.py) - and
the per-chunk statistics are merged online (rescaling sums to the running max). Under
vocab-parallel TP each rank holds a slice of W's rows; its statistics are then combined over the
TP group with two all-reduces (max, then [sum of exp rescaled to the global max, target logit]):
the quantities _VocabParallelCrossEntropy in megatron_code/parallel/layers.py reduces. Padded
vocabulary rows (ids >= vocab_size) get zero probability exactly like GPTModel.output_logits.

Backward recomputes each block's logits instead of storing anything of size N x V. This op
returns per-token losses and the caller masks and reduces them, so the weight gradient
sum_n grad_loss[n] (softmax_n - onehot_n)^T h_n cannot be formed before grad_loss is known;
where the caller knows its weights up front (the trainer's loss),
kernels/weighted_linear_cross_entropy.py makes the gradients in the forward instead. Trade-off here: one extra GEMM, 8 N V h FLOPs in all instead of 6 N V h (+33%
for the output layer, ~2-4% of a 7B training step), for O(block + N h + V h) memory instead of the
unfused path's bf16 logits plus fp32 copies of [N, V] (8192 tokens x 128K vocabulary: ~9 GiB).
Chunking the vocabulary (not only the tokens) keeps every GEMM large: its gradient accumulators
are the [block, h] rows of grad_hidden, not the whole [V, h] weight gradient per token block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.cross_entropy import cross_entropy
from kernels.grad_accumulation import fp32_gradient
from kernels.dispatch import select, triton_module

LINEAR_CROSS_ENTROPY_IMPLS = ("auto", "triton", "reference")
# The model's loss head (ModelConfig.cross_entropy_impl): the fused op or the unfused logits path.
LOSS_HEAD_IMPLS = ("auto", "triton", "reference", "unfused")
TOKEN_BLOCK = 8192
LOGITS_BLOCK_ELEMENTS = 1 << 27  # 256 MiB of bf16 logits per block (the torch reference adds an fp32 copy)
VOCAB_CHUNK_MULTIPLE = 256  # whole GEMM tiles


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the padded vocabulary (the rows of its output weight)."""

    start: int
    """Global id of local row 0."""
    size: int
    """Rows held here (weight.shape[0])."""
    valid: int
    """Leading rows that are real tokens; the rest is padding and gets zero probability."""
    group: object
    """Tensor-parallel process group over which the vocabulary is split (None: one process)."""


@dataclass(frozen=True)
class Blocking:
    """How the [N, V_local] logits are cut: token blocks x vocabulary chunks."""

    tokens: int
    """Rows (tokens) per block."""
    vocab: int
    """Vocabulary rows per chunk."""


def vocab_shard(rows: int, vocab_start: int, vocab_size: int | None, group) -> VocabShard:
    valid = rows if vocab_size is None else min(max(vocab_size - vocab_start, 0), rows)
    return VocabShard(vocab_start, rows, valid, group)


def default_blocking(n_tokens: int, vocab_rows: int) -> Blocking:
    """One token block up to TOKEN_BLOCK tokens (the weight gradient is then written, not
    accumulated), and vocabulary chunks that keep a block near LOGITS_BLOCK_ELEMENTS."""
    tokens = max(1, min(n_tokens, TOKEN_BLOCK))
    vocab = (LOGITS_BLOCK_ELEMENTS // tokens) // VOCAB_CHUNK_MULTIPLE * VOCAB_CHUNK_MULTIPLE
    return Blocking(tokens, max(1, min(vocab_rows, max(vocab, VOCAB_CHUNK_MULTIPLE))))


class TorchChunkOps:
    """The per-block reductions in plain torch (the 'reference' implementation)."""

    @staticmethod
    def _masked_fp32(logits: torch.Tensor, valid: int, keep: bool = False) -> torch.Tensor:
        """fp32 logits with the padding columns at -inf: the block itself when already fp32 (a
        temporary the caller owns), unless `keep` asks to leave it untouched."""
        x = logits.float()
        if keep and x is logits:
            x = x.clone()
        if valid < x.shape[1]:
            x[:, valid:] = float("-inf")
        return x

    @staticmethod
    def stats(logits, targets, valid, keep_logits: bool = False):
        """-> (row max, sum exp(x - row max), target logit or 0 where the target is elsewhere).
        fp32 logits are overwritten unless keep_logits (the forward-gradient op reuses them)."""
        x = TorchChunkOps._masked_fp32(logits, valid, keep=keep_logits)
        row_max = x.max(dim=1).values
        target_logit = x.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).masked_fill(targets < 0, 0.0)
        shift = row_max.masked_fill(row_max == float("-inf"), 0.0)  # an all-padding chunk: sum 0, not nan
        sum_exp = x.sub_(shift[:, None]).exp_().sum(dim=1)
        return row_max, sum_exp, target_logit

    @staticmethod
    def grad(logits, targets, valid, lse, grad_loss):
        """d loss / d logits = (softmax - onehot(target)) * grad_loss, in the logits' dtype."""
        x = TorchChunkOps._masked_fp32(logits, valid)
        x.sub_(lse[:, None]).exp_()
        x.scatter_add_(1, targets.clamp(min=0)[:, None], -(targets >= 0).to(x.dtype)[:, None])
        return x.mul_(grad_loss[:, None]).to(logits.dtype)


def _chunk_targets(targets: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """Ids -> row within [start, start + size), or -1 where the target lies outside it."""
    local = targets - start
    return local.masked_fill((local < 0) | (local >= size), -1)


def _initial_stats(rows: int, device) -> torch.Tensor:
    """[3, rows] running (max, sum exp, target logit) before any chunk: (-inf, 0, 0)."""
    stats = torch.zeros(3, rows, dtype=torch.float32, device=device)
    stats[0] = float("-inf")
    return stats


def _merge_stats(running: torch.Tensor, chunk: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """running [3, rows] (max, sum exp relative to max, target logit) absorbs one chunk's, in place."""
    row_max, sum_exp, target_logit = running
    chunk_max, chunk_sum, chunk_target = chunk
    new_max = torch.maximum(row_max, chunk_max)
    shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # nothing seen yet: sums stay 0
    sum_exp.mul_(torch.exp(row_max - shift)).add_(chunk_sum * torch.exp(chunk_max - shift))
    row_max.copy_(new_max)
    target_logit.add_(chunk_target)


def _combine_shards(row_max, sum_exp, target_logit, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank row statistics -> (log-sum-exp, target logit) over the whole vocabulary."""
    if group is not None and dist.get_world_size(group) > 1:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        sums = torch.stack((sum_exp * torch.exp(row_max - global_max), target_logit))
        dist.all_reduce(sums, group=group)
        row_max, (sum_exp, target_logit) = global_max, sums
    return row_max + sum_exp.log(), target_logit


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out = a @ b, or out += a @ b, where out may be fp32 and a, b bf16 (fp32 accumulation)."""
    beta = 1 if accumulate else 0
    if a.dtype == out.dtype:
        torch.addmm(out, a, b, beta=beta, out=out)
    elif out.is_cuda:  # cuBLAS: low-precision inputs, fp32 output and accumulator
        torch.addmm(out, a, b, out_dtype=out.dtype, beta=beta, out=out)
    elif accumulate:
        out.add_(a @ b)
    else:
        out.copy_(a @ b)


def _vocab_chunks(weight: torch.Tensor, shard: VocabShard, blocking: Blocking, dtype: torch.dtype,
                  weight_lp: torch.Tensor | None = None):
    """(vocab rows, W rows in the GEMM dtype, how many of them are real ids) per chunk: rows of
    weight_lp (W already in the GEMM dtype) when given, else cast chunk by chunk, which keeps the
    low-precision copy of W at one chunk (128K x 4096: 1 GiB otherwise)."""
    for v0 in range(0, shard.size, blocking.vocab):
        cols = slice(v0, min(v0 + blocking.vocab, shard.size))
        rows = weight_lp[cols] if weight_lp is not None else weight[cols].to(dtype)
        yield cols, rows, min(max(shard.valid - v0, 0), cols.stop - v0)


def _token_blocks(n_tokens: int, blocking: Blocking):
    return [slice(t0, t0 + blocking.tokens) for t0 in range(0, n_tokens, blocking.tokens)]


class LinearCrossEntropy(torch.autograd.Function):
    """hidden [N, h], weight [V_local, h], targets [N] -> loss [N] fp32 (see the module docstring).

    weight_lp: weight already in the compute dtype (a per-step copy), used instead of casting it
    chunk by chunk in every forward and backward. accumulate_wgrad: the fp32 weight's gradient is
    accumulated into weight.grad by the GEMMs themselves (gradient-accumulation fusion, as in
    megatron_code/parallel/fused_wgrad.py) instead of returned for autograd to add."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, shard: VocabShard, ops, compute_dtype, blocking: Blocking,
                weight_lp=None, accumulate_wgrad=False):
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            local = _chunk_targets(targets, shard.start, shard.size)
            stats = _initial_stats(h.shape[0], h.device)
            for cols, w, valid in _vocab_chunks(weight, shard, blocking, compute_dtype, weight_lp):
                for rows in _token_blocks(h.shape[0], blocking):
                    chunk_targets = _chunk_targets(local[rows], cols.start, cols.stop - cols.start)
                    _merge_stats(stats[:, rows], ops.stats(h[rows] @ w.t(), chunk_targets, valid))
            lse, target_logit = _combine_shards(*stats, shard.group)
        ctx.save_for_backward(h, weight, local, lse, weight_lp)
        ctx.shard, ctx.ops, ctx.blocking, ctx.hidden_dtype = shard, ops, blocking, hidden.dtype
        ctx.accumulate_wgrad = accumulate_wgrad
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, local, lse, weight_lp = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[:2]
        fresh_w = True  # the first token block writes each chunk of grad_w, the others add
        with torch.autocast(h.device.type, enabled=False):
            grad_loss = grad_loss.float().contiguous()
            grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if want_h else None
            grad_w = None
            if want_w and ctx.accumulate_wgrad:  # into the fp32 .grad itself (no add by autograd)
                grad_w, fresh_w = fp32_gradient(weight)
            elif want_w:
                grad_w = torch.empty(weight.shape, dtype=torch.float32, device=h.device)
            for cols, w, valid in _vocab_chunks(weight, ctx.shard, ctx.blocking, h.dtype, weight_lp):
                for rows in _token_blocks(h.shape[0], ctx.blocking):
                    chunk_targets = _chunk_targets(local[rows], cols.start, cols.stop - cols.start)
                    grad_logits = ctx.ops.grad(h[rows] @ w.t(), chunk_targets, valid, lse[rows], grad_loss[rows])
                    if want_h:
                        _matmul_into(grad_h[rows], grad_logits, w, accumulate=cols.start > 0)
                    if want_w:
                        _matmul_into(grad_w[cols], grad_logits.t(), h[rows], accumulate=rows.start > 0 or not fresh_w)
        grad_h = grad_h.to(ctx.hidden_dtype) if want_h else None
        grad_w = None if not want_w or ctx.accumulate_wgrad else grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def fused_loss_impl(impl: str, device: torch.device) -> str | None:
    """The fused implementation the model's loss head should use, or None for the unfused path.
    'auto' fuses only where Triton runs (CUDA): elsewhere the recomputed GEMM makes the fused path
    slower (docs/kernels.md) and activation memory is rarely the limit."""
    if impl == "unfused":
        return None
    if impl == "auto":
        return "triton" if select("cross_entropy", "auto", device, LINEAR_CROSS_ENTROPY_IMPLS) == "triton" else None
    return impl


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The GEMM dtype F.linear would use here: autocast's when active, else the input's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         vocab_size: int | None = None, vocab_start: int = 0, group=None, impl: str = "auto",
                         chunk_tokens: int | None = None, chunk_vocab: int | None = None,
                         weight_lp: torch.Tensor | None = None, accumulate_wgrad: bool = False) -> torch.Tensor:
    """Per-token cross-entropy of softmax(hidden @ weight^T) without materializing the logits.

    hidden [..., h]: the full sequence on every TP rank (after column_parallel_input);
    weight [V_local, h]: this rank's vocabulary rows, global ids vocab_start ... + V_local;
    targets [...]: global token ids (ids on no rank contribute a target logit of 0);
    vocab_size: ids >= this are padding (zero probability); group: the TP group (None: one process);
    chunk_tokens / chunk_vocab: block shape (default_blocking when None); weight_lp: the weight
    already in the compute dtype (e.g. cast once per step); accumulate_wgrad: add the weight gradient
    into the weight's fp32 gradient inside the backward (kernels/grad_accumulation.py: an fp32 leaf's
    .grad, or a bf16 leaf's main_grad).
    Returns loss [...] in fp32. Under TP the gradient of hidden is this rank's partial sum: the
    caller's column_parallel_input (copy_to_tensor_parallel) all-reduces it, as for any column-parallel GEMM.
    """
    call = prepare_call(hidden, weight, targets, vocab_size, vocab_start, group, impl, weight_lp)
    default = default_blocking(call.hidden.shape[0], weight.shape[0])
    blocking = Blocking(chunk_tokens or default.tokens, chunk_vocab or default.vocab)
    losses = LinearCrossEntropy.apply(call.hidden, weight, call.targets, call.shard, call.ops, call.compute_dtype,
                                      blocking, weight_lp, accumulate_wgrad)
    return losses.view(targets.shape)


@dataclass(frozen=True)
class FusedCall:
    """The checked, flattened operands of a fused loss-head call."""

    hidden: torch.Tensor
    """[N, h]"""
    targets: torch.Tensor
    """[N] global ids"""
    shard: VocabShard
    ops: type
    """TorchChunkOps or TritonChunkOps: the per-block reductions"""
    compute_dtype: torch.dtype


def prepare_call(hidden, weight, targets, vocab_size, vocab_start, group, impl, weight_lp) -> FusedCall:
    """Checks the operands (a ValueError naming the shapes) and picks the block reductions."""
    chosen = select("cross_entropy", impl, hidden.device, LINEAR_CROSS_ENTROPY_IMPLS)
    ops = triton_module("triton_linear_cross_entropy").TritonChunkOps if chosen == "triton" else TorchChunkOps
    h = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    if h.shape[0] != flat_targets.numel() or weight.shape[-1] != h.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                         f"targets {tuple(targets.shape)} do not fit ([..., h], [V, h], [...]).")
    compute_dtype = _compute_dtype(hidden)
    if weight_lp is not None and (weight_lp.shape != weight.shape or weight_lp.dtype != compute_dtype):
        raise ValueError(f"linear_cross_entropy: weight_lp must be the weight {tuple(weight.shape)} in {compute_dtype}, "
                         f"got {tuple(weight_lp.shape)} in {weight_lp.dtype}.")
    return FusedCall(h, flat_targets, vocab_shard(weight.shape[0], vocab_start, vocab_size, group), ops, compute_dtype)


def linear_cross_entropy_unfused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """What the fused op replaces (one process): full fp32 logits, padding masked to -inf, then
    the model's cross-entropy. The ground truth of the tests and the benchmark's baseline."""
    logits = F.linear(hidden, weight).float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[..., vocab_size:] = float("-inf")
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).view(targets.shape)
