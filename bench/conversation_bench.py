"""Conversation engine figures on the CPU runtime (bundled SmolLM2, greedy).

    .venv/bin/python bench/conversation_bench.py [--threads N]

Prints, in one run (about 1-3 minutes on a small machine):
1. a 10-turn chat: per-turn time to first token (TTFT) and prefill tokens with KV
   reuse vs a forced full re-prefill every turn (KV_REUSE=0); ratio at turn 10;
2. two interleaved 5-turn chats with conversation snapshots vs without (KV_SNAPSHOTS=0);
3. cold TTFT (freshly loaded model, first request) with a ~1500-token system prompt
   with vs without the system prompt cache (the cache is made for a system text seen
   before: the bench shows it to a first engine twice);
4. edit and regenerate: after a 5-turn chat, the last message edited, then the same
   request again (regenerate): prefill tokens with longest-common-prefix reuse vs
   KV_REUSE=0;
5. a long chat at a 1024-token context (30 turns): prefill tokens per turn, ours vs
   full, and how many turns prefilled more than half their prompt (the sliding
   window drops turns in quarter-context steps).
Everything goes through engine.Engine, as the HTTP layer drives it.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rkllm_api.config import Settings  # noqa: E402
from rkllm_api.engine.generation import GenerationJob  # noqa: E402
from rkllm_api.engine.manager import Engine  # noqa: E402
from rkllm_api.models.registry import Registry  # noqa: E402
from rkllm_api.openai.protocol import parse_messages  # noqa: E402
from rkllm_api.runtimes.base import EventKind, RunRequest, SamplingParams  # noqa: E402
from rkllm_api.text.prompts import PromptBuilder  # noqa: E402

MODEL = "smollm2"
GREEDY = SamplingParams(temperature=0.0)
ANSWER_TOKENS = 24
QUESTIONS = ["Tell me about the history of bicycles.", "Who invented the chain drive?",
             "What about pneumatic tyres?", "How heavy were early racing bikes?",
             "When did gears appear?", "What is a fixed-gear bike?",
             "Why are carbon frames popular?", "How do disc brakes work?",
             "What is a good first bike for a child?", "Summarise our talk in one line."]
OTHER = ["Describe how bread is baked.", "Why does dough need to rest?",
         "What does salt do in bread?", "How hot should the oven be?",
         "How do I know the bread is done?"]
_ids = itertools.count()


def make_engine(cache_dir: str, threads: int, **overrides) -> Engine:
    values = dict(include_bundled_model=True, models_root=os.path.join(cache_dir, "none"),
                  cpu_threads=threads, idle_unload_seconds=0, heartbeat_seconds=0,
                  gguf_max_context_length=8192, kv_cache_dir=cache_dir)
    settings = Settings(**{**values, **overrides})
    engine = Engine(settings, Registry(settings))
    engine.start()
    return engine


def ask(engine: Engine, messages: list, context: int = 8192) -> tuple:
    """One turn: (answer, ttft seconds, prefilled tokens, kv mode)."""
    built = PromptBuilder(engine.settings).build_chat(parse_messages(messages),
                                                      context_length=context)
    run = RunRequest(prompt=built.text, keep_history=True, max_new_tokens=ANSWER_TOKENS,
                     sampling=GREEDY)
    started = time.perf_counter()
    generation = engine.generate(GenerationJob(MODEL, run, f"b{next(_ids)}", built))
    ttft, texts = None, []
    for event in generation.events():
        if event.kind is EventKind.TEXT:
            ttft = ttft or time.perf_counter() - started
            texts.append(event.text)
    answer = "".join(texts)
    generation.commit_answer(answer)
    return answer, ttft or time.perf_counter() - started, generation.prefilled_tokens, \
        generation.kv_mode


def chat(engine: Engine, questions: list) -> list:
    messages, rows = [], []
    for question in questions:
        messages.append({"role": "user", "content": question})
        answer, ttft, prefilled, mode = ask(engine, messages)
        messages.append({"role": "assistant", "content": answer})
        rows.append((ttft, prefilled, mode))
    return rows


def ten_turns(threads: int) -> None:
    print("1. ten-turn chat: TTFT ms / prefill tokens per turn")
    results = {}
    for label, reuse in (("reuse", True), ("full", False)):
        with tempfile.TemporaryDirectory() as cache:
            engine = make_engine(cache, threads, kv_reuse=reuse)
            engine.load(MODEL)
            results[label] = chat(engine, QUESTIONS)
            engine.shutdown()
    print("   turn  reuse: ttft  prefill   full: ttft  prefill")
    for turn, (a, b) in enumerate(zip(results["reuse"], results["full"]), 1):
        print(f"   {turn:4d}  {a[0] * 1000:11.0f}  {a[1]:7d}  {b[0] * 1000:11.0f}  {b[1]:7d}")
    last_reuse, last_full = results["reuse"][-1], results["full"][-1]
    print(f"   turn 10: full/reuse TTFT ratio {last_full[0] / last_reuse[0]:.1f}x, "
          f"prefill tokens {last_full[1]} vs {last_reuse[1]}")


def interleaved(threads: int) -> None:
    print("2. two interleaved 5-turn chats: summed TTFT and prefill tokens of turns 2-5")
    totals = {}
    for label, snapshots in (("snapshots", True), ("no snapshots", False)):
        with tempfile.TemporaryDirectory() as cache:
            engine = make_engine(cache, threads, kv_snapshots=snapshots)
            engine.load(MODEL)
            chats = [[], []]
            ttft, prefill, modes = 0.0, 0, []
            for turn in range(5):
                for index, questions in enumerate((QUESTIONS, OTHER)):
                    chats[index].append({"role": "user", "content": questions[turn]})
                    answer, seconds, prefilled, mode = ask(engine, chats[index])
                    chats[index].append({"role": "assistant", "content": answer})
                    if turn:
                        ttft, prefill = ttft + seconds, prefill + prefilled
                        modes.append(mode)
            totals[label] = (ttft, prefill)
            print(f"   {label:13s} TTFT {ttft * 1000:7.0f} ms, prefill {prefill:5d} tokens, "
                  f"modes {sorted(set(modes))}")
            engine.shutdown()
    ratio = totals["no snapshots"][0] / totals["snapshots"][0]
    print(f"   without/with snapshots TTFT ratio {ratio:.1f}x")


def cold_system_prompt(threads: int) -> None:
    print("3. cold model, ~1500-token system prompt: TTFT of the first request")
    system = ("You are a meticulous assistant for a cycling club. " +
              "Members ask about routes, maintenance, safety rules, ride etiquette and "
              "events; answer briefly and cite the club rule number when one applies. " * 40)
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "Can I ride without a helmet?"}]
    figures = {}
    with tempfile.TemporaryDirectory() as cache:
        warm = make_engine(cache, threads)
        ask(warm, messages)          # seen once: no cache yet
        ask(warm, [messages[0], {"role": "user", "content": "Hi."}])
        ask(warm, [{"role": "user", "content": "Something else."}])
        ask(warm, messages)          # seen before, not held: saves the system prompt cache
        warm.shutdown()
        for label, enabled in (("with cache", True), ("without", False)):
            engine = make_engine(cache, threads, system_prompt_cache=enabled)
            engine.load(MODEL)       # loading (and the preload) is not part of TTFT
            _, ttft, prefilled, _ = ask(engine, messages)
            figures[label] = ttft
            print(f"   {label:10s} TTFT {ttft * 1000:7.0f} ms, prefill {prefilled} tokens")
            engine.shutdown()
    print(f"   without/with cache TTFT ratio {figures['without'] / figures['with cache']:.1f}x")


def edit_and_regenerate(threads: int) -> None:
    print("4. after a 5-turn chat: prefill tokens of an edited last message and of a "
          "regenerated answer")
    figures = {}
    for label, reuse in (("ours", True), ("full", False)):
        with tempfile.TemporaryDirectory() as cache:
            engine = make_engine(cache, threads, kv_reuse=reuse)
            engine.load(MODEL)
            messages = []
            for question in QUESTIONS[:5]:
                messages.append({"role": "user", "content": question})
                answer, _, _, _ = ask(engine, messages)
                messages.append({"role": "assistant", "content": answer})
            messages.append({"role": "user", "content": "Who made the first safety bicycle?"})
            ask(engine, messages)
            edited = messages[:-1] + [{"role": "user", "content":
                                       "Who made the first safety bicycle in England?"}]
            _, _, edit_prefill, _ = ask(engine, edited)
            _, _, regen_prefill, _ = ask(engine, edited)
            figures[label] = (edit_prefill, regen_prefill)
            engine.shutdown()
    for index, case in enumerate(("edit", "regenerate")):
        ours, full = figures["ours"][index], figures["full"][index]
        print(f"   {case:10s} ours {ours:5d}  full {full:5d}  full/ours {full / max(ours, 1):.0f}x")


def long_chat(threads: int) -> None:
    print("5. 30-turn chat at a 1024-token context: prefill tokens per turn")
    rows = {}
    for label, reuse in (("ours", True), ("full", False)):
        with tempfile.TemporaryDirectory() as cache:
            engine = make_engine(cache, threads, kv_reuse=reuse, gguf_max_context_length=1024)
            engine.load(MODEL)
            messages, rows[label] = [], []
            for turn in range(30):
                messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
                answer, _, prefilled, _ = ask(engine, messages, context=1024)
                messages.append({"role": "assistant", "content": answer})
                rows[label].append(prefilled)
            engine.shutdown()
    print("   turn   ours   full")
    for turn, (ours, full) in enumerate(zip(rows["ours"], rows["full"]), 1):
        print(f"   {turn:4d}  {ours:5d}  {full:5d}")
    big = sum(1 for ours, full in zip(rows["ours"], rows["full"]) if ours > full / 2)
    print(f"   total ours {sum(rows['ours'])}, full {sum(rows['full'])} "
          f"(full/ours {sum(rows['full']) / max(sum(rows['ours']), 1):.1f}x); "
          f"turns prefilling more than half their prompt: {big} of 30")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1)")
    parser.add_argument("--only", type=int, nargs="*", help="run only these parts (1-5)")
    args = parser.parse_args()
    started = time.perf_counter()
    parts = (ten_turns, interleaved, cold_system_prompt, edit_and_regenerate, long_chat)
    for number, part in enumerate(parts, 1):
        if not args.only or number in args.only:
            part(args.threads)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
