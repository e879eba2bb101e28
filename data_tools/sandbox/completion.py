"""The completion marker: proof that a ``script`` program's tests ran to their end.

Exit status 0 alone proves nothing: a solution that calls ``sys.exit(0)``, ``exit(0)`` or
``process.exit(0)`` before the tests (a script-style ``main`` that exits, say) also exits 0. So for
each run the runner picks a file name holding a fresh random nonce and passes its absolute path in
the environment variable :data:`COMPLETION_ENV`; each language's recipe (recipes.py, harness/)
creates that file only when control comes back from the end of the tests. A run that exits 0 without
the file is a ``fail``. The nonce keeps a file left by anything else from counting.

A file, not a line on stdout: output can be cut at ``max_output_bytes`` and printed by the program.
"""
from __future__ import annotations

import os
import secrets
import stat

COMPLETION_ENV = "MCODE_SANDBOX_COMPLETION_FILE"
"""Environment variable that tells the program where to write its completion marker (harness files
spell the same name: harness/*, and recipes.py for Bash)."""
MARKER_PREFIX = ".sandbox-tests-completed-"
NOT_COMPLETED_MESSAGE = "the program exited before its tests finished (exit status 0 without the completion marker)"


def new_marker_path(workdir: str) -> str:
    """A fresh marker path in ``workdir`` (absolute, so a program that changes directory still hits it)."""
    return os.path.join(os.path.abspath(workdir), MARKER_PREFIX + secrets.token_hex(16))


def tests_completed(marker_path: str) -> bool:
    """True when the run created ``marker_path`` as a regular file.

    lstat, not open: the program may have left a symlink or a FIFO there, which must neither count
    nor block the caller."""
    try:
        return stat.S_ISREG(os.lstat(marker_path).st_mode)
    except OSError:
        return False
