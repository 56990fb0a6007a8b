"""A CPU worker's I/O threads run on the cores vLLM leaves out of its compute threads.

vLLM's executor binds the worker's OpenMP threads to the compute cores; a thread the
worker starts inherits the core of its creator, and OpenMP binds it back there the
first time it opens a parallel region (the platform's KV write op opens one). The
OpenMP variables must be set before the OpenMP runtime loads, hence a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from vllm_kvcdn.compat import _omp_bound_cpus
from vllm_kvcdn.connector.io_threads import IO_NICE


def test_compute_cores_are_read_from_what_vllm_exports():
    assert _omp_bound_cpus({"OMP_PLACES": "{0,1,2}", "OMP_PROC_BIND": "true"}) == {0, 1, 2}
    assert _omp_bound_cpus({"GOMP_CPU_AFFINITY": "3 4"}) == {3, 4}
    assert _omp_bound_cpus({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[5,6]"}) == {5, 6}
    assert _omp_bound_cpus({}) is None  # nothing bound (one process, a GPU worker)
    assert _omp_bound_cpus({"OMP_PLACES": "{0:4}"}) is None  # a form vLLM does not write: no guess


SCRIPT = textwrap.dedent("""
    import os, sys, threading
    import torch
    from vllm_kvcdn.connector.io_threads import IOThreadPlacement
    from vllm_kvcdn.connector.jobs import pool
    from vllm_kvcdn.connector.kv_layout import CpuAttnLayout

    io_cpus = frozenset(int(c) for c in sys.argv[1].split(","))
    layout = CpuAttnLayout(torch.bfloat16, 128, 64)
    cache = torch.zeros(2, 2, 128, 128, dtype=torch.bfloat16)
    kv = torch.ones(4, 2, 64, dtype=torch.bfloat16)

    def write_then_where():
        layout.write(cache, kv, kv, torch.arange(4))
        return sorted(os.sched_getaffinity(0))

    def naive_pin():  # what a plain sched_setaffinity at thread start gets
        os.sched_setaffinity(0, io_cpus)

    layout.write(cache, kv, kv, torch.arange(4))  # OpenMP binds the engine's thread to the compute cores
    placement = IOThreadPlacement(io_cpus)
    placement.bind(lambda: layout.prime_thread(cache))
    primed = pool(1, "t", inline=False, on_start=placement.enter)
    naive = pool(1, "n", inline=False, on_start=naive_pin)
    print(primed.submit(write_then_where).result(), naive.submit(write_then_where).result())
    placement.engine_idle(True)  # a step that computes nothing: the compute cores are lent
    print(primed.submit(write_then_where).result())
    placement.engine_idle(False)  # and taken back before a step that computes
    print(primed.submit(write_then_where).result())
    print(primed.submit(os.getpriority, os.PRIO_PROCESS, 0).result() - os.getpriority(os.PRIO_PROCESS, 0))
""")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_pool_thread_stays_on_the_io_cpus_after_the_write_op_and_borrows_idle_compute_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    compute, io = cpus[0], cpus[1:]
    env = {**os.environ, "OMP_PLACES": f"{{{compute}}}", "OMP_PROC_BIND": "true", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(map(str, io))], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    first, idle, busy, nicer = out.stdout.strip().splitlines()[-4:]
    primed, naive = first.split("] [")
    assert primed.strip("[]") == ", ".join(map(str, io))
    assert naive.strip("[]") == str(compute)  # the trap this guards against, still there
    assert idle == str(cpus)  # an idle engine's core is lent to the I/O threads
    assert busy == str(io)
    assert nicer == str(IO_NICE)  # below the engine's threads where they share a core
