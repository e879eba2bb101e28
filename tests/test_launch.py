"""Launching: `mcode-train --dry-run` plans a job without starting anything and reports the layout
the real device mesh builds; every launch script dry-runs the full 512-GPU job on CPU; the
save-and-exit signal stops all ranks after the same step with a checkpoint that resumes exactly."""
import ctypes
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
import yaml

from megatron_code.errors import ConfigError
from megatron_code.parallel.rank_layout import process_groups, rank_coordinates
from megatron_code.parallel.state import ParallelConfig, build_parallel_state, rank_grid
from megatron_code.train import main
from megatron_code.training import checkpointing
from megatron_code.training.config import LaunchConfig
from megatron_code.training.exit_signal import ExitSignal, native_handler, parse_exit_signal
from megatron_code.training.world import launched_world_size, planned_world
from tests.conftest import TOKENIZER, run_training, tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")


# ---- reading a dry run's printout -------------------------------------------------------------
def layout_rows(text: str) -> dict[int, tuple[int, ...]]:
    """rank -> (node, local, pp, dp, cp, tp) from the rank table."""
    table = text.split("== rank layout", 1)[1].split("== process groups", 1)[0]
    rows = {}
    for line in table.splitlines():
        match = ROW.match(line)
        if match:
            rank, *rest = map(int, match.groups())
            rows[rank] = tuple(rest)
    return rows


def resolved_config(text: str) -> dict:
    body = text.split("== resolved config", 1)[1].split("\n", 1)[1].split("\n== ", 1)[0]
    return yaml.safe_load(body)


def layout_sizes(text: str) -> dict[str, int]:
    match = re.search(r"layout: TP (\d+) x CP (\d+) x PP (\d+) x DP (\d+)", text)
    return dict(zip(("tp", "cp", "pp", "dp"), map(int, match.groups())))


# ---- the trainer's --dry-run, in process --------------------------------------------------------
def dry_run_args(*extra):
    return ["--dry-run", "--preset", "7b", "--tokenizer-model", TOKENIZER, "--data-path", "missing/data",
            "--train-iters", "5000", *extra]


def test_dry_run_plans_512_ranks_without_starting_anything(capsys):
    code = main(dry_run_args("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                             "--world-size", "512", "--nproc-per-node", "8", "--global-batch-size", "512",
                             "--valid-data-path", "missing/held_out"))
    out = capsys.readouterr().out
    assert code == 0
    assert not dist.is_initialized() and not torch.cuda.is_initialized()
    rows = layout_rows(out)
    assert sorted(rows) == list(range(512))
    assert rows[0] == (0, 0, 0, 0, 0, 0) and rows[511] == (63, 7, 1, 127, 0, 1)
    assert layout_sizes(out) == {"tp": 2, "cp": 1, "pp": 2, "dp": 128}
    cfg = resolved_config(out)
    assert cfg["parallel"]["pipeline_model_parallel_size"] == 2 and cfg["model"]["vocab_size"] == 2048
    assert cfg["training"]["global_batch_size"] == 512 and cfg["launch"]["world_size"] == 512
    assert "data       missing/data: MISSING .bin/.idx, not checked" in out
    assert "valid data missing/held_out: MISSING .bin/.idx, not checked" in out
    assert "tp     256 groups of 2, each within one node: first [0, 1]" in out


def test_dry_run_validates_like_a_real_run(capsys):
    code = main(dry_run_args("--tensor-model-parallel-size", "3", "--world-size", "48"))
    assert code == 2
    assert "--num-attention-heads (32) must be divisible by --tensor-model-parallel-size (3)" in capsys.readouterr().err
    code = main(dry_run_args("--world-size", "12", "--nproc-per-node", "8"))
    assert code == 2 and "not a multiple of 8 processes per node" in capsys.readouterr().err
    # 0 is not "off": it read "... 0 x ... must divide the number of processes", or (VP) passed
    for flag in ("--tensor-model-parallel-size", "--virtual-pipeline-model-parallel-size"):
        assert main(dry_run_args(flag, "0", "--pipeline-model-parallel-size", "2")) == 2
        assert f"{flag} must be >= 1, got 0." in capsys.readouterr().err


def test_world_comes_from_torchrun_then_slurm_then_flags():
    none = LaunchConfig()
    torchrun = planned_world(none, {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"})
    assert (torchrun.world_size, torchrun.nproc_per_node, torchrun.nnodes) == (16, 8, 2)
    slurm = planned_world(none, {"SLURM_NNODES": "64", "SLURM_GPUS_ON_NODE": "8"})
    assert (slurm.world_size, slurm.nnodes) == (512, 64) and "$SLURM_NNODES (64)" in slurm.source
    flags = planned_world(LaunchConfig(world_size=32, nproc_per_node=4), {"WORLD_SIZE": "16"})
    assert (flags.world_size, flags.nnodes) == (32, 8)
    assert planned_world(none, {}).world_size == 1
    with pytest.raises(ConfigError, match="SLURM_GPUS_ON_NODE='eight'"):
        planned_world(none, {"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "eight"})


def test_real_run_refuses_a_world_size_flag_that_torchrun_did_not_launch():
    assert launched_world_size(LaunchConfig(world_size=4), {"WORLD_SIZE": "4"}) == 4
    with pytest.raises(ConfigError, match="--world-size 8 but the launcher started 4"):
        launched_world_size(LaunchConfig(world_size=8), {"WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="--nproc-per-node 8 but the launcher started 2"):
        launched_world_size(LaunchConfig(nproc_per_node=8), {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})


def test_dry_run_layout_is_the_device_mesh_a_real_run_builds():
    """Build the real mesh for several ranks of a 16-process TP2 x CP2 x PP2 x DP2 job on torch's
    fake process group (no communication) and compare with what the dry run reads from rank_grid."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    config = ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2, pipeline_model_parallel_size=2)
    grid = rank_grid(config, 16)
    coordinates = dict(rank_coordinates(grid))
    groups = {name: [row.tolist() for row in rows] for name, rows in process_groups(grid).items()}
    for rank in (0, 5, 10, 15):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=16)
        try:
            state = build_parallel_state(config, torch.device("cpu"), fp8_amax_group=True)
            assert coordinates[rank] == tuple(state.rank(dim) for dim in ("pp", "dp", "cp", "tp"))
            for name in ("pp", "dp", "cp", "tp"):
                assert state.mesh[name].mesh.tolist() in groups[name], (rank, name)
            assert dist.get_process_group_ranks(state.dp_cp_group) in groups["dp_cp"]
            # FP8 amaxes (Transformer Engine) are reduced over every rank of this pipeline stage.
            assert dist.get_process_group_ranks(state.amax_group) == grid[coordinates[rank][0]].flatten().tolist()
        finally:
            dist.destroy_process_group()


def test_exit_signal_names():
    assert parse_exit_signal("usr2") == signal.SIGUSR2 and parse_exit_signal("SIGHUP") == signal.SIGHUP
    with pytest.raises(ConfigError, match="cannot be caught"):
        parse_exit_signal("SIGKILL")
    with pytest.raises(ConfigError, match="'SIGNOPE' is not a signal name"):
        parse_exit_signal("SIGNOPE")


@pytest.mark.skipif(native_handler(signal.SIGUSR2) is None, reason="reads sigaction(2): Linux only")
def test_exit_signal_reclaims_a_handler_a_native_library_installed_over_it():
    """A library that installs its own C handler (through libc, unseen by Python's signal module)
    swallows the request; the trainer's per-step reclaim reinstalls the handler, and only then."""
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    exit_signal = ExitSignal("SIGUSR2")
    try:
        assert exit_signal.reclaim() == []  # untouched: nothing reinstalled
        libc.signal(int(signal.SIGUSR2), ctypes.c_void_p(1))  # SIG_IGN, installed natively
        os.kill(os.getpid(), signal.SIGUSR2)
        assert exit_signal.received == 0  # swallowed
        assert exit_signal.reclaim() == [signal.SIGUSR2]
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)  # the Python handler runs at the main thread's next bytecode
        assert exit_signal.received == signal.SIGUSR2
        assert exit_signal.reclaim() == []
    finally:
        exit_signal.restore()
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


# ---- the scripts ------------------------------------------------------------------------------
LAUNCH_SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "**", "*.sh"), recursive=True)
                        + glob.glob(os.path.join(REPO, "launch", "**", "*.sbatch"), recursive=True))


def test_every_launch_script_is_valid_bash():
    assert len(LAUNCH_SCRIPTS) >= 5
    for script in LAUNCH_SCRIPTS:
        result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert result.returncode == 0, (script, result.stderr)


def _slurm_env(root, job_name, **extra):
    """A minimal environment of node 0 of a 64-node job under `root`: Slurm's variables and its
    `scontrol` client (a stand-in that expands the node list as Slurm's does)."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && seq -f "gpu%03g" 1 64\n')
    scontrol.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(root), "PYTHON": sys.executable,
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": job_name, "SLURM_NNODES": "64", "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "gpu[001-064]", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96",
        "SLURM_SUBMIT_DIR": str(root), "TOKENIZER_MODEL": TOKENIZER,
        "DATA_PATH": "0.7 data/code_text_document 0.3 data/docs_text_document", **extra,
    }


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """Every script's dry run, started together (each spends seconds importing torch), as
    name -> (output, run root)."""
    roots = {name: tmp_path_factory.mktemp(name)
             for name in ("pretrain", "extend", "extend_again", "single", "sft", "dpo_again", "profile", "preflight")}
    resumable = roots["extend_again"] / "checkpoints" / "extend-7b-128k"
    resumable.mkdir(parents=True)
    (resumable / checkpointing.LATEST_MARKER).write_text("40\n")  # the stage's own checkpoint, as after a requeue
    pre = str(roots["extend"] / "pre")
    dpo_own = roots["dpo_again"] / "checkpoints" / "dpo-7b"
    dpo_own.mkdir(parents=True)
    (dpo_own / checkpointing.LATEST_MARKER).write_text("20\n")  # a requeued DPO job's own policy
    eight_nodes = dict(SLURM_NNODES="8", SLURM_JOB_NODELIST="gpu[001-008]")
    jobs = {
        "pretrain": ("launch/slurm/pretrain_7b_4k.sbatch", [], _slurm_env(
            roots["pretrain"], "pretrain-7b-4k", DRY_RUN="1", NCCL_IB_HCA="=mlx5_0,mlx5_1", NCCL_DEBUG="INFO")),
        "extend": ("launch/slurm/extend_7b_128k.sbatch", ["--dry-run", "--train-iters", "1000"],
                   _slurm_env(roots["extend"], "extend-7b-128k", PRETRAIN_CKPT=pre)),
        "extend_again": ("launch/slurm/extend_7b_128k.sbatch", [], _slurm_env(
            roots["extend_again"], "extend-7b-128k", DRY_RUN="1", PRETRAIN_CKPT=pre)),
        "sft": ("launch/slurm/sft_7b.sbatch", ["--dry-run"], _slurm_env(
            roots["sft"], "sft-7b", SFT_DATA_PATH="0.7 exp/a/sft 0.3 exp/b/sft", BASE_CKPT=pre, **eight_nodes)),
        "dpo_again": ("launch/slurm/dpo_7b.sbatch", ["--dpo-beta", "0.2"], _slurm_env(
            roots["dpo_again"], "dpo-7b", DRY_RUN="1", DPO_DATA_PATH="exp/a/dpo", SFT_CKPT=pre, **eight_nodes)),
        "profile": ("launch/slurm/profile_7b.sbatch", ["--dry-run", "--no-overlap-param-gather"],
                    _slurm_env(roots["profile"], "profile-7b-4k", PROFILE_STEPS="8")),
        "preflight": ("launch/slurm/preflight.sbatch", ["--dry-run", "--slow-fraction", "0.8"],
                      _slurm_env(roots["preflight"], "preflight")),
        "single": ("launch/torchrun.sh", ["--dry-run", "--preset", "1b", "--tokenizer-model", TOKENIZER,
                                          "--data-path", "data/x", "--train-iters", "3000",
                                          "--tensor-model-parallel-size", "4"],
                   {"PATH": os.environ["PATH"], "HOME": str(roots["single"]), "PYTHON": sys.executable,
                    "NPROC_PER_NODE": "8"}),
    }
    procs = {name: subprocess.Popen(["bash", os.path.join(REPO, script), *args], env=env, cwd=env["HOME"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (script, args, env) in jobs.items()}
    outputs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, out[-3000:], err[-3000:])
        outputs[name] = (out, roots[name])
    return outputs


def check_full_job(out, tp, cp, pp):
    rows = layout_rows(out)
    sizes = layout_sizes(out)
    assert sorted(rows) == list(range(512)) and tp * cp * pp * sizes["dp"] == 512
    assert sizes == {"tp": tp, "cp": cp, "pp": pp, "dp": 512 // (tp * cp * pp)}
    assert rows[0] == (0, 0, 0, 0, 0, 0)
    assert rows[511] == (63, 7, pp - 1, sizes["dp"] - 1, cp - 1, tp - 1)
    assert "world: 512 processes = 64 nodes x 8 per node" in out


def test_pretrain_script_dry_run_plans_the_512_gpu_job(script_runs):
    out, root = script_runs["pretrain"]
    check_full_job(out, tp=2, cp=1, pp=1)
    assert re.search(r"^srun --nodes=64 --ntasks-per-node=1 .*launch/torchrun.sh --preset 7b ", out, re.M)
    assert "--nnodes=64 --rdzv-backend=c10d --rdzv-endpoint=gpu001:24242 --rdzv-id=4242" in out
    for line in ("CUDA_DEVICE_MAX_CONNECTIONS=1", "OMP_NUM_THREADS=12", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 "NCCL_DEBUG=INFO", "NCCL_IB_HCA==mlx5_0,mlx5_1", "NCCL_NVLS_ENABLE=(unset: library default)",
                 "TORCH_FR_BUFFER_SIZE=20000", "TORCH_NCCL_TRACE_BUFFER_SIZE=20000", "TORCH_NCCL_DUMP_ON_TIMEOUT=1",
                 f"TORCH_FR_DUMP_TEMP_FILE={root}/logs/pretrain-7b-4k-4242/nccl_trace/rank_",
                 f"TORCH_NCCL_DEBUG_INFO_TEMP_FILE={root}/logs/pretrain-7b-4k-4242/nccl_trace/rank_"):
        assert line in out.splitlines(), line  # defaults, and the caller's values kept
    cfg = resolved_config(out)
    assert cfg["data"]["seq_length"] == 4096 and cfg["training"]["global_batch_size"] == 1024
    assert cfg["parallel"]["sequence_parallel"] and cfg["training"]["micro_batch_size"] == 4
    assert cfg["parallel"]["use_distributed_optimizer"] and cfg["parallel"]["overlap_param_gather"]  # the planner's #1
    assert cfg["model"]["params_dtype"] == "bfloat16"  # sharded fp32 master weights
    assert cfg["model"]["make_vocab_size_divisible_by"] * 2 == 1024  # the same padding at the 128K stage's TP
    assert cfg["checkpoint"]["save"] == cfg["checkpoint"]["load"] == f"{root}/checkpoints/pretrain-7b-4k"
    assert cfg["logging"]["metrics_file"] == f"{root}/logs/pretrain-7b-4k-4242/metrics.jsonl"
    assert cfg["training"]["exit_signal"] == "SIGUSR1" and not os.path.exists(root / "logs")
    assert cfg["training"]["manual_gc"] and cfg["training"]["manual_gc_interval"] == 100
    assert cfg["logging"]["log_straggler"]
    assert re.search(r"^fullest GPU \(pipeline rank 0\): weights .* GiB$", out, re.M) and "h100-sxm fits" in out


def test_extension_script_starts_from_pretraining_weights(script_runs):
    out, root = script_runs["extend"]
    check_full_job(out, tp=8, cp=4, pp=1)
    cfg = resolved_config(out)
    assert cfg["model"]["use_rope_scaling"] and cfg["model"]["rope_scaling_factor"] == 32.0
    assert cfg["model"]["rope_original_max_position_embeddings"] == 4096 and cfg["data"]["seq_length"] == 131072
    assert cfg["checkpoint"]["load"] == str(root / "pre") and cfg["checkpoint"]["finetune"]
    assert cfg["checkpoint"]["save"] == f"{root}/checkpoints/extend-7b-128k"
    assert cfg["model"]["recompute_granularity"] is None and cfg["model"]["make_vocab_size_divisible_by"] * 8 == 1024
    assert cfg["training"]["train_iters"] == 1000  # extra arguments override the script's
    assert cfg["parallel"]["use_distributed_optimizer"] and cfg["parallel"]["overlap_param_gather"]
    assert cfg["model"]["params_dtype"] == "bfloat16"
    assert "MISSING checkpoint (a real run with --finetune refuses to start)" in out


def test_requeued_extension_resumes_its_own_checkpoint(script_runs):
    out, root = script_runs["extend_again"]
    own = f"{root}/checkpoints/extend-7b-128k"
    cfg = resolved_config(out)
    assert cfg["checkpoint"]["load"] == own and not cfg["checkpoint"]["finetune"]
    assert f"load       {own}: resumes at iteration 40" in out


def check_eight_node_job(out, tp):
    rows, sizes = layout_rows(out), layout_sizes(out)
    assert sorted(rows) == list(range(64)) and sizes == {"tp": tp, "cp": 1, "pp": 1, "dp": 64 // tp}
    assert rows[0] == (0, 0, 0, 0, 0, 0) and rows[63] == (7, 7, 0, 64 // tp - 1, 0, tp - 1)
    assert "world: 64 processes = 8 nodes x 8 per node" in out


def test_sft_script_dry_run_starts_from_the_pretrained_weights(script_runs):
    out, root = script_runs["sft"]
    check_eight_node_job(out, tp=4)
    cfg = resolved_config(out)
    assert cfg["training"]["training_mode"] == "sft" and cfg["data"]["data_path"] == []
    assert cfg["data"]["sft_data_path"] == ["0.7", "exp/a/sft", "0.3", "exp/b/sft"]
    assert cfg["data"]["reset_attention_mask"] and cfg["data"]["reset_position_ids"]
    assert cfg["checkpoint"]["load"].endswith("/pre") and cfg["checkpoint"]["finetune"]
    assert cfg["checkpoint"]["save"] == f"{root}/checkpoints/sft-7b"
    assert cfg["training"]["global_batch_size"] == 128 and cfg["model"]["make_vocab_size_divisible_by"] * 4 == 1024
    assert "sft data   exp/a/sft (--sft-data-path: sft_prompt_document, sft_response_document): MISSING" in out


def test_requeued_dpo_script_resumes_its_policy_against_the_sft_reference(script_runs):
    out, root = script_runs["dpo_again"]
    check_eight_node_job(out, tp=4)
    cfg = resolved_config(out)
    own = f"{root}/checkpoints/dpo-7b"
    assert cfg["training"]["training_mode"] == "dpo" and cfg["training"]["dpo_beta"] == 0.2  # extra args win
    assert cfg["checkpoint"]["load"] == own and not cfg["checkpoint"]["finetune"]
    assert cfg["checkpoint"]["ref_load"].endswith("/pre") and cfg["data"]["dpo_data_path"] == ["exp/a/dpo"]
    assert f"load       {own}: resumes at iteration 20" in out
    assert "reference  " in out and "(--ref-load): MISSING checkpoint" in out
    assert re.search(r"^fullest GPU .* \+ DPO reference \d+\.\d = ", out, re.M)


def test_profile_script_dry_run_profiles_the_pretraining_layout_on_synthetic_tokens(script_runs):
    out, root = script_runs["profile"]
    check_full_job(out, tp=2, cp=1, pp=1)
    assert "-m torch.distributed.run --nproc-per-node=8 --nnodes=64" in out and " -m megatron_code.profile " in out
    cfg = resolved_config(out)
    assert cfg["data"]["mock_data"] and cfg["checkpoint"]["save"] is None
    assert cfg["training"]["train_iters"] == 5 + 8 + 3 and cfg["training"]["global_batch_size"] == 1024
    assert cfg["parallel"]["use_distributed_optimizer"]  # the pretraining layout's ZeRO-1
    assert not cfg["parallel"]["overlap_param_gather"]  # extra arguments reach the profiler too
    logs = f"{root}/logs/profile-7b-4k-4242"
    assert (f"5 warmup + 8 measured + 3 phase-timed steps; report -> {logs}/profile.json; traces: 2 measured step(s) "
            f"from ranks 0 -> {logs}/traces; NVTX ranges: on") in out


def test_launcher_refuses_an_unknown_module(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": sys.executable, "MCODE_MODULE": "os"}
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "torchrun.sh"), "--dry-run"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "MCODE_MODULE=os: expected megatron_code.train, megatron_code.profile" in result.stderr


def test_preflight_script_dry_run_plans_the_check_of_all_512_gpus(script_runs):
    out, root = script_runs["preflight"]
    report = f"{root}/logs/preflight-4242/preflight.json"
    assert f" -m megatron_code.preflight --report {report} --slow-fraction 0.8" in out
    assert "preflight: 512 ranks on 64 node(s) x 8 | cuda (the job's nodes)" in out
    assert "  GEMM: 500 x [8192, 8192] x [8192, 8192] bf16 per rank" in out
    assert "between neighbouring nodes (2 round(s), rank by rank)" in out and "slow: below 80%" in out
    assert "train iters" not in out and not os.path.exists(root / "logs")  # nothing trained, nothing made


def test_single_node_script_dry_run(script_runs):
    out, _ = script_runs["single"]
    assert "-m torch.distributed.run --nproc-per-node=8 --standalone -m megatron_code.train --preset 1b" in out
    rows = layout_rows(out)
    assert sorted(rows) == list(range(8)) and rows[7] == (0, 7, 0, 1, 0, 3)
    assert layout_sizes(out) == {"tp": 4, "cp": 1, "pp": 1, "dp": 2}


# ---- save and exit on a signal -----------------------------------------------------------------
def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _worker_of_rank(root: int, rank: int) -> int:
    for pid in _descendants(root):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"RANK") == str(rank).encode() and b"LOCAL_RANK" in env:
            return pid
    raise AssertionError(f"no training process of rank {rank} under {root}")


def _signal_masks(pid: int) -> str:
    """The Sig* lines of /proc/PID/status (blocked, ignored, caught: hex masks, bit n-1 = signal n)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            fields = [line.split() for line in fh if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]
        return " ".join(f"{name}{value}" for name, value in fields)
    except OSError as err:
        return f"unreadable ({err})"


def _process_report(root: int) -> str:
    """One line per process under `root`: pid, name, parent, threads, signal masks and pending
    signals (a signal still pending a moment after delivery was blocked in every thread)."""
    lines = []
    for pid in _descendants(root):
        try:
            with open(f"/proc/{pid}/status") as fh:
                fields = dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
        except OSError:
            continue
        keys = ("Name", "PPid", "Threads", "SigBlk", "SigIgn", "SigCgt", "SigPnd", "ShdPnd")
        lines.append(f"  pid {pid}: " + " ".join(f"{key}={fields.get(key, '?').strip()}" for key in keys))
    return "\n".join(lines)


def run_and_signal(args, env, deliver, timeout=240, preexec_fn=None, command=None):
    """Run launch/torchrun.sh ARGS (or `command` ARGS); once step 2 is logged call deliver(process).
    Returns (exit code, output); a run that hangs is killed with everything it started."""
    command = command or ["bash", os.path.join(REPO, "launch", "torchrun.sh")]
    proc = subprocess.Popen([*command, *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=preexec_fn)

    def kill_all():
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    watchdog = threading.Timer(timeout, kill_all)
    watchdog.start()
    lines, delivered = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if not delivered and re.search(r"step\s+2/\d+ \|", line):
                masks = _signal_masks(proc.pid)  # before: a failure then shows whether bash could trap it
                before = _process_report(proc.pid)
                deliver(proc)
                delivered = True
                time.sleep(0.3)
                lines.append(f"signal sent after the line above; the launcher's masks then: {masks}\n"
                             f"processes before:\n{before}\nprocesses 0.3 s after:\n{_process_report(proc.pid)}\n")
        return proc.wait(), "".join(lines)
    finally:
        watchdog.cancel()


def signal_run_args(data, ckpt, train_iters, **flags):
    args = ["--preset", "tiny", "--data-path", data, "--tokenizer-model", TOKENIZER, "--train-iters",
            str(train_iters), "--lr-warmup-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--seq-length", "128", "--eval-interval", "0", "--num-workers", "0", "--seed", "1234",
            "--log-interval", "1", "--save", ckpt]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def stopped_iteration(out: str, train_iters: int, name: str = "SIGUSR1") -> int:
    match = re.search(rf"exit signal {name}: stopped after iteration (\d+)/{train_iters}, checkpoint ", out)
    # On failure: what the launcher said it did with the signal, then the end of the run.
    launcher = [line for line in out.splitlines() if line.startswith(("torchrun.sh:", "signal sent", "processes ", "  pid ", "received SIG"))]
    assert match, "\n".join(launcher or ["(the launcher logged nothing about the signal)"]) + "\n" + out[-3000:]
    return int(match.group(1))


def test_exit_signal_saves_and_the_resumed_run_matches_an_uninterrupted_one(fixture_data, tmp_path):
    """USR1 to the launcher (forwarded to the trainer, which torchrun must survive): the run ends
    the step, saves, exits 0; resuming from that checkpoint reproduces the uninterrupted run."""
    # On a GPU the tiny model's steps take ~25 ms and the whole run ~1 s: with 10 and with 40
    # steps the run ended without the signal taking effect (H200, 2026-11-26; cause not yet
    # known), so there the run is long enough that timing alone cannot explain a miss.
    train_iters = 200 if torch.cuda.is_available() else 40
    ckpt, metrics = str(tmp_path / "ckpt"), tmp_path / "m.jsonl"
    env = {**os.environ, "PYTHON": sys.executable, "NPROC_PER_NODE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # this process's threads: the same float sums
    code, out = run_and_signal(signal_run_args(fixture_data, ckpt, train_iters, metrics_file=metrics), env,
                               lambda proc: proc.send_signal(signal.SIGUSR1))
    assert code == 0, out[-3000:]
    stop = stopped_iteration(out, train_iters)
    assert 2 <= stop < train_iters and checkpointing.latest_iteration(ckpt) == stop
    common = dict(train_iters=train_iters, lr_warmup_iters=2, micro_batch_size=2, global_batch_size=4, seq_length=128)
    full = run_training(tiny_run(fixture_data, **common))
    before = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]  # steps only
    resumed = run_training(tiny_run(fixture_data, **common, save=ckpt, load=ckpt))
    assert [r["step"] for r in before + resumed] == list(range(1, train_iters + 1))
    assert [r["loss"] for r in before + resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full[stop:]]


def test_all_ranks_stop_together_when_only_one_rank_gets_the_signal(fixture_data, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    env = {**os.environ, "PYTHON": sys.executable, "NPROC_PER_NODE": "2", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    code, out = run_and_signal(signal_run_args(fixture_data, ckpt, 40, exit_signal="SIGUSR2"), env,
                               lambda proc: os.kill(_worker_of_rank(proc.pid, 1), signal.SIGUSR2))
    assert code == 0, out[-3000:]
    stop = stopped_iteration(out, 40, "SIGUSR2")  # logged by rank 0, which never got the signal
    assert 2 <= stop < 40 and checkpointing.latest_iteration(ckpt) == stop
    rng = os.path.join(checkpointing.checkpoint_dir(ckpt, stop), "rng")
    assert sorted(os.listdir(rng)) == ["rank_00000.pt", "rank_00001.pt"]  # both ranks saved that step


def test_exit_signal_is_delivered_even_if_the_launcher_blocked_it(fixture_data, tmp_path):
    """Signal masks survive fork and exec: a trainer started with SIGUSR1 blocked must unblock it.
    (MCODE_SIGNALS_RESET keeps the launcher from unblocking it first, as it otherwise would.)"""
    ckpt = str(tmp_path / "ckpt")
    env = {**os.environ, "PYTHON": sys.executable, "NPROC_PER_NODE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "MCODE_SIGNALS_RESET": "1"}
    code, out = run_and_signal(signal_run_args(fixture_data, ckpt, 40), env,
                               lambda proc: os.kill(_worker_of_rank(proc.pid, 0), signal.SIGUSR1),
                               preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1}))
    assert code == 0, out[-3000:]
    assert 2 <= stopped_iteration(out, 40) < 40


def _ignore_exit_signals():
    for number in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(number, signal.SIG_IGN)


def _block_exit_signals():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})


@pytest.mark.parametrize("start_state", [_ignore_exit_signals, _block_exit_signals], ids=["ignored", "blocked"])
def test_exit_signal_sent_to_the_launcher_works_when_it_started_with_the_signal_ignored_or_blocked(
        fixture_data, tmp_path, start_state):
    """A shell cannot trap a signal ignored when it started (its trap is silently void), and keeps
    a signal blocked at its start pending forever (bash does not unblock what it traps), so a job
    runner that starts jobs either way would lose the save-and-exit signal. The launcher
    re-executes itself with default handling, unblocked, first (launch/signals.sh)."""
    ckpt = str(tmp_path / "ckpt")
    env = {**os.environ, "PYTHON": sys.executable, "NPROC_PER_NODE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("MCODE_SIGNALS_RESET", None)
    code, out = run_and_signal(signal_run_args(fixture_data, ckpt, 40), env,
                               lambda proc: proc.send_signal(signal.SIGUSR1), preexec_fn=start_state)
    assert code == 0, out[-3000:]
    assert "were ignored or blocked when this shell started" in out and "SIGUSR1 forwarded to 1 worker(s)" in out
    assert 2 <= stopped_iteration(out, 40) < 40


# ---- the batch shell's requeue decision (launch/slurm/common.sh), with srun and scontrol faked ----
TINY_JOB = """#!/bin/bash
set -euo pipefail
JOB_NAME=tiny-job JOB_NODES=1 GPUS_PER_NODE=1
source "$REPO_DIR/launch/slurm/common.sh"
slurm_parse_args "$@"
slurm_setup
slurm_launch --save "$CKPT_DIR" --load "$CKPT_DIR" "${EXTRA_TRAIN_ARGS[@]}"
"""


def _tiny_slurm_job(root, train_iters: int) -> tuple[list[str], dict]:
    """A one-node job script on common.sh, with an `srun` that runs its command here and an
    `scontrol` that answers `show hostnames` and records `requeue` in root/requeues."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\ncase "$1" in\n  show) echo localhost ;;\n'
                                      '  requeue) echo "requeue $2" >> "$REQUEUE_LOG" ;;\nesac\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    (root / "job.sbatch").write_text(TINY_JOB)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "REPO_DIR": REPO,
           "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "tiny-job", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_ON_NODE": "1", "RUN_ROOT": str(root),
           "TRAIN_ITERS": str(train_iters), "REQUEUE_LOG": str(root / "requeues"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    return ["bash", str(root / "job.sbatch")], env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requeues(root) -> list[str]:
    path = root / "requeues"
    return path.read_text().splitlines() if path.exists() else []


def test_a_failed_run_is_requeued_only_after_saving_a_newer_checkpoint(fixture_data, tmp_path):
    """lr 1e30 saves step 1, then stops at step 2 (non-finite gradient norm): the job requeues
    itself to resume. The requeued job fails at step 2 again without a new checkpoint, and stops
    there, saying why, rather than looping."""
    cmd, env = _tiny_slurm_job(tmp_path, train_iters=6)
    flags = ["--preset", "tiny", "--data-path", fixture_data, "--tokenizer-model", TOKENIZER, "--train-iters", "6",
             "--lr", "1e30", "--min-lr", "1e29", "--lr-warmup-iters", "0", "--clip-grad", "0", "--micro-batch-size",
             "2", "--global-batch-size", "2", "--seq-length", "64", "--eval-interval", "0", "--save-interval", "1"]
    first = subprocess.run(cmd + flags, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode != 0 and "gradient norm is nan at iteration 2" in first.stdout + first.stderr
    assert "the run failed (exit status 1) after saving iteration 1 (this job started at -1); requeueing job 77" \
        in first.stdout and _requeues(tmp_path) == ["requeue 77"]
    again = subprocess.run(cmd + flags, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and _requeues(tmp_path) == ["requeue 77"]  # no second requeue
    assert "the run failed (exit status 1); not requeued: no checkpoint saved since the job started (latest: 1)" \
        in again.stdout


def test_the_batch_shell_forwards_usr1_and_requeues_the_saved_run(fixture_data, tmp_path):
    """Slurm's `--signal=B:USR1` goes to the batch shell: its trap passes it on through srun to the
    ranks, which save and exit 0, and the shell requeues the unfinished job."""
    cmd, env = _tiny_slurm_job(tmp_path, train_iters=40)
    args = signal_run_args(fixture_data, str(tmp_path / "unused"), 40)[:-2]  # the job script sets --save
    code, out = run_and_signal(args, env, lambda proc: proc.send_signal(signal.SIGUSR1), command=cmd)
    assert code == 0, out[-3000:]
    stop = stopped_iteration(out, 40)
    assert checkpointing.latest_iteration(str(tmp_path / "checkpoints" / "tiny-job")) == stop
    assert "USR1 (time limit near)" in out and "checkpoint saved; requeueing job 77" in out
    assert _requeues(tmp_path) == ["requeue 77"]
