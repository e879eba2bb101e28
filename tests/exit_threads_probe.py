"""`mcode-train` that, once main() has returned, writes the native threads still running in this
process (what interpreter finalization would meet) to $EXIT_THREADS_DIR/rank<N>.json.

    EXIT_THREADS_DIR=d torchrun --nproc-per-node 2 tests/exit_threads_probe.py <mcode-train flags>

A file per rank, not a line on stdout: torchrun passes the workers' stdout through unbuffered and
unprefixed, and two ranks' lines printed at the same moment came out interleaved (a flaky test).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_code.train import main  # noqa: E402


def native_threads() -> list[str]:
    tasks = "/proc/self/task"
    return sorted(open(f"{tasks}/{task}/comm").read().strip() for task in os.listdir(tasks))


if __name__ == "__main__":
    code = main()
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(os.environ["EXIT_THREADS_DIR"], f"rank{rank}.json"), "w") as report:
        json.dump({"rank": rank, "threads": native_threads()}, report)
    sys.exit(code)
