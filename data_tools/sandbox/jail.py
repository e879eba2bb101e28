"""The sandbox's supervisor: a fork server that runs each build or run of a program, isolated.

Started once per worker as ``python -I jail.py --serve`` (by forkserver.py) as the caller (root for the
full isolation). For each request (a spec dict) it forks a *request process*, which:

1. calls unshare(2) for new mount, PID, IPC and (unless allowed) network namespaces, inside a new user
   namespace when not root, and forks the run's *init* (PID 1 of the new PID namespace) which mounts
   a fresh /proc, covers the world-writable dirs and $HOME with private tmpfs and binds back, read-only,
   the toolchains' install trees and, writable, the work directory;
2. forks the *program* with the rlimits, its stdio on the run's files, in its own process group,
   under the leased uid (or with every capability dropped in a user namespace), with no_new_privs,
   and execs it. Python programs are not exec'd: the forked interpreter (already isolated and
   unprivileged) runs the harness itself, which saves an interpreter start-up per run;
3. waits for it as a child subreaper, kills it and every descendant at the wall-clock limit or when it
   exits, and writes a status record to the run's status file. The server replies as soon as that
   record is written; the namespaces are torn down after the reply.

This file imports only the standard library and nothing of the package: it runs as a script, and a
forked Python program should find nothing loaded here but the standard library. Messages are marshal
dicts behind a 4-byte length.
"""
import atexit
import ctypes
import gc
import marshal
import os
import resource
import signal
import struct
import sys
import time

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x8000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 24, 36, 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522
RLIMITS = {"cpu": resource.RLIMIT_CPU, "data": resource.RLIMIT_DATA, "nproc": resource.RLIMIT_NPROC,
           "fsize": resource.RLIMIT_FSIZE, "stack": resource.RLIMIT_STACK, "core": resource.RLIMIT_CORE,
           "nofile": resource.RLIMIT_NOFILE}
HOST_MOUNT_NAMESPACE = os.readlink("/proc/self/ns/mnt")
PYTHON_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness", "python_harness.py")
python_harness = None  # loaded by serve()

libc = ctypes.CDLL(None, use_errno=True)


class WallClockExpired(Exception):
    pass


def check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def as_bytes(text):
    return None if text is None else text.encode()


def mount(source, target, fstype, flags, data):
    # A mount in the host's namespace would hide the host's /tmp from everyone: never let one through.
    if os.readlink("/proc/self/ns/mnt") == HOST_MOUNT_NAMESPACE:
        raise RuntimeError(f"refusing to mount {target}: not in a private mount namespace")
    check(libc.mount(as_bytes(source), as_bytes(target), as_bytes(fstype), flags, as_bytes(data)), f"mount {target}")


def under(path, directory):
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def enter_namespaces(network, user_namespace):
    """unshare(2) the namespaces of a run; the calling process's next child is PID 1 of the new PID namespace."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | (0 if network else CLONE_NEWNET)
    check(libc.unshare(flags | (CLONE_NEWUSER if user_namespace else 0)), "unshare")
    if user_namespace:  # map the caller to root of the new namespace (the only mapping we may write)
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing mounted from here on propagates out


def private_mounts(spec):
    """Cover world-writable dirs and hidden dirs with empty tmpfs; bind back what must stay visible."""
    keep = [(path, os.open(path, os.O_PATH | os.O_CLOEXEC), read_only) for path, read_only in spec["visible"]]
    covers = spec["covers"]
    for path, mode in covers:
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['tmpfs_mb']}m,nr_inodes=16384,mode={mode:o}")
    for path, fd, read_only in keep:
        if any(under(path, cover) for cover, _ in covers):
            os.makedirs(path, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
            if read_only:
                mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        os.close(fd)


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities():
    """Drop every capability now (a Python program runs without exec) and empty the bounding set, so
    that even uid 0 of a user namespace gets none back at exec."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    no_capabilities = (CapData * 2)()  # version 3 takes two 32-bit halves, all zero
    check(libc.capset(ctypes.byref(CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), no_capabilities), "capset")


def open_stdio(spec):
    """The run's stdin/stdout/stderr files, opened (close-on-exec) before private mounts can hide them."""
    modes = (os.O_RDONLY, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, os.O_WRONLY | os.O_TRUNC | os.O_CREAT)
    return [os.open(spec[name], mode | os.O_CLOEXEC, 0o600) for name, mode in zip(("stdin", "stdout", "stderr"), modes)]


def become_program(spec, stdio, error_pipe):
    """In the forked child: stdio, limits and identity, then the program (never returns)."""
    try:
        os.setpgid(0, 0)
        for fd, opened in enumerate(stdio):
            os.dup2(opened, fd)  # the copies on 0, 1, 2 are inheritable, the originals close at exec
        for name, (soft, hard) in spec["rlimits"].items():
            resource.setrlimit(RLIMITS[name], (soft, hard))
        if spec["drop_caps"]:
            drop_capabilities()
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["uid"])
            os.setuid(spec["uid"])
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        if spec["inline_python"]:
            os.close(error_pipe)  # started: the supervisor stops waiting for an error
            close_inherited_fds()
            os._exit(run_python_inline(spec["argv"][2:], spec["env"]))
        for signum in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; an exec'd program must not
            signal.signal(signum, signal.SIG_DFL)
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as exc:  # reported to the supervisor through the pipe, then a plain exit
        os.write(error_pipe, f"cannot start {spec['argv'][0]}: {exc}".encode()[:4000])
    os._exit(127)


def close_inherited_fds():
    """Close every descriptor but stdio, as exec would have closed them (looked up: closing all 65536
    possible numbers one by one costs ~15 ms)."""
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            try:
                os.close(int(name))
            except OSError:
                pass  # the descriptor of the listing itself, already closed


def load_python_harness():
    """harness/python_harness.py as a module, loaded once by the server: a forked program then only calls
    its main() (importing it, or run_path, in every child costs ~10 ms of copy-on-write page faults)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sandbox_harness", PYTHON_HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_python_inline(argv, env):
    """Run ``argv`` (the harness and the program file) in this forked interpreter as ``python -I`` would;
    return the exit status. The server started with -I, so sys.path and flags are those of ``python -I``."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = list(argv)
    status = 0
    try:
        python_harness.main(argv[1])
    except SystemExit as exc:
        status = exit_status(exc.code)
    except BaseException:  # what a fresh interpreter would print for an exception nobody caught
        sys.excepthook(*sys.exc_info())
        status = 1
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()  # like interpreter exit: wait for non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120  # CPython's status when flushing stdout fails at exit
    return status


def exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def kill_leftovers(spec, program_pgid):
    """Kill everything the program left: all of the PID namespace, or its group, uid and descendants."""
    if spec["namespaces"]:
        try:
            os.kill(-1, signal.SIGKILL)  # from PID 1 this reaches every other process of the namespace
        except ProcessLookupError:
            return  # nothing was left
        try:
            while True:  # reap them now: until then they still count against the uid's process limit
                os.wait4(-1, 0)
        except ChildProcessError:
            return
    for target in (lambda: os.killpg(program_pgid, signal.SIGKILL), lambda: kill_uid(spec["uid"])):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass
    while kill_children():  # as subreaper, orphaned grandchildren become our children; repeat until none
        pass


def kill_children():
    me, found = str(os.getpid()), False
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = f.read().rsplit(b")", 1)[1].split()[1].decode()
            except (OSError, IndexError):
                continue
            if ppid == me:
                found = True
                try:
                    os.kill(int(entry), signal.SIGKILL)
                    os.waitpid(int(entry), 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
    return found


def kill_uid(uid):
    """Kill every process of ``uid`` (a uid leased to this run alone): kill(-1) from a child with that uid."""
    if uid is None:
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def on_alarm(signum, frame):
    raise WallClockExpired


def supervise(spec, stdio):
    """Run the program to its end or to the wall-clock limit; return the status record."""
    read_end, write_end = os.pipe()  # close-on-exec: EOF without data means the program started
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        become_program(spec, stdio, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        start_error = pipe.read().decode(errors="replace")
    status = {"exit": None, "signal": None, "timed_out": False, "cpu_s": 0.0, "error": start_error or None}
    wait_status = None
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, spec["timeout_s"])
    try:
        while wait_status is None:
            reaped, any_status, usage = os.wait4(-1, 0)  # reaps orphans too (we are PID 1 / subreaper)
            status["cpu_s"] += usage.ru_utime + usage.ru_stime
            if reaped == pid:
                wait_status = any_status
        signal.setitimer(signal.ITIMER_REAL, 0)  # inside the try: an alarm just before it is caught below
    except WallClockExpired:
        status["timed_out"] = wait_status is None
    status["wall_s"] = time.monotonic() - started
    if wait_status is None:  # the program itself may have left its group: kill it by pid as well
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except ProcessLookupError:
                pass
        _, wait_status, usage = os.wait4(pid, 0)
        status["cpu_s"] += usage.ru_utime + usage.ru_stime
    kill_leftovers(spec, pid)
    if os.WIFSIGNALED(wait_status):
        status["signal"] = os.WTERMSIG(wait_status)
    else:
        status["exit"] = os.WEXITSTATUS(wait_status)
    return status


def run_jail(spec, done):
    """Set up the run's filesystem view, supervise the program, write the status file, then close
    ``done`` (the server replies when every copy of it is closed: tearing down the namespaces, a few
    ms, then happens after the reply)."""
    status_fd = os.open(spec["status"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:  # the status and stdio files are opened first: the private mounts may hide their directory
        stdio = open_stdio(spec)
        check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
        if spec["namespaces"]:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            private_mounts(spec)
        os.chdir(spec["workdir"])
        status = supervise(spec, stdio)
    except Exception as exc:  # any failure to set up is the sandbox's, reported as such
        status = {"error": f"sandbox setup failed: {type(exc).__name__}: {exc}"}
    os.write(status_fd, marshal.dumps(status))
    os.close(status_fd)
    os.close(done)


def handle_request(spec, done):
    """The request process: its own session (so it can be killed as a group), namespaces, the run's init."""
    try:
        os.setsid()
        if not spec["namespaces"]:
            run_jail(spec, done)
            os._exit(0)
        enter_namespaces(spec["network"], spec["user_namespace"])
        pid = os.fork()
        if pid == 0:  # PID 1 of the new namespace: dies with the request process, taking the namespace along
            check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
            run_jail(spec, done)  # had the request process died just before, our own wall clock still ends the run
            os._exit(0)
        os.close(done)
        os.waitpid(pid, 0)
    except BaseException as exc:
        with open(spec["status"], "wb") as f:
            f.write(marshal.dumps({"error": f"sandbox setup failed: {type(exc).__name__}: {exc}"}))
    os._exit(0)


def read_message(fd):
    header = os.read(fd, 4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack("<I", header)
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return marshal.loads(b"".join(chunks))


def write_message(fd, message):
    data = marshal.dumps(message)
    os.write(fd, struct.pack("<I", len(data)) + data)


def serve():
    """Answer requests from stdin until EOF: reply {"pid"} when a run starts and {"done"} when it ended."""
    global python_harness
    python_harness = load_python_harness()
    gc.freeze()  # the collector then leaves the server's objects alone in forked children: fewer page copies
    requests, replies = os.dup(0), os.dup(1)  # close-on-exec copies; 0 and 1 become /dev/null
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    while (spec := read_message(requests)) is not None:
        done_read, done_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            for fd in (requests, replies, done_read):
                os.close(fd)
            handle_request(spec, done_write)
        os.close(done_write)
        write_message(replies, {"pid": pid})
        os.read(done_read, 1)  # EOF once the status is written (or everything holding the pipe died)
        os.close(done_read)
        write_message(replies, {"done": True})
        reap_finished_requests()
    while reap_finished_requests(block=True):
        pass


def reap_finished_requests(block=False):
    """Collect request processes that have exited (they finish tearing down after their reply)."""
    try:
        while True:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
            if pid == 0:
                return True
    except ChildProcessError:
        return False


def probe(user_namespace):
    """Exit 0 when namespaces and private mounts work here (isolation.py runs this once per process)."""
    enter_namespaces(False, user_namespace)
    pid = os.fork()
    if pid == 0:
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m")
            check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
        except BaseException as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            os._exit(1)
        os._exit(0)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status)


def main(argv):
    if argv[1] == "--serve":
        serve()
        return 0
    if argv[1] == "--probe":
        return probe(user_namespace=argv[2] == "user")
    if argv[1] == "--kill-uid":
        kill_uid(int(argv[2]))
        return 0
    raise SystemExit(f"usage: {argv[0]} --serve | --probe user|root | --kill-uid UID")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
