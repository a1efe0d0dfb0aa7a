"""What metrics cost on the streaming path, measured on the librkllmrt double.

Prints, side by side in one run:
  - tokens/s a streaming client receives from a server with metrics (the engine
    observer, prometheus-flask-exporter) and from one without (the Prometheus packages
    blocked), runs alternating, and their ratio;
  - the time to scrape /metrics from the server with metrics;
  - per token, in process: the engine's timed event sink (it stamps each token for the
    inter-token histogram) against a bare queue put.

Starts its own servers on 127.0.0.1 (free ports) and always stops them.
Usage: .venv/bin/python bench/metrics_bench.py [--tokens 3000] [--runs 5] [--scrapes 40]
"""
from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench")]

from doubles.build import build_rkllm_double  # noqa: E402
from server_bench import http_stream  # noqa: E402
from support.live_server import LiveServers, start_npu_server  # noqa: E402

ABI = "1.3"


def blocker(folder: str) -> str:
    """A folder that, first on PYTHONPATH, makes the Prometheus packages unimportable."""
    for package in ("prometheus_client", "prometheus_flask_exporter"):
        os.makedirs(os.path.join(folder, package))
        with open(os.path.join(folder, package, "__init__.py"), "w") as handle:
            handle.write("raise ImportError('blocked by metrics_bench')\n")
    return folder


def scrape_seconds(server, scrapes: int) -> float:
    times = []
    for _ in range(scrapes):
        started = time.perf_counter()
        assert server.get("/metrics").status_code == 200
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def sink_cost(tokens: int = 200_000) -> tuple:
    """(ns per event: bare put, ns per event: the engine's timed sink)."""
    from rkllm_api.engine.generation import Generation
    from rkllm_api.runtimes.base import EventKind, TokenEvent
    event = TokenEvent(EventKind.TEXT, text="x")

    class Stub:   # only what Generation._timed_sink reads
        _queue = queue.SimpleQueue()
        _token_times: list = []
        submitted_at = time.monotonic()

    bare = queue.SimpleQueue().put
    started = time.perf_counter()
    for _ in range(tokens):
        bare(event)
    bare_ns = (time.perf_counter() - started) / tokens * 1e9
    stub = Stub()
    stub._token_times.append(0.0)   # past the first token: no observer call in the loop
    timed = Generation._timed_sink(stub)
    started = time.perf_counter()
    for _ in range(tokens):
        timed(event)
    return bare_ns, (time.perf_counter() - started) / tokens * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scrapes", type=int, default=40)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="metrics-bench-") as tmp:
        libs = {ABI: build_rkllm_double(ABI, os.path.join(tmp, "double"))}
        servers = LiveServers(tmp)
        path = os.pathsep.join(filter(None, [blocker(os.path.join(tmp, "blocked")),
                                             os.environ.get("PYTHONPATH")]))
        try:
            quiet = {"FAKE_RKLLM_RECORD": "", "RKLLM_API_LOG_LEVEL": "WARNING"}
            with_metrics = start_npu_server(servers, libs, **quiet)
            without = start_npu_server(servers, libs, PYTHONPATH=path, **quiet)
            assert without.get("/metrics").status_code == 404
            rates = {"on": [], "off": []}
            for server in (with_metrics, without):
                http_stream(server.port, 10)   # load the model before measuring
            for _ in range(args.runs):          # alternate: drift hits both alike
                rates["on"].append(http_stream(with_metrics.port, args.tokens)[0])
                rates["off"].append(http_stream(without.port, args.tokens)[0])
            scrape = scrape_seconds(with_metrics, args.scrapes)
        finally:
            servers.stop_all()
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    bare_ns, timed_ns = sink_cost()
    print(f"{args.tokens} tokens x {args.runs} runs per server (medians), {args.scrapes} scrapes")
    print(f"{'metrics on (tok/s)':<22}{'metrics off (tok/s)':<22}{'on / off':<12}"
          f"{'scrape /metrics (ms)':<22}{'bare put (ns)':<16}{'timed sink (ns)':<16}")
    print(f"{on:<22.0f}{off:<22.0f}{on / off:<12.3f}{scrape * 1000:<22.2f}"
          f"{bare_ns:<16.0f}{timed_ns:<16.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
