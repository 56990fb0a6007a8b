"""How long each engine step's forward pass took, for the prefill rate ``load_costs``
learns.

vLLM binds a step's connector metadata before the forward pass and calls
``wait_for_save`` after it, on the thread that runs the model. On a CPU engine the pass
is done when ``wait_for_save`` runs: wall time between the two is its time. On CUDA the
pass is only queued by then: a pair of CUDA events brackets it on the compute stream and
is read in a later step, once the device has passed the second (never waiting for it).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch


class StepClock:
    def __init__(self, device: torch.device, report: Callable[[int, float], None]):
        """``report(tokens, seconds)`` gets each timed step."""
        self._cuda = device.type == "cuda"
        self._report = report
        self._started: tuple[int, object] | None = None  # (tokens, start time or event)
        self._pending: deque = deque(maxlen=16)  # CUDA: (tokens, start event, end event) not yet passed

    def step_started(self, tokens: int) -> None:
        if not tokens:
            self._started = None
            return
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._started = (tokens, start)
        else:
            self._started = (tokens, time.perf_counter())
        self._drain()

    def step_ended(self) -> None:
        if self._started is None:
            return
        tokens, start = self._started
        self._started = None
        if not self._cuda:
            self._report(tokens, time.perf_counter() - start)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((tokens, start, end))

    def _drain(self) -> None:
        while self._pending and self._pending[0][2].query():
            tokens, start, end = self._pending.popleft()
            self._report(tokens, start.elapsed_time(end) / 1000)
