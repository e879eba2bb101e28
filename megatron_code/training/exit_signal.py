"""Save-and-exit on a signal. A scheduler about to stop the job (Slurm's `--signal=B:USR1@300`,
forwarded by launch/slurm/common.sh; SIGTERM at the time limit or from torchrun) makes each
process record the signal; the trainer all-reduces the record after every step and reads the
result with that step's loss, once it has launched the next step, so all ranks stop after the same
iteration (one or two steps after the signal), save (collectively) and exit 0. The handler only
records: saving from inside a signal handler could interrupt a collective half-way.

--exit-duration-in-mins goes the same way: a rank past the time limit reports it in the same
all-reduce, so every rank stops after the same step, saves and exits 0."""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from megatron_code.errors import ConfigError

_UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)
TIME_LIMIT = 0x100
"""What `agreement` reports for --exit-duration-in-mins: above every signal number, so the
all-reduce's MAX keeps it."""


def parse_exit_signal(name: str) -> signal.Signals:
    """`SIGUSR1`, `USR1` or `usr1` -> signal.SIGUSR1; a clear error for anything else."""
    key = name.strip().upper()
    key = key if key.startswith("SIG") else "SIG" + key
    try:
        sig = signal.Signals[key]
    except KeyError:
        raise ConfigError(f"--exit-signal {name!r} is not a signal name; use e.g. SIGUSR1, SIGUSR2 "
                          "or SIGHUP.") from None
    if sig in _UNCATCHABLE:
        raise ConfigError(f"--exit-signal {sig.name} cannot be caught by a process; use e.g. SIGUSR1.")
    return sig


class _SigAction(ctypes.Structure):
    """glibc's struct sigaction on Linux (x86_64 and aarch64): handler, 1024-bit mask, flags, restorer."""

    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def native_handler(sig: int) -> int | None:
    """The address of the handler the kernel will run for `sig` (0: default, 1: ignore), as
    sigaction(2) reports it; None where it cannot be read (not Linux). Python's own record
    (signal.getsignal) does not see a handler a native library installed over it."""
    if not sys.platform.startswith("linux"):
        return None
    action = _SigAction()
    if _libc().sigaction(int(sig), None, ctypes.byref(action)) != 0:
        return None
    return action.handler or 0


class ExitSignal:
    """Installs handlers for SIGTERM and the configured signal (restored by `restore`); `agreement`
    is the per-step collective that tells every rank whether any rank got one."""

    def __init__(self, name: str, duration_minutes: float | None = None):
        self.signals = sorted({parse_exit_signal(name), signal.SIGTERM})
        self.received = 0
        """Number of the first signal this process got (0: none)."""
        self.duration_minutes = duration_minutes
        self.deadline = None if duration_minutes is None else time.monotonic() + 60 * duration_minutes
        """time.monotonic() past which the run stops (--exit-duration-in-mins, counted from here)."""
        self.stopped_by: signal.Signals | int | None = None
        """The signal all ranks agreed to stop on (the largest number any rank got), or TIME_LIMIT."""
        self._previous = {}
        self._native = {}
        """Per signal, the native handler address Python's signal.signal installed."""
        # Python allows handlers only in the main thread; a run driven from another thread keeps
        # the default actions (and never sees a request).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
                self._native[sig] = native_handler(sig)
            # A signal mask is inherited through fork and exec: a launcher that blocked these
            # signals would make the handler unreachable, so make sure they can be delivered.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def _record(self, signum: int, frame) -> None:
        if self.received:
            return  # launchers may deliver one request twice (to the step and to each task)
        self.received = signum
        if os.environ.get("RANK", "0") == "0":
            # os.write: print() can fail when the signal interrupts another print.
            os.write(2, f"received {signal.Signals(signum).name}: saving and exiting after the next step\n".encode())

    def reclaim(self) -> list[signal.Signals]:
        """Reinstall the handlers a native library replaced since they were installed (such a
        library's handler swallows the request: the run would never stop); returns those signals.
        Cheap (one sigaction(2) call per signal): the trainer calls it every step."""
        taken = [sig for sig, address in self._native.items()
                 if address is not None and native_handler(sig) != address]
        for sig in taken:
            signal.signal(sig, self._record)
            self._native[sig] = native_handler(sig)
            if os.environ.get("RANK", "0") == "0":
                os.write(2, f"warning: a native library replaced the {sig.name} handler after the trainer "
                            f"installed it (NCCL does with NCCL_PROXY_DUMP_SIGNAL={int(sig)}); reinstalled, so "
                            f"{sig.name} still saves and exits\n".encode())
        return taken

    def agreement(self, device: torch.device) -> torch.Tensor:
        """Collective (every rank, every step): a 0-d device tensor holding the largest signal
        number any rank got so far (0: none), left on the device. The trainer reads it with the
        step's loss (training/launched_step.py) and passes it to `decide`."""
        self.reclaim()
        code = self.received or (TIME_LIMIT if self.deadline is not None and time.monotonic() >= self.deadline else 0)
        flag = torch.full((), code, dtype=torch.int32, device=device)  # a fill: no blocking copy
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def decide(self, agreed: float) -> signal.Signals | int | None:
        """The signal (or TIME_LIMIT) that stops the run, given an `agreement` read back on the
        host, or None."""
        if agreed and self.stopped_by is None:
            self.stopped_by = TIME_LIMIT if int(agreed) == TIME_LIMIT else signal.Signals(int(agreed))
        return self.stopped_by

    def stop_message(self, iteration: int, train_iters: int, saved_to: str | None) -> str:
        """The one log line that says the run stopped on the signal or the time limit, and where it
        can resume."""
        if self.stopped_by == TIME_LIMIT:
            reason = f"time limit (--exit-duration-in-mins {self.duration_minutes:g})"
        else:
            reason = f"exit signal {self.stopped_by.name if self.stopped_by else '?'}"
        where = (f"checkpoint {saved_to}; resume with --load {os.path.dirname(saved_to)}" if saved_to
                 else "no --save, nothing saved")
        return f"{reason}: stopped after iteration {iteration}/{train_iters}, {where}"

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous, self._native = {}, {}
