"""Months of uptime, in small: rounds of every kind of request (a runtime crash and
its reload, vanished clients and unfinished heads included) on a live server on the
librkllmrt double. After a first round has warmed everything up, more rounds must not
leave more behind: file descriptors and threads of the worker and of the runtime's
child, child processes, zombies. Memory is measured by bench/soak_bench.py (a few
rounds are too few to tell a leak from the allocator's noise)."""
from __future__ import annotations

from support.live_server import start_npu_server
from support.processes import gunicorn_worker
from support.soak import (fill_thread_pool, footprint, live_children, mixed_round,
                          wait_until_idle, zombie_children)

ROUNDS_AFTER_WARMUP = 4
SLACK = 2   # a descriptor or thread that happens to be open at the moment of looking


def test_rounds_of_mixed_traffic_leave_nothing_behind(live_servers, rkllm_double_libs):
    server = start_npu_server(live_servers, rkllm_double_libs, SSE_HEARTBEAT_SECONDS="0",
                              REQUEST_HEADER_TIMEOUT="1")
    worker = gunicorn_worker(server.proc.pid)
    mixed_round(server, 0)
    fill_thread_pool(server)
    wait_until_idle(server, worker)
    worker_before = footprint(worker)
    [child] = live_children(worker)
    child_before = footprint(child)
    children_seen = {child}
    for number in range(1, ROUNDS_AFTER_WARMUP + 1):
        mixed_round(server, number)
        wait_until_idle(server, worker)
        children_seen.update(live_children(worker))
    worker_after = footprint(worker)
    [child_after_pid] = live_children(worker)
    child_after = footprint(child_after_pid)
    # every round crashed the runtime once: each reload is a new child, the old reaped
    assert len(children_seen) == 1 + ROUNDS_AFTER_WARMUP
    assert zombie_children(worker) == []
    assert worker_after.fds <= worker_before.fds + SLACK, (worker_before, worker_after)
    assert worker_after.threads <= worker_before.threads + SLACK, (worker_before, worker_after)
    # a fresh child after the same work holds what the first one did
    assert child_after.fds <= child_before.fds + SLACK, (child_before, child_after)
    assert child_after.threads <= child_before.threads + SLACK, (child_before, child_after)
