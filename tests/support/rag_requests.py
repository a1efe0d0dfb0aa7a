"""Open WebUI's retrieval requests, built from the fixture templates and pages in
tests/fixtures/rag: shared by the RAG unit tests and the live-server replays."""
from __future__ import annotations

import json
import os
from datetime import date

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "rag")
TODAY = date(2026, 2, 10)
SYSTEM_PROMPT = "You are a friendly assistant."


def fixture(name):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as handle:
        return handle.read()


def web_pages():
    return [("https://travel.example/eiffel", fixture("web_eiffel_noisy.txt")),
            ("https://news.example/eiffel", fixture("web_eiffel_syndicated.txt")),
            ("https://food.example/croissants", fixture("web_unrelated.txt")),
            ("https://shop.example/", fixture("web_garbage.txt"))]


def newer_context(pages, quote='"'):
    """Open WebUI's source tags; quote="'" writes them as some other clients do."""
    q = quote
    return "\n".join(f'<source id={q}{i}{q} name={q}{name}{q}>{text}</source>'
                     for i, (name, text) in enumerate(pages, start=1))


def older_context(pages):
    return "\n".join(f"<source><source_id>{name}</source_id><source_context>{text}"
                     f"</source_context></source>" for name, text in pages)


def fill(template_file, context, question):
    return fixture(template_file).replace("{{CONTEXT}}", context).replace("{{QUERY}}", question)


def owui_request(filled, question, placement, history=(), system=SYSTEM_PROMPT):
    """messages as Open WebUI sends them for one placement of the filled template."""
    if placement == "system":
        return ([{"role": "system", "content": f"{system}\n{filled}"}] + list(history)
                + [{"role": "user", "content": question}])
    return ([{"role": "system", "content": system}] + list(history)
            + [{"role": "user", "content": f"{filled}\n{question}"}])


def eiffel_request(placement="user", question="How tall is the Eiffel Tower?"):
    return owui_request(fill("template_newer.txt", newer_context(web_pages()), question),
                        question, placement)


def document_request(question, layout="older", placement="system", history=()):
    doc = json.loads(fixture("document_chunks.json"))
    pages = [(doc["name"], chunk) for chunk in doc["chunks"]]
    if layout == "older":
        filled = fill("template_older.txt", older_context(pages), question)
    else:
        filled = fill("template_newer.txt", newer_context(pages), question)
    return owui_request(filled, question, placement, history)
