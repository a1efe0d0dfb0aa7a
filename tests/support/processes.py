"""Processes as /proc shows them: children of a process, whether one still runs.
For the tests of runtimes in child processes (no psutil needed)."""
from __future__ import annotations

import os
import time


def process_state(pid: int):
    """The state letter of a process (R, S, Z ...) or None when it no longer exists."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def parent_of(pid: int):
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def children_of(pid: int) -> list:
    """Pids whose parent is `pid` (zombies included: they are still children)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and parent_of(int(entry)) == pid:
            found.append(int(entry))
    return sorted(found)


def running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    return process_state(pid) not in (None, "Z", "X")


def wait_until_gone(pid: int, seconds: float = 15.0) -> bool:
    """Waits (bounded) until the process has ended; True when it has. A zombie whose
    parent is gone counts as ended (reaping it is init's job, not ours)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not running(pid):
            return True
        time.sleep(0.05)
    return not running(pid)


def gunicorn_worker(master_pid: int, seconds: float = 15.0) -> int:
    """The single worker of a gunicorn master (waits for it, bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        workers = [pid for pid in children_of(master_pid) if running(pid)]
        if len(workers) == 1:
            return workers[0]
        time.sleep(0.05)
    raise AssertionError(f"gunicorn master {master_pid} has no single worker")
