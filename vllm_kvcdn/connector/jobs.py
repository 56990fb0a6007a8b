"""Background work of the worker half: bounded thread pools, results collected per step.

vLLM's worker calls the connector once per engine step; a store read or a document write
must not hold that step. A job runs in a pool thread and leaves its outcome in a queue;
the worker drains the queue at the step's end (``get_finished``) and reports through
vLLM's channels. With ``inline=True`` every job runs at once in the caller's thread: the
synchronous behaviour, kept so benchmarks compare both in one run.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from typing import Any


class InlineExecutor(Executor):
    """Runs each submitted call at once; the future is already done."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to whoever asks the future
            future.set_exception(e)
        return future


def pool(threads: int, name: str, *, inline: bool, on_start: Callable[[], None] | None = None) -> Executor:
    """``threads`` pool threads, each running ``on_start`` first (it must not raise)."""
    if inline:
        return InlineExecutor()
    return ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=on_start)


def start_threads(executor: Executor, threads: int, timeout_s: float = 60.0) -> None:
    """Start all ``threads`` of a pool now, each running its initializer, instead of at
    the first jobs: a new thread's one-time setup must not land on a request's load.
    (A pool starts a thread per job that finds none idle: hold each job until all run.)"""
    if isinstance(executor, InlineExecutor):
        return
    together = threading.Barrier(threads)
    wait([executor.submit(together.wait, timeout_s) for _ in range(threads)], timeout=timeout_s)


class Outbox:
    """Outcomes of finished jobs, put by pool threads, taken by the engine's thread."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.in_flight = 0  # jobs submitted and not yet taken (read and written by the engine's thread)

    def run(self, executor: Executor, job: Callable[[], Any], on_error: Callable[[BaseException], Any]) -> None:
        """Run ``job`` on ``executor`` and queue what it returns, or ``on_error(e)`` if it
        raises: every job leaves exactly one outcome (a request waits for it)."""

        def guarded() -> None:
            try:
                outcome = job()
            except BaseException as e:
                outcome = on_error(e)
            self._queue.put(outcome)

        self.in_flight += 1
        executor.submit(guarded)

    def take(self, wait_s: float = 0.0) -> list:
        """Outcomes ready now; with ``wait_s``, first block up to that long for one when
        jobs are in flight (an idle engine step then sleeps instead of spinning, and
        leaves the GIL to the jobs)."""
        out = []
        if wait_s and self.in_flight:
            try:
                out.append(self._queue.get(timeout=wait_s))
            except queue.Empty:
                pass
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self.in_flight -= len(out)
        return out
