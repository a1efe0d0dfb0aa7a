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

from rkllm_api.config import Settings  # noqa: E402
from doubles.build import RKLLM_DOUBLE_ABIS, build_rkllm_double  # noqa: E402
from rkllm_ctypes import RKLLMRuntime  # noqa: E402
from rkllm_api.runtimes.base import EventKind, RunRequest  # noqa: E402


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
# CPU half (owner: the CPU runtime, llamacpp_runtime.py). Edit only this section.
#   LlamaCppRuntime's streaming rate vs llama-cpp-python's bare `Llama.generate`
#   loop: same model, prompt tokens, n_ctx, threads and greedy sampling, same number
#   of tokens, interleaved in one process. The ratio is the runtime's overhead
#   (target >= 0.95). The machine's load drifts, so rounds alternate who goes first
#   and the ratio is the median of per-round ratios.
# ---------------------------------------------------------------------------
CPU_BENCH_PROMPT = "Write a long story about a dragon."  # SmolLM2 greedy: 400+ tokens
CPU_BENCH_TOKENS = 256
CPU_BENCH_ROUNDS = 8
CPU_BENCH_CONTEXT = 2048


def _cpu_runtime_stream(runtime, n_tokens: int) -> tuple:
    """(first, last) text arrival times and tokens generated, through the runtime."""
    from rkllm_api.runtimes.base import SamplingParams
    stamps = []

    def sink(event):
        if event.kind is EventKind.TEXT:
            stamps.append(time.perf_counter())

    runtime.clear_kv_cache()
    request = RunRequest(CPU_BENCH_PROMPT, max_new_tokens=n_tokens,
                         sampling=SamplingParams(temperature=0.0, repeat_penalty=1.0))
    result = runtime.run(request, sink)
    return stamps[0], stamps[-1], result.perf.generate_tokens


def _cpu_bare_stream(llama, prompt_tokens: list, n_tokens: int) -> tuple:
    """The reference: llama-cpp-python's own generator, token ids only, greedy."""
    first = last = None
    count = 0
    llama.reset()
    for _token in llama.generate(prompt_tokens, temp=0.0, repeat_penalty=1.0):
        last = time.perf_counter()
        first = first or last
        count += 1
        if count >= n_tokens:
            break
    return first, last, count


def cpu_stream_figures(n_tokens: int = CPU_BENCH_TOKENS, rounds: int = CPU_BENCH_ROUNDS,
                       context_length: int = CPU_BENCH_CONTEXT, threads: int = 0) -> dict:
    import statistics

    import llama_cpp
    from rkllm_api.runtimes.llamacpp import LlamaCppRuntime, _thread_count, bundled_model_path

    model_path = bundled_model_path()
    if model_path is None:
        raise RuntimeError("the bundled SmolLM2 model is missing (install.sh installs it)")
    settings = Settings(cpu_threads=threads)
    n_threads = _thread_count(settings)
    runtime = LlamaCppRuntime(model_path, context_length=context_length, settings=settings)
    bare = llama_cpp.Llama(model_path, n_ctx=context_length, n_batch=512, n_threads=n_threads,
                           n_threads_batch=n_threads, verbose=False)
    before, after = runtime.template.turn_segments("user", False, False)
    prompt_tokens = bare.tokenize((before + CPU_BENCH_PROMPT + after).encode("utf-8"),
                                  add_bos=False, special=True)
    rates = {"runtime": [], "bare": []}
    try:
        for round_index in range(rounds):
            order = ("bare", "runtime") if round_index % 2 else ("runtime", "bare")
            for name in order:
                if name == "runtime":
                    first, last, count = _cpu_runtime_stream(runtime, n_tokens)
                else:
                    first, last, count = _cpu_bare_stream(bare, prompt_tokens, n_tokens)
                if count != n_tokens:
                    raise RuntimeError(f"{name} made {count} tokens, not {n_tokens}")
                rates[name].append((count - 1) / (last - first))
    finally:
        runtime.close()
        bare.close()
    return {"model": os.path.basename(model_path), "threads": n_threads,
            "n_ctx": context_length, "tokens": n_tokens, "rounds": rounds,
            "runtime": statistics.median(rates["runtime"]),
            "bare": statistics.median(rates["bare"]),
            "ratio": statistics.median(r / b for r, b in zip(rates["runtime"], rates["bare"])),
            "ratio_min": min(r / b for r, b in zip(rates["runtime"], rates["bare"]))}


def cpu_bench(args) -> list:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return ["CPU: skipped (llama-cpp-python is not installed)"]
    f = cpu_stream_figures()
    return [f"CPU runtime, {f['model']} ({f['threads']} threads, n_ctx {f['n_ctx']}, greedy, "
            f"{f['tokens']} tokens x {f['rounds']} rounds): LlamaCppRuntime "
            f"{f['runtime']:.1f} tokens/s, bare Llama.generate {f['bare']:.1f} tokens/s, "
            f"ratio {f['ratio']:.3f} (median of rounds; worst round {f['ratio_min']:.3f}; "
            f"target >= 0.95)"]


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
