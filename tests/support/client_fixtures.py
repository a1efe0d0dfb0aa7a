"""The recorded Open WebUI and Home Assistant requests in tests/fixtures, and Open
WebUI's own way of reading a reply: shared by the client unit tests and the
live-server replays."""
from __future__ import annotations

import json
import os

from rkllm_api.openai.protocol import parse_tool_request
from rkllm_api.text import clients
from support.messages import typed

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
OWUI = os.path.join(FIXTURES, "openwebui")
HA = os.path.join(FIXTURES, "homeassistant")

# Releases where the title template still asked for plain text, and where tool
# selection still wanted one {"name", "parameters"} object.
PLAIN_TEXT_TITLE = {"v0.5.4"}
SINGLE_TOOL_OBJECT = {"v0.5.4"}
# Releases that cut the queries reply from the LAST "{" instead of the first.
QUERIES_CUT_FROM_LAST_BRACE = {"v0.12.4"}

EXPECTED_KIND = {
    "title": "title", "title_with_model_system_prompt": "title", "tags": "tags",
    "queries": "queries", "queries_first_turn": "queries", "queries_multimodal": "queries",
    "autocomplete": "autocomplete", "emoji": "emoji", "tool_selection": "tool_selection",
    "image_prompt": "image_prompt", "follow_ups": "follow_ups", "chat_rag": None,
}


def _owui_fixtures():
    for version in sorted(os.listdir(OWUI)):
        folder = os.path.join(OWUI, version)
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".json"):
                    yield version, name[:-5]


OWUI_CASES = list(_owui_fixtures())


def load(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def owui_body(version, name):
    return load(OWUI, version, name + ".json")


def classify_body(body):
    return clients.classify(typed(body["messages"]), parse_tool_request(body))


# --- Open WebUI's own reading of a reply, as its middleware does it ---------------

def owui_cut_json(content, from_last_brace=False):
    start = content.rfind("{") if from_last_brace else content.find("{")
    return json.loads(content[start:content.rfind("}") + 1])


def owui_read_title(content, version):
    if version in PLAIN_TEXT_TITLE:
        return content.strip()
    return owui_cut_json(content).get("title")


def owui_read_queries(content, version):
    return owui_cut_json(content, version in QUERIES_CUT_FROM_LAST_BRACE).get("queries", [])
