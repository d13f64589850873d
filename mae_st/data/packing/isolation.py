"""Run one job per child process, a few at a time, so a decoder that crashes or hangs costs only its own job.

A pool of long-lived workers (concurrent.futures) breaks as a whole when one worker dies and cannot stop one
stuck task; a fresh process per job can simply be killed or buried. Jobs are forked from a forkserver, a clean
single-threaded process started once: forking the caller itself inherits its other threads' state (DALI, torch),
which corrupted the heap of libx265 children in the test suite ("corrupted size vs. prev_size"). As with any
multiprocessing code, a script that calls the packer's API needs an `if __name__ == "__main__":` guard. A job
that crashes runs once more before its file is given up (a really bad file crashes twice; a transient failure
such as the OOM killer does not cost a good file); a hang is not retried, it would cost another full timeout.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from multiprocessing.connection import wait
from typing import Callable, Dict, Optional, Sequence, TypeVar

Job = TypeVar("Job")
POLL_SECONDS = 0.5
ATTEMPTS_AFTER_CRASH = 2


def run_isolated(jobs: Sequence[Job], target: Callable[[Job], None], *, workers: int, timeout: float,
                 on_finish: Callable[[Job, Optional[str]], None]) -> None:
    """Run `target(job)` for every job in its own process, at most `workers` at once. `on_finish(job, error)` is
    called in this process as each ends: error is None on a clean exit, else "worker crashed ..." / "timed out ..."
    (a job that overruns `timeout` seconds is killed). Ctrl-C kills the running jobs and re-raises."""
    context = multiprocessing.get_context("forkserver")
    # each child would import the target's module (PyAV and the packer, ~0.2 s) before its job; the server
    # imports it once and every child is forked with it loaded (no effect if the server already runs)
    context.set_forkserver_preload([target.__module__])
    pending = [(job, 1) for job in reversed(jobs)]  # (job, attempt), next job last
    running: Dict[int, tuple] = {}  # sentinel -> (process, job, attempt, deadline)
    try:
        while pending or running:
            while pending and len(running) < workers:
                job, attempt = pending.pop()
                process = context.Process(target=target, args=(job,), daemon=True)
                process.start()
                running[process.sentinel] = (process, job, attempt, time.monotonic() + timeout)
            ready = wait(list(running), timeout=POLL_SECONDS)
            now = time.monotonic()
            for sentinel in list(running):
                process, job, attempt, deadline = running[sentinel]
                if sentinel in ready:
                    process.join()
                    del running[sentinel]
                    problem = _exit_problem(process.exitcode)
                    if problem is not None and attempt < ATTEMPTS_AFTER_CRASH:
                        pending.append((job, attempt + 1))
                    else:
                        on_finish(job, problem)
                elif now > deadline:
                    _kill(process)
                    del running[sentinel]
                    on_finish(job, f"timed out after {timeout:g} s (decoder hung or file too long for --timeout)")
    finally:
        for process, *_ in running.values():
            _kill(process)


def _exit_problem(exitcode: int) -> Optional[str]:
    if exitcode == 0:
        return None
    if exitcode < 0:
        return f"worker crashed (killed by {signal.Signals(-exitcode).name})"
    return f"worker crashed (exit code {exitcode})"


def _kill(process) -> None:
    process.kill()
    process.join(5)
