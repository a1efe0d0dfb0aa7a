"""Structured output: what decoding under a JSON-schema grammar costs on the CPU
runtime, and what validating an answer costs (the NPU's only check).

Side by side, interleaved, in one run on the bundled SmolLM2 (CPU runtime):
  free      plain text, greedy, max_new_tokens N (a prompt that does not stop early)
  grammar   the same, decoding under a schema whose one string must be long, so the
            run also lasts ~N tokens
  nested    the deepest fixture schema (tests/fixtures/structured/schemas.json),
            sampled with the model's defaults: a grammar with many rules
Reported: ms per generated token (median over rounds, the runtime's own perf
figures) and the ratio to `free`; then the one-off cost of turning a schema into a
grammar, and of OutputContract.check() on a typical answer.

    .venv/bin/python bench/structured_bench.py [--rounds 5] [--tokens 96] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rkllm_api.models.sampling import model_defaults  # noqa: E402
from rkllm_api.request import ResponseFormat  # noqa: E402
from rkllm_api.runtimes.base import RunRequest, SamplingParams  # noqa: E402
from rkllm_api.structured.schema import contract_for  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
FREE_PROMPT = "Write a long story about a dragon."


class Settings:
    def __init__(self, threads: int, tokens: int):
        self.cpu_threads, self.default_max_tokens = threads, tokens


def fixture_schema(name: str) -> dict:
    path = os.path.join(ROOT, "tests", "fixtures", "structured", "schemas.json")
    with open(path, encoding="utf-8") as handle:
        return next(c["schema"] for c in json.load(handle) if c["name"] == name)


def ms_per_token(runtime, request: RunRequest) -> tuple:
    runtime.clear_kv_cache()
    result = runtime.run(request, lambda event: None)
    perf = result.perf
    return perf.generate_ms / max(1, perf.generate_tokens), perf.generate_tokens, result.text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from rkllm_api.runtimes.grammar import gbnf_for_schema
    from rkllm_api.runtimes.llamacpp import LlamaCppRuntime, bundled_model_path
    runtime = LlamaCppRuntime(bundled_model_path(), context_length=2048,
                              settings=Settings(args.threads, args.tokens))
    long_text = {"type": "object", "properties": {"story": {
        "type": "string", "minLength": 4 * args.tokens, "maxLength": 6 * args.tokens}},
        "required": ["story"]}
    nested = contract_for(ResponseFormat("json_schema", fixture_schema("deep_nesting")), "bench")
    cases = {
        "free": RunRequest(prompt=FREE_PROMPT, max_new_tokens=args.tokens, sampling=GREEDY),
        "grammar": RunRequest(prompt=FREE_PROMPT + " Answer in JSON.", sampling=GREEDY,
                              max_new_tokens=args.tokens, response_schema=json.dumps(long_text)),
        "nested": RunRequest(prompt=f"{nested.instruction()}\n\nDescribe a small company.",
                             max_new_tokens=args.tokens * 2, sampling=model_defaults("smollm", {}),
                             response_schema=nested.grammar_text),
    }
    figures = {name: [] for name in cases}
    tokens = {name: [] for name in cases}
    try:
        for _ in range(args.rounds):
            for name, request in cases.items():   # interleaved: drift hits every case alike
                ms, count, _ = ms_per_token(runtime, request)
                figures[name].append(ms)
                tokens[name].append(count)
    finally:
        runtime.close()

    base = statistics.median(figures["free"])
    print(f"{'case':<8} {'ms/token':>9} {'tokens':>7} {'ratio to free':>14}")
    for name in cases:
        median = statistics.median(figures[name])
        print(f"{name:<8} {median:9.2f} {statistics.median(tokens[name]):7.0f} "
              f"{median / base:14.3f}")

    started, repeats = time.perf_counter(), 50
    for _ in range(repeats):
        gbnf_for_schema(nested.grammar_text)
    print(f"schema -> grammar (deep_nesting): {(time.perf_counter() - started) / repeats * 1e3:.2f} ms")
    answer = json.dumps({"company": {"name": "Ava", "teams": [{"team": "core", "members": [
        {"name": "Ethan", "role": "engineer"}, {"name": "Liam", "role": "manager"}]}]}})
    nested.check(answer)   # builds the validator once
    started, repeats = time.perf_counter(), 2000
    for _ in range(repeats):
        assert nested.check(answer)[0] is None
    print(f"OutputContract.check (deep_nesting answer): "
          f"{(time.perf_counter() - started) / repeats * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
