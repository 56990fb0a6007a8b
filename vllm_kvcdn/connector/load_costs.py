"""Load or recompute, decided by measurement: what a worker has seen its sources deliver
and its engine compute, and whether the rest of a hit arrives sooner than it would be
computed.

A hit is not always worth loading: a 4k-token Qwen3-4B prefill takes ~70 ms on an H100
while its 590 MB take ~480 ms from S3 (ANCHORS); peers ship tiers slower than recomputing
(a file tier at 2,450 ms vs 1,725 ms, a remote backend at 29 s vs 8.5 s). So each worker
learns, online:
- each source's chunk read time (``store``: a chunk object, whatever tiers the store has
  in front; ``image``: a block image on the node's disk), the median of its last reads;
  ``io_threads`` reads run at once, so n chunks take ceil(n / io_threads) read times;
- the engine's prefill time per token, from its last forward passes (``step_clock``): the
  slope of step time against tokens computed, so a step's fixed cost does not count as
  prefill (measured on this CPU, Qwen3-0.6B shape: a 16-token step costs ~6 ms a token, a
  271-token one ~1.3; the per-token average of small steps made a 1.6 s read look faster
  than a 0.35 s prefill). With one step size seen, its time per token; none until a step
  computed ``MIN_STEP_TOKENS``.
A load goes ahead unless both are known and the source's chunks would arrive later than
computing them by more than ``margin_s`` (a step's round trip and noise): until then it
loads, as before. RAM-tier chunks always load (a memory copy beats any prefill).

A source judged slow is no longer read by loads, so nothing would show it recovered: each
skipped load starts one probe read of the first chunk it skipped (one probe in flight per
source, off the request path; its bytes are verified and dropped, and an ``s3://`` store's
disk tier keeps them), and loads resume once the probes say the source is fast again.
Thread-safe: load jobs, probes and the engine's step all report here.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from statistics import median

MIN_STEP_TOKENS = 16  # no prefill rate until a step computed this many tokens
READS_KEPT = 3  # the median of the last three: one outlier neither starts nor stops loads
STEPS_KEPT = 64  # forward passes the prefill rate is fitted on


@dataclass(frozen=True)
class Verdict:
    load: bool
    load_s: float | None = None  # expected seconds to read the chunks (None: not measured yet)
    compute_s: float | None = None  # expected seconds to compute their tokens

    def why(self) -> str:
        return (f"reading them would take ~{self.load_s:.3f}s, computing them ~{self.compute_s:.3f}s"
                if self.load_s is not None and self.compute_s is not None else "not measured yet")


class LoadCosts:
    def __init__(self, parallel_reads: int, margin_s: float = 0.05, enabled: bool = True):
        self.parallel_reads, self.margin_s, self.enabled = parallel_reads, margin_s, enabled
        self._reads: dict[str, deque[float]] = {}  # source -> seconds of its last chunk reads
        self._steps = _StepFit()
        self._probing: set[str] = set()
        self._lock = threading.Condition()

    def observe_read(self, source: str, seconds: float) -> None:
        with self._lock:
            self._reads.setdefault(source, deque(maxlen=READS_KEPT)).append(seconds)

    def observe_step(self, tokens: int, seconds: float) -> None:
        """A forward pass that computed ``tokens`` tokens in ``seconds``."""
        if tokens > 0 and seconds > 0:
            with self._lock:
                self._steps.add(tokens, seconds)

    def prefill_s_per_token(self) -> float | None:
        with self._lock:
            return self._steps.seconds_per_token()

    def read_seconds(self, source: str) -> float | None:
        with self._lock:
            reads = self._reads.get(source)
            return median(reads) if reads else None

    def estimates(self) -> dict[str, float]:
        """What is measured so far, by gauge name (``stats.GAUGES``)."""
        found = {"prefill_seconds_per_token": self.prefill_s_per_token(),
                 **{f"{source}_read_seconds": self.read_seconds(source) for source in ("store", "image")}}
        return {name: value for name, value in found.items() if value is not None}

    def verdict(self, source: str, chunks: int, tokens: int) -> Verdict:
        """Whether ``chunks`` chunks (``tokens`` tokens) of ``source`` arrive sooner than
        their tokens would be computed (or too little is known to say no)."""
        read_s, per_token = self.read_seconds(source), self.prefill_s_per_token()
        if read_s is None or per_token is None:
            return Verdict(True)
        load_s = read_s * math.ceil(chunks / self.parallel_reads)
        compute_s = tokens * per_token
        return Verdict(not self.enabled or load_s <= compute_s + self.margin_s, load_s, compute_s)

    def start_probe(self, source: str) -> bool:
        """Whether the caller should probe ``source`` now (none in flight); ``end_probe`` after."""
        with self._lock:
            if source in self._probing:
                return False
            self._probing.add(source)
            return True

    def end_probe(self, source: str) -> None:
        with self._lock:
            self._probing.discard(source)
            self._lock.notify_all()

    def wait_for_probes(self, timeout_s: float) -> bool:
        """Wait until no probe is in flight (tests, benchmarks); whether none is."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._probing, timeout_s)


class _StepFit:
    """The last ``STEPS_KEPT`` forward passes and the least-squares line of their time
    against tokens, kept as running sums: the worker reads it every engine step (for its
    gauges), and a read then does no regression over the window."""

    def __init__(self):
        self._steps: deque[tuple[int, float]] = deque()
        self._sums = [0.0] * 4  # tokens, seconds, tokens², tokens x seconds
        self._since_exact = 0

    def add(self, tokens: int, seconds: float) -> None:
        self._steps.append((tokens, seconds))
        self._update(tokens, seconds, 1)
        if len(self._steps) > STEPS_KEPT:
            self._update(*self._steps.popleft(), -1)
        self._since_exact += 1
        if self._since_exact >= STEPS_KEPT:  # no rounding drift from endless adds and removals
            self._sums = [0.0] * 4
            for step in self._steps:
                self._update(*step, 1)
            self._since_exact = 0

    def _update(self, tokens: int, seconds: float, sign: int) -> None:
        for i, value in enumerate((tokens, seconds, tokens * tokens, tokens * seconds)):
            self._sums[i] += sign * value

    def seconds_per_token(self) -> float | None:
        """The slope of time against tokens (a step's fixed cost is not prefill); with one
        step size seen (or a slope that is no slope), the largest step's time per token;
        None until a step computed ``MIN_STEP_TOKENS``."""
        if not self._steps:
            return None
        most, fewest = max(t for t, _ in self._steps), min(t for t, _ in self._steps)
        if most < MIN_STEP_TOKENS:
            return None
        n = len(self._steps)
        t, s, tt, ts = self._sums
        spread = tt - t * t / n
        slope = (ts - t * s / n) / spread if spread > 0 else 0.0
        if slope > 0 and most >= 2 * fewest:
            return slope
        tokens, seconds = max(self._steps)
        return seconds / tokens
