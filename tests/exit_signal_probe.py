"""Where, on this machine, the exit signal's handler is taken from the trainer: install ExitSignal,
then go through the trainer's setup one stage at a time (CUDA, the process group, subgroups,
collectives, a Triton kernel, Transformer Engine's import), printing after each stage whether the
native handler is still Python's; finally reclaim it and check a signal reaches the trainer's flag.

    python tests/exit_signal_probe.py [SIGUSR1]     # run by tests/test_gpu.py; prints one JSON line last
"""
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.dispatch import package_imports  # noqa: E402
from kernels.rmsnorm import rms_norm  # noqa: E402
from megatron_code.distributed import init_distributed  # noqa: E402
from megatron_code.training.exit_signal import ExitSignal, native_handler  # noqa: E402


def import_transformer_engine() -> None:
    if package_imports("transformer_engine.pytorch"):  # imports it where installed
        print("(transformer_engine imported)")


def stages(device):
    yield "cuda context", lambda: torch.zeros(1, device=device)
    yield "process group", init_distributed
    yield "subgroup", lambda: dist.new_group([0])
    yield "all_reduce", lambda: dist.all_reduce(torch.ones(1, device=device))
    yield "barrier", dist.barrier
    yield "triton kernel", lambda: rms_norm(torch.randn(4, 64, device=device), torch.ones(64, device=device), 1e-5)
    yield "transformer_engine import", import_transformer_engine


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "SIGUSR1"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    exit_signal = ExitSignal(name)
    sig = signal.Signals[name]
    installed, taken_at = native_handler(sig), []
    for stage, run in stages(device):
        run()
        now = native_handler(sig)
        print(f"{stage:<26} handler {now:#x} ({'ours' if now == installed else 'REPLACED'})", flush=True)
        if now != installed and not taken_at:
            taken_at.append(stage)
    reclaimed = [s.name for s in exit_signal.reclaim()]
    os.kill(os.getpid(), sig)
    time.sleep(0.1)  # the handler runs in the main thread at its next bytecode
    print(json.dumps({"signal": name, "replaced_after": taken_at, "reclaimed": reclaimed,
                      "received": exit_signal.received == sig, "env": {k: v for k, v in os.environ.items()
                                                                       if k.startswith("NCCL_")}}))
    exit_signal.restore()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
