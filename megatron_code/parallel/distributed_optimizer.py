"""ZeRO-1 distributed optimizer: AdamW whose state is sharded over the data-parallel ranks.

fp32 parameters are their own master weights (bf16 is autocast): ZeRO-1 shards the Adam state
(exp_avg, exp_avg_sq: 8 bytes per parameter) and the optimizer's work. bf16 parameters
(--params-dtype bfloat16, Megatron-LM's distributed optimizer): each rank also keeps the fp32
master weights of its shard, AdamW steps those, and the step writes their bf16 rounding into the
parameters before the all-gather, which then moves 2 bytes per parameter. Their gradients stay
fp32: the buffer's views are the parameters' `main_grad` (fused kernels write it,
kernels/grad_accumulation.py; a bf16 `.grad` autograd makes is folded into it by the
post-accumulate hook), and a checkpoint holds the master weights (training/checkpointing.py).

Layout. Parameters are grouped into buckets of ~bucket_elements (in reverse definition order, the
order backward produces gradients). Each bucket owns two flat buffers of the same length, padded
to a multiple of G x SHARD_ALIGNMENT (G the group size): the parameters (every parameter's `.data` becomes a view into
it) and their gradients (every `.grad` a view, which autograd accumulates into in place, so no
gradient is copied before communication). Rank r of the group owns elements [r*S, (r+1)*S) of
each bucket, S = padded length / G.

One step:
1. backward (last micro-batch only): as soon as all of a bucket's gradients are accumulated, the
   bucket is reduce-scattered asynchronously and in place: rank r's shard of the gradient buffer
   receives the group's SUM of its elements (the exact global-batch gradient, see grads.py), the
   rest of the buffer keeps this rank's unreduced values, which nothing reads before zero_grad;
2. the shard elements of sequence-parallel norm weights (partial sums per TP rank) are
   all-reduced over TP;
3. the global grad norm from the shards: sums of squares over the group, TP-sharded parameters
   also summed over TP, TP-replicated ones counted once (the rule of grads.global_grad_norm);
4. clipping scales the shard; torch AdamW updates the shard;
5. the updated parameter shards are all-gathered into the full parameter buffers (in place: each
   rank's shard already sits at its offset); with
   overlap_param_gather (Megatron's --overlap-param-gather) the step returns with the gathers in
   flight, and the next forward waits for each bucket just before the first module that owns
   one of its parameters, so the gathers of later layers overlap the compute of earlier ones.

AdamW works on "pieces": the intersection of one parameter with this rank's shard, a 1-D view
of the parameter buffer whose `.grad` is the matching view of the reduced gradient shard and
whose exp_avg / exp_avg_sq are views of this bucket's flat state shards. Weight decay is chosen
per piece from its parameter (optimizer.parameter_groups: no decay on 1-D tensors), so every
element gets exactly the update of the non-distributed optimizer.

Both collectives are in place (NCCL's documented in-place forms, recvbuff = sendbuff +
rank x count; Megatron-LM's distributed optimizer does the same; gloo handles the aliasing too), so
no shard-sized copy exists. Per-rank bytes for N fp32 parameters: params 4N + grads 4N + Adam
8N/G, against 4N + 4N + 8N without sharding (`memory_bytes`); for bf16 parameters 2N + 4N +
12N/G, and the per-step bf16 weight copies (2N) are gone too.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from megatron_code.parallel.grads import (BucketTrigger, backward_ordered_groups, check_gradient_views,
                                         clip_in_optimizer_step, default_bucket_elements, sum_of_squares)
from megatron_code.parallel.state import ParallelState
from megatron_code.training.config import OptimizerConfig
from megatron_code.training.optimizer import adamw, parameter_groups

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class _Piece:
    """The part [start, end) of a flattened parameter that falls in this rank's shard, at
    [shard_start, shard_end) of the shard."""

    def __init__(self, param, offset: int, start: int, end: int, shard_start: int):
        self.param, self.offset, self.start, self.end = param, offset, start, end
        self.shard = slice(shard_start, shard_start + end - start)
        self.tensor: torch.Tensor | None = None  # the view AdamW updates


# Shards are whole multiples of this many elements, so each starts 256 bytes (fp32) into the
# buffer: with parameter sizes multiples of 16 every piece TritonAdamW steps is then 16-byte
# aligned, which its vectorized loads need (kernels/triton_adamw.py ALIGNED). Megatron-LM pads its
# buckets for the same reason.
SHARD_ALIGNMENT = 64


class _Bucket:
    """Flat buffers of some parameters: the parameters themselves (their dtype), their fp32
    gradients and, for low-precision parameters, this rank's shard of fp32 master weights."""

    def __init__(self, params: list[torch.nn.Parameter], group_size: int, group_rank: int, alignment: int):
        self.params = params
        self.offsets, total = [], 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        padded = -(-total // (group_size * alignment)) * group_size * alignment
        self.shard_size = padded // group_size
        self.lo = group_rank * self.shard_size
        device = params[0].device
        like = dict(dtype=torch.float32, device=device)  # gradients, Adam state and master weights
        self.param_buffer = torch.zeros(padded, dtype=params[0].dtype, device=device)
        self.grad_buffer = torch.zeros(padded, **like)
        with torch.no_grad():
            for p, off in zip(params, self.offsets):
                self.param_buffer[off:off + p.numel()].copy_(p.detach().reshape(-1))
                p.data = self.param_buffer[off:off + p.numel()].view_as(p)
        # bf16 parameters: AdamW steps an fp32 copy of this rank's shard (Megatron-LM's main params)
        low_precision = params[0].dtype != torch.float32
        self.master = self.own_params().float() if low_precision else None
        self.grad_views = [self.grad_buffer[off:off + p.numel()].view_as(p) for p, off in zip(params, self.offsets)]
        self.point_grads()
        # The reduce-scatter writes the group's sum over this rank's own part of the buffer.
        self.grad_shard = self.grad_buffer[self.lo:self.lo + self.shard_size]
        self.state = {key: torch.zeros(self.shard_size, **like) for key in ADAM_KEYS}
        self.pieces = []
        for p, off in zip(params, self.offsets):
            start, end = max(off, self.lo), min(off + p.numel(), self.lo + self.shard_size)
            if start < end:
                self.pieces.append(_Piece(p, off, start - off, end - off, start - self.lo))
        self.pending, self.launched, self.work = len(params), False, None
        self.gather = None  # the parameter all-gather in flight (overlap_param_gather)

    @property
    def grad_attribute(self) -> str:
        """fp32 parameters: `.grad` is a view of the gradient buffer, autograd accumulates into it.
        bf16 parameters: `.main_grad` is (autograd's bf16 `.grad` of a micro-batch is folded into
        it by the post-accumulate hook; the fused kernels write it directly)."""
        return "grad" if self.master is None else "main_grad"

    def point_grads(self) -> None:
        for p, view in zip(self.params, self.grad_views):
            setattr(p, self.grad_attribute, view)
            if self.master is not None:
                p.grad = None

    def own_params(self) -> torch.Tensor:
        return self.param_buffer[self.lo:self.lo + self.shard_size]

    def stepped_params(self) -> torch.Tensor:
        """What AdamW updates: the master shard, or the parameters' own shard in place."""
        return self.own_params() if self.master is None else self.master


class DistributedOptimizer(BucketTrigger):
    """AdamW over this rank's shard of every bucket; also the gradient reducer of the run (same
    interface as grads.GradientReducer: `armed`, `finish()`), since gradients must be
    reduce-scattered into the layout the optimizer owns.

    `group` is the group whose ranks hold the same parameters and see different tokens
    (data x context parallel). Collective: every rank of the run builds it."""

    def __init__(self, model: torch.nn.Module, config: OptimizerConfig, parallel: ParallelState,
                 group, bucket_elements: int | None = None, overlap_param_gather: bool = False,
                 shard_alignment: int = SHARD_ALIGNMENT):
        self.parallel, self.group = parallel, group
        self.shard_alignment = shard_alignment
        self.overlap_param_gather = overlap_param_gather
        self.group_size = 1 if group is None else dist.get_world_size(group)
        self.group_rank = 0 if group is None else dist.get_rank(group)
        self.armed = False
        decay_of = {id(p): g["weight_decay"] for g in parameter_groups(model, config.weight_decay)
                    for p in g["params"]}
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = self._make_buckets(params, bucket_elements or default_bucket_elements(self.group_size))
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._watch(params)
        self.optimizer = self._build_adamw(config, decay_of, params[0].is_cuda)
        if overlap_param_gather:
            self._install_gather_waits(model)

    def _make_buckets(self, params, bucket_elements: int) -> list[_Bucket]:
        """~bucket_elements gradient elements each (what is reduce-scattered), in backward order."""
        groups = backward_ordered_groups(params, bucket_elements)
        return [_Bucket(g, self.group_size, self.group_rank, self.shard_alignment) for g in groups]

    def _build_adamw(self, config: OptimizerConfig, decay_of: dict, on_cuda: bool) -> torch.optim.AdamW:
        groups: dict[float, list] = {}
        for b in self.buckets:
            for piece in b.pieces:
                t = b.stepped_params()[piece.shard]
                t.grad = b.grad_shard[piece.shard]
                piece.tensor = t
                groups.setdefault(decay_of[id(piece.param)], []).append(t)
        param_groups = [{"params": ts, "weight_decay": wd} for wd, ts in groups.items()]
        if not param_groups:  # this rank's shards hold only padding (a model smaller than the group)
            param_groups = [{"params": [torch.zeros(0, device=self.buckets[0].param_buffer.device)]}]
        optimizer = adamw(param_groups, config, on_cuda)
        fused = any(g.get("fused") for g in optimizer.param_groups)
        for b in self.buckets:  # Adam state as views of the flat shard buffers (gathered for saving)
            for piece in b.pieces:
                optimizer.state[piece.tensor].update(
                    step=torch.zeros((), dtype=torch.float32, device=piece.tensor.device if fused else "cpu"),
                    **{key: b.state[key][piece.shard] for key in ADAM_KEYS},
                )
        return optimizer

    # ---- the optimizer interface the trainer uses -------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffers (gradients stay views of them, whatever set_to_none says)."""
        for b in self.buckets:
            b.grad_buffer.zero_()
            b.point_grads()

    def step(self) -> None:
        """AdamW on this rank's shards, then all-gather the updated parameters: waited for here, or
        with overlap_param_gather by the next forward, bucket by bucket as it reaches them."""
        self.wait_for_params()  # the gathers of the last step write into the shards updated now
        self.optimizer.step()
        for b in self.buckets:
            if b.master is not None:
                b.own_params().copy_(b.master)  # the bf16 parameters the gather hands to every rank
        if self.group_size == 1:
            return
        for b in reversed(self.buckets):  # forward order: the first layers' buckets first
            b.gather = dist.all_gather_into_tensor(b.param_buffer, b.own_params(), group=self.group,
                                                   async_op=True)
        if not self.overlap_param_gather:
            self.wait_for_params()

    def wait_for_params(self) -> None:
        """Wait for every pending parameter all-gather (before anything reads the parameters
        outside a forward: saving a checkpoint, the end of training)."""
        for b in self.buckets:
            self._wait_gather(b)

    @staticmethod
    def _wait_gather(bucket: _Bucket) -> None:
        if bucket.gather is not None:
            bucket.gather.wait()
            bucket.gather = None

    def _install_gather_waits(self, model: torch.nn.Module) -> None:
        """Forward pre-hooks: a module waits for the buckets of the parameters it owns directly.
        Each parameter also gets `wait_until_gathered` (param_gather.py) for reads elsewhere."""
        for module in model.modules():
            buckets = list({id(self.bucket_of[id(p)]): self.bucket_of[id(p)]
                            for p in module.parameters(recurse=False) if id(p) in self.bucket_of}.values())
            if buckets:
                module.register_forward_pre_hook(functools.partial(self._wait_gathers, buckets))
        for bucket in self.buckets:
            for p in bucket.params:
                p.wait_until_gathered = functools.partial(self._wait_gather, bucket)

    def _wait_gathers(self, buckets: list[_Bucket], module, args) -> None:
        for bucket in buckets:
            self._wait_gather(bucket)

    # ---- gradient reduction (GradientReducer's interface) -----------------------------------
    def _on_gradient_ready(self, param: torch.nn.Parameter) -> None:
        main_grad = getattr(param, "main_grad", None)
        if main_grad is not None and param.grad is not None:  # a bf16 parameter's micro-batch gradient
            main_grad.add_(param.grad)
            param.grad = None
        super()._on_gradient_ready(param)

    def _launch(self, bucket: _Bucket) -> None:
        check_gradient_views("DistributedOptimizer", bucket.params, bucket.grad_views, bucket.grad_attribute)
        bucket.launched = True
        if self.group_size > 1:
            bucket.work = dist.reduce_scatter_tensor(bucket.grad_shard, bucket.grad_buffer,
                                                     group=self.group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket's reduce-scatter (launching any whose parameters got no gradient)."""
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
            if bucket.work is not None:
                bucket.work.wait()
            bucket.work, bucket.launched, bucket.pending = None, False, len(bucket.params)
        self.armed = False

    # ---- norm and clipping ------------------------------------------------------------------
    def _pieces(self):
        return [piece for b in self.buckets for piece in b.pieces]

    def _reduce_sequence_parallel_grads(self) -> None:
        """Norm weights see only their rank's tokens under sequence parallelism: sum over TP. TP
        peers have identical bucket layouts, so their shards hold the same pieces."""
        if not self.parallel.sequence_parallel:
            return
        grads = [pc.tensor.grad for pc in self._pieces() if getattr(pc.param, "sequence_parallel_grad", False)]
        if grads:
            flat = torch.cat(grads)
            dist.all_reduce(flat, group=self.parallel.tp_group)
            torch._foreach_copy_(grads, list(flat.split([g.numel() for g in grads])))

    def global_grad_norm(self) -> torch.Tensor:
        """L2 norm of the full model's reduced gradient, from the shards (see module docstring)."""
        device = self.buckets[0].grad_shard.device
        grads = {True: [], False: []}  # TP-sharded?
        for pc in self._pieces():
            grads[getattr(pc.param, "tensor_parallel_dim", None) is not None].append(pc.tensor.grad)
        sq = torch.stack([sum_of_squares(grads[k], device) for k in (True, False)])
        if self.group_size > 1:
            dist.all_reduce(sq, group=self.group)
        if self.parallel.tp > 1:
            sharded = sq[:1].clone()
            dist.all_reduce(sharded, group=self.parallel.tp_group)
            sq = torch.cat([sharded, sq[1:]])
        total_sq = sq.sum()
        if self.parallel.pp > 1:  # each parameter lives on exactly one pipeline stage
            dist.all_reduce(total_sq, group=self.parallel.group("pp"))
        return total_sq.sqrt()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Finish the gradients (SP sums), return the global norm, clip the shards to max_norm
        (0: only measure) with torch's clip_grads_with_norm_ formula."""
        self._reduce_sequence_parallel_grads()
        total_norm = self.global_grad_norm()
        if max_norm > 0 and not clip_in_optimizer_step(self.optimizer, max_norm, total_norm):
            coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
            for b in self.buckets:
                b.grad_shard.mul_(coef.to(b.grad_shard.device))
        return total_norm

    # ---- memory -----------------------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        """Bytes held on this rank: parameters, gradients (the buffers, reduced shards included),
        optimizer state (the Adam shards, and the master weight shards of bf16 parameters)."""
        def nbytes(ts):
            return sum(t.numel() * t.element_size() for t in ts)
        grads = nbytes(b.grad_buffer for b in self.buckets)
        optimizer = nbytes([b.state[k] for b in self.buckets for k in ADAM_KEYS]
                           + [b.master for b in self.buckets if b.master is not None])
        return {"params": nbytes(b.param_buffer for b in self.buckets), "grads": grads, "optimizer": optimizer}

    def unsharded_memory_bytes(self) -> dict[str, int]:
        """What the non-distributed optimizer holds on every rank for the same parameters (fp32)."""
        n = sum(4 * p.numel() for b in self.buckets for p in b.params)
        return {"params": n, "grads": n, "optimizer": 2 * n}

    @property
    def master_weights(self) -> bool:
        """The parameters are bf16 and their fp32 master weights live here, sharded."""
        return any(b.master is not None for b in self.buckets)

    def memory_summary(self) -> str:
        mine, plain = self.memory_bytes(), self.unsharded_memory_bytes()
        mib = 2**20
        state = "Adam state + fp32 master weights" if self.master_weights else "Adam state"
        return (f"distributed optimizer over {self.group_size} ranks, per rank: params {mine['params'] / mib:.1f} MiB"
                f" + grads {mine['grads'] / mib:.1f} MiB + {state} {mine['optimizer'] / mib:.1f} MiB = "
                f"{sum(mine.values()) / mib:.1f} MiB (non-distributed: {sum(plain.values()) / mib:.1f} MiB, "
                f"Adam state {plain['optimizer'] / mib:.1f} MiB)")

    # ---- checkpoints (layout-independent form, see training/checkpointing.py) ----------------
    def step_count(self) -> torch.Tensor:
        states = [self.optimizer.state[pc.tensor]["step"] for pc in self._pieces()]
        return states[0] if states else torch.zeros(())

    def full_adam_state(self, gather: bool) -> dict:
        """{param: {"exp_avg": t, "exp_avg_sq": t}} with each tensor of the parameter's (TP-local)
        full shape. gather=True all-gathers the shards over the group (collective), so every rank
        temporarily holds the full 8N bytes; gather=False returns zeros of that shape (targets
        for loading)."""
        out = {p: {} for b in self.buckets for p in b.params}
        for b in self.buckets:
            for key in ADAM_KEYS:
                for p, tensor in self._full_of(b, b.state[key], gather).items():
                    out[p][key] = tensor
        return out

    def full_master_weights(self, gather: bool) -> dict:
        """{param: fp32 tensor of its (TP-local) full shape} for bf16 parameters: the master
        weights, all-gathered as full_adam_state gathers (gather=False: zeros, targets for loading)."""
        return {p: t for b in self.buckets if b.master is not None for p, t in self._full_of(b, b.master, gather).items()}

    def _full_of(self, bucket: _Bucket, shard: torch.Tensor, gather: bool) -> dict:
        """{param: its part of the whole bucket-length tensor whose shards are `shard` over the group}."""
        full = torch.zeros(bucket.grad_buffer.numel(), dtype=shard.dtype, device=shard.device)
        if gather and self.group_size > 1:
            dist.all_gather_into_tensor(full, shard, group=self.group)
        elif gather:
            full.copy_(shard)
        return {p: full[off:off + p.numel()].view_as(p) for p, off in zip(bucket.params, bucket.offsets)}

    def load_master_weights(self, full: dict) -> None:
        """This rank's master shards from full (TP-local) fp32 tensors {param: tensor}, exactly
        (the bf16 parameters themselves are the caller's to set)."""
        with torch.no_grad():
            for b in self.buckets:
                if b.master is None:
                    continue
                for p, off in zip(b.params, b.offsets):
                    start, end = max(off, b.lo), min(off + p.numel(), b.lo + b.shard_size)
                    if start < end:
                        b.master[start - b.lo:end - b.lo].copy_(full[p].reshape(-1)[start - off:end - off])

    def load_full_adam_state(self, full: dict, step: torch.Tensor) -> None:
        """Keep this rank's shard of full (TP-local) Adam states {param: {key: tensor}}."""
        with torch.no_grad():
            for b in self.buckets:
                for pc in b.pieces:
                    for key in ADAM_KEYS:
                        b.state[key][pc.shard].copy_(full[pc.param][key].reshape(-1)[pc.start:pc.end])
                    self.optimizer.state[pc.tensor]["step"].copy_(step)
