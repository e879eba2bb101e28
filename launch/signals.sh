# Sourced by the launch scripts that trap the save-and-exit signals (launch/torchrun.sh,
# launch/slurm/common.sh).
#
# A non-interactive shell cannot trap a signal that was ignored when it started (POSIX: the trap is
# accepted and silently void; `trap -p USR1` then prints "trap -- '' SIGUSR1"). Some job runners
# start their jobs that way -- the lent GPU machines did (2026-11-26), and a USR1 sent to
# launch/torchrun.sh never reached training. reexec_with_default_signals re-executes the calling
# script with SIGUSR1 and SIGUSR2 at their default dispositions when either was ignored, so the
# trap that follows works.

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
