r"""Math-verify in a pool of killable worker processes, with a hard per-completion time limit.

Why processes: math-verify bounds its own work with `signal.alarm`, which works only in a main thread,
and some inputs spend minutes in C code no signal interrupts. Each completion is therefore verified in
a persistent worker process (the worker's main thread keeps math-verify's own timeouts as a first
line), and a worker that overruns its hard per-completion limit is killed and replaced; the completion
scores as incorrect and is counted in `num_timeouts`.

Workers are started with `subprocess` (never `fork`, which is unsafe in a threaded torch process) and
load this file alone, without importing the `bridge_trl` package, torch or the caller's `__main__`,
so one starts in about a second. The pool starts lazily on first use and is closed at exit.

This module imports only the standard library at the top: it is also the worker's entry point. The answer
normalisation the caller applies (`answers.py`) is imported inside `MathVerifier.verify`, never in a worker.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)


class Verdict(NamedTuple):
    """The outcome of verifying one completion."""

    correct: bool
    extracted: str | None  # the answer math-verify took from the completion, as text
    status: str  # "ok", "timeout" (worker killed), "crash" (worker died) or "bad_gold" (gold unparseable)


# --------------------------------------------------------------------------------------------------
# Inside a worker process (its main thread, so math-verify's signal-based timeouts work).
# --------------------------------------------------------------------------------------------------
_GOLD_CACHE: dict[str, list] = {}


def verify_in_process(gold: str, text: str, timeout_s: float) -> Verdict:
    r"""Verify `text` against the normalised `gold` in this process: main thread only, no hard bound.

    The completion's final answer is its last `\boxed{}`: boxed matches get the highest priority and
    math-verify tries the rightmost first. Boxes listed together (`\boxed{1}, \boxed{2}`, under 70
    characters apart) form one set answer, as multi-answer golds need; so hedging between answers
    earns nothing. With no box the answer is the last math expression.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    inner = max(1, math.ceil(timeout_s / 3))  # signal.alarm takes whole seconds
    if gold not in _GOLD_CACHE:
        if len(_GOLD_CACHE) > 10_000:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gold] = parse(gold, parsing_timeout=inner) if gold else []
    gold_parsed = _GOLD_CACHE[gold]
    if not gold_parsed:
        return Verdict(False, None, "bad_gold")
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    pred = parse(text, config, parsing_timeout=inner)
    if not pred:
        return Verdict(False, None, "ok")
    extracted = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
    return Verdict(bool(verify(gold_parsed, pred, timeout_seconds=inner)), extracted, "ok")


def _worker_setup(parent_pid: int, memory_limit_mb: int) -> None:
    """Die with the parent (Linux), cap memory (huge integers fail with MemoryError), silence math-verify.

    A negative `parent_pid` means the worker was started from a non-main thread: Linux delivers the
    parent-death signal when that *thread* exits, so such workers rely on EOF on their pipe instead.
    """
    if parent_pid > 0:
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:  # not Linux: the worker still exits on EOF when the parent closes its pipe
            pass
    if os.getppid() != abs(parent_pid):
        os._exit(0)
    if memory_limit_mb > 0:
        try:
            import resource

            limit = memory_limit_mb << 20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    # Timeouts are counted by the parent; math-verify's own warnings would echo whole model outputs.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)


def _worker_main(rx_fd: int, tx_fd: int, parent_pid: int, memory_limit_mb: int) -> None:
    """A worker's loop: receive (kind, payload), answer with a Verdict, until the parent closes the pipe."""
    from multiprocessing.connection import Connection

    rx, tx = Connection(rx_fd, writable=False), Connection(tx_fd, readable=False)
    _worker_setup(parent_pid, memory_limit_mb)
    verify_in_process("\\boxed{1}", "\\boxed{1}", 5)  # import and warm up before reporting ready
    tx.send("ready")
    while True:
        try:
            kind, payload = rx.recv()
        except (EOFError, OSError):
            return
        try:
            if kind == "hang":  # tests only: stand-in for a C call that ignores signals
                import signal

                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                time.sleep(payload)
                result = Verdict(False, None, "ok")
            else:
                result = verify_in_process(*payload)
        except BaseException:  # noqa: BLE001 - model text must never take a worker down
            result = Verdict(False, None, "ok")
        tx.send(tuple(result))


_BOOTSTRAP = (
    "import importlib.util as u,sys;sys.path[:]=[p for p in sys.path if p];"
    "s=u.spec_from_file_location('_bridge_trl_reward_worker',sys.argv[1]);m=u.module_from_spec(s);"
    "sys.modules[s.name]=m;s.loader.exec_module(m);m._worker_main(*map(int,sys.argv[2:]))"
)


# --------------------------------------------------------------------------------------------------
# In the caller: the pool.
# --------------------------------------------------------------------------------------------------
class _Worker:
    """One worker process and its two pipe ends."""

    def __init__(self, memory_limit_mb: int):
        from multiprocessing.connection import Connection

        main_thread = threading.current_thread() is threading.main_thread()
        parent_pid = os.getpid() if main_thread else -os.getpid()
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, os.path.abspath(__file__)]
                + [str(v) for v in (to_child_r, from_child_w, parent_pid, memory_limit_mb)],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.tx = Connection(to_child_w, readable=False)
        self.rx = Connection(from_child_r, writable=False)
        self.started = time.monotonic()
        self.ready = False

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        except Exception:  # already gone
            pass
        for conn in (self.tx, self.rx):
            conn.close()


_LIVE_VERIFIERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for verifier in list(_LIVE_VERIFIERS):
        verifier.close()


class MathVerifier:
    """A lazy, reusable pool of worker processes that verify answers with a hard per-completion time limit.

    Args:
        timeout_s: wall-clock limit for one completion, counted from when a worker takes it. A worker
            still busy after it is killed and replaced, and the completion scores as incorrect.
        num_workers: processes in the pool (default: min(4, CPU count)); a batch is scored in parallel.
        max_chars: completions longer than this are clipped around their last `\\boxed` (or to the tail).
        memory_limit_mb: address-space cap of a worker (0: none); runaway integers fail fast instead.
        startup_timeout_s: how long a worker may take to import math-verify before this is an error.
    """

    def __init__(
        self,
        timeout_s: float = 10.0,
        num_workers: int | None = None,
        max_chars: int = 32_768,
        memory_limit_mb: int = 4096,
        startup_timeout_s: float = 120.0,
    ):
        if timeout_s <= 0:
            raise ValueError(f"`timeout_s` must be > 0, got {timeout_s}.")
        self.timeout_s = float(timeout_s)
        self.num_workers = max(1, num_workers or min(4, os.cpu_count() or 1))
        self.max_chars = max_chars
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self.num_timeouts = 0  # cumulative: completions scored incorrect because their worker was killed
        self.num_crashes = 0
        self._bad_golds: set[str] = set()
        self._workers: list[_Worker] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()
        _LIVE_VERIFIERS.add(self)

    def __getstate__(self) -> dict:  # picklable (TRL may pickle reward functions): the pool is not sent
        state = self.__dict__.copy()
        state.update(_workers=[], _lock=None, _pid=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        _LIVE_VERIFIERS.add(self)

    def close(self) -> None:
        """Stop the workers. The pool restarts on next use."""
        if self._pid == os.getpid():  # after a fork the workers belong to the parent
            for worker in self._workers:
                worker.kill()
        self._workers = []

    def verify(self, golds: list[Any], texts: list[Any]) -> list[Verdict]:
        """Verify each completion in `texts` (strings or messages) against its gold answer, in parallel."""
        from .answers import clip_completion, completion_text, normalize_gold  # the caller's side only

        if len(golds) != len(texts):
            raise ValueError(f"Got {len(golds)} gold answers for {len(texts)} completions.")
        tasks = [
            (
                "verify",
                (normalize_gold(g), clip_completion(completion_text(t), self.max_chars), self.timeout_s),
            )
            for g, t in zip(golds, texts, strict=True)
        ]
        verdicts = self._run(tasks)
        for (_, (gold, _, _)), verdict in zip(tasks, verdicts, strict=True):
            if verdict.status == "bad_gold" and gold not in self._bad_golds and len(self._bad_golds) < 100:
                self._bad_golds.add(gold)  # warn once per gold: every completion of it scores incorrect
                logger.warning(
                    "math-verify could not parse the gold answer %r (or timed out on it).", gold[:200]
                )
        return verdicts

    def _run(self, tasks: list[tuple[str, Any]]) -> list[Verdict]:
        if not tasks:
            return []
        with self._lock:
            if self._pid != os.getpid():
                self._workers, self._pid = [], os.getpid()
            while len(self._workers) < min(self.num_workers, max(1, len(tasks))):
                self._workers.append(_Worker(self.memory_limit_mb))
            results: list[Verdict | None] = [None] * len(tasks)
            pending = deque(range(len(tasks)))
            busy: dict[_Worker, tuple[int, float]] = {}  # worker -> (task index, deadline)
            try:
                while pending or busy:
                    self._dispatch(tasks, pending, busy)
                    self._collect(busy, results)
            except BaseException:  # e.g. KeyboardInterrupt: busy workers would answer into the next batch
                for worker in busy:
                    worker.kill()
                self._workers = [w for w in self._workers if w not in busy]
                raise
            return results  # type: ignore[return-value]

    def _dispatch(self, tasks: list, pending: deque, busy: dict) -> None:
        """Give each ready, idle worker the next task; a worker found dead is replaced, its task requeued."""
        for worker in list(self._workers):
            if pending and worker.ready and worker not in busy:
                index = pending.popleft()
                try:
                    worker.tx.send(tasks[index])
                except OSError:  # died while idle (e.g. the OOM killer): not the task's fault
                    pending.appendleft(index)
                    worker.kill()
                    self._workers[self._workers.index(worker)] = _Worker(self.memory_limit_mb)
                    continue
                busy[worker] = (index, time.monotonic() + self.timeout_s)

    def _collect(self, busy: dict, results: list) -> None:
        """Wait for the first answer or deadline; record answers, kill overdue workers."""
        from multiprocessing.connection import wait

        waiting = [w for w in self._workers if w in busy or not w.ready]
        deadlines = [busy[w][1] if w in busy else w.started + self.startup_timeout_s for w in waiting]
        ready = wait([w.rx for w in waiting], timeout=max(0.0, min(deadlines) - time.monotonic()))
        now = time.monotonic()
        for worker, deadline in zip(waiting, deadlines, strict=True):
            if worker.rx in ready:
                try:
                    message = worker.rx.recv()
                except (EOFError, OSError):
                    self._replace(worker, busy, results, "crash")
                    continue
                if message == "ready":
                    worker.ready = True
                else:
                    results[busy.pop(worker)[0]] = Verdict(*message)
            elif now >= deadline:
                self._replace(worker, busy, results, "timeout")

    def _replace(self, worker: _Worker, busy: dict, results: list, status: str) -> None:
        """Kill `worker`, score its task incorrect, start a new one; a worker that cannot start is an error."""
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self.memory_limit_mb)
        if worker not in busy:
            raise RuntimeError(
                f"A math-verify worker failed to start ({status}); is `math-verify` installed for "
                f"{sys.executable}? See the worker's stderr above."
            )
        results[busy.pop(worker)[0]] = Verdict(False, None, status)
        if status == "timeout":
            self.num_timeouts += 1
            logger.warning(
                "Verifying an answer took over %.1fs: worker killed, scored incorrect.", self.timeout_s
            )
        else:
            self.num_crashes += 1
            logger.warning(
                "A math-verify worker died (exit code %s): scored incorrect.", worker.proc.returncode
            )
