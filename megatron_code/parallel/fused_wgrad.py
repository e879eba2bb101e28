"""Linear layers whose weight gradients go straight into the fp32 master gradient (Megatron-LM's
gradient-accumulation fusion), with each weight's bf16 copy made once per training step.

Under bf16 autocast over fp32 master weights, autograd runs a linear's weight-gradient GEMM in
bf16, casts the [out, in] result to fp32 (ToCopyBackward) and adds it into `.grad`
(AccumulateGrad): two more passes over every weight per micro-batch, and autocast casts every
weight to bf16 again in every micro-batch. On an H200 the cast and the add took 85 ms of an 875 ms
training step of the 7B shape (docs/benchmarks.md). Here

- the weight-gradient GEMM writes fp32 and accumulates into `.grad` itself (cuBLAS bf16 x bf16 ->
  fp32 with beta = 1; on CPU a bf16 product added in fp32, as autograd would);
- inside `cached_weight_casts(model)` (the trainer wraps each step in it) a weight's bf16 copy is
  made by its first micro-batch (or written by the last optimizer step, TritonAdamW) and reused
  by the others; outside it, every call casts (FP8
  layers use the same cache for their weight's FP8 cast, and advance their delayed scales once
  per step);
- the embedding (VocabParallelEmbedding, `embedding_lookup`) adds its row gradients into `.grad`
  in place instead of handing autograd a dense [vocab, h] gradient per micro-batch;
- the backward returns no weight gradient, so autograd's AccumulateGrad has nothing to add, but
  it still runs the weight's post-accumulate-grad hooks after this backward (pinned by
  tests/test_fused_wgrad.py): the data-parallel buckets launch as before.

Schedules that split the input and weight backward (zero-bubble pipelines) must not use this
path: each pass would accumulate the weight gradient.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from kernels.grad_accumulation import fp32_gradient, has_fp32_gradient


class StepWeightCasts:
    """bf16 copies of fp32 weights, reused while `active` (one training step) and dropped after.

    A copy may also come ready-made: an optimizer that writes it while updating the weight
    (training/optimizer.py TritonAdamW) asks `wanted` which weights the last step cast, and
    `prepare`s their copies for the next step. A prepared copy is used only if the weight has not
    been written since (its version counter, which in-place torch ops and loading a state dict
    advance; the Triton kernel's own write does not)."""

    def __init__(self):
        self.active = False
        self.copies: dict[tuple, object] = {}
        self.wanted: dict[int, tuple[torch.Tensor, torch.dtype]] = {}  # what the last step cast: id -> (weight, dtype)
        self.prepared: dict[tuple, tuple] = {}  # (id, dtype) -> (weight, copy, weight's version then)

    def cast(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.memo(weight, dtype, lambda: self._take_prepared(weight, dtype))

    def prepare(self, weight: torch.Tensor, copy: torch.Tensor) -> None:
        """`copy`: the current value of `weight` in copy.dtype, for the next step's cast."""
        self.prepared[(id(weight), copy.dtype)] = (weight, copy, weight._version)

    def _take_prepared(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The prepared copy if it still matches the weight, else a fresh cast."""
        entry = self.prepared.pop((id(weight), dtype), None) if self.active else None
        if entry is not None and entry[0] is weight and entry[2] == weight._version:
            return entry[1]
        return weight.detach().to(dtype)

    def memo(self, owner, kind, make):
        """make() (a cast of a weight), computed once per step for (owner, kind) while active.
        `owner` is an object that lives as long as the layer (the parameter, its FP8 scaling
        state); it is kept referenced so that its id cannot be reused within the step."""
        if not self.active:
            return make()
        key = (id(owner), kind)
        if key not in self.copies:
            self.copies[key] = (owner, make())
        return self.copies[key][1]

    def first_use(self, owner) -> bool | None:
        """Whether this is `owner`'s first call in the step (True once, then False); None outside
        a step. What Transformer Engine's `is_first_microbatch` asks (te_linear.py)."""
        if not self.active:
            return None
        key = (id(owner), "first-use")
        if key in self.copies:
            return False
        self.copies[key] = (owner, None)
        return True

    def end_step(self) -> None:
        """Drop the step's copies; owners that first_use saw release their own per-step state
        (te_linear.TELinear: Transformer Engine's cached FP8 weight)."""
        for (_, kind), (owner, _) in self.copies.items():
            if kind == "first-use" and hasattr(owner, "release_step_state"):
                owner.release_step_state()
        # cast()'s entries (kind: a dtype; memo's other users key by name) are what the next step wants
        self.wanted = {id(owner): (owner, kind) for (_, kind), (owner, _) in self.copies.items()
                       if isinstance(kind, torch.dtype)}
        self.copies.clear()
        self.prepared.clear()  # copies this step did not read (the weights it cast changed)


@contextmanager
def cached_weight_casts(model: nn.Module):
    """One training step's forwards and backwards: each fused linear's weight is cast once for the
    micro-batches run inside (weights must not change inside: the optimizer steps after), and FP8
    delayed scales stay fixed inside, their amax histories advancing once at the end
    (kernels.fp8_history)."""
    caches, histories = _step_state(model)
    for item in (*caches, *histories):
        item.active = True
    try:
        yield
    finally:
        for cache in caches:
            cache.active = False
            cache.end_step()
        for scales in histories:
            scales.active = False
            scales.advance()


def _step_state(model: nn.Module) -> tuple[list[StepWeightCasts], list]:
    """The model's weight-cast caches and FP8 amax histories (kernels.fp8_history), each shared
    object once, in module order; one pass over the modules."""
    caches, histories = {}, {}
    for m in model.modules():
        if getattr(m, "weight_casts", None) is not None:
            caches.setdefault(id(m.weight_casts), m.weight_casts)
        if getattr(m, "fp8", None) is not None:
            histories.setdefault(id(m.fp8.histories), m.fp8.histories)
    return list(caches.values()), list(histories.values())


def wanted_weight_copies(model: nn.Module) -> dict[int, tuple[StepWeightCasts, torch.dtype]]:
    """id(weight) -> (the cache that casts it, the dtype) for every weight `model`'s last
    training step cast: the copies its next step will want."""
    return {key: (cache, dtype) for cache in _step_state(model)[0] for key, (_, dtype) in cache.wanted.items()}


def fp8_histories(model: nn.Module) -> list:
    """The FP8 delayed-scaling state objects of a model (one per model, or one per layer given its
    own), in module order: what a step context advances and a checkpoint saves."""
    return _step_state(model)[1]


def _accumulate_wgrad(target: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor, fresh: bool) -> None:
    """target (fp32 [out, in]) (+)= grad_out^T x, grad_out [N, out] and x [N, in] in bf16."""
    if target.is_cuda:
        if fresh:
            torch.mm(grad_out.t(), x, out_dtype=torch.float32, out=target)
        else:
            torch.addmm(target, grad_out.t(), x, out_dtype=torch.float32, out=target)
    elif fresh:  # CPU has no mixed-dtype GEMM: round the product to bf16, as autograd does
        target.copy_(torch.mm(grad_out.t(), x))
    else:
        target.add_(torch.mm(grad_out.t(), x))


class _FusedWgradLinear(torch.autograd.Function):
    """outputs_i = x W_i^T for each W_i of the fp32 leaf `weight` ([out, in]: one output;
    [k, out, in]: k outputs), computed with its bf16 copy `weight_lp`."""

    @staticmethod
    def forward(ctx, x, weight, weight_lp):
        ctx.save_for_backward(x, weight_lp)
        ctx.weight = weight
        if weight_lp.dim() == 2:
            return F.linear(x, weight_lp)
        return tuple(F.linear(x, w) for w in weight_lp.unbind(0))

    @staticmethod
    def backward(ctx, *grads):
        x, weight_lp = ctx.saved_tensors
        weight = ctx.weight
        stacked = weight_lp.unsqueeze(0) if weight_lp.dim() == 2 else weight_lp  # [k, out, in]
        x2d = x.reshape(-1, x.shape[-1])  # [N, in]
        grad, fresh = fp32_gradient(weight)
        grad_buffer = grad.view(stacked.shape)
        grad_x = None
        for i, grad in enumerate(grads):
            g2d = grad.reshape(-1, grad.shape[-1]).to(x.dtype)  # [N, out]
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(g2d, stacked[i]) if grad_x is None else grad_x.addmm_(g2d, stacked[i])
            _accumulate_wgrad(grad_buffer[i], g2d, x2d, fresh)
        return (None if grad_x is None else grad_x.view(x.shape)), None, None


def fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fused path applies to leaf weights with an fp32 gradient (fp32 weights, or bf16 ones
    with the distributed optimizer's main_grad) trained under autocast."""
    return (torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type) and weight.requires_grad
            and has_fp32_gradient(weight))


def fused_wgrad_linear(x: torch.Tensor, weight: torch.Tensor, casts: StepWeightCasts):
    """x [..., in] times weight ([out, in] -> [..., out]; [k, out, in] -> k tensors [..., out]) in
    the autocast dtype, the weight gradient accumulated in fp32 (call only when `fusable`)."""
    dtype = torch.get_autocast_dtype(x.device.type)
    with torch.autocast(x.device.type, enabled=False):
        return _FusedWgradLinear.apply(x.to(dtype), weight, casts.cast(weight, dtype))


class _FusedGradEmbedding(torch.autograd.Function):
    """rows = weight[ids] for the fp32 leaf `weight`; the backward adds each row's gradient into
    weight.grad in place (index_put_ with accumulate: sorted, deterministic on CUDA) rather than
    building a dense [vocab, h] gradient for AccumulateGrad to add: per micro-batch that saved a
    zero fill of the whole table and, after the first micro-batch, a read-read-write of it."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        target, _ = fp32_gradient(weight, torch.zeros_like)
        rows = grad.reshape(-1, weight.shape[1]).to(target.dtype)  # [N, h]
        target.index_put_((ids.reshape(-1),), rows, accumulate=True)
        return None, None


def embedding_lookup(ids: torch.Tensor, weight: torch.Tensor, fused: bool) -> torch.Tensor:
    """weight[ids]; with `fused` (gradient-accumulation fusion on) and under autocast for an fp32
    leaf weight, its gradient accumulates in place (_FusedGradEmbedding)."""
    if fused and fusable(ids, weight):
        return _FusedGradEmbedding.apply(ids, weight)
    return F.embedding(ids, weight)
