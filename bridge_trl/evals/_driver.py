"""The code that runs inside a sandboxed process, before and around the untrusted program.

Not imported by the evaluator: `sandbox.py` runs this file's text with `python -I -S -c` in the child. It reads
the job from `job.json` in its working directory, sets the resource limits, moves into `work/`, and then runs
the program. Verdicts travel to the parent as frames (1-byte tag, 4-byte length, payload) on an inherited pipe:
`O` one stdin/stdout case's output, `F` a failure (exception type and message), `P` success, whose payload is a
nonce that the parent wrote into a second pipe and that this code reads only after every test ran. A program
that exits early (`sys.exit(0)`, `os._exit(0)`, a signal) never gets to send `P`; one that raises is reported
by `F`. Everything the driver needs after the program ran (`os.write`, `os._exit`, ...) is bound before it runs.

With a third argument `supervise` (the `none` isolation mode on Linux, where no PID namespace ends the run), the
first process becomes a child subreaper and forks: the child runs the job, in its own process group, and the
parent only waits. Whatever the program starts is its descendant, and an orphan of any of them is re-parented
to it even if it left the session and group or cleared its parent-death signal; when the job ends, or when the
evaluator sends SIGTERM (the timeout), it kills and reaps every descendant before it exits. The program runs as
the same user and can still kill this supervisor; the evaluator's process-group kill is then all that is left.
"""

import io
import json
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def adopted() -> list[int]:
    """This process's children (the kernel's list, or a scan of /proc where there is none)."""
    try:
        return [int(c) for task in os.listdir("/proc/self/task")
                for c in open(f"/proc/self/task/{task}/children").read().split()]  # fmt: skip
    except OSError:
        pass
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return found


def supervise(res_fd: int, nonce_fd: int) -> None:
    """Return in a child that runs the job; the parent waits, kills every descendant, exits like the child."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return  # no subreaper here: the job runs unsupervised, as a process group only
    child = 0

    def kill_all() -> None:
        if child:
            try:
                os.killpg(child, signal.SIGKILL)
            except OSError:
                pass
        while True:  # a killed process's children become ours: repeat until none is left
            for pid in adopted():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return

    def on_timeout(signum, frame) -> None:
        kill_all()
        os._exit(128 + signal.SIGKILL)

    signal.signal(signal.SIGTERM, on_timeout)  # before the fork: a timeout at any moment finds it
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the supervisor (it can clear this)
        os.setpgid(0, 0)  # its own group: one kill reaches most of a tree, never this supervisor
        return
    os.close(res_fd)  # only the job reports and reads the nonce
    os.close(nonce_fd)
    try:
        os.setpgid(child, child)  # both sides set it: no window where a kill of the group misses the child
    except OSError:
        pass
    # Not reaped yet (WNOWAIT): its number, and so its group's, cannot name anyone else while kill_all runs.
    info = os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
    kill_all()
    if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):  # report a signal as the signal, as the driver would
        try:
            signal.signal(info.si_status, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL has no handler to reset
            pass
        os.kill(os.getpid(), info.si_status)
        os._exit(128 + info.si_status)
    os._exit(info.si_status)


def main() -> None:
    res_fd, nonce_fd = int(sys.argv[1]), int(sys.argv[2])
    if sys.argv[3:] == ["supervise"]:
        supervise(res_fd, nonce_fd)
    with open("job.json", encoding="utf-8") as f:
        job = json.load(f)
    for name, value in job["limits"].items():
        if value is not None:  # soft = hard: the program cannot raise them again
            resource.setrlimit(getattr(resource, name), (value, value))
    os.chdir("work")
    write, read, exit_, dup2, open_fd, close = os.write, os.read, os._exit, os.dup2, os.open, os.close
    settrace, setprofile, exc_info = sys.settrace, sys.setprofile, sys.exc_info

    real_out, real_err = sys.__stdout__, sys.__stderr__

    def flush() -> None:  # what the program printed, for the result's stdout/stderr tails
        for stream in (sys.stdout, sys.stderr, real_out, real_err):
            try:
                stream.flush()
            except BaseException:
                pass

    def send(tag: bytes, payload: bytes = b"") -> None:
        data = tag + len(payload).to_bytes(4, "big") + payload
        while data:
            data = data[write(res_fd, data) :]

    def fail(stage: str) -> None:
        kind, value, _ = exc_info()
        text = f"{stage}: {kind.__name__}: {value}"[:500]
        flush()
        send(b"F", text.encode("utf-8", "replace"))
        exit_(1)

    def run(source: str, filename: str, namespace: dict) -> None:
        exec(compile(source, filename, "exec"), namespace)

    if job["cases"] is None:  # functional tests: the program, then the tests in its namespace
        namespace = {"__name__": "__sandbox__", "__builtins__": __builtins__}
        try:
            run(job["program"], "program.py", namespace)
        except BaseException:  # SystemExit included: exiting before the tests ran is not passing them
            fail("program")
        settrace(None)  # a trace function set by the program could skip the tests' lines
        setprofile(None)
        try:
            run(job["tests"], "tests.py", namespace)
        except BaseException:
            fail("tests")
    else:  # stdin/stdout cases: each input on fd 0, each output from fd 1, compared in the parent
        for i, stdin in enumerate(job["cases"]):
            with open(f".in{i}", "w", encoding="utf-8") as f:
                f.write(stdin)
            for fd, target in (
                (open_fd(f".in{i}", os.O_RDONLY), 0),
                (open_fd(f".out{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1),
            ):
                if fd != target:  # the program may have closed fd 0 or 1 (open(0) does): then it is reused
                    dup2(fd, target)
                    close(fd)
            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
            try:
                run(job["program"], "program.py", {"__name__": "__main__", "__builtins__": __builtins__})
            except SystemExit as e:  # a script may end with sys.exit(); a non-zero status is an error
                if e.code not in (None, 0):
                    fail(f"case {i}")
            except BaseException:
                fail(f"case {i}")
            settrace(None)
            setprofile(None)
            try:
                sys.stdout.flush()
            except BaseException:
                fail(f"case {i}")
            with open(f".out{i}", "rb") as f:
                send(b"O", f.read())
    flush()
    nonce = read(nonce_fd, 64)  # only now: the program never had it in this process's memory
    send(b"P", nonce)
    exit_(0)


main()
