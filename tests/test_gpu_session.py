"""benchmarks/gpu_session.sh is what a lent GPU machine runs, minutes at a time: every
gpu_check.py command line in it must parse (known sections, variants and flags), so that a typo
costs nothing on CPU rather than a device call."""
import os
import shlex

import pytest

from benchmarks.gpu_check import VARIANTS, build_parser

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_session.sh")


def gpu_check_command_lines() -> list[list[str]]:
    """The arguments of each gpu_check.py call in the script (continuation lines joined, "$@" and
    the timeout/python prefix dropped, shell variables left as words)."""
    with open(SCRIPT) as fh:
        text = fh.read().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if "benchmarks/gpu_check.py" in words:
            calls.append([w for w in words[words.index("benchmarks/gpu_check.py") + 1:] if w != "$@"])
    return calls


def test_the_session_script_runs_gpu_check_three_times():
    assert len(gpu_check_command_lines()) == 3  # phase 1, phase 2, the merged table


@pytest.mark.parametrize("argv", gpu_check_command_lines(), ids=["phase1", "phase2", "merge"])
def test_every_gpu_check_call_of_the_session_script_parses(argv):
    args = build_parser().parse_args(argv)
    assert set(args.variants) <= set(VARIANTS)
