"""Predicted step time of a layout: compute at a stated fraction of peak, plus the communication
our implementation leaves exposed, plus the pipeline bubble. docs/planner.md states each
assumption; benchmarks/bench_plan_gpu.py measures the compute efficiency of our layers.

What is exposed, and why (our code, not Megatron-LM's):
- TP and CP collectives (parallel/mappings.py, parallel/context.py) are synchronous: 100% exposed.
- Pipeline p2p (torch.distributed.pipelining) waits before each chunk's compute: exposed.
- DP gradient all-reduce / reduce-scatter starts from backward hooks as buckets complete in the
  last micro-batch's backward (with PP: of the 1F1B/interleaved schedule) and overlaps it, except
  the last bucket. The distributed optimizer's parameter all-gather (planned with
  --overlap-param-gather) overlaps the next step's first forward, except the first bucket.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from megatron_code.model.config import ModelConfig
from megatron_code.plan.activations import document_kernel
from megatron_code.plan.hardware import GpuSpec
from megatron_code.plan.layout import Layout
from megatron_code.parallel.grads import cut_into_buckets, default_bucket_elements
from megatron_code.plan.memory import layer_parameter_sizes, rank_parameters, recompute_split
from megatron_code.training.flops import training_flops_per_token

FP32 = 4
BF16 = 2
INT64 = 8


@dataclass(frozen=True)
class TimeModelConfig:
    """Assumptions of the step-time model."""

    compute_efficiency: float = 0.55
    """Fraction of the dense peak that our layers' GEMMs and attention reach (measured for the 7B
    layer on one H200 by benchmarks/bench_plan_gpu.py; see docs/planner.md)."""
    link_efficiency: float = 0.75
    """Fraction of a link's bandwidth NCCL collectives and p2p reach (bus bandwidth / link)."""
    hbm_efficiency: float = 0.8
    """Fraction of HBM bandwidth the fused AdamW step and gradient clipping reach."""
    precision: str = "bf16"
    """bf16, or fp8 (the transformer layers' projection and MLP GEMMs run at the FP8 peak, at
    fp8_compute_efficiency)."""
    fp8_compute_efficiency: float = 0.39
    """Fraction of the FP8 dense peak the FP8 GEMMs reach, with their casts and scaling: what the
    measured FP8 / BF16 step ratios of the 7B shape on one GPU imply under this model (H200
    2026-11-27: 1.34x at 4096, 1.37x at 8192 -> 0.39, 0.41; H100 2026-11-26: 1.29x, 1.30x -> 0.38,
    0.39; docs/planner.md). At compute_efficiency they would give 1.7x."""
    loss_head_recompute: bool = False
    """The fused linear-cross-entropy head recomputes the logits in backward (8 N V h FLOPs
    instead of 6 N V h): where the loss weights are not known in the forward (DPO's per-token
    log-probs; evaluate() sets it for --training-mode dpo). The trainer's own loss gives them, and
    the head then makes its gradients in the forward (kernels/weighted_linear_cross_entropy.py)."""
    nvlink_ring_step_latency: float = 3.4e-6
    """Seconds each ring step of a collective costs besides its bytes between GPUs of one node,
    and network_ring_step_latency between nodes: NCCL's own tuning model for its ring algorithm
    and Simple protocol, the one large messages take (src/graph/tuning.cc hwLat: 3.4 and 9.6
    us; a ring reduce-scatter over G ranks on N nodes takes G - N NVLink steps and N - 1 network
    steps). What makes many small data-parallel buckets latency-bound at large G."""
    network_ring_step_latency: float = 9.6e-6
    """See nvlink_ring_step_latency."""
    ddp_bucket_size: int | None = None
    """The run's --ddp-bucket-size (gradient elements per data-parallel bucket); None: the
    trainer's default, grads.default_bucket_elements of the DP x CP size."""
    masked_attention_efficiency: float = 0.14
    """Fraction of the BF16 peak the masked attention kernel reaches on packed documents
    (document_attention 'mask': every block of the s x s scores, twice the causal FLOPs). H200,
    7B shape, 16 layers, seq 4096: the packed SFT step took 306.6 ms more than pretraining's,
    whose causal flash attention took 80 ms (traced): 52.8 TFLOP in ~387 ms (docs/planner.md)."""

    @property
    def gemm_efficiency(self) -> float:
        """Efficiency of the GEMMs that run in `precision`."""
        return self.fp8_compute_efficiency if self.precision == "fp8" else self.compute_efficiency


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds of one optimizer step, by where they go."""

    compute: float
    """All micro-batches' forward/backward (and recompute) GEMMs and attention, slowest stage."""
    tp_comm: float
    """Exposed tensor-parallel all-gathers/reduce-scatters (NVLink within a node)."""
    cp_comm: float
    """Exposed context-parallel K/V all-gathers (and their backward reduce-scatters)."""
    pp_comm: float
    """Exposed pipeline send/receive of activations and their gradients."""
    bubble: float
    """Pipeline fill and drain: (PP - 1) / VP micro-batch times."""
    dp_comm: float
    """Exposed gradient reduction over DP x CP (and the ZeRO-1 parameter all-gather)."""
    optimizer: float
    """Gradient norm, clipping and the AdamW update (HBM-bound)."""
    bubble_fraction: float
    """(PP - 1) / (VP x micro-batches), the bubble relative to the ideal compute time."""
    reference: float = 0.0
    """DPO: the frozen reference model's forward passes (reference_forward_seconds); 0 otherwise."""

    @property
    def step(self) -> float:
        return (self.compute + self.tp_comm + self.cp_comm + self.pp_comm + self.bubble + self.dp_comm
                + self.optimizer + self.reference)


def _link(gpu: GpuSpec, span: int) -> float:
    """Bytes/s of a group whose ranks span `span` consecutive ranks: NVLink inside a node, else the NIC."""
    return 1e9 * (gpu.intra_node_gb_per_s if span <= gpu.gpus_per_node else gpu.inter_node_gb_per_s)


def _ring(size: int) -> float:
    """Share of a tensor each rank sends in a ring all-gather or reduce-scatter over `size` ranks."""
    return (size - 1) / size


@dataclass(frozen=True)
class _Rank:
    """One pipeline rank's work per micro-batch."""

    gemm_flops: float
    attention_flops: float
    """Causal attention (flash kernels, varlen on packed documents: an upper bound there)."""
    masked_attention_flops: float
    """Attention through the masked kernel (packed documents on 'mask'): the full square."""
    fp8_flops: float
    tp_bytes: float
    cp_bytes: float


def _layer_flops(config: ModelConfig, seq_length: int) -> tuple[float, float]:
    """(projection + MLP, attention core) training FLOPs per token of one layer (flops.py's count)."""
    one_layer = config.replace(num_layers=1)
    total = training_flops_per_token(one_layer, seq_length, 0)
    gemm = training_flops_per_token(one_layer, 0, 0)
    return gemm, total - gemm


def _rank_work(config: ModelConfig, layout: Layout, seq_length: int, padded_vocab: int, tm: TimeModelConfig,
               first: bool, last: bool, document_attention: str | None = None) -> _Rank:
    tokens = layout.micro_batch_size * seq_length / layout.cp  # this rank's tokens
    chunk_layers = config.num_layers // (layout.pp * layout.vp)
    full = recompute_split(layout, chunk_layers)[0]
    recomputed = layout.vp * (chunk_layers - full)  # layers whose forward runs twice
    layers = config.num_layers // layout.pp
    gemm, attention = _layer_flops(config, seq_length)
    selective = layout.recompute_granularity == "selective"
    gemm_total = tokens / layout.tp * gemm * (layers + recomputed / 3)
    attention_total = tokens / layout.tp * attention * (layers + recomputed / 3 + (layers / 3 if selective else 0))
    logits = training_flops_per_token(config.replace(num_layers=0), seq_length, padded_vocab)
    logits_total = tokens / layout.tp * logits * (4 / 3 if tm.loss_head_recompute else 1) if last else 0.0
    h, a = config.hidden_size, BF16
    # SP per layer: 2 all-gathers of the norm output (cast to bf16 first: layers.gemm_input) and
    # 2 reduce-scatters of bf16 GEMM outputs forward, their adjoints (bf16 too) backward; a
    # recomputed layer repeats its forward ones.
    tp_layer = 2 * (a + a) * tokens * h * _ring(layout.tp)
    tp_bytes = tp_layer * (2 * layers + recomputed) + (first + last) * 2 * FP32 * tokens * h * _ring(layout.tp)
    kv = 2 * a * layout.micro_batch_size * seq_length * (config.num_kv_heads // layout.tp) * config.head_dim
    cp_bytes = kv * _ring(layout.cp) * (2 * layers + recomputed)
    masked = document_kernel(document_attention, layout.cp) == "mask"
    return _Rank(gemm_flops=gemm_total + logits_total, attention_flops=0.0 if masked else attention_total,
                 masked_attention_flops=2 * attention_total if masked else 0.0,
                 fp8_flops=gemm_total if tm.precision == "fp8" else 0.0, tp_bytes=tp_bytes, cp_bytes=cp_bytes)


def estimate_time(config: ModelConfig, layout: Layout, seq_length: int, global_batch_size: int,
                  padded_vocab: int, gpu: GpuSpec, tm: TimeModelConfig = TimeModelConfig(),
                  document_attention: str | None = None) -> TimeEstimate:
    """document_attention: the kernel packed documents run on (Execution.document_attention; under
    CP always the mask: activations.document_kernel), None without packed documents.
    Varlen kernels are charged the causal count over the whole row, an upper bound: documents
    shorter than the row attend to fewer keys."""
    m = layout.micro_batches(global_batch_size)
    bf16_peak = 1e12 * gpu.bf16_tflops * tm.compute_efficiency
    gemm_peak = 1e12 * gpu.peak_tflops(tm.precision) * tm.gemm_efficiency
    masked_peak = 1e12 * gpu.bf16_tflops * tm.masked_attention_efficiency
    ranks = [_rank_work(config, layout, seq_length, padded_vocab, tm, r == 0, r == layout.pp - 1, document_attention)
             for r in range(layout.pp)]
    tp_bw = _link(gpu, layout.tp) * tm.link_efficiency
    cp_bw = _link(gpu, layout.tp * layout.cp) * tm.link_efficiency

    def seconds(r: _Rank) -> tuple[float, float, float]:
        compute = (r.fp8_flops / gemm_peak + (r.gemm_flops - r.fp8_flops) / bf16_peak
                   + r.attention_flops / bf16_peak + r.masked_attention_flops / masked_peak)
        return compute, r.tp_bytes / tp_bw, r.cp_bytes / cp_bw

    slowest = max((seconds(r) for r in ranks), key=sum)
    per_micro_batch = sum(slowest)
    bubble_fraction = (layout.pp - 1) / (layout.vp * m)
    return TimeEstimate(
        compute=m * slowest[0], tp_comm=m * slowest[1], cp_comm=m * slowest[2],
        pp_comm=_pipeline_p2p(config, layout, seq_length, m, gpu, tm), bubble=bubble_fraction * m * per_micro_batch,
        dp_comm=_data_parallel(config, layout, padded_vocab, gpu, tm, compute=slowest[0]),
        optimizer=_optimizer(config, layout, padded_vocab, gpu, tm), bubble_fraction=bubble_fraction)


def fp8_efficiency_for_speedup(config: ModelConfig, layout: Layout, seq_length: int, global_batch_size: int,
                               padded_vocab: int, gpu: GpuSpec, speedup: float,
                               tm: TimeModelConfig = TimeModelConfig()) -> float | None:
    """The fp8_compute_efficiency under which this model predicts `speedup` (BF16 step time / FP8
    step time) for this run: how a measured pair of steps refits the default (gpu_check prints
    it). None when no efficiency in (0, 1] gives that speedup."""
    def step(precision: str, efficiency: float = tm.fp8_compute_efficiency) -> float:
        return estimate_time(config, layout, seq_length, global_batch_size, padded_vocab, gpu,
                             replace(tm, precision=precision, fp8_compute_efficiency=efficiency)).step

    target = step("bf16") / speedup
    low, high = 1e-3, 1.0  # the FP8 step shrinks as the efficiency grows
    if not step("fp8", high) <= target <= step("fp8", low):
        return None
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if step("fp8", middle) > target else (low, middle)
    return (low + high) / 2


def reference_forward_seconds(config: ModelConfig, layout: Layout, seq_length: int, global_batch_size: int,
                              padded_vocab: int, gpu: GpuSpec, tm: TimeModelConfig = TimeModelConfig()) -> float:
    """DPO's reference model: one forward per micro-batch (no_grad: no recompute, no backward) in
    the layout of the policy (TP x DP, no PP or CP): a third of the training FLOPs (its unfused
    loss-head count: the fused head recomputes only in backward) and the forward half of the TP
    collectives, all exposed like the policy's."""
    plain = Layout(layout.tp, 1, 1, 1, layout.dp, layout.micro_batch_size, layout.distributed_optimizer)
    work = _rank_work(config, plain, seq_length, padded_vocab, replace(tm, loss_head_recompute=False), True, True)
    bf16_peak = 1e12 * gpu.bf16_tflops * tm.compute_efficiency
    gemm_peak = 1e12 * gpu.peak_tflops(tm.precision) * tm.gemm_efficiency
    compute = (work.fp8_flops / gemm_peak + (work.gemm_flops - work.fp8_flops + work.attention_flops) / bf16_peak) / 3
    tp_comm = work.tp_bytes / 2 / (_link(gpu, layout.tp) * tm.link_efficiency)
    return layout.micro_batches(global_batch_size) * (compute + tp_comm)


def _pipeline_p2p(config: ModelConfig, layout: Layout, seq_length: int, m: int, gpu: GpuSpec,
                  tm: TimeModelConfig) -> float:
    """Each chunk micro-batch receives its input forward and its output's gradient backward:
    hidden [s/(CP TP), b, h] fp32 (+ int64 position and segment ids forward), on the critical
    path (m VP + PP - 1) times."""
    if layout.pp == 1:
        return 0.0
    tokens = layout.micro_batch_size * seq_length // layout.cp
    hidden = FP32 * tokens // layout.tp * config.hidden_size
    ids = INT64 * (tokens + layout.micro_batch_size * seq_length)
    bandwidth = _link(gpu, layout.tp * layout.cp * layout.dp + 1) * tm.link_efficiency
    return (m * layout.vp + layout.pp - 1) * (2 * hidden + ids) / bandwidth


def _largest_rank_parameters(config: ModelConfig, layout: Layout, padded_vocab: int) -> int:
    layers = config.num_layers // layout.pp
    return max(rank_parameters(config, layout.tp, layers, r == 0, r == layout.pp - 1, padded_vocab)
               for r in range(layout.pp))


def _data_parallel(config: ModelConfig, layout: Layout, padded_vocab: int, gpu: GpuSpec, tm: TimeModelConfig,
                   compute: float) -> float:
    """fp32 gradients summed over the DP x CP group G in buckets of default_bucket_elements(G)
    (the trainer's): a ring all-reduce per bucket (a reduce-scatter and an all-gather, 2 (G-1)/G of
    the bytes), or with ZeRO-1 a reduce-scatter, then the updated parameters' all-gather ((G-1)/G
    each); every ring pass also pays its steps' latency. `compute`: one micro-batch's forward +
    backward on the slowest rank (a third forward)."""
    group = layout.dp * layout.cp
    if group == 1:
        return 0.0
    elements = _largest_rank_parameters(config, layout, padded_vocab)
    bandwidth = _link(gpu, layout.tp * layout.cp * layout.dp) * tm.link_efficiency
    latency = ring_latency(group, max(1, gpu.gpus_per_node // layout.tp), tm)
    buckets = first_stage_buckets(config, layout, padded_vocab, tm.ddp_bucket_size or default_bucket_elements(group))
    passes = 1 if layout.distributed_optimizer else 2  # an all-reduce is a reduce-scatter + an all-gather
    # The bucket that cannot overlap: backward's last, forward's first (it holds the embedding).
    edge = _ring(group) * FP32 * buckets[-1] / bandwidth + latency
    reduce = passes * (_ring(group) * FP32 * elements / bandwidth + len(buckets) * latency)
    # overlapped with the last micro-batch's backward
    reduce = max(reduce - 2 / 3 * compute, passes * edge)
    if not layout.distributed_optimizer:
        return reduce
    # launched in forward order after the step; each layer waits only for its own bucket. bf16
    # parameters gather 2 bytes each (their fp32 master weights stay sharded).
    share = BF16 / FP32 if layout.bf16_params else 1.0
    gather_bytes = _ring(group) * share * FP32 * elements / bandwidth
    gather = max(gather_bytes + len(buckets) * latency - compute / 3, share * (edge - latency) + latency)
    return reduce + gather


def ring_latency(group: int, per_node: int, tm: TimeModelConfig) -> float:
    """The steps' latency of one ring reduce-scatter or all-gather over `group` ranks placed
    `per_node` to a node (TimeModelConfig.nvlink_ring_step_latency)."""
    nodes = -(-group // per_node)
    return (group - nodes) * tm.nvlink_ring_step_latency + (nodes - 1) * tm.network_ring_step_latency


def first_stage_buckets(config: ModelConfig, layout: Layout, padded_vocab: int, bucket_elements: int) -> list[int]:
    """Elements of each gradient bucket of the first pipeline rank, in the order backward fills
    them (the trainer's rule, grads.cut_into_buckets: reverse definition order, closed at bucket_elements);
    the last holds the embedding."""
    sizes = layer_parameter_sizes(config, layout.tp) * (config.num_layers // layout.pp)
    embedding = padded_vocab // layout.tp * config.hidden_size
    sizes = [embedding] + sizes
    if layout.pp == 1:  # the final norm and the output layer too
        sizes += [config.hidden_size] + [embedding] * config.untie_embeddings_and_output_weights
    backward = sizes[::-1]
    return [sum(backward[i] for i in group) for group in cut_into_buckets(backward, bucket_elements)]


def _optimizer(config: ModelConfig, layout: Layout, padded_vocab: int, gpu: GpuSpec, tm: TimeModelConfig) -> float:
    """The gradient norm reads every gradient (4 bytes per element); the fused AdamW step reads
    parameter, gradient and both moments and writes three of them (28), clipping inside it
    (parallel/grads.py clip_in_optimizer_step): 32 bytes per element of the local shard. (The bf16
    weight copies TritonAdamW writes, 2 bytes per GEMM weight, replace the next step's casts,
    which this model does not count either.)"""
    shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    elements = _largest_rank_parameters(config, layout, padded_vocab) / shards
    return 32 * elements / (1e12 * gpu.hbm_tb_per_s * tm.hbm_efficiency)


def model_flops_per_step(config: ModelConfig, seq_length: int, global_batch_size: int, padded_vocab: int) -> float:
    """Megatron's model FLOPs of one step (no recompute, unfused logits): what MFU counts."""
    return training_flops_per_token(config, seq_length, padded_vocab) * seq_length * global_batch_size

