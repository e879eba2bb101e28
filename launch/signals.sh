# Sourced by the launch scripts that trap the save-and-exit signals (launch/torchrun.sh,
# launch/slurm/common.sh).
#
# A non-interactive shell cannot trap a signal that was ignored when it started (POSIX: the trap is
# accepted and silently void; `trap -p USR1` then prints "trap -- '' SIGUSR1"), and a job runner
# that starts jobs that way would lose the save-and-exit signal without a word (reproduced by
# tests/test_launch.py). reexec_with_default_signals re-executes the calling script with SIGUSR1
# and SIGUSR2 at their default dispositions when either was ignored, so the trap that follows
# works. (It was suspected of the signal lost on the lent GPU machines, 2026-11-26, but a launcher
# started normally lost it there too: that cause is still open, docs/benchmarks.md.)

reexec_with_default_signals() {  # usage: reexec_with_default_signals "$0" "$@"
    [[ -n "${MCODE_SIGNALS_RESET:-}" || ! -r /proc/$$/status ]] && return 0
    local key value mask=0
    while read -r key value; do
        [[ "$key" == "SigIgn:" ]] && mask=$value
    done < "/proc/$$/status"
    # Bit n-1 of the mask is signal n: SIGUSR1 = 10, SIGUSR2 = 12 on Linux.
    (( ((16#$mask >> 9) & 1) || ((16#$mask >> 11) & 1) )) || return 0
    echo "$(basename "$1"): SIGUSR1/SIGUSR2 were ignored when this shell started, so its trap could not" \
         "work; re-executing it with their default handling" >&2
    export MCODE_SIGNALS_RESET=1
    exec "${PYTHON:-python}" -c 'import os, signal, sys
for number in (signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(number, signal.SIG_DFL)
os.execvp("bash", ["bash", *sys.argv[1:]])' "$@"
}
