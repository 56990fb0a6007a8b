"""Publish isolation, as the scheduler half drives it (no engine: a fake clock)."""

from vllm_kvcdn.connector.publish_gate import PublishGate


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_publish_into_an_idle_engine_runs_alone_then_others_follow():
    gate = PublishGate(10, clock=Clock())
    assert gate.may_admit_publish("pub")
    gate.on_admitted("pub", publish=True)
    assert not gate.may_admit("q1")  # nobody joins its prefill steps
    gate.on_prefill_done("pub")
    assert gate.may_admit("q1")


def test_a_publish_waits_for_in_flight_requests_and_holds_new_ones_back():
    clock = Clock()
    gate = PublishGate(10, clock=clock)
    gate.on_admitted("q1", publish=False)
    assert not gate.may_admit_publish("pub")  # q1 is still running
    assert not gate.may_admit("q2")  # new requests wait while q1 drains
    gate.on_finished("q1")
    assert gate.may_admit_publish("pub")
    gate.on_admitted("pub", publish=True)
    assert not gate.may_admit("q2")
    gate.on_finished("pub")
    assert gate.may_admit("q2")


def test_an_admitted_request_coming_back_may_finish_during_a_drain():
    gate = PublishGate(10, clock=Clock())
    gate.on_admitted("preempted", publish=False)
    assert not gate.may_admit_publish("pub")
    assert gate.may_admit("preempted")  # otherwise the drain could never end


def test_the_hold_is_bounded_then_the_publish_shares_steps():
    clock = Clock()
    gate = PublishGate(10, clock=clock)
    gate.on_admitted("q1", publish=False)
    assert not gate.may_admit_publish("pub")
    clock.now += 10
    assert gate.may_admit("q2")  # the hold has ended
    assert gate.may_admit_publish("pub")
    gate.on_admitted("pub", publish=True)
    assert gate.may_admit("q3")  # it shares steps: it does not block anyone


def test_zero_means_no_isolation_at_all():
    gate = PublishGate(0, clock=Clock())
    gate.on_admitted("q1", publish=False)
    assert gate.may_admit_publish("pub")
    gate.on_admitted("pub", publish=True)
    assert gate.may_admit("q2")


def test_one_publish_at_a_time_and_an_aborted_one_releases_the_engine():
    gate = PublishGate(10, clock=Clock())
    assert gate.may_admit_publish("a")
    gate.on_admitted("a", publish=True)
    assert not gate.may_admit_publish("b")
    gate.on_finished("a")  # aborted before its prefill ended
    assert gate.may_admit_publish("b") and gate.may_admit("q")
