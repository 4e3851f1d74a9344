"""Run untrusted programs (model-written code) against tests, each in its own contained process.

`check_program(program, tests, timeout_s)` runs `program` and then the test code `tests` in one fresh
interpreter, never in the evaluator's process, and returns a `SandboxResult` with `passed` and a `reason`.
`check_program(program, cases=[(stdin, expected_stdout), ...])` runs a script on each input instead and the
*parent* compares the outputs. `check_programs(jobs)` runs many at once in a thread pool (each thread only waits
on its child process, so a stuck program never blocks the others).

Containment, strongest mode first (`isolation()` says which one this machine gives):
- every mode: its own session and process group, killed as a whole at the wall-clock timeout; RLIMIT_CPU,
  RLIMIT_AS (memory), RLIMIT_FSIZE (file and stdout size), RLIMIT_NOFILE, no core files; stdin closed
  (/dev/null); a clean environment (PATH and LANG only: no inherited secrets); a fresh temporary working
  directory, removed afterwards; `python -I -S` (no PYTHON* variables, no site-packages, no user site);
- `userns` (Linux, unprivileged user namespaces): also new network (loopback only, down: no network), PID
  (cannot see or signal any process outside; all of it dies with its first process) and mount namespaces, with
  fresh small tmpfs over /tmp, /var/tmp, /dev/shm, /run/lock and as the working directory;
- `namespaces` (Linux, run as root): as `userns`, and the program runs as a random unprivileged uid, so it
  cannot write or delete files it does not own, and RLIMIT_NPROC (a fork bomb) counts its processes alone.
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
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

DRIVER = (Path(__file__).with_name("_driver.py")).read_text(encoding="utf-8")
CLEAN_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "HOME": "/nonexistent",
}
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable: hidden behind fresh tmpfs
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


# ------------------------------------------------------------------------------------------- isolation
def _world_accessible(path: str) -> bool:
    """True when a user with no special rights can read and execute `path` (every directory above it too)."""
    path = os.path.realpath(path)
    needed = stat.S_IROTH | stat.S_IXOTH  # a directory Python imports from must be listable, too
    try:
        if os.stat(path).st_mode & needed != needed:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def _interpreter(drop_uid: bool) -> str | None:
    """This Python, or (when the sandbox drops to another uid) one that other users may run."""
    if not drop_uid:
        return os.path.realpath(sys.executable)
    for candidate in (sys.executable, shutil.which("python3", path=CLEAN_ENV["PATH"])):
        if (
            candidate
            and _world_accessible(candidate)
            and _world_accessible(
                os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(candidate))), "lib")
            )
        ):
            return os.path.realpath(candidate)
    return None


def _namespace_script(uid: int | None, work_mb: int, run_driver: bool = True) -> str:
    """The shell step inside the new namespaces: private tmpfs mounts, then the driver (as `uid` if given)."""
    mounts = " && ".join(
        f"{{ [ ! -d {d} ] || mount -t tmpfs -o size=8m,mode=1777,nosuid,nodev tmpfs {d}; }}"
        for d in WRITABLE_DIRS
    )
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    drop = f"setpriv --reuid={uid} --regid={uid} --clear-groups --no-new-privs -- " if uid is not None else ""
    driver = '"$0" -I -S -c "$1" "$2" "$3"' if run_driver else '"$0" -I -S -c pass'
    return f"{mounts} && mount -t tmpfs -o size={work_mb}m,mode=0700,nosuid,nodev{owner} tmpfs work && exec {drop}{driver}"


UNSHARE = ["--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]


@lru_cache(maxsize=1)
def _mode() -> tuple[str, str]:
    """(mode, interpreter), probed once by really starting a sandbox whose program is `pass`."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    candidates = []
    if sys.platform.startswith("linux") and unshare:
        python = _interpreter(drop_uid=True)
        if os.geteuid() == 0 and setpriv and python:
            candidates.append(("namespaces", python, [unshare, *UNSHARE]))
        candidates.append(("userns", _interpreter(False), [unshare, "--user", "--map-root-user", *UNSHARE]))
    for mode, python, prefix in candidates:
        with tempfile.TemporaryDirectory(prefix="bridge_sandbox_probe_") as tmp:
            os.mkdir(os.path.join(tmp, "work"))
            os.chmod(tmp, 0o711)
            script = _namespace_script(65534 if mode == "namespaces" else None, 1, run_driver=False)
            try:
                ok = subprocess.run([*prefix, "/bin/sh", "-c", script, python], cwd=tmp, env=CLEAN_ENV,
                                    capture_output=True, timeout=30).returncode == 0  # fmt: skip
            except (OSError, subprocess.SubprocessError):
                ok = False
        if ok:
            logger.info("Sandbox: %s isolation, interpreter %s", mode, python)
            return mode, python
        logger.info("Sandbox mode %s unavailable on this machine", mode)
    logger.warning(
        "Sandbox without namespaces: no network, PID or mount isolation, and the program runs as this user "
        "(it can write this user's files). Run untrusted code in a container."
    )
    return "none", _interpreter(False)


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


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
    nproc = limits.processes if mode == "namespaces" else limits.processes + _user_processes()
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
    os.close(
        nonce_w
    )  # reading it after the nonce gives EOF: a program that took it leaves nothing for the driver
    args = [str(res_w), str(nonce_r)]
    if mode == "none":
        command = [python, "-I", "-S", "-c", DRIVER, *args]
    else:
        prefix = [
            shutil.which("unshare"),
            *(["--user", "--map-root-user"] if mode == "userns" else []),
            *UNSHARE,
        ]
        command = [*prefix, "/bin/sh", "-c", _namespace_script(uid, limits.work_mb), python, DRIVER, *args]
    out_path, err_path = Path(job_dir, "stdout"), Path(job_dir, "stderr")
    received, killed_for = bytearray(), None
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
            if proc.poll() is not None:
                break
        _kill_group(proc)  # stragglers too: forked children in the no-namespace mode
        returncode = proc.wait()
        os.set_blocking(res_r, False)
        try:
            while len(received) <= cap and (chunk := os.read(res_r, 1 << 16)):
                received += chunk
        except BlockingIOError:
            pass
    finally:
        for fd in (res_r, res_w, nonce_r):
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
