"""`mcode-train` that, once main() has returned, prints the native threads still running in this
process, as one line: what interpreter finalization would meet.

    torchrun --nproc-per-node 2 tests/exit_threads_probe.py <mcode-train flags>   # tests/test_parallel.py
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
    print("threads at exit: " + json.dumps({"rank": int(os.environ.get("RANK", 0)), "threads": native_threads()}),
          flush=True)
    sys.exit(code)
