"""mcode-train with one rank made slow on purpose, for tests/test_straggler.py: under torchrun,

    python tests/straggler_probe.py SLOW_COMPUTE_RANK SLOW_DATA_RANK SECONDS [mcode-train flags]

sleeps SECONDS before every forward of SLOW_COMPUTE_RANK's model (a slow GPU) and before every
micro-batch SLOW_DATA_RANK's loader yields (a slow file system), then trains as mcode-train does."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_code.training.arguments import parse_args  # noqa: E402
from megatron_code.training.trainer import train  # noqa: E402


def slow_iterator(items, seconds: float):
    for item in items:
        time.sleep(seconds)
        yield item


def main() -> None:
    slow_compute_rank, slow_data_rank, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    cfg = parse_args(sys.argv[4:])

    def slow_down(trainer) -> None:
        rank = trainer.env.rank
        if rank == slow_compute_rank:
            trainer.model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
        if rank == slow_data_rank:
            make_loader = trainer._train_loader
            trainer._train_loader = lambda: slow_iterator(make_loader(), seconds)

    train(cfg, prepare=slow_down)


if __name__ == "__main__":
    main()
