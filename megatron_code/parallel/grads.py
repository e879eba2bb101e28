"""Gradient synchronization across ranks, and the global gradient norm.

The trainer divides every rank's summed token losses by the number of loss tokens in the whole
global batch, so the exact global gradient is the SUM of the data-parallel ranks' gradients
(not their mean): that is what the reducer computes.
"""
from __future__ import annotations

import abc
import weakref

import torch
import torch.distributed as dist

from megatron_code.parallel.state import ParallelState


# Each parameter's gradient starts a multiple of this many elements into its bucket's buffer:
# 256 bytes in fp32, so the views keep the alignment a separately allocated gradient has
# (the fused AdamW's vectorized loads want 16 bytes: kernels/triton_adamw.py).
GRAD_ALIGNMENT = 64


class _Bucket:
    """One flat gradient buffer whose views are its parameters' `.grad`: autograd and the fused
    weight-gradient kernels accumulate into them in place, and the all-reduce runs on the buffer
    itself (no copy before or after it)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, offsets, total = params, [], 0
        for p in params:
            offsets.append(total)
            total += -(-p.numel() // GRAD_ALIGNMENT) * GRAD_ALIGNMENT
        self.buffer = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        self.pending = len(params)
        self.work = None
        self.views = [self.buffer[off:off + p.numel()].view_as(p) for p, off in zip(params, offsets)]
        self.point_grads()

    def point_grads(self) -> None:
        for p, view in zip(self.params, self.views):
            p.grad = view


def check_gradient_views(owner: str, params, views, attribute: str = "grad") -> None:
    """Before a bucket's collective: each parameter's gradient (`attribute`) must still be its view
    of the bucket's buffer; one replaced behind the owner's back would be left out silently."""
    for p, view in zip(params, views):
        held = getattr(p, attribute, None)
        if held is None or held.data_ptr() != view.data_ptr():
            raise RuntimeError(
                f"{owner}: a parameter's .{attribute} is no longer a view of its gradient buffer (shape "
                f"{tuple(p.shape)}); zero gradients with {owner}.zero_grad(), not a torch optimizer's "
                f"zero_grad(set_to_none=True), and do not assign .{attribute}.")


def default_bucket_elements(group_size: int) -> int:
    """Gradient elements per bucket of the data-parallel reduction, Megatron-LM's default:
    max(40M, 1M x G). Each rank's part of a bucket's ring collective is bucket / G, so a fixed
    bucket size would make the G - 1 ring steps latency-bound at large G (at G = 256 a 25 MB
    bucket moves 100 KB per step); 1M elements per rank keeps each step at 4 MB."""
    return max(40_000_000, 1_000_000 * group_size)


def cut_into_buckets(numels: list[int], bucket_elements: int, kinds: list | None = None) -> list[list[int]]:
    """Indices of `numels` (tensors in the order backward produces them) cut into consecutive
    buckets: one closes once it holds bucket_elements elements, or before a tensor of another kind
    (dtype). The trainer's rule, which the planner applies to parameter sizes (plan/timing.py)."""
    groups, current, size = [], [], 0
    for i, n in enumerate(numels):
        if current and kinds is not None and kinds[i] != kinds[current[0]]:
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += n
        if size >= bucket_elements:
            groups.append(current)
            current, size = [], 0
    return groups + [current] if current else groups


def backward_ordered_groups(params: list[torch.nn.Parameter], bucket_elements: int) -> list[list[torch.nn.Parameter]]:
    """The parameters cut into buckets of ~bucket_elements elements, one dtype per bucket, in
    reverse order of definition: roughly the order backward produces their gradients, so the
    first buckets complete (and launch their collective) earliest."""
    ordered = list(reversed(params))
    groups = cut_into_buckets([p.numel() for p in ordered], bucket_elements, [p.dtype for p in ordered])
    return [[ordered[i] for i in group] for group in groups]


class BucketTrigger(abc.ABC):
    """Launches a bucket's collective (`self._launch(bucket)`) as soon as backward has produced the
    last gradient of every parameter in the bucket, once `arm(n)` was called: a parameter counts as
    done after n more gradient accumulations (n = 1 for the last micro-batch of a step; n = the
    number of micro-batches when a pipeline schedule runs them all in one call). Subclasses set
    `bucket_of` (id(param) -> bucket with a `pending` count) and register `_on_gradient_ready` as
    each parameter's post-accumulate hook; `finish()` launches whatever did not launch and disarms."""

    armed = False
    bucket_of: dict

    def arm(self, accumulations: int = 1) -> None:
        self._accumulations_left = dict.fromkeys(self.bucket_of, accumulations)
        self.armed = True

    def _watch(self, params) -> None:
        """Call `_on_gradient_ready` after each parameter's gradient accumulation, through a weak
        reference: the hook lives in C++ on the parameter, where the garbage collector cannot see
        it, so a strong one made a cycle nothing frees (parameter -> hook -> this object -> its
        buckets -> parameter) and kept this object's process group alive until exit."""
        ready = weakref.WeakMethod(self._on_gradient_ready)

        def hook(param: torch.nn.Parameter) -> None:
            method = ready()
            if method is not None:
                method(param)

        for param in params:
            param.register_post_accumulate_grad_hook(hook)

    def _on_gradient_ready(self, param: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        key = id(param)
        self._accumulations_left[key] -= 1
        if self._accumulations_left[key]:
            return
        bucket = self.bucket_of[key]
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch(bucket)

    @abc.abstractmethod
    def _launch(self, bucket) -> None:
        """Start the bucket's collective (asynchronously)."""


class GradientReducer(BucketTrigger):
    """Sums gradients over the data-parallel group in buckets of ~bucket_elements elements
    (default_bucket_elements of the group size, Megatron-LM's --ddp-bucket-size). A bucket's
    all-reduce is launched (asynchronously) as soon as backward has produced all of its gradients,
    so communication overlaps the rest of backward. Armed for the last micro-batch of a step (or for
    all micro-batches of a pipeline schedule), so gradient accumulation communicates once per step.

    The gradients live in the buckets' flat buffers for the whole run (Megatron-LM's DDP grad
    buffer): `zero_grad()` zeroes them, the micro-batches accumulate into them, the all-reduce
    sums them in place. 4 bytes per fp32 parameter, and no second copy at the end of backward."""

    def __init__(self, params: list[torch.nn.Parameter], group, bucket_elements: int | None = None):
        self.group = group
        self.armed = False
        if bucket_elements is None:
            bucket_elements = default_bucket_elements(dist.get_world_size(group))
        groups = backward_ordered_groups([p for p in params if p.requires_grad], bucket_elements)
        self.buckets: list[_Bucket] = [_Bucket(g) for g in groups]
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._watch(self.bucket_of_params())

    def bucket_of_params(self):
        return [p for b in self.buckets for p in b.params]

    def zero_grad(self) -> None:
        """Zero the gradient buffers; every `.grad` is (again) a view of its buffer."""
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.point_grads()

    def _launch(self, bucket: _Bucket) -> None:
        check_gradient_views("GradientReducer", bucket.params, bucket.views)
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket (launching any whose parameters got no gradient): the `.grad`
        views then hold the group's sums."""
        for bucket in self.buckets:
            if bucket.work is None:
                self._launch(bucket)
            bucket.work.wait()
            bucket.work, bucket.pending = None, len(bucket.params)
        self.armed = False


def reduce_sequence_parallel_grads(params, parallel: ParallelState) -> None:
    """Norm weights see only their rank's tokens under sequence parallelism: sum over TP."""
    if not parallel.sequence_parallel:
        return
    grads = [p.grad for p in params if getattr(p, "sequence_parallel_grad", False) and p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=parallel.tp_group)
        torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])


def sum_of_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """fp32 sum of the squared elements of all tensors: per-tensor norms in multi-tensor kernels
    (a few launches, no squared copy of each gradient), then squared and summed."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.nn.utils.get_total_norm(tensors, norm_type=2.0, foreach=tensors[0].is_cuda).float().square()


def global_grad_norm(params, parallel: ParallelState) -> torch.Tensor:
    """L2 norm of the full model's gradient: TP-sharded parameters contribute their shard on each
    TP rank (summed over TP); replicated ones are identical on all TP ranks and count once;
    pipeline stages hold disjoint parameters (summed over PP). Gradients are already identical
    across data-parallel ranks."""
    sharded, replicated = [], []
    for p in params:
        if p.grad is not None:
            (replicated if getattr(p, "tensor_parallel_dim", None) is None else sharded).append(p.grad)

    device = params[0].device
    sharded_sq = sum_of_squares(sharded, device)
    if parallel.tp > 1:
        dist.all_reduce(sharded_sq, group=parallel.tp_group)
    total_sq = sharded_sq + sum_of_squares(replicated, device)
    if parallel.pp > 1:  # each parameter lives on exactly one pipeline stage
        dist.all_reduce(total_sq, group=parallel.group("pp"))
    return total_sq.sqrt()


def clip_grads_by_norm(params, max_norm: float, total_norm: torch.Tensor, optimizer=None) -> None:
    """Scale gradients so the global norm is at most max_norm (0 disables): inside the optimizer's
    step when it is a fused Adam (`clip_in_optimizer_step`), else by a pass over the gradients."""
    if max_norm > 0 and not clip_in_optimizer_step(optimizer, max_norm, total_norm):
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total_norm)


def clip_in_optimizer_step(optimizer, max_norm: float, total_norm: torch.Tensor) -> bool:
    """Have a fused Adam/AdamW (torch's, or training/optimizer.py TritonAdamW) clip as it steps;
    False (nothing set) for any other optimizer.

    The fused kernel divides every gradient by `optimizer.grad_scale` when that attribute is set
    (the hook torch.amp.GradScaler unscales through), so clipping costs nothing there instead of a
    read and a write of every fp32 gradient (~8 ms of a 7B-shape step on an H200). Dividing by
    max(1, (norm + 1e-6) / max_norm) is torch's clip_grads_with_norm_ up to rounding."""
    if optimizer is None or max_norm <= 0:
        return False
    if not (getattr(optimizer, "clips_in_step", False) or all(g.get("fused") for g in optimizer.param_groups)):
        return False
    optimizer.grad_scale = torch.clamp((total_norm.float() + 1e-6) / max_norm, min=1.0)
    return True
