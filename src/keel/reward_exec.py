"""How rewards are executed: math-verify in killable worker processes, deadlines around custom functions.

math-verify's own timeout uses SIGALRM, which only works in the main thread and cannot interrupt C-level
work (``9^9^9^9`` hangs inside big-integer power). Here math-verify runs with its timeouts off in worker
processes (:class:`VerifyPool`); a call past its deadline has its worker killed and restarted and scores 0
(counted in ``reward/timeouts``), so scoring returns on time from any thread.

A custom (TRL / verl) function runs under :func:`run_with_deadline` (``reward.batch_timeout_s``): past it,
:class:`RewardTimeout` is raised into the function (main thread: a watchdog's SIGALRM) or the function's
thread is abandoned (any other thread). :func:`_contained` turns its ``sys.exit()`` or a raised
KeyboardInterrupt into :class:`RewardExit` (a failed sample), while a real Ctrl-C still stops the run.

The scoring rules, the registry of built-ins and the TRL / verl adapters are in :mod:`keel.rewards`.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from keel.errors import KeelError


# --------------------------------------------------------------------------- math-verify worker pool


class VerifyTimeout(Exception):
    """A math-verify call that passed its deadline (or whose worker died); it scores 0."""


def _math_verify_pair(gold: str, prediction: str) -> float:
    """math-verify with its signal timeouts off (this runs inside a worker the pool can kill)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    if not gold_parsed:  # a gold that is not LaTeX ("1/2", "x=3") parses as an expression
        gold_parsed = parse(gold, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)
    pred_parsed = parse(prediction, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                        parsing_timeout=None)
    return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=None) else 0.0


def _serve(task_fd: int, result_fd: int) -> None:
    """Worker main loop: receive (gold, prediction), send ("ok", score) or ("error", message)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning is expected here
    try:  # keep a runaway expression from eating the machine's memory before its deadline
        import resource

        limit = 4 << 30
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass
    import math_verify  # noqa: F401  (imported before "ready" so the first deadline measures work, not imports)

    tasks, results = Connection(task_fd, writable=False), Connection(result_fd, readable=False)
    results.send("ready")
    while True:
        try:
            gold, prediction = tasks.recv()
        except EOFError:  # the parent closed the pool or exited
            return
        try:
            results.send(("ok", _math_verify_pair(gold, prediction)))
        except Exception as e:
            results.send(("error", f"{type(e).__name__}: {str(e)[:200]}"))


class _Worker:
    """One math-verify worker process: a fresh interpreter (never a fork of the trainer) talking over two pipes."""

    STARTUP_S = 120.0  # importing sympy on a loaded machine can take a while

    def __init__(self) -> None:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        src = str(Path(__file__).resolve().parents[1])  # so the child finds keel even when not installed
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
        code = "import sys; from keel.reward_exec import _serve; _serve(int(sys.argv[1]), int(sys.argv[2]))"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(task_r), str(result_w)],
                                     pass_fds=(task_r, result_w), env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL)
        os.close(task_r)
        os.close(result_w)
        self.tasks = Connection(task_w, readable=False)
        self.results = Connection(result_r, writable=False)
        self.state = "starting"  # starting -> idle <-> busy
        self.deadline = time.monotonic() + self.STARTUP_S
        self.job: int | None = None

    def stop(self) -> None:
        for conn in (self.tasks, self.results):
            conn.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class VerifyPool:
    """math-verify calls in worker processes, each with its own deadline; thread-safe (one batch at a time).

    A worker past its deadline is killed and replaced; its call scores 0 as a :class:`VerifyTimeout`.
    """

    def __init__(self, workers: int) -> None:
        self.size = max(1, int(workers))
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.restarts = 0

    def run(self, jobs: list[tuple[str, str]], timeout_s: float,
            batch_timeout_s: float | None = None) -> list[float | BaseException]:
        """(gold, prediction) pairs -> 1.0 / 0.0, or VerifyTimeout / RuntimeError per pair.

        `timeout_s` bounds each call; `batch_timeout_s` the whole batch (calls not done by then time out)."""
        with self._lock:
            return self._run(jobs, timeout_s, batch_timeout_s)

    def _run(self, jobs: list[tuple[str, str]], timeout_s: float,
             batch_timeout_s: float | None = None) -> list[float | BaseException]:
        results: list[float | BaseException | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))[::-1]  # popped from the end
        end = time.monotonic() + batch_timeout_s if batch_timeout_s else math.inf
        while len(self._workers) < min(self.size, len(jobs)):
            self._workers.append(_Worker())
        while pending or any(w.state == "busy" for w in self._workers):
            now = time.monotonic()
            if now >= end:  # the batch's deadline: whatever is not scored yet times out
                late = VerifyTimeout(f"math-verify batch took longer than {batch_timeout_s} s")
                for w in [w for w in self._workers if w.state == "busy"]:
                    results[w.job] = late
                    self._replace(w)
                for job in pending:
                    results[job] = late
                break
            for w in self._workers:  # hand out work
                if w.state == "idle" and pending:
                    w.job = pending.pop()
                    w.state, w.deadline = "busy", now + timeout_s
                    try:
                        w.tasks.send(jobs[w.job])
                    except OSError:  # died while idle: replace it, retry the job
                        pending.append(w.job)
                        self._replace(w)
            waiting = [w for w in self._workers if w.state != "idle"]
            if not waiting:
                continue
            ready = wait([w.results for w in waiting], timeout=max(0.0, min(end, *(w.deadline for w in waiting)) - now))
            for w in waiting:
                if w.results in ready:
                    self._receive(w, results)
                elif time.monotonic() >= w.deadline:
                    if w.state == "starting":
                        raise KeelError(f"math-verify worker did not start within {w.STARTUP_S:.0f} s")
                    results[w.job] = VerifyTimeout(f"math-verify took longer than {timeout_s} s")
                    self._replace(w)
        return results  # type: ignore[return-value]

    def _receive(self, w: _Worker, results: list) -> None:
        try:
            message = w.results.recv()
        except (EOFError, OSError):
            if w.state == "starting":
                raise KeelError("math-verify worker exited while starting (is math-verify installed? "
                                "pip install 'math-verify[antlr4_13_2]')") from None
            results[w.job] = VerifyTimeout("math-verify worker died (crash or memory limit)")
            self._replace(w)
            return
        if w.state == "starting":
            w.state = "idle"
            return
        status, value = message
        results[w.job] = value if status == "ok" else RuntimeError(value)
        w.state, w.job = "idle", None

    def _replace(self, w: _Worker) -> None:
        w.stop()
        self._workers[self._workers.index(w)] = _Worker()
        self.restarts += 1

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.stop()
            self._workers = []


_POOL: VerifyPool | None = None
_POOL_LOCK = threading.Lock()
# one worker per two cores, 1..4: rewards share the machine with generation and training
DEFAULT_WORKERS = max(1, min(4, (os.cpu_count() or 2) // 2))


def get_pool(workers: int | None = None) -> VerifyPool:
    """The process-wide math-verify pool (started lazily; ``workers`` resizes it)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = VerifyPool(workers or DEFAULT_WORKERS)
            atexit.register(_POOL.close)
        elif workers:
            _POOL.size = max(1, workers)
        return _POOL


# --------------------------------------------------------------------------- deadlines for custom functions


class RewardTimeout(BaseException):
    """A custom reward function past ``reward.batch_timeout_s``; its unscored samples score 0 (reward/timeouts).

    A BaseException so that a function's own ``except Exception`` cannot swallow the deadline."""


class RewardExit(Exception):
    """A reward function that raised SystemExit / KeyboardInterrupt / another BaseException: a failure of that
    function (its sample scores reward.error_score), not the run's exit or the user's Ctrl-C."""


_CTRL_C = threading.Event()  # set by the SIGINT handler of a guarded call: a real Ctrl-C, not a raised one


def _contained(fn: Callable) -> Callable:
    """`fn` whose non-Exception escapes (``sys.exit()``, a raised KeyboardInterrupt) become :class:`RewardExit`."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (Exception, RewardTimeout):
            raise
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt) and _CTRL_C.is_set():
                raise  # the user pressed Ctrl-C while the function ran
            args_text = ", ".join(repr(a) for a in e.args)
            raise RewardExit(f"raised {type(e).__name__}({args_text})") from None

    return call


def run_with_deadline(work: Callable[[], Any], seconds: float, what: str) -> Any:
    """``work()``, or RewardTimeout once `seconds` have passed.

    In the main thread a watchdog thread sends SIGALRM to it (again every 0.2 s until `work` gives up), which
    interrupts Python code, sleeps and I/O (not a C call that never returns to the interpreter); math-verify's
    own SIGALRM timeouts inside `work` keep working. Elsewhere `work` runs in a daemon thread that is abandoned
    when late. While it runs, Ctrl-C is told apart from a KeyboardInterrupt that `work` raises itself.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_kill"):
        return _deadline_in_thread(work, seconds, what)
    active = [True]

    def on_alarm(signum, frame):
        if active[0]:
            raise RewardTimeout(f"{what} took longer than {seconds:g} s")

    def on_ctrl_c(signum, frame):
        _CTRL_C.set()
        raise KeyboardInterrupt

    done = threading.Event()
    main_id = threading.main_thread().ident

    def watchdog() -> None:
        if done.wait(seconds):
            return
        while not done.is_set():
            signal.pthread_kill(main_id, signal.SIGALRM)
            done.wait(0.2)

    _CTRL_C.clear()
    old_alarm = signal.signal(signal.SIGALRM, on_alarm)
    old_int = signal.getsignal(signal.SIGINT)
    if old_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_ctrl_c)
    dog = threading.Thread(target=watchdog, daemon=True, name="keel-reward-deadline")
    dog.start()
    try:
        return work()
    finally:
        active[0] = False
        done.set()
        dog.join()
        signal.signal(signal.SIGALRM, old_alarm)
        if old_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, old_int)


def _deadline_in_thread(work: Callable[[], Any], seconds: float, what: str) -> Any:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True, name=f"keel-reward {what}")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise RewardTimeout(f"{what} took longer than {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
