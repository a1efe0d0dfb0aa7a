"""Uptime in a hurry: what a live server holds as mixed traffic goes on.

Runs rounds of every kind of request (tests/support/soak.py: chats streamed and not, a
client that vanishes mid-stream, an unfinished request head, the Ollama surface,
embeddings, completions, bad JSON, GETs; with --crash also a runtime crash and reload
per round) against a real gunicorn on the librkllmrt double, and samples the worker's
and the runtime child's resident memory, file descriptors and threads every --every
rounds. Prints the samples and the growth per 1000 requests between the first sample
(after a warm-up round and a burst that fills the thread pool) and the last.

Starts its own server on 127.0.0.1 and always stops it.
Usage: .venv/bin/python bench/soak_bench.py [--rounds 100] [--every 10] [--crash]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from doubles.build import build_rkllm_double  # noqa: E402
from support.live_server import LiveServers, start_npu_server  # noqa: E402
from support.processes import gunicorn_worker  # noqa: E402
from support.soak import (REQUESTS_PER_ROUND, fill_thread_pool, footprint,  # noqa: E402
                          live_children, mixed_round, wait_until_idle)

ABI = "1.3"


def sample(server, worker: int) -> tuple:
    wait_until_idle(server, worker)
    [child] = live_children(worker)
    return footprint(worker), footprint(child), child


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--crash", action="store_true",
                        help="a runtime crash and reload in every round")
    args = parser.parse_args()
    per_round = REQUESTS_PER_ROUND if args.crash else REQUESTS_PER_ROUND - 1
    with tempfile.TemporaryDirectory(prefix="soak-bench-") as tmp:
        libs = {ABI: build_rkllm_double(ABI, os.path.join(tmp, "double"))}
        servers = LiveServers(tmp)
        try:
            server = start_npu_server(servers, libs, SSE_HEARTBEAT_SECONDS="0",
                                      REQUEST_HEADER_TIMEOUT="1")
            worker = gunicorn_worker(server.proc.pid)
            mixed_round(server, 0, crash=args.crash)
            fill_thread_pool(server)
            started = time.monotonic()
            samples = [(0,) + sample(server, worker)]
            print(f"{'requests':>8} {'worker RSS MB':>13} {'fds':>4} {'threads':>7} "
                  f"{'child RSS MB':>12} {'fds':>4} {'threads':>7}  child pid")
            for number in range(1, args.rounds + 1):
                mixed_round(server, number, crash=args.crash)
                if number % args.every == 0 or number == args.rounds:
                    samples.append((number * per_round,) + sample(server, worker))
            for done, (w, c, pid) in ((s[0], s[1:]) for s in samples):
                print(f"{done:>8} {w.rss_kb / 1024:>13.1f} {w.fds:>4} {w.threads:>7} "
                      f"{c.rss_kb / 1024:>12.1f} {c.fds:>4} {c.threads:>7}  {pid}")
            (first, w0, c0, _), (last, w1, c1, _) = samples[0], samples[-1]
            per_k = 1000 / max(1, last - first)
            print(f"\n{last} requests in {time.monotonic() - started:.0f} s; growth per 1000 "
                  f"requests: worker RSS {(w1.rss_kb - w0.rss_kb) * per_k / 1024:+.2f} MB, "
                  f"fds {(w1.fds - w0.fds) * per_k:+.1f}, threads "
                  f"{(w1.threads - w0.threads) * per_k:+.1f}; child RSS "
                  f"{(c1.rss_kb - c0.rss_kb) * per_k / 1024:+.2f} MB"
                  + (" (a new child every round: not comparable)" if args.crash else ""))
        finally:
            servers.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
