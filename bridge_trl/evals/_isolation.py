"""How a sandboxed run is contained and ended: the isolation modes, their command lines, and the kill.

`sandbox.check_program` decides what to run and judges it; this module holds what keeps the run inside its
walls and makes sure nothing of it outlives `check_program`, because that is where the security argument
lives. In the namespace modes (`namespaces`, `userns`) the command is `unshare` (new network, PID and mount
namespaces) around a shell that mounts fresh tmpfs and then *waits* for the driver rather than `exec`-ing it,
so PID 1 of the namespace is always that shell and never the program. The evaluator opens a pidfd on that init
as soon as it exists and kills it by its host PID: when a PID namespace's init dies the kernel kills every
other process in it, whatever the program did with sessions, process groups, double forks or
`prctl(PR_SET_PDEATHSIG, 0)`, and the pidfd becomes readable only once they are all gone, so the kill is
synchronous. `unshare --kill-child` also gives that init a parent-death SIGKILL (the fallback without pidfds);
the program cannot clear it, because it is not PID 1 and `setpriv` drops every capability (and, as root, the
uid) before the driver starts, so it can neither ptrace nor signal the init nor unmount its tmpfs;
`--pdeathsig=KILL` ends the driver if the init goes first. In `none` mode (no namespaces) the driver's first
process is a child subreaper (`_driver.supervise`) that SIGTERM asks to kill and reap every descendant; the
program runs as the same user and can kill it, so its process group is killed too, and a process that left
both survives (the documented limit).
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from contextlib import suppress
from functools import cache, lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

CLEAN_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "HOME": "/nonexistent",
}
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable: hidden behind fresh tmpfs
STOP_S = 5.0  # the longest a kill may take to complete before check_program returns anyway
# `none` mode on Linux: the driver forks, and its first process stays as a child subreaper that kills every
# process the program started (whichever session or group it moved to) when the run ends (see _driver.py).
SUPERVISED = sys.platform.startswith("linux")
UNSHARE = ["--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
MODES = ("namespaces", "userns", "none")  # strongest first


# ------------------------------------------------------------------------------------------- the modes
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


@lru_cache(maxsize=1)
def _setpriv() -> tuple[str, ...] | None:
    """`setpriv` and the flags every sandboxed driver gets from it, or None where it is missing."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    try:
        usage = subprocess.run([setpriv, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        usage = ""
    # No capabilities, even as root of a user namespace: the program cannot ptrace, signal or remount its way
    # around the namespace's init (the waiter below) or its tmpfs. SIGKILL when that waiter dies, where offered.
    flags = ["--no-new-privs", "--inh-caps=-all", "--bounding-set=-all"]
    return (setpriv, *flags, *(["--pdeathsig=KILL"] if "--pdeathsig" in usage else []))


def _namespace_script(uid: int | None, work_mb: int, run_driver: bool = True) -> str:
    """The shell step inside the new namespaces: private tmpfs mounts, then the driver (as `uid` if given).

    The shell is the PID namespace's init and stays so: it waits for the driver instead of `exec`-ing it
    (`; exit $?` keeps dash from replacing itself with the last command). The program therefore never is PID 1:
    it cannot clear init's parent-death signal (set by `unshare --kill-child`, and cleared by any uid change),
    and killing init, from outside by its host PID or by that signal, kills every process in the namespace
    whatever it did with sessions, process groups or `prctl`.
    """
    mounts = " && ".join(
        f"{{ [ ! -d {d} ] || mount -t tmpfs -o size=8m,mode=1777,nosuid,nodev tmpfs {d}; }}"
        for d in WRITABLE_DIRS
    )
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    setpriv = _setpriv()
    ids = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []
    drop = " ".join([setpriv[0], *ids, *setpriv[1:], "--", ""]) if setpriv else ""
    driver = '"$0" -I -S -c "$1" "$2" "$3"' if run_driver else '"$0" -I -S -c pass'
    work = f"mount -t tmpfs -o size={work_mb}m,mode=0700,nosuid,nodev{owner} tmpfs work"
    return f"{mounts} && {work} && {drop}{driver}; exit $?"


def _prefix(mode: str) -> list[str]:
    """The `unshare` command line of a namespace mode."""
    return [shutil.which("unshare") or "unshare", *(["--user", "--map-root-user"] if mode == "userns" else []),
            *UNSHARE]  # fmt: skip


def command_line(
    mode: str, python: str, uid: int | None, work_mb: int, driver: str, args: list[str]
) -> list[str]:
    """The command that runs the driver text `driver` with `args` in `mode` (as `uid`, namespaces mode)."""
    if mode == "none":
        return [python, "-I", "-S", "-c", driver, *args, *(["supervise"] if SUPERVISED else [])]
    return [*_prefix(mode), "/bin/sh", "-c", _namespace_script(uid, work_mb), python, driver, *args]


@cache
def mode_interpreter(mode: str) -> str | None:
    """The interpreter `mode` runs programs with, or None when this machine cannot give that mode: probed once
    by really starting a sandbox whose program is `pass`."""
    if mode == "none":
        return _interpreter(False)
    if mode not in MODES or not sys.platform.startswith("linux") or not shutil.which("unshare"):
        return None
    python = _interpreter(drop_uid=mode == "namespaces")
    if mode == "namespaces" and (os.geteuid() != 0 or _setpriv() is None or python is None):
        return None
    with tempfile.TemporaryDirectory(prefix="bridge_sandbox_probe_") as tmp:
        os.mkdir(os.path.join(tmp, "work"))
        os.chmod(tmp, 0o711)
        script = _namespace_script(65534 if mode == "namespaces" else None, 1, run_driver=False)
        try:
            ok = subprocess.run([*_prefix(mode), "/bin/sh", "-c", script, python], cwd=tmp, env=CLEAN_ENV,
                                capture_output=True, timeout=30).returncode == 0  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            ok = False
    logger.info("Sandbox mode %s %s", mode, f"available, interpreter {python}" if ok else "unavailable here")
    return python if ok else None


# ------------------------------------------------------------------------------------------- stopping
def _children(pid: int) -> list[int]:
    """The direct children of `pid`, oldest first (a scan of /proc where the kernel has no `children` file)."""
    try:
        return [int(c) for task in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]  # fmt: skip
    except OSError:
        pass
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]
            if ppid == str(pid):
                found.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return sorted(found)


def first_child(pid: int) -> tuple[int, int] | None:
    """(pid, pidfd) of `pid`'s first child: the PID namespace's init (`unshare --fork`'s child), or the job
    under the `none` mode's supervisor. None while it is not forked yet, once gone, or without pidfds. Held
    from the start, so that it can be killed even after its parent died."""
    kids = _children(pid)
    if not kids or not hasattr(os, "pidfd_open"):
        return None
    try:
        fd = os.pidfd_open(kids[0])
    except OSError:
        return None
    if kids[0] not in _children(pid):  # exited and reaped meanwhile: the number may be another's now
        os.close(fd)
        return None
    return kids[0], fd


def _exited(pidfd: int, timeout_s: float = 0.0) -> bool:
    """Wait up to `timeout_s` for the process to exit (a pidfd is readable once it did)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def stop(proc: subprocess.Popen, mode: str, first: tuple[int, int] | None) -> int:
    """Kill every process of the run, wait until they are gone (bounded by `STOP_S`), return the status."""
    if mode != "none":
        if first is not None:
            # PID 1 of the namespace dies, so the kernel kills every other process in it, whatever it did with
            # sessions, groups or prctl; the pidfd is readable only once they all exited (zap_pid_ns_processes).
            with suppress(OSError):
                signal.pidfd_send_signal(first[1], signal.SIGKILL)
            _exited(first[1], STOP_S)
    elif SUPERVISED:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the supervisor kills and reaps all it adopted, then exits
            with suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_S)
        if first is not None and not _exited(first[1]):  # the program killed the supervisor: its own group
            _kill_group(first[0])  # (safe: a live process's number names no other process or group)
    # `unshare`, with an init not found yet (just forked, before its parent-death signal was set); the group,
    # where the program stopped or killed its supervisor (`none` mode).
    _kill_group(proc.pid)
    return proc.wait()


def _kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
