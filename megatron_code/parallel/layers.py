"""Megatron-style tensor-parallel layers. With a TP group of one rank they are plain layers.

Each sharded parameter carries `tensor_parallel_dim` (the dim split over TP ranks), which
initialization, gradient-norm computation and checkpointing read. Parameters replicated across
TP ranks whose gradients are partial under sequence parallelism (norm weights) carry
`sequence_parallel_grad = True` and get their gradients all-reduced over TP before the step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels import cross_entropy
from kernels.fp8_linear import Fp8LinearScaling, Fp8Weight, fp8_linear
from megatron_code.parallel.fused_wgrad import StepWeightCasts, embedding_lookup, fusable, fused_wgrad_linear
from megatron_code.parallel.mappings import (
    copy_to_tensor_parallel, gather_sequence_parallel, reduce_from_tensor_parallel,
    reduce_scatter_sequence_parallel,
)
from megatron_code.parallel.state import ParallelState

SINGLE = ParallelState()


def mark_tensor_parallel(param: nn.Parameter, dim: int | None) -> nn.Parameter:
    param.tensor_parallel_dim = dim
    return param


def local_linear(x: torch.Tensor, weight: torch.Tensor, fp8: Fp8LinearScaling | None,
                 weight_casts: StepWeightCasts | None = None) -> torch.Tensor:
    """This rank's GEMM x W^T: in FP8 when the layer was given FP8 scaling (model.fp8); with the
    weight gradient fused into the fp32 gradient when given weight casts (fused_wgrad.py) and
    training under autocast; else F.linear. (In FP8 a [k, out, in] weight is multiplied as one
    [k out, in] matrix.)"""
    fuse_wgrad = weight_casts is not None and fusable(x, weight)
    if fp8 is not None:
        return fp8_linear(x, weight, fp8, fp8_weight_cast(fp8, weight_casts), fuse_wgrad)
    if fuse_wgrad:
        return fused_wgrad_linear(x, weight, weight_casts)
    return F.linear(x, weight)


def fp8_weight(x: torch.Tensor, linear: nn.Module) -> Fp8Weight:
    """The weight side of an FP8 linear module (one with `fp8` set) for a GEMM on x: as local_linear
    gives it, for callers that run the FP8 GEMMs themselves (kernels/fp8_mlp.py)."""
    casts = linear.weight_casts
    fuse_wgrad = casts is not None and fusable(x, linear.weight)
    return Fp8Weight(linear.weight, linear.fp8, fp8_weight_cast(linear.fp8, casts), fuse_wgrad)


def fp8_weight_cast(fp8: Fp8LinearScaling, weight_casts: StepWeightCasts | None):
    """The FP8 cast of `weight`, once per step when the model caches weight casts (keyed by the
    layer's scaling state: the weight may be a fresh view, as GateUpLinear's flattened one)."""
    if weight_casts is None:
        return None
    # W^T (for the input gradient) comes from the same pass as W: one cast per weight per step.
    return lambda w: weight_casts.memo(fp8, "fp8", lambda: fp8.weight.cast(w, transpose=torch.is_grad_enabled()))


def gemm_input(x: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """column_parallel_input for a GEMM that autocast would run in bf16: cast first, so sequence
    parallelism all-gathers (and the GEMM saves for backward) half the bytes, and a layer that
    reads x twice (gate and up) casts it once. The forward values are those autocast would give;
    the TP reduction of the input gradient then runs in bf16, as in Megatron-LM."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32:
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return column_parallel_input(x, parallel)


def column_parallel_input(x: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """Bring the input of a column-parallel GEMM to full sequence on every TP rank."""
    if parallel.sequence_parallel:
        return gather_sequence_parallel(x, parallel.tp_group)  # [s/tp, b, h] -> [s, b, h]
    return copy_to_tensor_parallel(x, parallel.tp_group)


def row_parallel_output(y: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """Sum the partial outputs of a row-parallel GEMM (and re-split the sequence under SP)."""
    if parallel.sequence_parallel:
        return reduce_scatter_sequence_parallel(y, parallel.tp_group)  # [s, b, h] -> [s/tp, b, h]
    return reduce_from_tensor_parallel(y, parallel.tp_group)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with the output features (rows of W) split over TP ranks; output stays split."""

    def __init__(self, in_features: int, out_features: int, parallel: ParallelState = SINGLE):
        super().__init__()
        self.parallel = parallel
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(out_features // parallel.tp, in_features)), 0)
        self.fp8: Fp8LinearScaling | None = None  # set by megatron_code.model.fp8.enable_fp8
        self.te = None  # TELinear under --fp8-backend te (megatron_code/model/te_linear.py): it communicates
        self.weight_casts: StepWeightCasts | None = None  # set by GPTModel (gradient_accumulation_fusion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.te is not None:
            return self.te(x, self.weight, self.weight_casts)
        return local_linear(gemm_input(x, self.parallel), self.weight, self.fp8, self.weight_casts)


class RowParallelLinear(nn.Module):
    """y = x W^T with the input features (columns of W) split over TP ranks; output summed."""

    def __init__(self, in_features: int, out_features: int, parallel: ParallelState = SINGLE):
        super().__init__()
        self.parallel = parallel
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(out_features, in_features // parallel.tp)), 1)
        self.fp8: Fp8LinearScaling | None = None  # set by megatron_code.model.fp8.enable_fp8
        self.te = None  # TELinear under --fp8-backend te (megatron_code/model/te_linear.py): it communicates
        self.weight_casts: StepWeightCasts | None = None  # set by GPTModel (gradient_accumulation_fusion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.te is not None:
            return self.te(x, self.weight, self.weight_casts)
        return row_parallel_output(local_linear(x, self.weight, self.fp8, self.weight_casts), self.parallel)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split over TP ranks: each rank looks up the ids in
    its range, zeros the others, and the partial results are summed over TP."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState = SINGLE):
        super().__init__()
        self.parallel = parallel
        rows = vocab_size // parallel.tp
        self.vocab_start = parallel.tp_rank * rows
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(rows, hidden_size)), 0)
        self.fused_grad = False  # set by GPTModel (gradient_accumulation_fusion)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> [s, b, h] (or [s/tp, b, h] under sequence parallelism)."""
        ids = tokens.t()  # [s, b]
        if self.parallel.tp == 1:
            return embedding_lookup(ids, self.weight, self.fused_grad)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        # the rows of ids outside this rank's range get zero gradient (masked below): adding them into row 0 is a no-op
        out = embedding_lookup(local.masked_fill(outside, 0), self.weight, self.fused_grad)
        out = out.masked_fill(outside[..., None], 0.0)
        return row_parallel_output(out, self.parallel)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits whose vocabulary is split over TP ranks, without gathering them:
    three all-reduces of [s, b] tensors (max, target logit, sum of exponentials)."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group):
        logits = logits.float()
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - row_max[..., None]
        local = targets - vocab_start
        outside = (local < 0) | (local >= logits.shape[-1])
        local = local.masked_fill(outside, 0)
        target_logit = logits.gather(-1, local[..., None]).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)
        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        softmax = exp.div_(sum_exp[..., None])
        ctx.save_for_backward(softmax, local, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax  # d loss / d logits = softmax - onehot(target)
        grad.scatter_add_(-1, local[..., None], -(~outside).to(grad.dtype)[..., None])
        return grad.mul_(grad_loss[..., None]), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                 parallel: ParallelState) -> torch.Tensor:
    """logits [s, b, V/tp] (this rank's vocabulary slice), targets [s, b] -> loss [s, b] in fp32."""
    if parallel.tp == 1:
        return cross_entropy(logits.float().flatten(0, 1), targets.flatten()).view(targets.shape)
    return _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, parallel.tp_group)
