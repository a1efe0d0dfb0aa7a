"""Runtime throughput: how many tokens per second each runtime layer can carry.

NPU half: the librkllmrt binding driven by the C double at full speed
(`@@count:N@@`, no delay between tokens). The double costs almost nothing per
token, so the figure is the binding's own ceiling: callback, UTF-8 assembly,
event creation and the sink. A real NPU decodes far slower (10-30 tokens/s for
1-3B models), so the binding must stay orders of magnitude above that.

CPU half: see `cpu_bench` below.

    .venv/bin/python bench/runtime_bench.py [--tokens 20000] [--abi 1.2 1.3] [--skip-cpu]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from config import Settings  # noqa: E402
from doubles.build import RKLLM_DOUBLE_ABIS, build_rkllm_double  # noqa: E402
from rkllm_ctypes import RKLLMRuntime  # noqa: E402
from runtime import EventKind, RunRequest  # noqa: E402


def npu_binding_bench(abi: str, tokens: int, work_dir: str, repeats: int = 3) -> dict:
    """Best of `repeats` runs of `tokens` tokens through the binding on the double."""
    library = build_rkllm_double(abi, work_dir)
    model = os.path.join(work_dir, "bench.rkllm")
    with open(model, "wb") as handle:
        handle.write(b"FAKE-RKLLM-MODEL\n")
    runtime = RKLLMRuntime(model, context_length=tokens + 64,
                           settings=Settings(rkllm_lib_path=library, rkllm_abi=""))
    received = 0

    def sink(event):
        nonlocal received
        if event.kind is EventKind.TEXT:
            received += 1

    best = float("inf")
    try:
        for _ in range(repeats):
            received = 0
            started = time.perf_counter()
            result = runtime.run(RunRequest(prompt=f"@@count:{tokens}@@", max_new_tokens=tokens),
                                 sink)
            best = min(best, time.perf_counter() - started)
            assert received == tokens and result.error is None, (received, result)
    finally:
        runtime.close()
    return {"abi": abi, "tokens": tokens, "seconds": best, "tokens_per_s": tokens / best,
            "us_per_token": best / tokens * 1e6}


# ---------------------------------------------------------------------------
# CPU half (to be written by the CPU runtime's engineer):
#   CPU runtime tokens/s (llamacpp_runtime.LlamaCppRuntime on the bundled SmolLM2)
#   vs llama-cpp-python's bare `Llama.generate` loop on the same prompt and model,
#   and their ratio (the runtime's overhead). Return a list of printable lines.
# ---------------------------------------------------------------------------
def cpu_bench(args) -> list:
    return ["CPU: not measured yet (cpu_bench in bench/runtime_bench.py is a placeholder)"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--abi", nargs="+", default=list(RKLLM_DOUBLE_ABIS))
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rkllm-bench-") as work_dir:
        for abi in args.abi:
            figures = npu_binding_bench(abi, args.tokens, work_dir)
            print(f"NPU binding, librkllmrt double ABI {abi}: {figures['tokens']} tokens in "
                  f"{figures['seconds']:.3f} s = {figures['tokens_per_s']:,.0f} tokens/s "
                  f"({figures['us_per_token']:.1f} us/token)")
    if not args.skip_cpu:
        for line in cpu_bench(args):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
