"""The code that runs inside a sandboxed process, before and around the untrusted program.

Not imported by the evaluator: `sandbox.py` runs this file's text with `python -I -S -c` in the child. It reads
the job from `job.json` in its working directory, sets the resource limits, moves into `work/`, and then runs
the program. Verdicts travel to the parent as frames (1-byte tag, 4-byte length, payload) on an inherited pipe:
`O` one stdin/stdout case's output, `F` a failure (exception type and message), `P` success, whose payload is a
nonce that the parent wrote into a second pipe and that this code reads only after every test ran. A program
that exits early (`sys.exit(0)`, `os._exit(0)`, a signal) never gets to send `P`; one that raises is reported
by `F`. Everything the driver needs after the program ran (`os.write`, `os._exit`, ...) is bound before it runs.
"""

import io
import json
import os
import resource
import sys


def main() -> None:
    res_fd, nonce_fd = int(sys.argv[1]), int(sys.argv[2])
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
