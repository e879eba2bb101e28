"""mcode-preflight with a slow GPU and a slow node simulated, for tests/test_preflight.py:

    python tests/preflight_probe.py SLOW_RANK SLOW_NODE SECONDS [mcode-preflight flags]

On global rank SLOW_RANK every matrix product sleeps SECONDS first (a throttled GPU); on every rank
of torchrun agent SLOW_NODE (GROUP_RANK) every all-reduce does (a slow link inside that node).
-1 slows nothing."""
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_code.preflight.cli import main  # noqa: E402


def slowed(function, seconds: float):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return function(*args, **kwargs)
    return slow


if __name__ == "__main__":
    slow_rank, slow_node, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    if int(os.environ["RANK"]) == slow_rank:
        torch.mm = slowed(torch.mm, seconds)
    if int(os.environ.get("GROUP_RANK", 0)) == slow_node:
        dist.all_reduce = slowed(dist.all_reduce, seconds)
    sys.exit(main(sys.argv[4:]))
