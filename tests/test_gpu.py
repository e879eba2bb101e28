"""GPU-only checks (skipped without CUDA): the CUDA attention backends against the CPU fp32
reference, packed sequences on each backend, and a bf16 training step."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_code.model import GPTModel, ModelConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def config(backend="sdpa"):
    return ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                       group_query_attention=True, num_query_groups=2, vocab_size=1000,
                       max_position_embeddings=512, attention_backend=backend)


def needs(package):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"needs {package}")


def reference_logits(tokens, state, positions=None, segments=None):
    """fp32 CPU logits of the same weights: the numerical ground truth."""
    model = GPTModel(config())
    model.load_state_dict(state)
    return model(tokens.cpu(), positions, segments)


@pytest.mark.parametrize("backend", [
    "sdpa", pytest.param("flash", marks=needs("flash_attn")), pytest.param("te", marks=needs("transformer_engine")),
])
def test_cuda_backend_bf16_matches_cpu_fp32(backend):
    torch.manual_seed(0)
    model = GPTModel(config(backend)).cuda()
    tokens = torch.randint(0, 1000, (2, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens).float().cpu()
    expected = reference_logits(tokens, {k: v.cpu() for k, v in model.state_dict().items()})
    torch.testing.assert_close(logits, expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("backend", [
    "sdpa", pytest.param("flash", marks=needs("flash_attn")), pytest.param("te", marks=needs("transformer_engine")),
])
def test_cuda_backend_packed_sequences(backend):
    torch.manual_seed(0)
    model = GPTModel(config(backend)).cuda()
    segments = torch.tensor([[0] * 40 + [1] * 50 + [2] * 38, [0] * 100 + [1] * 28], device="cuda")
    positions = torch.cat([torch.arange(n) for n in (40, 50, 38, 100, 28)]).view(2, 128).cuda()
    tokens = torch.randint(0, 1000, (2, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens, positions, segments).float().cpu()
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    expected = reference_logits(tokens, state, positions.cpu(), segments.cpu())
    torch.testing.assert_close(logits, expected, rtol=0.05, atol=0.05)


def test_bf16_training_step_on_cuda_reduces_loss():
    torch.manual_seed(0)
    model = GPTModel(config()).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    tokens = torch.randint(0, 1000, (4, 128), device="cuda")
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, labels=tokens.roll(-1, 1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_exit_signal_reaches_the_trainer_after_cuda_and_nccl_setup():
    """The save-and-exit signal went missing on the lent GPU machines (docs/benchmarks.md): the
    probe walks the trainer's CUDA/NCCL setup, prints where a native library took the handler, and
    checks that ExitSignal.reclaim gets the signal back to the trainer's flag."""
    probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exit_signal_probe.py")
    proc = subprocess.run([sys.executable, probe, "SIGUSR1"], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "MASTER_PORT": "29531"})
    print(proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["received"], proc.stdout


@pytest.mark.parametrize("precision", ["bf16", "fp8", "bf16-packed"])
def test_the_trainer_launches_its_steps_without_waiting_for_the_gpu(fixture_data, precision):
    """After the first step (lazy initialization, autotuning), launching a step makes no
    synchronizing CUDA call: loading its micro-batches, their forward and backward, the clipping,
    the optimizer and the copy of its loss to the host (training/launched_step.py). Any `.item()`,
    blocking copy or data-dependent shape (`nonzero`) there would leave the GPU idle while the
    host catches up; torch's sync debug mode raises at the first one, naming it. `bf16-packed`:
    documents packed with --reset-attention-mask, their cu_seqlens found on the host."""
    from megatron_code.training.arguments import run_config_from_values
    from megatron_code.training.trainer import train
    from tests.conftest import tiny_run

    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need sm_89 or newer")
    checked = []

    def check_launches(trainer):
        launch = trainer._launch_step

        def launch_checked(loader):
            if trainer.iteration == 0:
                return launch(loader)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return launch(loader)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked.append(trainer.iteration)
        trainer._launch_step = launch_checked

    # bf16 also checks --log-straggler's CUDA events inside the step
    extra = {"fp8": {"fp8_format": "hybrid"}, "bf16-packed": {"reset_attention_mask": True},
             "bf16": {"log_straggler": True, "log_interval": 2}}[precision]
    values = tiny_run(fixture_data, train_iters=4, bf16=True, micro_batch_size=2, global_batch_size=8, **extra)
    history = train(run_config_from_values(values), prepare=check_launches)
    assert checked == [2, 3, 4] and len(history) == 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["ms_per_step"] > 0 for r in history)
    if precision == "bf16":  # its forward-backward is part of its step, on the GPU's timeline
        for first, second in (history[0:2], history[2:4]):
            forward_backward = second["straggler"]["forward_backward_ms"]["max"]
            assert 0 < forward_backward < (first["ms_per_step"] + second["ms_per_step"]) / 2, (first, second)
