"""The HTTP server's own cost on the streaming path, measured on the librkllmrt double.

Prints, side by side in one run:
  - direct:  tokens/s of the double through the ctypes binding alone (RKLLMRuntime.run)
  - http:    tokens/s a streaming HTTP client receives from a real gunicorn server
             answering the same full-speed script (@@count:N@@)
  - their ratio (the share of the runtime's rate the server delivers),
  - request-to-first-byte time of a short streamed chat (request sent on a new
    connection -> response headers and role chunk; median of --first-byte-runs), and
  - the same round trip for GET /ready: the HTTP floor of this machine;
  - the runtime in a child process (RUNTIME_ISOLATION=1, the default) against the
    runtime in the server's process (RUNTIME_ISOLATION=0): both servers run side by
    side, measured alternately, and the child's rate and first byte are given as a
    ratio of the in-process ones.

Starts its own servers on 127.0.0.1 (free ports) and always stops them.
Usage: .venv/bin/python bench/server_bench.py [--tokens 3000] [--runs 3] [--first-byte-runs 40]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from rkllm_api.config import Settings  # noqa: E402
from doubles.build import build_rkllm_double  # noqa: E402
from rkllm_api.runtimes.base import EventKind, RunRequest  # noqa: E402
from support.live_server import NPU_MODEL_ID, LiveServers, start_npu_server  # noqa: E402

ABI = "1.3"


def direct_rate(lib: str, model_file: str, tokens: int, runs: int) -> float:
    """Tokens/s of the double through the binding, with a callback that only counts."""
    from rkllm_ctypes import RKLLMRuntime
    runtime = RKLLMRuntime(model_file, context_length=4096,
                           settings=Settings(rkllm_lib_path=lib, rkllm_abi=ABI))
    rates = []
    try:
        for _ in range(runs):
            count = [0]

            def on_event(event, count=count):
                if event.kind is EventKind.TEXT:
                    count[0] += 1

            started = time.perf_counter()
            runtime.run(RunRequest(prompt=f"@@count:{tokens}@@", max_new_tokens=tokens + 10),
                        on_event)
            rates.append(count[0] / (time.perf_counter() - started))
    finally:
        runtime.close()
    return statistics.median(rates)


def http_stream(port: int, tokens: int) -> tuple:
    """(tokens/s received, seconds to first byte) for one streaming request."""
    body = json.dumps({"model": NPU_MODEL_ID, "stream": True, "max_tokens": tokens + 10,
                       "messages": [{"role": "user", "content": f"@@count:{tokens}@@"}]})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        started = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", body,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        first_line = response.readline()
        first_byte = time.perf_counter() - started
        assert response.status == 200 and first_line.startswith(b"data: "), first_line
        received = 0
        for line in response:
            if line.startswith(b'data: {"id"') and b'"content":"' in line:
                received += 1
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    return received / elapsed, first_byte, received


def ready_round_trip(port: int) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        started = time.perf_counter()
        connection.request("GET", "/ready")
        response = connection.getresponse()
        response.read()
        return time.perf_counter() - started
    finally:
        connection.close()


def measure(port: int, tokens: int, first_byte_runs: int) -> tuple:
    """(streamed tok/s of one run, first byte of one short chat (s), tokens received)
    samples; first_byte_runs short chats per call."""
    rate, _, received = http_stream(port, tokens)
    first_bytes = [http_stream(port, 10)[1] for _ in range(first_byte_runs)]
    return rate, first_bytes, received


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--first-byte-runs", type=int, default=40)
    args = parser.parse_args()
    modes = ("in-process", "child process")

    with tempfile.TemporaryDirectory(prefix="server-bench-") as tmp:
        libs = {ABI: build_rkllm_double(ABI, os.path.join(tmp, "double"))}
        servers = LiveServers(tmp)
        samples = {mode: {"rates": [], "first": [], "received": []} for mode in modes}
        try:
            started = {mode: start_npu_server(servers, libs, FAKE_RKLLM_RECORD="",
                                              RKLLM_API_LOG_LEVEL="WARNING",
                                              RUNTIME_ISOLATION=str(int(mode != modes[0])))
                       for mode in modes}
            server = started[modes[0]]
            model_file = os.path.join(server.env["RKLLM_MODELS_ROOT"], NPU_MODEL_ID,
                                      f"{NPU_MODEL_ID}.rkllm")
            for each in started.values():
                http_stream(each.port, 10)  # load the model before measuring
            per_round = max(1, args.first_byte_runs // args.runs)
            for _ in range(args.runs):      # alternately, so both see the same machine
                for mode in modes:
                    rate, first, received = measure(started[mode].port, args.tokens, per_round)
                    samples[mode]["rates"].append(rate)
                    samples[mode]["first"] += first
                    samples[mode]["received"].append(received)
            floors = [ready_round_trip(server.port) for _ in range(args.first_byte_runs)]
        finally:
            servers.stop_all()
        direct = direct_rate(libs[ABI], model_file, args.tokens, args.runs)

    rate = {mode: statistics.median(samples[mode]["rates"]) for mode in modes}
    first_ms = {mode: statistics.median(samples[mode]["first"]) * 1000 for mode in modes}
    floor_ms = statistics.median(floors) * 1000
    print(f"tokens per run: {args.tokens}, runs: {args.runs}; first byte: "
          f"{per_round * args.runs} short chats per mode (medians)")
    print(f"{'runtime':<16}{'direct binding (tok/s)':<24}{'HTTP stream (tok/s)':<22}"
          f"{'HTTP / direct':<16}{'first byte (ms)':<18}{'GET /ready (ms)':<16}")
    for mode in modes:
        print(f"{mode:<16}{direct:<24.0f}{rate[mode]:<22.0f}{rate[mode] / direct:<16.3f}"
              f"{first_ms[mode]:<18.1f}{floor_ms:<16.1f}")
    child, inside = modes[1], modes[0]
    print(f"child / in-process: tokens/s {rate[child] / rate[inside]:.3f}, "
          f"first byte {first_ms[child] / first_ms[inside]:.3f}")
    for mode in modes:
        if any(r != args.tokens for r in samples[mode]["received"]):
            print(f"warning: {mode}: token counts received {samples[mode]['received']}",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
