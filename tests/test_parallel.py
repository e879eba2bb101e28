"""Parallel layouts (torchrun, gloo, CPU, fp32) against the single-process run: losses to 1e-5
relative, grad norms to 1e-4; and checkpoints saved under one layout resumed under another.

Each layout is one real `torchrun -m megatron_code.train` invocation; workers are judged by
the metrics they wrote, not only by their exit status (see ARCHITECTURE.md on gloo exits)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kernels.dispatch import triton_interpreter_enabled
from megatron_code.training import checkpointing
from tests.conftest import run_training, tiny_run

STEPS = 3
# Validation after the last step too: its loss must not depend on the layout either.
COMMON = dict(train_iters=STEPS, micro_batch_size=2, global_batch_size=8, seq_length=128, eval_interval=STEPS,
              eval_iters=1)


def cli_args(values: dict) -> list[str]:
    args = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def launch(nproc: int, values: dict, program: tuple[str, ...] = ("-m", "megatron_code.train"),
           env: dict | None = None):
    """Run `program` (mcode-train by default) under torchrun with one intra-op thread per worker."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *program, *cli_args(values)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def torchrun(nproc: int, values: dict, metrics: str, may_fail: bool = False) -> list[dict]:
    """The job's step and validation records. A failed job is an error unless may_fail (a test
    that kills a rank on purpose): a run that crashed after logging its steps once passed here,
    hiding a validation that failed under the V-shaped pipeline schedules."""
    result = launch(nproc, {**values, "metrics_file": metrics})
    records = []
    if os.path.exists(metrics):
        records = [json.loads(line) for line in open(metrics) if '"loss"' in line or '"valid_loss"' in line]
    # A process that aborts at interpreter exit after the run printed its end-of-run memory line
    # ("terminate called without an active exception", seen once in 2026-11-27's CI, before
    # destroy_distributed freed the groups' threads) finished everything the test compares; an
    # earlier failure never prints that line.
    finished = " memory: peak" in result.stdout and "terminate called" in result.stderr
    if result.returncode != 0 and not (may_fail and records) and not finished:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return records


@pytest.fixture(scope="module")
def reference(fixture_data, tmp_path_factory):
    """The single-process run every layout must reproduce: its steps, then its validation records."""
    metrics = str(tmp_path_factory.mktemp("reference") / "m.jsonl")
    run_training(tiny_run(fixture_data, **COMMON, metrics_file=metrics))
    return [json.loads(line) for line in open(metrics) if '"loss"' in line or '"valid_loss"' in line]


def assert_same_numbers(records, reference):
    """Same steps with the same losses and grad norms; where both ran validation, the same loss."""
    steps, want_steps = ([r for r in rs if "valid_loss" not in r] for rs in (records, reference))
    assert [r["step"] for r in steps] == [r["step"] for r in want_steps]
    for got, want in zip(steps, want_steps):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (got["step"], got["loss"], want["loss"])
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    valid, want_valid = ([r for r in rs if "valid_loss" in r] for rs in (records, reference))
    if valid and want_valid:
        assert [r["step"] for r in valid] == [r["step"] for r in want_valid]
        assert [r["valid_loss"] for r in valid] == pytest.approx([r["valid_loss"] for r in want_valid], rel=1e-5)


LAYOUTS = {
    "tp2": (2, dict(tensor_model_parallel_size=2)),
    "tp2_sp": (2, dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "dp2": (2, dict()),
    "tp2_dp2": (4, dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "cp2": (2, dict(context_parallel_size=2)),
    "tp2_cp2": (4, dict(tensor_model_parallel_size=2, sequence_parallel=True, context_parallel_size=2)),
    "pp2_1f1b": (2, dict(pipeline_model_parallel_size=2, pipeline_schedule="1f1b")),
    "pp2_vp2_interleaved": (2, dict(pipeline_model_parallel_size=2, pipeline_schedule="interleaved-1f1b",
                                    virtual_pipeline_model_parallel_size=2)),
    "pp2_zbv": (2, dict(pipeline_model_parallel_size=2, pipeline_schedule="zbv")),
    "pp2_dualpipev": (2, dict(pipeline_model_parallel_size=2, pipeline_schedule="dualpipev")),
    "tp2_pp2": (4, dict(tensor_model_parallel_size=2, sequence_parallel=True, pipeline_model_parallel_size=2)),
    "pp2_dp2_interleaved": (4, dict(pipeline_model_parallel_size=2, pipeline_schedule="interleaved-1f1b",
                                    virtual_pipeline_model_parallel_size=2)),
    # The loss head runs in the schedule's loss function: the fused one must work there too
    # (zero-bubble schedules compute its weight gradient in their separate weight pass).
    "pp2_fused_loss_head": (2, dict(pipeline_model_parallel_size=2, cross_entropy_impl="reference")),
    "pp2_zbv_fused_loss_head": (2, dict(pipeline_model_parallel_size=2, pipeline_schedule="zbv",
                                        cross_entropy_impl="reference")),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, fixture_data, reference, tmp_path):
    nproc, extra = LAYOUTS[layout]
    records = torchrun(nproc, tiny_run(fixture_data, **COMMON, **extra), str(tmp_path / "m.jsonl"))
    assert_same_numbers(records, reference)
    assert [r["step"] for r in records + reference if "valid_loss" in r] == [STEPS, STEPS]  # compared above


def test_context_parallel_with_packed_documents(fixture_data, tmp_path):
    """CP2 with document masking and restarted positions equals one process doing the same."""
    packed = dict(COMMON, reset_attention_mask=True, reset_position_ids=True)
    expected = run_training(tiny_run(fixture_data, **packed))
    records = torchrun(2, tiny_run(fixture_data, **packed, context_parallel_size=2), str(tmp_path / "m.jsonl"))
    assert_same_numbers(records, expected)


@pytest.mark.parametrize("layout", [dict(pipeline_model_parallel_size=2),  # 12 gloo threads were left
                                    dict(async_save=True),  # the async-save group was cached at module level
                                    dict(use_distributed_optimizer=True)],  # gradient hooks held their group
                         ids=["pp2", "dp2_async_save", "dp2_zero1"])
def test_a_finished_run_leaves_no_process_group_threads(layout, fixture_data, tmp_path):
    """When mcode-train's main() returns, the process groups are freed with their gloo threads,
    rather than left running into interpreter finalization (where a thread that takes the GIL
    aborts the process)."""
    values = tiny_run(fixture_data, **COMMON, **layout, save=str(tmp_path / "ckpt"))
    probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exit_threads_probe.py")
    result = launch(2, values, program=(probe,), env={"EXIT_THREADS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.load(open(path)) for path in sorted(tmp_path.glob("rank*.json"))]
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert not [name for name in report["threads"] if "gloo" in name], report


RESHARD = {
    "tp2_to_tp1": ((2, dict(tensor_model_parallel_size=2)), (1, dict())),
    "tp1_to_tp2": ((1, dict()), (2, dict(tensor_model_parallel_size=2, sequence_parallel=True))),
    "dp2_to_dp1": ((2, dict()), (1, dict())),
    "dp4_to_dp1": ((4, dict()), (1, dict())),
    "pp2_to_pp4": ((2, dict(pipeline_model_parallel_size=2)), (4, dict(pipeline_model_parallel_size=4))),
}


@pytest.mark.parametrize("case", list(RESHARD))
def test_checkpoint_resumes_under_another_layout(case, fixture_data, reference, tmp_path):
    """Save after 2 steps under one layout, resume under another: step 3 equals the uninterrupted run."""
    (n_save, save_layout), (n_load, load_layout) = RESHARD[case]
    ckpt = str(tmp_path / "ckpt")
    first = tiny_run(fixture_data, **COMMON, **save_layout, save=ckpt, exit_interval=2)
    if n_save == 1:
        run_training(first)
    else:
        torchrun(n_save, first, str(tmp_path / "a.jsonl"))
    second = tiny_run(fixture_data, **COMMON, **load_layout, load=ckpt)
    if n_load == 1:
        records = run_training(second)
    else:
        records = torchrun(n_load, second, str(tmp_path / "b.jsonl"))
    assert_same_numbers(records, reference[2:])


def one_thread_run(values: dict) -> list[dict]:
    """One process with one intra-op thread, as every torchrun worker has (OMP_NUM_THREADS=1):
    CPU bf16 GEMMs round partial sums per thread, and in a full suite run the in-process reference
    with the default threads once landed 2.3e-3 away from the PP2 run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_training(values)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bf16_reference(fixture_data):
    return one_thread_run(tiny_run(fixture_data, **COMMON, bf16=True))


@pytest.mark.parametrize("layout", [
    dict(pipeline_model_parallel_size=2),  # the schedule runs stages outside the trainer's autocast
    dict(tensor_model_parallel_size=2, sequence_parallel=True),  # GEMM inputs gathered in bf16
    # Buckets launch on hooks that fused weight-gradient accumulation must still fire, and only
    # once the gradient is complete (an early launch would reduce a partial gradient).
    dict(),  # data parallel
    dict(use_distributed_optimizer=True),
    # The fused loss head given the loss weights makes its gradients in the forward (the
    # pipeline's loss function, and the trainer's micro-batches ahead of the bucket hooks).
    dict(pipeline_model_parallel_size=2, cross_entropy_impl="reference"),
    dict(cross_entropy_impl="reference"),
    # bf16 parameters, fp32 master weights sharded in the optimizer (over DP; over a group of one
    # under TP, with the norms' sequence-parallel gradients)
    dict(use_distributed_optimizer=True, params_dtype="bfloat16", overlap_param_gather=True),
    dict(tensor_model_parallel_size=2, sequence_parallel=True, use_distributed_optimizer=True,
         params_dtype="bfloat16", cross_entropy_impl="reference"),
    dict(pipeline_model_parallel_size=2, use_distributed_optimizer=True, params_dtype="bfloat16"),
], ids=["pp2", "tp2_sp", "dp2", "dp2_distributed_optimizer", "pp2_fused_head", "dp2_fused_head",
        "dp2_bf16_params", "tp2_sp_bf16_params_fused_head", "pp2_bf16_params"])
def test_bf16_layouts_match_one_process_bf16(layout, fixture_data, reference, bf16_reference, tmp_path):
    """--bf16 must reach every layout's GEMMs: the run matches one process in bf16, not in fp32."""
    records = torchrun(2, tiny_run(fixture_data, **COMMON, bf16=True, **layout), str(tmp_path / "m.jsonl"))
    assert any(abs(w["loss"] - f["loss"]) > 1e-4 for w, f in zip(bf16_reference, reference))  # bf16 shows
    for got, want in zip(records, bf16_reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-3)


def test_fp8_pipeline_matches_one_process_fp8(fixture_data, tmp_path):
    """FP8 (torch backend, delayed scaling) through two pipeline stages. Without the stages' shapes
    given up front, torch's shape inference ran each stage on empty tensors at the first step and
    this run failed (checked 2026-11-27)."""
    values = tiny_run(fixture_data, **COMMON, bf16=True, fp8_format="hybrid")
    reference = one_thread_run(values)
    records = torchrun(2, {**values, "pipeline_model_parallel_size": 2}, str(tmp_path / "m.jsonl"))
    steps = [r for r in records if "valid_loss" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for got, want in zip(steps, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-3)


def test_tp_larger_than_kv_groups_is_refused(fixture_data, tmp_path):
    values = tiny_run(fixture_data, **COMMON, tensor_model_parallel_size=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           "-m", "megatron_code.train", *cli_args(values)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "KV heads (2) must be divisible by --tensor-model-parallel-size (4)" in result.stderr


# ---- distributed optimizer (ZeRO-1) and checkpoint options ------------------------------------

def run_layout(nproc: int, values: dict, metrics: str) -> list[dict]:
    """One process in-process, or a torchrun job."""
    return run_training(values) if nproc == 1 else torchrun(nproc, values, metrics)


DISTRIBUTED_OPTIMIZER = {
    "dp2": (2, dict(use_distributed_optimizer=True)),
    # Parameter all-gathers waited for by the next forward, layer by layer; the pipeline stages
    # read the output weight in the schedule's loss function, outside its module's forward.
    "dp2_overlap_param_gather": (2, dict(use_distributed_optimizer=True, overlap_param_gather=True)),
    "pp2_dp2_overlap_param_gather": (4, dict(pipeline_model_parallel_size=2, use_distributed_optimizer=True,
                                             overlap_param_gather=True)),
    # launch/slurm/pretrain_7b_4k.sbatch's layout (the planner plans ZeRO-1 with the overlapped gather)
    "tp2_sp_dp2_overlap_param_gather": (4, dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                                use_distributed_optimizer=True, overlap_param_gather=True)),
    "pp2_dp2": (4, dict(pipeline_model_parallel_size=2, use_distributed_optimizer=True)),
    # TritonAdamW on the shards' flat views (interpreted on CPU), clipping inside its kernel
    "dp2_triton_adamw": (2, dict(use_distributed_optimizer=True, optimizer_impl="triton")),
}


@pytest.mark.parametrize("layout", list(DISTRIBUTED_OPTIMIZER))
def test_distributed_optimizer_matches_single_process(layout, fixture_data, reference, tmp_path):
    nproc, extra = DISTRIBUTED_OPTIMIZER[layout]
    if extra.get("optimizer_impl") == "triton" and not triton_interpreter_enabled():
        pytest.skip("CPU processes run Triton kernels only under TRITON_INTERPRET=1 (set on CPU-only machines)")
    records = torchrun(nproc, tiny_run(fixture_data, **COMMON, **extra), str(tmp_path / "m.jsonl"))
    assert_same_numbers(records, reference)


RESHARD_OPTIMIZER = {
    # The DP2 side also saves asynchronously (background thread, its own gloo group) and keeps one.
    "on_dp2_to_off": ((2, dict(use_distributed_optimizer=True, async_save=True, save_interval=1, keep_last=1)),
                      (1, dict())),
    # Saved with the last step's parameter all-gathers in flight: the save must wait for them.
    "overlap_dp2_to_off": ((2, dict(use_distributed_optimizer=True, overlap_param_gather=True)), (1, dict())),
    "off_to_on_dp2": ((1, dict()), (2, dict(use_distributed_optimizer=True))),
}


@pytest.mark.parametrize("case", list(RESHARD_OPTIMIZER))
def test_distributed_optimizer_checkpoint_reshards(case, fixture_data, reference, tmp_path):
    """Adam state saved sharded (gathered to the global form) loads unsharded, and back."""
    (n_save, save_opts), (n_load, load_opts) = RESHARD_OPTIMIZER[case]
    ckpt = str(tmp_path / "ckpt")
    run_layout(n_save, tiny_run(fixture_data, **COMMON, **save_opts, save=ckpt, exit_interval=2),
               str(tmp_path / "a.jsonl"))
    assert checkpointing.latest_iteration(ckpt) == 2
    if save_opts.get("keep_last") == 1:
        assert sorted(os.listdir(ckpt)) == sorted([checkpointing.LATEST_MARKER, "iter_0000002"])
    records = run_layout(n_load, tiny_run(fixture_data, **COMMON, **load_opts, load=ckpt), str(tmp_path / "b.jsonl"))
    assert_same_numbers(records, reference[2:])


def test_bf16_parameters_resume_exactly_and_their_checkpoint_loads_as_fp32(fixture_data, tmp_path):
    """bf16 parameters under ZeRO-1 save their fp32 master weights: a resumed run continues the
    uninterrupted one exactly, and the checkpoint loads into fp32 parameters without ZeRO-1 (its
    losses within bf16 rounding of the bf16-parameter run's)."""
    # 4 steps: the bf16 parameters of step 3 are the master's rounding whether or not the master
    # was restored exactly; step 4 and the validation after it see the difference.
    common = {**COMMON, "train_iters": 4, "eval_interval": 4}
    values = tiny_run(fixture_data, **common, bf16=True, use_distributed_optimizer=True, params_dtype="bfloat16")
    whole = torchrun(2, values, str(tmp_path / "whole.jsonl"))
    ckpt = str(tmp_path / "ckpt")
    torchrun(2, {**values, "save": ckpt, "exit_interval": 2}, str(tmp_path / "a.jsonl"))
    resumed = torchrun(2, {**values, "load": ckpt}, str(tmp_path / "b.jsonl"))
    def numbers(records):
        return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("valid_loss")) for r in records]
    assert len(resumed) == 3 and numbers(resumed) == numbers(whole[2:])  # steps 3, 4 and the validation
    plain = [r for r in run_training(tiny_run(fixture_data, **common, bf16=True, load=ckpt)) if "loss" in r]
    assert [r["step"] for r in plain] == [3, 4]
    for got, want in zip(plain, whole[2:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-3)


def test_keep_last_never_deletes_the_latest(tmp_path):
    root = str(tmp_path)
    for iteration in (1, 2, 3, 9):
        os.makedirs(checkpointing.checkpoint_dir(root, iteration))
    os.makedirs(checkpointing.checkpoint_dir(root, 10) + ".tmp")  # an unfinished save: not counted
    with open(os.path.join(root, checkpointing.LATEST_MARKER), "w") as fh:
        fh.write("3\n")  # e.g. iter_9 left by a run that was rolled back by hand
    deleted = checkpointing.delete_old_checkpoints(root, 1)
    assert deleted == [checkpointing.checkpoint_dir(root, i) for i in (1, 2)]
    assert sorted(os.listdir(root)) == sorted([checkpointing.LATEST_MARKER, "iter_0000003", "iter_0000009",
                                               "iter_0000010.tmp"])


def test_keep_last_counts_the_checkpoints_up_to_the_latest_after_a_rollback(tmp_path):
    """Marker set back to 3 with 9 and 12 left from the abandoned segment: --keep-last 2 keeps 2
    and 3 (it used to count 9 and 12 as the newest two and delete 2), and leaves 9 and 12."""
    root = str(tmp_path)
    for iteration in (1, 2, 3, 9, 12):
        os.makedirs(checkpointing.checkpoint_dir(root, iteration))
    with open(os.path.join(root, checkpointing.LATEST_MARKER), "w") as fh:
        fh.write("3\n")
    assert checkpointing.delete_old_checkpoints(root, 2) == [checkpointing.checkpoint_dir(root, 1)]
    assert sorted(d for d in os.listdir(root) if d.startswith("iter_")) == [
        "iter_0000002", "iter_0000003", "iter_0000009", "iter_0000012"]


def test_async_save_resumes_exactly(fixture_data, reference, tmp_path):
    """Async saves every step (each published at the next step, the last at exit); resuming from
    the last one reproduces the uninterrupted run. The resumed run saves synchronously with
    --keep-last 2, which prunes iter_1."""
    ckpt = str(tmp_path / "ckpt")
    first = run_training(tiny_run(fixture_data, **COMMON, save=ckpt, save_interval=1, exit_interval=2, async_save=True))
    assert checkpointing.latest_iteration(ckpt) == 2
    assert sorted(os.listdir(ckpt)) == sorted([checkpointing.LATEST_MARKER, "iter_0000001", "iter_0000002"])
    second = run_training(tiny_run(fixture_data, **COMMON, load=ckpt, save=ckpt, keep_last=2))
    assert_same_numbers(first + second, reference)
    assert checkpointing.latest_iteration(ckpt) == 3
    assert sorted(os.listdir(ckpt)) == sorted([checkpointing.LATEST_MARKER, "iter_0000002", "iter_0000003"])


def test_rank_killed_during_save_leaves_previous_checkpoint(fixture_data, reference, tmp_path, monkeypatch):
    """DP2 (distributed optimizer, synchronous saves) saves at step 2 and at the end (step 3);
    rank 1 dies while writing step 3 (fault injection hook). Step 2 stays the latest checkpoint,
    and one process (plain optimizer) resumes from it with the uninterrupted run's numbers."""
    ckpt = str(tmp_path / "ckpt")
    monkeypatch.setenv(checkpointing.KILL_DURING_SAVE_ENV, "3")  # read by rank 1 only
    values = tiny_run(fixture_data, **COMMON, save=ckpt, save_interval=2, use_distributed_optimizer=True)
    records = torchrun(2, values, str(tmp_path / "a.jsonl"), may_fail=True)
    assert_same_numbers(records, reference)  # the steps ran; only the last save failed
    assert checkpointing.latest_iteration(ckpt) == 2
    assert not os.path.exists(checkpointing.checkpoint_dir(ckpt, 3))
    assert os.path.exists(checkpointing.checkpoint_dir(ckpt, 3) + ".tmp")  # the partial write
    resumed = run_training(tiny_run(fixture_data, **COMMON, load=ckpt, save=ckpt))
    assert_same_numbers(resumed, reference[2:])
    assert checkpointing.latest_iteration(ckpt) == 3
    assert sorted(os.listdir(ckpt)) == sorted([checkpointing.LATEST_MARKER, "iter_0000002", "iter_0000003"])


@pytest.mark.parametrize("overlap", [False, True], ids=["gather_in_step", "overlap_param_gather"])
def test_distributed_optimizer_shards_match_adamw(overlap):
    """2 spawned gloo ranks: ZeRO-1 shards reproduce torch AdamW on the whole batch (params,
    clipped global norm, gathered Adam state) with buckets that cut parameters and need padding;
    with the parameter all-gathers left in flight for the next forward too."""
    import socket

    import torch.multiprocessing as mp

    from tests.distributed_optimizer_worker import zero1_worker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The worker lives in a light module: spawned processes import it (not this test module).
    mp.spawn(zero1_worker, args=(2, port, overlap), nprocs=2, join=True)


def test_distributed_optimizer_keeps_fp32_master_weights_of_bf16_parameters():
    """2 spawned gloo ranks, bf16 parameters: fp32 master shards stepped by AdamW, bf16 gradients
    of each micro-batch folded into fp32 ones, the parameters the master rounded on every rank."""
    import socket

    import torch.multiprocessing as mp

    from tests.distributed_optimizer_worker import zero1_master_worker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(zero1_master_worker, args=(2, port), nprocs=2, join=True)
