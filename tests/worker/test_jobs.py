"""The worker's job pools: every thread started (and set up) with the worker, not by a request."""

import threading

from vllm_kvcdn.connector.jobs import Outbox, pool, start_threads


def test_start_threads_starts_every_thread_and_runs_its_setup_before_any_job():
    started, lock = [], threading.Lock()

    def setup():
        with lock:
            started.append(threading.get_ident())

    executor = pool(3, "t", inline=False, on_start=setup)
    try:
        start_threads(executor, 3)
        assert len(set(started)) == 3
        outbox = Outbox()
        outbox.run(executor, threading.get_ident, on_error=repr)
        (ran_on,) = outbox.take(wait_s=5)
        assert ran_on in started and len(started) == 3  # a job finds its thread ready
    finally:
        executor.shutdown()


def test_inline_pools_have_no_threads_to_start():
    calls = []
    executor = pool(2, "t", inline=True, on_start=lambda: calls.append(1))
    start_threads(executor, 2)
    assert calls == [] and executor.submit(lambda: 7).result() == 7
