"""The parallelism planner: its CLI ranks valid, fitting layouts; its memory model matches hand
computation, the models it describes, the bytes autograd saves and a real training step."""
import dataclasses
import json
import os

import pytest
import torch

from megatron_code.model import GPTModel
from megatron_code.model.config import ModelConfig
from megatron_code.model.fp8 import enable_fp8
from megatron_code.model.gpt import TransformerLayer
from megatron_code.model.rope import RotaryEmbedding
from megatron_code.parallel.state import ParallelState
from megatron_code.plan import activations as act
from megatron_code.plan.cli import main
from megatron_code.plan.layout import Layout, check_layout
from megatron_code.plan.measure import StepMemoryProbe
from megatron_code.plan.search import PlanRequest, evaluate, layout_memory, plan
from megatron_code.plan.memory import Execution, in_flight_micro_batches, rank_memory, rank_parameters
from megatron_code.plan.timing import (TimeModelConfig, estimate_time, first_stage_buckets, fp8_efficiency_for_speedup,
                                       ring_latency)
from megatron_code.plan.hardware import GPUS, gpu_for_device
from megatron_code.presets import get_preset
from megatron_code.training.arguments import run_config_from_values
from megatron_code.training.flops import training_flops_per_token
from megatron_code.tokenizer import SentencePieceTokenizer
from megatron_code.training.memory_forecast import forecast, memory_forecast
from megatron_code.training.profile_report import planner_peak_gib
from megatron_code.training.trainer import startup_memory_forecast, train
from tests.conftest import TOKENIZER, tiny_run

SEVEN_B = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                      group_query_attention=True, num_query_groups=8, vocab_size=49152,
                      untie_embeddings_and_output_weights=True, max_position_embeddings=131072)


def test_cli_ranks_valid_fitting_7b_layouts_for_512_h100s(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["--preset", "7b", "--gpus", "512", "--gpu", "h100-sxm", "--seq-length", "4096", "--top", "5",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "TP PP VP CP" in printed and "recommended (rank 1):" in printed
    assert len([line for line in printed.splitlines() if line[:3].strip().isdigit()]) == 5
    record = json.loads(out.read_text())
    candidates = record["candidates"]
    steps = [c["time_s"]["step"] for c in candidates]
    assert len(candidates) > 100 and steps == sorted(steps)
    model = run_config_from_values({**get_preset("7b"), "vocab_size": 49152}).model
    for c in candidates:
        layout = Layout(**c["layout"])
        assert layout.gpus == 512
        check_layout(layout, model, 4096, 1024)  # raises if the trainer would refuse it
        assert c["memory_bytes"]["total"] <= record["request"]["memory_budget_bytes"]
    assert " ".join(candidates[0]["train_flags"]) in printed


@pytest.mark.parametrize("argv, message", [
    (["--preset", "13b", "--gpus", "8"], "unknown preset"),
    (["--preset", "7b", "--gpus", "0"], "--gpus must be positive"),
    # An explicit 0 used to be taken as "not given" and silently replaced by the preset's value.
    (["--preset", "7b", "--gpus", "8", "--seq-length", "0"], "--seq-length must be positive, got 0"),
    (["--preset", "7b", "--gpus", "8", "--global-batch-size", "0"], "--global-batch-size must be positive, got 0"),
    (["--preset", "7b", "--gpus", "8", "--seq-length", "262144"], "exceeds the 7b preset's max_position_embeddings"),
    (["--preset", "7b", "--gpus", "8", "--gpu", "a100", "--precision", "fp8"], "no FP8 tensor cores"),
    (["--preset", "7b", "--gpus", "8", "--gpu", "b300"], "unknown GPU"),
    (["--preset", "7b", "--gpus", "8", "--precision", "fp8", "--fp8-compute-efficiency", "1.5"],
     "--fp8-compute-efficiency must be in (0, 1]"),
])
def test_cli_rejects_bad_input_before_searching(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_says_when_nothing_fits(capsys):
    assert main(["--preset", "7b", "--gpus", "1", "--seq-length", "4096", "--global-batch-size", "1"]) == 1
    assert "No layout fits" in capsys.readouterr().out


def test_cli_says_why_no_layout_is_valid_and_which_batch_size_would_be(capsys):
    """7 GPUs: TP and CP are powers of two and PP must divide 32 layers, so DP is 7, which divides
    no micro-batch multiple of 1024. The report gives the trainer's reason, not "nothing fits",
    and the nearest batch that works; with it, the planner finds layouts."""
    assert main(["--preset", "7b", "--gpus", "7", "--seq-length", "4096"]) == 1
    out = capsys.readouterr().out
    assert "No layout fits" not in out
    assert "No valid layout: the trainer would refuse all 8 searched layouts (1 kind of reason)" in out
    assert ("TP1 PP1 CP1 DP7 mb1 ZeRO-1: --global-batch-size (1024) must be divisible by --micro-batch-size (1) "
            "x data-parallel size (7).") in out
    assert "Nearest global batch size the trainer accepts on 7 GPUs: --global-batch-size 1022" in out
    assert main(["--preset", "7b", "--gpus", "7", "--seq-length", "4096", "--global-batch-size", "1022"]) == 0
    assert "recommended (rank 1)" in capsys.readouterr().out


def test_7b_tp8_state_bytes_match_hand_computation():
    # Per TP8 rank: a layer's QKV (4096 x 128 x (32 + 16)) + proj (4096 x 4096) + MLP (3 x 4096 x 14336)
    # = 218,103,808 / 8 = 27,262,976, plus two replicated norms (8,192): 27,271,168; x 32 layers =
    # 872,677,376; embedding and output layer 49,152 x 4096 / 8 = 25,165,824 each; final norm 4,096.
    params = 872_677_376 + 2 * 25_165_824 + 4_096
    assert params == 923_013_120
    assert rank_parameters(SEVEN_B, 8, 32, True, True, SEVEN_B.padded_vocab_size(8)) == params
    plain = rank_memory(SEVEN_B, Layout(8, 1, 1, 1, 64, 1, False), 4096, 64, 0, 49152, Execution())
    assert (plain.weights, plain.grads, plain.optimizer) == (4 * params, 4 * params, 8 * params)
    zero1 = rank_memory(SEVEN_B, Layout(8, 1, 1, 1, 64, 1, True), 4096, 64, 0, 49152, Execution())
    # ZeRO-1 over 64 ranks: fp32 weights and gradient buffer stay whole (the reduce-scatter writes
    # the reduced 1/64 shard in place); Adam's two fp32 moments are sharded.
    assert (zero1.weights, zero1.grads, zero1.optimizer) == (3_692_052_480, 3_692_052_480, 115_376_640)


def test_step_weight_copies_replace_autocasts_per_micro_batch_copies():
    """--gradient-accumulation-fusion holds one bf16 copy of every layer weight for the step:
    the same bytes as autocast's without pipelining or recompute; 1F1B's in-flight micro-batches
    then stop multiplying them, and recompute stops saving them. The fused loss head reads the
    output weight's step copy too and adds its gradient into .grad: no fp32 gradient temporary."""
    gemm_bytes = 2 * 218_103_808 // 8  # one 7B layer's linear weights on a TP8 rank, in bf16
    output_grad_temporary = 4 * 49152 * 4096 // 8  # fp32 [V / TP, h]

    def activations(layout, step_copies):
        return rank_memory(SEVEN_B, layout, 4096, 64, 0, 49152, Execution(step_weight_copies=step_copies)).activations

    plain = Layout(8, 1, 1, 1, 8, 1, False)
    assert activations(plain, False) - activations(plain, True) == output_grad_temporary
    pp4 = Layout(8, 4, 1, 1, 2, 1, False)  # stage 0 holds 4 micro-batches in flight, 8 layers
    assert activations(pp4, False) - activations(pp4, True) == (4 - 1) * 8 * gemm_bytes
    recompute = Layout(8, 1, 1, 1, 1, 1, False, "full", "uniform", 1)
    assert activations(recompute, True) > activations(recompute, False)


@pytest.mark.parametrize("tp, pp, stage", [(1, 1, 0), (2, 1, 0), (2, 2, 0), (2, 2, 1), (4, 4, 2)])
def test_rank_parameters_count_what_the_model_builds(tp, pp, stage):
    config = ModelConfig(num_layers=8, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
                         group_query_attention=True, num_query_groups=4, vocab_size=300,
                         untie_embeddings_and_output_weights=True)
    per_stage = config.num_layers // pp
    model = GPTModel(config, ParallelState(tp=tp), layer_indices=range(stage * per_stage, (stage + 1) * per_stage),
                     pre_process=stage == 0, post_process=stage == pp - 1)
    built = sum(p.numel() for p in model.parameters())
    assert rank_parameters(config, tp, per_stage, stage == 0, stage == pp - 1, config.padded_vocab_size(tp)) == built


def saved_activation_bytes(config: ModelConfig, tp: int, bf16: bool, seq: int = 64, batch: int = 2) -> int:
    """Bytes of the distinct storages one layer saves for backward (parameters, their autocast
    copies, the shared RoPE tables and FP8 scales excluded), as one TP rank of a single-process
    layer fed the residual stream in the dtype the embedding gives it."""
    layer = TransformerLayer(config, ParallelState(tp=tp))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if config.fp8_format:
        enable_fp8(torch.nn.ModuleDict({"0": layer}), config)
    residual_dtype = torch.bfloat16 if bf16 and not config.fp32_residual_connection else torch.float32
    x = torch.randn(seq, batch, config.hidden_size, dtype=residual_dtype, requires_grad=True)
    cos, sin = RotaryEmbedding(config)(torch.arange(seq).expand(batch, seq))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", enabled=bf16):
        layer(x, cos, sin)
    skip = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), cos, sin)}
    # FP8 layers cast their weights outside autocast and keep them outside save_for_backward.
    gemm_copies = 2 * sum(p.numel() for p in layer.parameters() if p.dim() > 1) if bf16 and not config.fp8_format else 0
    scales = sum(n for n, dtype in saved.values() if n == 4 and dtype == torch.float32)  # FP8: scale_inv
    return sum(n for ptr, (n, _) in saved.items() if ptr not in skip) - gemm_copies - scales * bool(config.fp8_format)


@pytest.mark.parametrize("bf16, fp32_residual", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("recompute", [None, "selective"])
def test_layer_formula_equals_bytes_autograd_saves(bf16, fp32_residual, tp, recompute):
    config = ModelConfig(num_layers=1, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4,
                         group_query_attention=True, num_query_groups=2, vocab_size=256,
                         recompute_granularity=recompute, rmsnorm_impl="reference", rope_impl="reference",
                         swiglu_impl="reference", fp32_residual_connection=fp32_residual)
    mb = act.MicroBatch(2, 64, tensor_parallel=tp, bf16=bf16, fused_kernels=False, fp32_residual=fp32_residual)
    assert saved_activation_bytes(config, tp, bf16) == act.layer_bytes(config, mb, recompute_core=recompute is not None)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_fp8_layer_formula_equals_bytes_autograd_saves(bf16, tp):
    """FP8 linears (torch backend) keep their inputs as FP8 transposes, and the SwiGLU gate_up."""
    config = ModelConfig(num_layers=1, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4,
                         group_query_attention=True, num_query_groups=2, vocab_size=256, rmsnorm_impl="reference",
                         rope_impl="reference", swiglu_impl="reference", fp8_format="hybrid")
    mb = act.MicroBatch(2, 64, tensor_parallel=tp, bf16=bf16, fused_kernels=False, fp8=True)
    assert saved_activation_bytes(config, tp, bf16) == act.layer_bytes(config, mb)
    assert act.layer_bytes(config, mb) < act.layer_bytes(config, dataclasses.replace(mb, fp8=False))


def test_in_flight_micro_batches_give_korthikanti_interleaving_factor():
    for pp, vp in [(2, 2), (4, 2), (4, 4), (8, 3)]:
        m = 4 * pp
        layout = Layout(1, pp, vp, 1, 1, 1, False)
        chunk_layers = 1  # in units of one chunk's activations: L / (PP VP) layers
        first_rank = in_flight_micro_batches(layout, m, 0) * chunk_layers
        # (L / p) layers x p micro-batches x (1 + (p - 1) / (p v)), with L = p v chunk layers
        assert first_rank == pytest.approx(vp * pp * (1 + (pp - 1) / (pp * vp)))
    plain = Layout(1, 4, 1, 1, 1, 1, False)
    assert [in_flight_micro_batches(plain, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_micro_batches(plain, 2, 0) == 2  # never more than the micro-batches


def test_time_model_bubble_and_mfu_are_consistent():
    layout = Layout(4, 4, 2, 1, 32, 1, True)
    time = estimate_time(SEVEN_B, layout, 4096, 256, 49152, GPUS["h100-sxm"], TimeModelConfig())
    m = 256 // 32
    assert time.bubble_fraction == pytest.approx(3 / (2 * m))
    assert time.cp_comm == 0 and time.tp_comm > 0 and time.pp_comm > 0
    single = estimate_time(SEVEN_B, Layout(1, 1, 1, 1, 1, 1, False), 4096, 1, 49152, GPUS["h100-sxm"],
                           TimeModelConfig(compute_efficiency=1.0))
    # one GPU, no communication: compute time = Megatron's FLOPs / peak
    flops = training_flops_per_token(SEVEN_B, 4096, 49152) * 4096
    assert single.compute == pytest.approx(flops / 989e12)
    # DPO's fused head recomputes the logits in backward: one more 2 N V h GEMM
    recomputing = estimate_time(SEVEN_B, Layout(1, 1, 1, 1, 1, 1, False), 4096, 1, 49152, GPUS["h100-sxm"],
                                TimeModelConfig(compute_efficiency=1.0, loss_head_recompute=True))
    assert recomputing.compute - single.compute == pytest.approx(2 * 4096 * 49152 * 4096 / 989e12)
    assert single.tp_comm == single.dp_comm == single.pp_comm == single.bubble == 0


@pytest.mark.parametrize("micro_batch", [4, 8])
def test_zero1_parameter_gather_is_hidden_behind_the_next_forward(micro_batch):
    """ZeRO-1 is planned with --overlap-param-gather: its parameter all-gather costs what the next
    step's first forward (a third of a micro-batch's compute) leaves uncovered, and at least its
    first bucket, the embedding's; the gradient reduction what the last backward leaves. Each
    ring pass over a bucket also pays its steps' latency."""
    zero1 = Layout(4, 1, 1, 1, 128, micro_batch, True)
    assert "--overlap-param-gather" in zero1.train_flags(1024) and zero1.parallel_config().overlap_param_gather
    args = (SEVEN_B, 4096, 1024, 49152, GPUS["h100-sxm"], TimeModelConfig())
    time, plain = estimate_time(SEVEN_B, zero1, *args[1:]), estimate_time(
        SEVEN_B, dataclasses.replace(zero1, distributed_optimizer=False), *args[1:])
    ring, link = 127 / 128, 50e9 * 0.75  # 512 ranks: InfiniBand
    # DP 128 at TP 4: 2 ranks of the group per node, 64 nodes: 64 NVLink steps and 63 network steps
    latency = 64 * 3.4e-6 + 63 * 9.6e-6
    assert ring_latency(128, 2, TimeModelConfig()) == pytest.approx(latency)
    buckets = first_stage_buckets(SEVEN_B, zero1, 49152, 128_000_000)  # Megatron's max(40M, 1M x 128)
    assert sum(buckets) == rank_parameters(SEVEN_B, 4, 32, True, True, 49152) and len(buckets) == 14
    grads = ring * 4 * sum(buckets) / link + len(buckets) * latency
    edge = ring * 4 * buckets[-1] / link + latency
    compute = time.compute / zero1.micro_batches(1024)
    reduce, gather = (max(grads - 2 / 3 * compute, edge), max(grads - compute / 3, edge))
    assert time.dp_comm == pytest.approx(reduce + gather)
    assert plain.dp_comm == pytest.approx(max(2 * grads - 2 / 3 * compute, 2 * edge))
    if micro_batch == 8:  # one micro-batch of 8 samples covers both: only the embedding's bucket shows
        assert time.dp_comm == pytest.approx(2 * edge)


def test_a_run_bucket_size_is_planned_and_passed_on(capsys):
    """--ddp-bucket-size: 25 MB of fp32 (the trainer's size until 2026-11-28) cuts the 7B at TP 2
    into 130 buckets, Megatron's default for G = 256 into 14, and 130 ring passes of latency make
    the TP 2 layout slower; the recommended command carries the flag."""
    tp2 = Layout(2, 1, 1, 1, 256, 4, True, bf16_params=True)
    assert len(first_stage_buckets(SEVEN_B, tp2, 49152, 6_553_600)) == 130
    assert len(first_stage_buckets(SEVEN_B, tp2, 49152, 256_000_000)) == 14
    request = PlanRequest(model=SEVEN_B, gpus=512, gpu=GPUS["h100-sxm"], seq_length=4096, global_batch_size=1024)
    small, default = (evaluate(request, tp2, TimeModelConfig(ddp_bucket_size=n)).time for n in (6_553_600, None))
    latency = ring_latency(256, 4, TimeModelConfig())
    assert latency == pytest.approx(192 * 3.4e-6 + 63 * 9.6e-6)  # 1.26 ms: 4 ranks of the group per node, 64 nodes
    assert small.dp_comm - default.dp_comm > (130 - 14) * latency  # at least the extra reduce-scatter passes
    assert main(["--preset", "7b", "--gpus", "64", "--seq-length", "4096", "--ddp-bucket-size", "6553600",
                 "--top", "1"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("--ddp-bucket-size 6553600")
    assert main(["--preset", "7b", "--gpus", "64", "--ddp-bucket-size", "0"]) == 2
    assert "--ddp-bucket-size must be positive, got 0" in capsys.readouterr().err


def test_planned_buckets_follow_the_trainers_bucketing():
    """Two layers (h 8, ffn 16, 2 heads / 1 KV group of 4, vocab 32), buckets closed at 300
    elements in backward order: output 256 + final norm 8 + down 128 = 392; gate/up 256 + norm 8
    + proj 64 = 328; qkv 128 + norm 8 + the first layer's down 128 + gate/up 256 = 520; its norm 8
    + proj 64 + qkv 128 + norm 8 + embedding 256 = 464. With PP 2 the first stage holds the
    embedding and one layer: 128 + 256 = 384, then 8 + 64 + 128 + 8 + 256 = 464."""
    toy = ModelConfig(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                      group_query_attention=True, num_query_groups=1, max_position_embeddings=64,
                      vocab_size=32, untie_embeddings_and_output_weights=True)
    assert first_stage_buckets(toy, Layout(1, 1, 1, 1, 2, 1, False), 32, 300) == [392, 328, 520, 464]
    assert first_stage_buckets(toy, Layout(1, 2, 1, 1, 1, 1, False), 32, 300) == [384, 464]


def test_zero1_under_bf16_is_planned_with_bf16_parameters():
    """The search gives every ZeRO-1 layout under bf16 bf16 parameters (sharded fp32 master
    weights, never worse): 2 + 4 + 12/G bytes per parameter, no per-step bf16 weight copies,
    half the parameter all-gather, and --params-dtype bfloat16 in its flags."""
    request = PlanRequest(model=SEVEN_B, gpus=512, gpu=GPUS["h100-sxm"], seq_length=4096, global_batch_size=1024)
    zero1 = Layout(2, 1, 1, 1, 256, 4, True, bf16_params=True)
    assert zero1.train_flags(1024)[-2:] == ["--params-dtype", "bfloat16"]
    assert all(c.layout.bf16_params == c.layout.distributed_optimizer for c in plan(request).candidates[:50])
    fp32_params = dataclasses.replace(zero1, bf16_params=False)
    ours, before = evaluate(request, zero1, TimeModelConfig()), evaluate(request, fp32_params, TimeModelConfig())
    params = rank_parameters(SEVEN_B, 2, 32, True, True, 49152)
    assert (ours.memory.weights, ours.memory.grads, ours.memory.optimizer) == (
        2 * params, 4 * params, 12 * params // 256)
    copies = 2 * 32 * act_gemm_parameters(2) + 2 * 49152 // 2 * 4096  # the layers' and the loss head's
    assert before.memory.activations - ours.memory.activations == copies
    link, forward = 50e9 * 0.75, ours.time.compute / zero1.micro_batches(1024) / 3
    buckets = first_stage_buckets(SEVEN_B, zero1, 49152, 256_000_000)
    latency = ring_latency(256, 4, TimeModelConfig())  # the steps' latency does not shrink with the bytes
    gather, edge = (255 / 256 * 4 * n / link for n in (params, buckets[-1]))  # fp32 bytes
    gathers = len(buckets) * latency
    assert before.time.dp_comm - ours.time.dp_comm == pytest.approx(
        max(gather + gathers - forward, edge + latency) - max(gather / 2 + gathers - forward, edge / 2 + latency),
        rel=1e-6)


def act_gemm_parameters(tp: int) -> int:
    from megatron_code.plan.memory import layer_parameters
    return layer_parameters(SEVEN_B, tp).gemm


def test_fp8_gemms_run_at_the_fp8_efficiency_and_give_the_measured_speedup():
    """FP8 GEMMs at fp8_compute_efficiency x the FP8 peak, the rest at compute_efficiency x BF16;
    the default reproduces the FP8 / BF16 step ratio measured on one H200 (7B shape, 16 layers,
    4 micro-batches of one 4096-token sequence, 2026-11-27: 703.8 / 527.1 ms = 1.34x)."""
    one_gpu, h200 = Layout(1, 1, 1, 1, 1, 1, False), GPUS["h200"]
    cut = SEVEN_B.replace(num_layers=16)

    def compute(**tm):
        return estimate_time(cut, one_gpu, 4096, 4, 49152, h200, TimeModelConfig(**tm)).compute
    # With G the FP8-able GEMM FLOPs: bf16 - fp8 = G (1/(0.55 P16) - 1/(0.39 P8)), and lowering the
    # FP8 efficiency to 0.2 adds G/P8 (1/0.2 - 1/0.39), the rest unchanged.
    bf16, fp8, slower = compute(), compute(precision="fp8"), compute(precision="fp8", fp8_compute_efficiency=0.2)
    gemm_flops = (bf16 - fp8) / (1 / (0.55 * 989e12) - 1 / (0.39 * 1979e12))
    assert slower - fp8 == pytest.approx(gemm_flops / 1979e12 * (1 / 0.2 - 1 / 0.39), rel=1e-9)
    step = {p: estimate_time(cut, one_gpu, 4096, 4, 49152, h200, TimeModelConfig(precision=p)).step
            for p in ("bf16", "fp8")}
    assert step["bf16"] / step["fp8"] == pytest.approx(703.8 / 527.1, rel=0.05)


def test_a_measured_fp8_speedup_gives_back_the_efficiency_that_predicts_it():
    one_gpu, h100 = Layout(1, 1, 1, 1, 1, 1, False), GPUS["h100-sxm"]
    args = (SEVEN_B.replace(num_layers=12), one_gpu, 4096, 4, 49152, h100)
    predicted = (estimate_time(*args, TimeModelConfig()).step
                 / estimate_time(*args, TimeModelConfig(precision="fp8", fp8_compute_efficiency=0.3)).step)
    assert fp8_efficiency_for_speedup(*args, predicted) == pytest.approx(0.3, rel=1e-6)
    assert fp8_efficiency_for_speedup(*args, 5.0) is None  # more than FP8 at its full peak gives


def test_gpu_check_prints_the_fp8_efficiency_its_measured_steps_imply():
    """From the recorded H200 run of 2026-11-27 (16 layers): 703.8 / 527.1 ms at 4096 tokens."""
    from benchmarks.gpu_check import fp8_refit_lines

    results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
    recorded = json.load(open(os.path.join(results, "2026-11-27_h200_gpu_check_phase1.json")))
    lines = fp8_refit_lines(recorded["device"], recorded["layers"], recorded["ours"])
    assert lines[0].startswith("planner, seq 4096: FP8/BF16 1.33x at fp8_compute_efficiency 0.39; measured 1.34x")
    assert lines[0].endswith("implies 0.391") and len(lines) == 2


@pytest.mark.parametrize("name, key", [("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"),
                                       ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
                                       ("NVIDIA GeForce RTX 4090", None)])
def test_cuda_device_names_map_to_the_planners_gpus(name, key):
    assert gpu_for_device(name) == (GPUS[key] if key else None)


def test_masked_document_attention_is_charged_the_full_square_at_the_masked_kernels_rate():
    """Packed documents on the mask kernel: twice the causal attention FLOPs at
    masked_attention_efficiency; varlen kernels: the causal count (an upper bound), as unpacked;
    under CP packed documents always take the mask."""
    tm = TimeModelConfig(compute_efficiency=0.5, masked_attention_efficiency=0.1)
    one_gpu, gpu = Layout(1, 1, 1, 1, 1, 1, False), GPUS["h100-sxm"]
    times = {kernel: estimate_time(SEVEN_B, one_gpu, 4096, 4, 49152, gpu, tm, kernel)
             for kernel in (None, "varlen", "varlen-repeat-kv", "mask")}
    assert times[None] == times["varlen"] == times["varlen-repeat-kv"]
    attention = 4 * 4096 * SEVEN_B.num_layers * (training_flops_per_token(SEVEN_B.replace(num_layers=1), 4096, 0)
                                                 - training_flops_per_token(SEVEN_B.replace(num_layers=1), 0, 0))
    extra = 2 * attention / (0.1 * 989e12) - attention / (0.5 * 989e12)
    assert times["mask"].compute - times[None].compute == pytest.approx(extra)
    with_cp = Layout(1, 1, 1, 2, 1, 1, False)
    assert (estimate_time(SEVEN_B, with_cp, 4096, 4, 49152, gpu, tm, "varlen").compute
            == estimate_time(SEVEN_B, with_cp, 4096, 4, 49152, gpu, tm, "mask").compute
            > estimate_time(SEVEN_B, with_cp, 4096, 4, 49152, gpu, tm, None).compute)


@pytest.mark.parametrize("recompute", [{}, dict(recompute_granularity="full", recompute_method="uniform",
                                                recompute_num_layers=1)])
def test_predicted_peak_matches_a_real_cpu_training_step(fixture_data, recompute):
    """One process, fp32, plain-torch kernels: predicted peak tensor bytes within 5% of the live
    tensor bytes measured over the second training step (docs/planner.md has the other layouts)."""
    values = cpu_step_values(fixture_data, 128, recompute)
    measured, predicted = measured_step(values), predicted_step(values, recompute)
    assert (measured["weights"], measured["optimizer"]) == (predicted.weights, predicted.optimizer)
    assert measured["grads"] == pytest.approx(predicted.grads, rel=1e-3)
    assert predicted.total == pytest.approx(measured["peak_before_step"], rel=0.05)


def test_predicted_bf16_parameter_peak_matches_a_real_cpu_training_step(fixture_data):
    """--params-dtype bfloat16 under ZeRO-1: bf16 weights, fp32 gradients and master weights as
    optimizer state, exactly as the planner counts them (Megatron-LM's 2 + 4 + 12 bytes per
    parameter on one rank), and the peak within 5%."""
    values = cpu_step_values(fixture_data, 128, dict(bf16=True, use_distributed_optimizer=True,
                                                     params_dtype="bfloat16"))
    cfg = run_config_from_values(values)
    cfg.model.vocab_size = SentencePieceTokenizer(TOKENIZER).vocab_size
    layout = Layout(1, 1, 1, 1, 1, 2, True, bf16_params=True)
    predicted = rank_memory(layout.model_config(cfg.model), layout, 128, 4, 0, cfg.model.padded_vocab_size(),
                            Execution(bf16=True, fused_kernels=False))
    measured = measured_step(values)
    params = rank_parameters(cfg.model, 1, cfg.model.num_layers, True, True, cfg.model.padded_vocab_size())
    assert (predicted.weights, predicted.optimizer) == (2 * params, 12 * params)
    assert measured["weights"] == pytest.approx(predicted.weights, rel=1e-3)  # the buffers' padding
    assert measured["optimizer"] == pytest.approx(predicted.optimizer, rel=1e-3)
    assert measured["grads"] == pytest.approx(predicted.grads, rel=1e-3)
    assert predicted.total == pytest.approx(measured["peak_before_step"], rel=0.05)


def test_predicted_fp8_peak_matches_a_real_cpu_fp8_training_step(fixture_data):
    """FP8 layers keep FP8 inputs and FP8 weight casts: at 2 x 1024 tokens, where the layers'
    activations outweigh the loss head's, the FP8 model is within 2% of the step (-0.2% on
    2026-11-27); modeled as bf16 layers, the same run comes out 19.5% over."""
    values = cpu_step_values(fixture_data, 1024, dict(fp8_format="hybrid"))
    measured = measured_step(values)["peak_before_step"]
    assert predicted_step(values, {}, fp8=True).total == pytest.approx(measured, rel=0.02)
    assert predicted_step(values, {}, fp8=False).total > 1.1 * measured


def cpu_step_values(fixture_data, seq: int, overrides: dict) -> dict:
    """The tiny preset in one process, fp32, 2 micro-batches of 2 sequences of `seq` tokens."""
    return tiny_run(fixture_data, seq_length=seq, micro_batch_size=2, global_batch_size=4, train_iters=2, **overrides)


def measured_step(values: dict) -> dict:
    probe = StepMemoryProbe()
    train(run_config_from_values(values), prepare=probe)
    return probe.result


def predicted_step(values: dict, recompute: dict, fp8: bool = False):
    """The planner's estimate of cpu_step_values' run (`fp8`: its FP8 layers modeled as FP8)."""
    cfg = run_config_from_values(values)
    cfg.model.vocab_size = SentencePieceTokenizer(TOKENIZER).vocab_size
    layout = Layout(1, 1, 1, 1, 1, 2, False, **recompute)
    return rank_memory(layout.model_config(cfg.model), layout, cfg.data.seq_length, 4, 0,
                       cfg.model.padded_vocab_size(), Execution(bf16=False, fused_kernels=False, fp8=fp8))



@pytest.mark.parametrize("bf16", [False, True])
def test_dpo_plan_matches_a_real_cpu_dpo_step(bf16):
    """--training-mode dpo: the planner counts a micro-batch of b pairs as 2b sequences and adds the
    frozen reference's weights (bf16 GEMM weights under --bf16, DPOTrainer._freeze): its weights
    and its total are checked against a real one-process DPO step on synthetic conversations."""
    values = tiny_run("", data_path=[], tokenizer_model=None, vocab_size=2048, mock_data=True,
                      training_mode="dpo", seq_length=128, micro_batch_size=2, global_batch_size=4,
                      train_iters=2, lr_warmup_iters=0, bf16=bf16, cross_entropy_impl="reference")
    probe = StepMemoryProbe()
    train(run_config_from_values(values), prepare=probe)
    cfg = run_config_from_values(values)
    request = PlanRequest(model=cfg.model, gpus=1, gpu=GPUS["h100-sxm"], seq_length=128, global_batch_size=4,
                          micro_batch_sizes=(2,), execution=Execution(bf16=bf16, fused_kernels=False),
                          training_mode="dpo")
    layout = Layout(1, 1, 1, 1, 1, 2, False)
    predicted = layout_memory(request, layout, TimeModelConfig())
    measured = probe.result
    assert measured["reference"] == predicted.reference
    assert measured["reference"] < measured["weights"] if bf16 else measured["reference"] == measured["weights"]
    assert predicted.total == pytest.approx(measured["peak_before_step"], rel=0.05)


def test_dpo_plan_lists_tp_dp_layouts_and_adds_the_reference_forward():
    request = PlanRequest(model=SEVEN_B, gpus=64, gpu=GPUS["h100-sxm"], seq_length=4096, global_batch_size=128,
                          micro_batch_sizes=(2,), training_mode="dpo")
    pretrain = PlanRequest(model=SEVEN_B, gpus=64, gpu=GPUS["h100-sxm"], seq_length=4096, global_batch_size=256,
                           micro_batch_sizes=(4,))
    candidates = plan(request).candidates
    assert candidates and all(c.layout.pp == 1 and c.layout.cp == 1 for c in candidates)
    tm = TimeModelConfig(loss_head_recompute=True)  # DPO's policy head recomputes its logits (per-token log-probs)
    for c in candidates:
        sequences = dataclasses.replace(c.layout, micro_batch_size=4)  # 2 pairs = 4 sequences
        policy = evaluate(pretrain, sequences, tm)
        assert c.memory.total == policy.memory.total + c.memory.reference
        assert c.time.reference > 0 and c.time.step == pytest.approx(policy.time.step + c.time.reference)
        # The reference's forward is about a third of the policy's compute (and half its TP traffic).
        assert c.time.reference == pytest.approx((policy.time.compute + policy.time.tp_comm) / 3, rel=0.25)


def test_cli_plans_dpo_in_pairs_and_recommends_a_dpo_command(tmp_path, capsys):
    out = tmp_path / "dpo.json"
    code = main(["--preset", "7b", "--gpus", "64", "--seq-length", "4096", "--training-mode", "dpo",
                 "--global-batch-size", "128", "--micro-batch-sizes", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "batch: 128 pairs = 256 sequences" in printed
    record = json.loads(out.read_text())
    assert record["request"]["training_mode"] == "dpo"
    best = record["candidates"][0]
    assert best["train_flags"][:2] == ["--training-mode", "dpo"] and " ".join(best["train_flags"]) in printed
    assert best["memory_bytes"]["reference"] > 0 and best["time_s"]["reference"] > 0


def test_dry_run_memory_forecast_is_the_planners_estimate_of_the_run():
    values = {**get_preset("7b"), "vocab_size": 49152, "seq_length": 4096, "bf16": True, "micro_batch_size": 4,
              "global_batch_size": 1024, "tensor_model_parallel_size": 4, "sequence_parallel": True}
    lines = memory_forecast(run_config_from_values(values), 512)
    planned = evaluate(PlanRequest(model=run_config_from_values(values).model, gpus=512, gpu=GPUS["h100-sxm"],
                                   seq_length=4096, global_batch_size=1024), Layout(4, 1, 1, 1, 128, 4, False),
                       TimeModelConfig())
    assert lines[0].endswith(f"= {planned.memory.total / 2**30:.1f} GiB") and "h100-sxm fits" in lines[1]
    single = memory_forecast(run_config_from_values({**values, "tensor_model_parallel_size": 1,
                                                     "sequence_parallel": False}), 8)
    assert "h100-sxm DOES NOT FIT" in single[1] and "activations" in single[0]


def test_fp8_run_forecast_is_the_planners_fp8_estimate():
    """An --fp8-format run is forecast with FP8 layers (except those kept in bf16): what
    `mcode-plan --precision fp8` predicts for the layout, and less than the same run in bf16."""
    values = {**get_preset("7b"), "vocab_size": 49152, "seq_length": 4096, "bf16": True, "micro_batch_size": 4,
              "global_batch_size": 1024, "tensor_model_parallel_size": 4, "sequence_parallel": True}
    fp8_values = {**values, "fp8_format": "hybrid"}
    request = PlanRequest(model=run_config_from_values(fp8_values).model, gpus=512, gpu=GPUS["h100-sxm"],
                          seq_length=4096, global_batch_size=1024, execution=Execution(fp8=True))
    planned = layout_memory(request, Layout(4, 1, 1, 1, 128, 4, False), TimeModelConfig(precision="fp8"))
    fp8, bf16 = (forecast(run_config_from_values(v), 512) for v in (fp8_values, values))
    assert fp8.total == planned.total and fp8.activations < bf16.activations
    edges = forecast(run_config_from_values({**fp8_values, "num_layers_at_start_in_bf16": 2,
                                             "num_layers_at_end_in_bf16": 2}), 512)
    assert fp8.activations < edges.activations < bf16.activations


@pytest.mark.parametrize("kernel, mib_per_layer", [("mask", 80), ("varlen-repeat-kv", 48), ("varlen", 0)])
def test_packed_documents_memory_per_kernel(kernel, mib_per_layer):
    """Packed documents on the sdpa backend, 7B shape at seq 4096, per layer beyond unpacked rows:
    the masked kernel keeps KV heads repeated to the query heads (48 MiB) and the bf16 mask
    (32 MiB; measured on an H200: 1.25 GiB over 16 layers); torch's varlen flash kernel keeps
    nothing more, or the repeated KV heads where it takes no grouped ones; the CPU reference path
    is not modeled."""
    config = run_config_from_values({**get_preset("7b"), "vocab_size": 49152}).model
    packed = act.MicroBatch(1, 4096, document_attention=kernel)
    assert act.document_mask_bytes(config, packed) == mib_per_layer * 2**20
    assert act.document_mask_bytes(config, dataclasses.replace(packed, fused_kernels=False)) == 0


@pytest.mark.parametrize("kernel, mib_per_layer", [("mask", 80), ("varlen", 0)])
def test_packed_sft_forecast_counts_the_kernel_torch_runs(kernel, mib_per_layer, monkeypatch):
    """The run's forecast asks which kernel this torch runs (here set either way) and counts it
    in every layer; under CP the sdpa backend always masks."""
    from megatron_code.training import memory_forecast

    monkeypatch.setattr(memory_forecast, "packed_attention_kernel", lambda device_type: kernel)
    values = {**get_preset("7b"), "num_layers": 16, "vocab_size": 49152, "seq_length": 4096, "bf16": True,
              "micro_batch_size": 1, "global_batch_size": 4}
    plain = forecast(run_config_from_values(values), 1).activations
    packed = {"reset_attention_mask": True, "reset_position_ids": True}
    assert forecast(run_config_from_values({**values, **packed}), 1).activations - plain == 16 * mib_per_layer * 2**20
    with_cp = act.MicroBatch(1, 4096, context_parallel=2, document_attention=kernel)
    assert act.document_mask_bytes(run_config_from_values(values).model, with_cp) > 0
    flash = forecast(run_config_from_values({**values, **packed, "attention_backend": "flash"}), 1).activations
    assert flash == plain  # cu_seqlens, no mask


def test_trainer_prints_the_forecast_on_gpus_only():
    values = {**get_preset("7b"), "vocab_size": 49152, "seq_length": 4096, "bf16": True, "micro_batch_size": 1,
              "global_batch_size": 4}
    cfg = run_config_from_values(values)
    line = startup_memory_forecast(cfg, 1, "cuda")
    assert line.startswith("memory forecast (planner): fullest GPU (pipeline rank 0): weights ")
    assert memory_forecast(cfg, 1)[0] in line and startup_memory_forecast(cfg, 1, "cpu") is None
    # The whole 7B on one GPU (fp32 weights, grads and Adam state: 141 GiB forecast) cannot fit an
    # 80 GB card: warned before the first step, with the fixes.
    h100 = startup_memory_forecast(cfg, 1, "cuda", capacity_bytes=80 * 10**9)
    assert h100.startswith(line + "\nWARNING: the forecast exceeds this GPU's 74.5 GiB: expect an out-of-memory "
                                  "error in the first step. To fit: --use-distributed-optimizer")
    assert startup_memory_forecast(cfg, 1, "cuda", capacity_bytes=10**13) == line  # fits: no warning


def test_profile_report_sets_the_planner_forecast_beside_the_measured_peak_on_gpus():
    cfg = run_config_from_values({**get_preset("7b"), "vocab_size": 49152, "seq_length": 4096, "bf16": True,
                                  "micro_batch_size": 1, "global_batch_size": 4, "num_layers": 16})
    assert planner_peak_gib(cfg, 1, "cpu") is None  # CPU peaks are RSS: not what the model counts
    assert planner_peak_gib(cfg, 1, "cuda") == pytest.approx(forecast(cfg, 1).total / 2**30)
    assert 60 < planner_peak_gib(cfg, 1, "cuda") < 90  # 74.3 GiB measured on an H200 (docs/benchmarks.md)


def _preflight_report(path, nodes: int, per_node: int, node_bus: list[float], pair_bus: float) -> str:
    """A report as mcode-preflight --report writes it (cli.write_report), with chosen bandwidths."""
    ranks = []
    for node in range(nodes):
        for local in range(per_node):
            partners = [(r, pair) for r in (0, 1) for pair in [(0, 1), (2, 3), (1, 2), (3, 0)][2 * r:2 * r + 2]
                        if node in pair]
            ranks.append({"rank": node * per_node + local, "node": node, "host": f"n{node}", "gemm_tflops": 700.0,
                          "world_bus_gbps": 40.0, "node_bus_gbps": node_bus[node],
                          "pairs": [{"round": r, "nodes": list(pair), "bus_gbps": pair_bus} for r, pair in partners]})
    path.write_text(json.dumps({"config": {}, "nodes": [f"n{i}" for i in range(nodes)], "ranks": ranks,
                                "findings": [], "exclude": []}))
    return str(path)


def test_measured_links_replace_the_datasheets_and_speed_up_the_data_parallel_reduction(tmp_path, capsys):
    """A preflight that measured 360 GB/s inside the nodes (one slow node left out by the median)
    and 45 GB/s between them: the planner's links become 360 / 0.75 and 45 / 0.75 GB/s, so its
    collectives run at the measured rates, and a data-parallel reduction over the network gets
    faster than with the datasheet's 50 GB/s x 0.75."""
    from megatron_code.plan.cli import build_parser, request_from_args

    report = _preflight_report(tmp_path / "preflight.json", 4, 8, [360.0, 360.0, 100.0, 370.0], 45.0)
    argv = ["--preset", "7b", "--gpus", "512", "--seq-length", "4096"]
    datasheet, tm = request_from_args(build_parser().parse_args(argv))
    measured, _ = request_from_args(build_parser().parse_args(argv + ["--network-from", report]))
    assert measured.gpu.intra_node_gb_per_s == pytest.approx(360 / 0.75)
    assert measured.gpu.inter_node_gb_per_s == pytest.approx(45 / 0.75)
    layout = Layout(tp=2, pp=1, vp=1, cp=1, dp=256, micro_batch_size=4, distributed_optimizer=True)
    times = [evaluate(request, layout, tm).time.dp_comm for request in (datasheet, measured)]
    assert times[1] < times[0]
    assert main(argv + ["--network-from", report, "--top", "1"]) == 0
    assert f"links measured by preflight ({report}): intra-node 360 GB/s bus, inter-node 45 GB/s bus" in \
        capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file; give the preflight.json"),
    ("four_per_node", "measured with 4 GPUs per node, but the planner's h100-sxm nodes hold 8"),
    ("with_ib_gbps", "--ib-gbps and --network-from"),
    ("not_a_report", "not a preflight report"),
])
def test_a_preflight_report_that_cannot_stand_for_the_cluster_is_refused(case, message, tmp_path, capsys):
    path = tmp_path / "preflight.json"
    if case == "four_per_node":
        _preflight_report(path, 2, 4, [300.0, 300.0], 40.0)
    elif case == "with_ib_gbps":
        _preflight_report(path, 2, 8, [300.0, 300.0], 40.0)
    elif case == "not_a_report":
        path.write_text('{"rows": []}')
    extra = ["--ib-gbps", "400"] if case == "with_ib_gbps" else []
    assert main(["--preset", "7b", "--gpus", "64", "--network-from", str(path), *extra]) == 2
    assert message in capsys.readouterr().err
