"""Admission control that runs each publish's prefill alone in its engine steps.

Why: a prefill's last bits depend on everything in its step, not only on its own tokens.
vLLM's CPU attention splits a step's work over threads by the batch's total KV length and
tiles queries from each request's computed span (measured: one decode batched beside a
700-token prefill moves the prefill's attention outputs by up to 1e-3; see README
"Exactness"). A publish computed alone, in one pass, with no prefix-cache hit gives bytes
that depend only on the tokens and the compute profile; `verify` recomputes the same way.

How: the scheduler half asks the gate before admitting a request (``None`` from
``get_num_new_matched_tokens`` means "ask again next step", vLLM's own contract).
- A publish is admitted only when no other request holds the engine; nothing else is
  admitted until its prefill has been computed.
- While a publish waits, new requests are held back so in-flight ones drain, for at most
  ``max_hold_s``; after that the publish shares steps with others, and says so.
- ``max_hold_s == 0``: publishes are never held and never hold anyone back.
"""

from __future__ import annotations

import time


class PublishGate:
    def __init__(self, max_hold_s: float, clock=time.monotonic):
        self.max_hold_s = max_hold_s
        self._clock = clock
        self._admitted: set[str] = set()  # in the engine (blocks allocated), not finished
        self._holding: dict[str, float] = {}  # waiting publish -> when it first asked
        self._alone: str | None = None  # the publish whose prefill runs alone now

    def may_admit_publish(self, req_id: str) -> bool:
        if self._alone not in (None, req_id):
            return False  # one publish at a time
        if not self.max_hold_s or not self._admitted - {req_id}:
            return True
        since = self._holding.setdefault(req_id, self._clock())
        if self._clock() - since < self.max_hold_s:
            return False  # hold back new requests while in-flight ones drain
        del self._holding[req_id]  # waited long enough: share steps
        return True

    def may_admit(self, req_id: str) -> bool:
        """Any other request. One already admitted (e.g. preempted, coming back) may
        finish during a drain; nobody joins a publish that runs alone."""
        if self._alone is not None:
            return False
        return req_id in self._admitted or not self._is_draining()

    def _is_draining(self) -> bool:
        now = self._clock()
        return any(now - since < self.max_hold_s for since in self._holding.values())

    def on_admitted(self, req_id: str, *, publish: bool) -> None:
        if publish:
            self._holding.pop(req_id, None)
            if self.max_hold_s and not self._admitted:
                self._alone = req_id
        self._admitted.add(req_id)

    def on_prefill_done(self, req_id: str) -> None:
        if self._alone == req_id:
            self._alone = None

    def on_finished(self, req_id: str) -> None:
        self._admitted.discard(req_id)
        self._holding.pop(req_id, None)
        self.on_prefill_done(req_id)
