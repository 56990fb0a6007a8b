"""A circuit breaker: after a run of failures, fail at once for a while instead of
making every request wait out its retries against a store that is down."""

from __future__ import annotations

import threading
import time

from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store.base import StoreError

logger = get_logger(__name__)


class CircuitOpen(StoreError):
    """Refused without asking the store: it failed too often just now."""


class CircuitBreaker:
    """Closed: calls go through. ``threshold`` failures in a row open it: calls fail
    at once for ``cooldown_s``; then one trial call is let through (half-open), and its
    outcome closes the breaker or opens it again."""

    def __init__(self, name: str, threshold: int = 5, cooldown_s: float = 5.0, clock=time.monotonic):
        self.name = name
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False
        self.times_opened = 0

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def before_call(self) -> None:
        """Raise ``CircuitOpen`` unless this call may go to the store."""
        with self._lock:
            if self._opened_at is None:
                return
            waited = self._clock() - self._opened_at
            if waited < self.cooldown_s or self._trial_running:
                raise CircuitOpen(f"{self.name} is failing; not asking it again for "
                                  f"{max(0.0, self.cooldown_s - waited):.1f}s (circuit open)")
            self._trial_running = True

    def succeeded(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                logger.info("kvcdn: %s answers again; circuit closed", self.name)
            self._failures, self._opened_at, self._trial_running = 0, None, False

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            reopen = self._trial_running
            self._trial_running = False
            if reopen or (self._opened_at is None and self._failures >= self.threshold):
                self._opened_at = self._clock()
                self.times_opened += 1
                logger.warning("kvcdn: %s failed %d times in a row; circuit open for %.1fs",
                               self.name, self._failures, self.cooldown_s)
