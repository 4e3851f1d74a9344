"""Run untrusted programs (model-written code) against tests, each in its own contained process.

`check_program(program, tests, timeout_s)` runs `program` and then the test code `tests` in one fresh
interpreter, never in the evaluator's process, and returns a `SandboxResult` with `passed` and a `reason`.
`check_program(program, cases=[(stdin, expected_stdout), ...])` runs a script on each input instead and the
*parent* compares the outputs. `check_programs(jobs)` runs many at once in a thread pool (each thread only waits
on its child process, so a stuck program never blocks the others).

Containment, strongest mode first (`isolation()` says which one this machine gives, `mode_interpreter(mode)`
whether a given one is available):
- every mode: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE (file and stdout size), RLIMIT_NOFILE, no core
  files; stdin closed (/dev/null); a clean environment (PATH and LANG only: no inherited secrets); a fresh
  temporary working directory, removed afterwards; `python -I -S` (no PYTHON* variables, no site-packages, no
  user site). The run ends when its driver exits or at the wall-clock timeout, and `check_program` returns
  only after it killed what the program started (`_isolation.stop`), as far as the mode allows:
- `userns` (Linux, unprivileged user namespaces): also new network (loopback only, down: no network), PID
  (cannot see or signal any process outside) and mount namespaces, with fresh small tmpfs over /tmp, /var/tmp,
  /dev/shm, /run/lock and as the working directory. The PID namespace's init is a shell that only waits for
  the driver; the evaluator kills it by its host PID (a pidfd) and waits, so the kernel kills every process in
  the namespace whatever it did with sessions, process groups, `prctl` or double forks (and init dies with
  `unshare` too; without pidfds, Linux < 5.3, that is the only way, and it may finish just after the return).
  The program runs as the invoking user, as root of the user namespace but with every capability dropped
  (`setpriv`, where installed), so it can neither trace nor signal that init nor unmount its tmpfs; the user's
  own files stay writable;
- `namespaces` (Linux, run as root): as `userns`, and the program runs as a random unprivileged uid, so it
  cannot write or delete files it does not own, and RLIMIT_NPROC (a fork bomb) counts its processes alone;
- `none` (no namespaces): on Linux the driver's first process stays as a child subreaper that kills and reaps
  every descendant at the end (`_driver.supervise`); the program, running as the same user, can kill that
  supervisor, and a process that does so and leaves its process group survives the run. Elsewhere only the
  process group is killed: a process that calls `setsid()` survives.
The pass verdict is a nonce the driver (`_driver.py`) sends after the last test ran, over a pipe: exiting early
or raising never yields it. Not covered: a program that deliberately reads that pipe or inspects the harness's
frames can forge a pass (it shares an interpreter with the tests); files readable by every user stay readable;
kernel exploits. Use a container or VM (gVisor, Firecracker) for adversarial code at scale.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# The containment itself (command lines, mode probing, the kill) lives in `_isolation`; these names stay
# importable from here.
from ._isolation import CLEAN_ENV, MODES, SUPERVISED, command_line, first_child, mode_interpreter, stop

logger = logging.getLogger(__name__)

DRIVER = (Path(__file__).with_name("_driver.py")).read_text(encoding="utf-8")
_TAIL = 2000  # characters of stdout/stderr kept in a result


@dataclass(frozen=True)
class Limits:
    """Per-program limits. `cpu_s=None` means the wall-clock timeout plus one second."""

    memory_mb: int = 1024
    cpu_s: int | None = None
    file_mb: int = 16  # any one file, stdout included
    # RLIMIT_NPROC (namespaces mode), or processes beyond those the user already runs. Memory is limited per
    # process, so a tree may hold up to processes x memory_mb: keep both small.
    processes: int = 8
    open_files: int = 128
    work_mb: int = 64  # the tmpfs working directory (namespace modes)


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    reason: str  # "passed", or why not: the exception, "timeout after 3.0 s", "exited before ...", ...
    stdout: str = ""  # the last characters of what the program printed (functional mode)
    stderr: str = ""
    duration_s: float = 0.0


# ------------------------------------------------------------------------------------------- modes
@lru_cache(maxsize=1)
def _mode() -> tuple[str, str]:
    """(mode, interpreter): the strongest mode this machine gives."""
    mode = next(m for m in MODES if mode_interpreter(m) is not None)
    if mode == "none":
        logger.warning(
            "Sandbox without namespaces: no network, PID or mount isolation, and the program runs as this user "
            "(it can write this user's files and kill its supervisor). Run untrusted code in a container."
        )
    return mode, mode_interpreter(mode)


def isolation() -> str:
    """The containment this machine gives: 'namespaces', 'userns' or 'none' (see the module docstring)."""
    return _mode()[0]


def _user_processes() -> int:
    """Processes (threads included) of this user: RLIMIT_NPROC counts them all, not just the sandbox's."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    with open(f"/proc/{entry}/status") as f:
                        count += next((int(line.split()[1]) for line in f if line.startswith("Threads:")), 1)
            except (OSError, ValueError):
                pass
    return count


# ------------------------------------------------------------------------------------------- running
def _read_frames(data: bytes) -> list[tuple[bytes, bytes]]:
    frames, pos = [], 0
    while pos + 5 <= len(data):
        size = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if pos + 5 + size > len(data):
            break
        frames.append((data[pos : pos + 1], data[pos + 5 : pos + 5 + size]))
        pos += 5 + size
    return frames


def outputs_match(got: str, expected: str) -> bool:
    """stdout comparison of competitive-programming judges: line by line, surrounding whitespace ignored,
    numbers equal to 1e-6 (relative or absolute)."""
    a, b = got.strip().split("\n"), expected.strip().split("\n")
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        tx, ty = x.split(), y.split()
        if tx == ty:
            continue
        if len(tx) != len(ty):
            return False
        for u, v in zip(tx, ty, strict=True):
            if u == v:
                continue
            try:
                if not math.isclose(float(u), float(v), rel_tol=1e-6, abs_tol=1e-6):
                    return False
            except ValueError:
                return False
    return True


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4 * _TAIL))
            return f.read().decode("utf-8", "replace")[-_TAIL:]
    except OSError:
        return ""


def _remove(path: str) -> None:
    """Remove the job directory even if the program made parts of it unreadable (no-namespace mode)."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700)
        os.chmod(path, 0o700)
        shutil.rmtree(path, ignore_errors=True)


def check_program(
    program: str,
    tests: str = "",
    timeout_s: float = 10.0,
    *,
    cases: list[tuple[str, str]] | None = None,
    limits: Limits | None = None,
) -> SandboxResult:
    """Run `program` then `tests` (functional), or `program` on each `cases` input (stdin/stdout), contained.

    Passes when the tests ran to their end without raising, or when every case's output matches its expected
    output (`outputs_match`). `timeout_s` bounds the whole run, all cases together.
    """
    if cases is not None and not cases:
        raise ValueError("check_program: `cases` is empty, so nothing would be checked.")
    limits = limits or Limits()
    mode, python = _mode()
    start = time.monotonic()
    job_dir = tempfile.mkdtemp(prefix="bridge_sandbox_")
    os.chmod(job_dir, 0o711)  # the dropped uid must traverse it to reach work/, never list it
    uid = 100_000 + secrets.randbelow(1 << 24) if mode == "namespaces" else None
    cpu_s = limits.cpu_s or math.ceil(timeout_s) + 1
    # Other modes count all of this user's processes, the init shell or supervisor that waits for the driver too.
    nproc = limits.processes if mode == "namespaces" else limits.processes + _user_processes() + 1
    rlimits = {"RLIMIT_CPU": cpu_s, "RLIMIT_AS": limits.memory_mb << 20, "RLIMIT_FSIZE": limits.file_mb << 20,
               "RLIMIT_NOFILE": limits.open_files, "RLIMIT_CORE": 0,
               "RLIMIT_NPROC": nproc if os.geteuid() != 0 or uid is not None else None}  # fmt: skip
    job = {"program": program, "tests": tests, "limits": rlimits,
           "cases": None if cases is None else [stdin for stdin, _ in cases]}  # fmt: skip
    Path(job_dir, "job.json").write_text(json.dumps(job), encoding="utf-8")
    os.chmod(Path(job_dir, "job.json"), 0o644)
    os.mkdir(Path(job_dir, "work"), 0o700)
    nonce = secrets.token_hex(16).encode()
    res_r, res_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)  # reading past the nonce gives EOF: a program that took it leaves none for the driver
    command = command_line(mode, python, uid, limits.work_mb, DRIVER, [str(res_w), str(nonce_r)])
    out_path, err_path = Path(job_dir, "stdout"), Path(job_dir, "stderr")
    received, killed_for, first, proc = bytearray(), None, None, None
    cap = 4 * (limits.file_mb << 20)  # one file's limit per case output is the most a sane program sends
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(command, cwd=job_dir, env=CLEAN_ENV, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, pass_fds=(res_w, nonce_r), start_new_session=True)  # fmt: skip
        os.close(res_w)
        os.close(nonce_r)
        res_w = nonce_r = -1
        deadline = start + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed_for = f"timeout after {timeout_s:g} s"
                break
            ready, _, _ = select.select([res_r], [], [], min(remaining, 0.05))
            if ready:
                chunk = os.read(res_r, 1 << 16)
                received += chunk
                if len(received) > cap:
                    killed_for = "output limit exceeded"
                    break
                if chunk:
                    continue
            if first is None and (mode != "none" or SUPERVISED):
                first = first_child(proc.pid)
            if proc.poll() is not None:
                break
        # Stragglers too: whatever the program started, wherever it went.
        returncode = stop(proc, mode, first)
        if mode != "none" and returncode > 128:  # the init shell reports a driver killed by signal N: 128 + N
            returncode = 128 - returncode
        os.set_blocking(res_r, False)
        try:
            while len(received) <= cap and (chunk := os.read(res_r, 1 << 16)):
                received += chunk
        except BlockingIOError:
            pass
    finally:
        if proc is not None and proc.returncode is None:  # an exception above (an interrupt): stop it anyway
            stop(proc, mode, first)
        for fd in (res_r, res_w, nonce_r, -1 if first is None else first[1]):
            if fd >= 0:
                os.close(fd)
        stdout, stderr = _tail(out_path), _tail(err_path)
        _remove(job_dir)
    duration = time.monotonic() - start
    result = _verdict(_read_frames(bytes(received)), nonce, cases, killed_for, returncode)
    return SandboxResult(result == "passed", result, stdout, stderr, duration)


def _verdict(frames, nonce: bytes, cases, killed_for: str | None, returncode: int) -> str:
    if killed_for:
        return killed_for
    failure = next((p for tag, p in frames if tag == b"F"), None)
    if failure is not None:
        return failure.decode("utf-8", "replace")
    if cases is not None:
        outputs = [p.decode("utf-8", "replace") for tag, p in frames if tag == b"O"]
        for i, (got, (_, expected)) in enumerate(zip(outputs, cases, strict=False)):
            if not outputs_match(got, expected):
                return f"case {i}: wrong output {got[:80]!r} (expected {expected[:80]!r})"
    if not any(tag == b"P" for tag, _ in frames):
        status = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"status {returncode}"
        return f"exited before its tests finished ({status})"
    if not any(tag == b"P" and payload == nonce for tag, payload in frames):
        return "completion token missing or wrong (the program read or forged it)"
    if cases is not None and sum(tag == b"O" for tag, _ in frames) != len(cases):
        return "not every case produced an output"
    return "passed"


def check_programs(jobs: list[dict], max_workers: int | None = None) -> list[SandboxResult]:
    """`check_program(**job)` for every job, several at a time (default: one per CPU core), in input order."""
    if not jobs:
        return []
    workers = max_workers or min(len(jobs), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: check_program(**job), jobs))
