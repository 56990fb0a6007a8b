"""Which cores the worker's I/O threads run on.

vLLM's CPU worker binds its OpenMP compute threads to some cores and may leave others out
(``VLLM_CPU_NUM_OF_RESERVED_CPU``; ``compat.io_cpus``). kvcdn's pool threads live on those
others, so a load or a publish never takes a core from the model. In a step that computes
nothing (every request waits for its KV, or none is left) the compute cores are idle:
the pool threads may use them too until the next step that computes.

A thread starts on its creator's core (the model's first OpenMP thread), and OpenMP binds
it back there the first time it opens a parallel region, which the platform's KV write op
does; so each thread opens one first (``prime``), then moves.

Pool threads also run a few nice levels below the engine's threads: where they share a
core with the engine core process or the model, the engine's step goes first.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from vllm_kvcdn.log import get_logger

logger = get_logger(__name__)

IO_NICE = 5  # nice levels below the engine's threads (Linux: per thread)


class IOThreadPlacement:
    def __init__(self, io_cpus: frozenset[int] | None):
        self.io_cpus = io_cpus  # None: vLLM binds nothing here; threads stay where they start
        self._compute_cpus: frozenset[int] = frozenset()
        self._prime: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._threads: list[int] = []  # native ids of the pool threads placed so far
        self._lent = False  # compute cores lent to the pool threads (the engine is idle)

    def bind(self, prime: Callable[[], None]) -> None:
        """From the engine's thread, once its KV cache exists: its cores are the compute cores."""
        self._compute_cpus = frozenset(os.sched_getaffinity(0))
        self._prime = prime

    def enter(self) -> None:
        """A pool thread's first call (its initializer; must not raise)."""
        try:
            os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + IO_NICE)
        except OSError:  # not Linux, or not allowed: same priority as the engine
            pass
        if not self.io_cpus:
            return
        try:
            self._prime()
            with self._lock:
                os.sched_setaffinity(0, self._cpus())
                self._threads.append(threading.get_native_id())
        except Exception as e:  # a pool whose start raises is broken: run where we are instead
            logger.warning("kvcdn: I/O thread stays on the engine's CPUs (%r)", e)

    def engine_idle(self, idle: bool) -> None:
        """Lend the compute cores to the pool threads for a step that computes nothing;
        take them back before a step that computes (called at each step's start)."""
        if not self.io_cpus or idle == self._lent:
            return
        with self._lock:
            self._lent = idle
            cpus = self._cpus()
            for tid in self._threads:
                try:
                    os.sched_setaffinity(tid, cpus)
                except OSError:  # the thread has ended
                    pass

    def _cpus(self) -> frozenset[int]:
        return self.io_cpus | self._compute_cpus if self._lent else self.io_cpus
