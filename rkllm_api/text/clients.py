"""Who is asking: an Open WebUI background task, Home Assistant, or a person chatting.

Open WebUI runs its housekeeping (chat title, tags, follow-up suggestions, search
queries, autocomplete, emoji, image prompt, tool selection) as ordinary chat
completions. The request holds one user message: a filled-in prompt template, with
the chat so far pasted between `<chat_history>` tags as "USER: ..." / "ASSISTANT: ..."
lines. On a small NPU every such job costs seconds of prefill, so this module
recognises them and answers the cheap ones (title, tags, queries) without the model.

Recognition uses a few short phrases of each template (the JSON key Open WebUI reads
back, a task phrase), looked for only OUTSIDE the pasted chat history, never the
whole template text: admins may edit templates and the wording drifts between
releases (0.5 to 0.12 were checked). A request that holds assistant turns is a
conversation, never a background task.

Home Assistant's Extended OpenAI Conversation is recognised by its system prompt
("smart home manager of Home Assistant", "Available Devices:") or by its
`execute_services` function; its requests get thinking turned off.

Answer formats Open WebUI parses (it cuts from the first "{" to the last "}" and
json.loads the cut; queries in newer releases cut from the LAST "{"):
  title         {"title": "..."}; plain text before the JSON template (early 0.5.x)
  tags          {"tags": ["..."]}
  follow_ups    {"follow_ups": ["..."]}
  queries       {"queries": ["..."]}
  autocomplete  {"text": "..."}
  image_prompt  {"prompt": "..."}
  emoji         one emoji, plain text
  tool_selection {"tool_calls": [{"name": ..., "parameters": {...}}]}, or in early
                0.5.x one {"name": ..., "parameters": {...}} object ({} for none)

Which tasks get an instant answer: title (the first user message, shortened),
tags (a domain found by keywords, else "General"), queries (the user's question,
enriched for vague follow-ups). The rest need the model to be any good and return
None: the caller runs them with thinking off and `task_budget(kind)` new tokens.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Optional

from rkllm_api.request import ToolSpec
from rkllm_api.structured.schema import schema_problems

TASK_KINDS = ("title", "tags", "follow_ups", "queries", "autocomplete", "emoji",
              "image_prompt", "tool_selection")

# max_new_tokens for a background task the model answers; sized for the JSON reply
# with some slack, so a rambling small model is cut off instead of holding the NPU.
_TASK_BUDGETS = {
    "title": 32,
    "tags": 64,
    "follow_ups": 192,
    "queries": 96,
    "autocomplete": 40,
    "emoji": 8,
    "image_prompt": 256,
    "tool_selection": 256,
}


@dataclass(frozen=True)
class ClientTask:
    """What a request is. `kind` None means ordinary chat."""

    kind: Optional[str] = None
    home_assistant: bool = False
    history: tuple = ()          # ({"role": "user"|"assistant"|..., "content": str}, ...)
    question: str = ""           # the last user question (or the emoji/tool query text)
    reply_format: str = "json"   # "json", or "text" where Open WebUI reads plain text
    json_key: str = ""           # the key Open WebUI reads from the JSON reply
    autocomplete_type: str = ""  # e.g. "General", "search query"
    autocomplete_text: str = ""  # the text the user is typing
    offered_tools: tuple = ()    # tool selection: the tools its prompt lists ({name, parameters})

    @property
    def background(self) -> bool:
        return self.kind is not None

    @property
    def thinking_off(self) -> bool:
        """Reasoning is wasted on housekeeping and on voice commands."""
        return self.background or self.home_assistant


def task_budget(kind: Optional[str]) -> int:
    """max_new_tokens for a background task run on the model; 0 = no cap (chat)."""
    return _TASK_BUDGETS.get(kind, 0)


# ---------------------------------------------------------------- message text


def _split_history(text: str) -> tuple[str, Optional[str]]:
    """(template text outside <chat_history>, the text inside it or None).

    The block runs from the first opening tag to the LAST closing tag, so a chat
    that itself mentions the tags cannot end it early."""
    start = text.find("<chat_history>")
    end = text.rfind("</chat_history>")
    if start < 0 or end < start:
        return text, None
    inside = text[start + len("<chat_history>"):end]
    outside = text[:start] + "\n" + text[end + len("</chat_history>"):]
    return outside, inside


_ROLE_LINE = re.compile(r"^(USER|ASSISTANT|SYSTEM|TOOL): ?(.*)$")


def parse_history(inside: str) -> tuple:
    """Turn Open WebUI's "ROLE: content" lines back into messages. A line that
    does not start with a role continues the message above it."""
    messages = []
    for line in inside.strip("\n").split("\n"):
        match = _ROLE_LINE.match(line)
        if match:
            messages.append({"role": match.group(1).lower(), "content": match.group(2)})
        elif messages:
            messages[-1]["content"] += "\n" + line
    for message in messages:
        content = message["content"].strip()
        # Open WebUI prints None for a message without text (an image alone).
        message["content"] = "" if content == "None" else content
    return tuple(messages)


# ---------------------------------------------------------------- signatures

# Each task: alternatives, each a set of patterns that must all be found in the
# template text outside the chat history. The JSON key Open WebUI reads back is
# the strongest sign; a task phrase covers templates with other output wording.
_HISTORY_TASK_SIGNS = (
    ("follow_ups", ((r'"follow_ups"\s*:',), (r"follow-up (questions|prompts)", r"\bsuggest"))),
    ("tags", ((r'"tags"\s*:',), (r"\btags categoriz",))),
    ("queries", ((r'"queries"\s*:',), (r"\bsearch queries\b", r"\bgenerat"))),
    ("autocomplete", ((r"\bautocompletion system\b",), (r"<type>", r"<text>", r'"text"\s*:'))),
    ("image_prompt", ((r"\bimage generation\b", r'"prompt"\s*:'),)),
    ("title", ((r'"title"\s*:',), (r"\btitle\b[^\n]{0,60}\bchat history\b",))),
)
_JSON_KEYS = {"follow_ups": "follow_ups", "tags": "tags", "queries": "queries",
              "autocomplete": "text", "image_prompt": "prompt", "title": "title"}


def _signs_match(text: str, alternatives) -> bool:
    return any(all(re.search(p, text, re.IGNORECASE) for p in alt) for alt in alternatives)


def _conversation(messages) -> list:
    return [m for m in messages if m.role != "system"]


def _system_text(messages) -> str:
    return "\n".join(m.text for m in messages if m.role == "system")


def _single_user_text(messages) -> Optional[str]:
    """The prompt of a task request: exactly one non-system message, from the user.
    (A model's own system prompt may be prepended by Open WebUI.)"""
    rest = _conversation(messages)
    if len(rest) != 1 or rest[0].role != "user":
        return None
    return rest[0].text


def _last_user(history) -> str:
    for message in reversed(history):
        if message["role"] == "user" and message["content"]:
            return message["content"]
    return ""


def _history_task(text: str) -> Optional[ClientTask]:
    outside, inside = _split_history(text)
    if inside is None:
        return None
    for kind, signs in _HISTORY_TASK_SIGNS:
        if _signs_match(outside, signs):
            break
    else:
        return None
    history = parse_history(inside)
    fields = {"kind": kind, "history": history, "question": _last_user(history),
              "json_key": _JSON_KEYS[kind]}
    if kind == "title" and not re.search(r'"title"\s*:', outside):
        fields.update(reply_format="text", json_key="")
    if kind == "autocomplete":
        fields.update(_autocomplete_fields(text))
    return ClientTask(**fields)


def _autocomplete_fields(text: str) -> dict:
    # The template's own examples also hold <type>/<text>; the real ones come last.
    after = text[text.rfind("</chat_history>"):]
    kinds = re.findall(r"<type>(.*?)</type>", after, re.DOTALL)
    typed = re.findall(r"<text>(.*?)</text>", after, re.DOTALL)
    return {"autocomplete_type": kinds[-1].strip() if kinds else "",
            "autocomplete_text": typed[-1] if typed else ""}


_EMOJI_MESSAGE = re.compile(r"Message:\s*```(.*)```", re.DOTALL)


def _emoji_task(text: str) -> Optional[ClientTask]:
    match = _EMOJI_MESSAGE.search(text)
    if not match:
        return None
    instructions = text[:match.start()]
    if not (re.search(r"\bemoji", instructions, re.IGNORECASE)
            and re.search(r"facial expression", instructions, re.IGNORECASE)):
        return None
    return ClientTask(kind="emoji", question=match.group(1).strip(), reply_format="text")


def _tool_selection_task(messages) -> Optional[ClientTask]:
    system = _system_text(messages).lstrip()
    user = _single_user_text(messages)
    if user is None or not system.startswith("Available Tools:"):
        return None
    if not re.search(r'"parameters"', system) or not re.match(r"\s*(Query|History):", user):
        return None
    question = user[user.rfind("Query:") + len("Query:"):].strip()
    modern = re.search(r'"tool_calls"', system) is not None
    return ClientTask(kind="tool_selection", question=question,
                      json_key="tool_calls" if modern else "",
                      offered_tools=_listed_tools(system))


def _listed_tools(system: str) -> tuple:
    """The tool specs after "Available Tools:" (a JSON list); () when unreadable."""
    start = system.find("[", system.find("Available Tools:"))
    if start < 0:
        return ()
    try:
        listed, _ = json.JSONDecoder().raw_decode(system, start)
    except ValueError:
        return ()
    if not isinstance(listed, list):
        return ()
    return tuple(t for t in listed if isinstance(t, dict) and isinstance(t.get("name"), str))


def classify(messages, tools: Optional[ToolSpec] = None) -> ClientTask:
    """Recognise a background task and/or Home Assistant from a request's typed
    messages (plus its tools, which only Home Assistant detection uses)."""
    home_assistant = is_home_assistant(messages, tools)
    task = _tool_selection_task(messages)
    if task is None:
        text = _single_user_text(messages)
        if text:
            task = _history_task(text) or _emoji_task(text)
    if task is None:
        chat = [{"role": m.role, "content": m.text} for m in _conversation(messages)]
        return ClientTask(home_assistant=home_assistant, question=_last_user(chat))
    return replace(task, home_assistant=home_assistant)


# ---------------------------------------------------------------- Home Assistant

_HA_FUNCTION_NAMES = ("execute_services",)
_HA_STRONG_SIGNS = (r"smart home manager of home assistant",
                    r"this smart home is controlled by home assistant")
_HA_DEVICE_LIST = (r"available devices:", r"list of available devices in this smart home")


def is_home_assistant(messages, tools: Optional[ToolSpec] = None) -> bool:
    """True for Extended OpenAI Conversation requests. Only the system prompt and
    the declared functions count: a user chatting ABOUT Home Assistant is not it."""
    if tools is not None and set(tools.names) & set(_HA_FUNCTION_NAMES):
        return True
    system = _system_text(messages).lower()
    if not system:
        return False
    if any(re.search(p, system) for p in _HA_STRONG_SIGNS):
        return True
    has_devices = any(re.search(p, system) for p in _HA_DEVICE_LIST)
    return has_devices and ("home assistant" in system or "execute_services" in system
                            or "entity_id" in system)


# Lines Home Assistant rewrites on every request ("Current Time: 2024-03-01
# 19:42:07.118392+01:00"), at the top of its system prompt.
_HA_VOLATILE_LINE = re.compile(r"^[ \t]*current (?:date and )?time\s*:.*$", re.IGNORECASE | re.MULTILINE)


def volatile_lines_last(messages, tools_prompt: str = "") -> tuple:
    """(messages, tools_prompt) of a Home Assistant request with the lines that change
    on every request (the clock) moved to the very end of the system text, after the
    tools text, so that everything before them (instructions, the device table, the
    tools) stays the same from one command to the next and the KV cache keeps it.
    When lines move, the tools text is put into the system message (and "" returned
    for it). Other messages are untouched."""
    index = next((i for i, m in enumerate(messages) if m.role == "system"), None)
    if index is None:
        return tuple(messages), tools_prompt
    text = messages[index].text
    moved = [m.group(0).strip() for m in _HA_VOLATILE_LINE.finditer(text)]
    if not moved:
        return tuple(messages), tools_prompt
    rest = re.sub(r"\n{3,}", "\n\n", _HA_VOLATILE_LINE.sub("", text)).strip()
    parts = [part for part in (rest, tools_prompt, "\n".join(moved)) if part]
    message = messages[index].with_text("\n\n".join(parts))
    return tuple(messages[:index]) + (message,) + tuple(messages[index + 1:]), ""


# ---------------------------------------------------------------- instant answers


def _enabled(settings, name: str) -> bool:
    return bool(getattr(settings, name, True)) if settings is not None else True


def instant_answer(task: ClientTask, settings=None) -> Optional[str]:
    """The reply body for a task answerable without the model, in exactly the form
    the requesting Open WebUI parses; None when the model must answer (or the
    shortcut is turned off in settings)."""
    if task.kind == "title" and _enabled(settings, "shortcut_title"):
        title = make_title(_first_user(task.history) or task.question)
        if not title:
            return None
        return title if task.reply_format == "text" else _dump({"title": title})
    if task.kind == "tags" and _enabled(settings, "shortcut_tags"):
        return _dump({"tags": [guess_domain(task.history)]})
    if task.kind == "queries" and _enabled(settings, "shortcut_queries"):
        query = search_query(task.history)
        return _dump({"queries": [query] if query else []})
    return None


def _dump(value: dict) -> str:
    return json.dumps(value, ensure_ascii=False)


def _first_user(history) -> str:
    for message in history:
        if message["role"] == "user" and message["content"]:
            return message["content"]
    return ""


# ---------------------------------------------------------------- title

_GREETING = re.compile(
    r"^(hi|hello|hey|hiya|yo|greetings|good (morning|afternoon|evening))\b[\s,!.]*", re.IGNORECASE)
_REQUEST_OPENER = re.compile(
    r"^(please\s+)?((can|could|would|will) you\s+(please\s+)?|please\s+|"
    r"i (want|need|would like|'d like) (you )?to\s+|help me( to)?\s+|tell me( about)?\s+)",
    re.IGNORECASE)
_TRAILING_SMALL_WORDS = {"a", "an", "the", "of", "and", "or", "to", "in", "on", "for",
                         "with", "at", "by", "from", "about", "is", "are", "my", "your"}
TITLE_MAX_WORDS = 6


def _plain(text: str) -> str:
    """Markdown and links out, whitespace collapsed."""
    text = re.sub(r"```.*?(```|$)", " ", text, flags=re.DOTALL)
    text = re.sub(r"https?://\S+", " ", text)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[`*_#>|{}\[\]]+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def make_title(text: str) -> str:
    """A short title from the user's first message: its first sentence without
    greetings or "can you", at most TITLE_MAX_WORDS words, first letter capital."""
    text = re.sub(r"```.*?(```|$)", "\n", text or "", flags=re.DOTALL)
    lines = [line for line in (_plain(l) for l in text.split("\n")) if line]
    if not lines:
        return ""
    # The first line with more than a greeting ("Hi!\nCan you ...").
    line = next((g for g in (_GREETING.sub("", l).strip() for l in lines) if g), lines[0])
    core = re.split(r"(?<=[.!?])\s+", line)[0]
    for _ in range(3):   # "could you please help me write ..." has openers in a row
        core = _REQUEST_OPENER.sub("", core)
    words = (core.strip() or line).split()[:TITLE_MAX_WORDS]
    while len(words) > 1 and words[-1].lower().strip(",;:") in _TRAILING_SMALL_WORDS:
        words.pop()
    title = " ".join(words).strip(" ,;:.!?-\"'")
    return title[:1].upper() + title[1:]


# ---------------------------------------------------------------- tags

# Broad domains named by Open WebUI's tag template, with words that clearly
# point at them. Unclear chats get "General", as the template itself asks.
_DOMAIN_WORDS = {
    "Technology": "python javascript code coding programming software computer linux api "
                  "database sql server docker kubernetes algorithm network app bug github "
                  "html css compiler rust java laptop smartphone",
    "Science": "physics chemistry biology quantum atom atoms molecule planet planets astronomy "
               "universe experiment mathematics math equation dna evolution climate",
    "Health": "health healthy medical doctor symptom symptoms disease diet nutrition exercise "
              "vitamin vitamins medicine sleep fitness calories",
    "Business": "business market marketing stock stocks finance invest investing startup "
                "sales economy tax taxes revenue profit",
    "Politics": "election elections government policy president parliament senate politics "
                "political vote voting",
    "Sports": "football soccer basketball tennis olympics athlete league tournament cricket",
    "Entertainment": "movie movies film films music song songs album tv series netflix "
                     "celebrity concert videogame",
    "Education": "school university homework exam exams study studying course teacher "
                 "student students lesson",
    "Arts": "art painting poem poetry novel drawing sculpture museum artist",
    "Philosophy": "philosophy ethics morality consciousness existential stoicism",
}


def guess_domain(history) -> str:
    """The broad domain most words of the chat point at; "General" without a clear
    winner (no hit in the user's words and fewer than two in the whole chat)."""
    user_words = re.findall(r"[a-z]+", " ".join(m["content"] for m in history
                                                 if m["role"] == "user").lower())
    all_words = re.findall(r"[a-z]+", " ".join(m["content"] for m in history).lower())
    best, best_score = "General", 0
    for domain, words in _DOMAIN_WORDS.items():
        vocabulary = set(words.split())
        score = sum(w in vocabulary for w in all_words) + sum(w in vocabulary for w in user_words)
        if score > best_score:
            best, best_score = domain, score
    return best if best_score >= 2 else "General"


# ---------------------------------------------------------------- search queries

_ANAPHORA = re.compile(
    r"\b(that|this|it|its|those|these|them|they|he|she|him|her|his|their|there)\b", re.IGNORECASE)
_VAGUE_WHOLE = re.compile(
    r"^(tell me more|more|go on|continue|elaborate|why|how so|really|are you sure|"
    r"source|sources|proof|explain|details|more details|and then|what else)\W*$", re.IGNORECASE)
QUERY_MAX_CHARS = 200
VAGUE_MAX_WORDS = 8
ENRICH_MAX_ENTITIES = 3


def is_vague(question: str) -> bool:
    """A short follow-up that leans on the previous answer ("can you verify that?")."""
    words = question.split()
    if not words or len(words) > VAGUE_MAX_WORDS:
        return False
    return bool(_VAGUE_WHOLE.match(question.strip()) or _ANAPHORA.search(question))


_LEADING_SMALL_WORD = re.compile(r"^(the|a|an|in|on|at|it|this|that|and|but)\s+(?=\S)",
                                 re.IGNORECASE)


def answer_entities(answer: str, limit: int = 3) -> list:
    """Names worth searching for in an assistant answer: bold text, quoted strings,
    then runs of two or more capitalised words; first seen first, no repeats."""
    answer = re.sub(r"<details.*?</details>", " ", answer or "", flags=re.DOTALL)
    found = []
    found += re.findall(r"\*\*([^*\n]{1,60})\*\*|__([^_\n]{1,60})__", answer)
    found += re.findall(r"\"([^\"\n]{2,60})\"|\u201c([^\u201d\n]{2,60})\u201d", answer)
    found = [a or b for a, b in found]
    found += re.findall(r"\b[A-Z][\w'-]+(?:[ \t]+(?:(?:of|de|la|the|von|van|du)[ \t]+)?[A-Z][\w'-]+)+",
                        answer)
    result, seen = [], set()
    for entity in (_LEADING_SMALL_WORD.sub("", e.strip(" .,;:")) for e in found):
        key = entity.lower()
        if entity and key not in seen and not any(key in s for s in seen):
            seen.add(key)
            result.append(entity)
    return result[:limit]


def search_query(history) -> str:
    """The user's last question as a search query. A vague follow-up is replaced by
    the question before it plus the names from the answer it refers to."""
    question = _clean_query(_last_user(history))
    if not question or not is_vague(question):
        return question[:QUERY_MAX_CHARS]
    users = [m["content"] for m in history if m["role"] == "user" and m["content"]]
    answers = [m["content"] for m in history if m["role"] == "assistant" and m["content"]]
    if not answers:
        return question[:QUERY_MAX_CHARS]
    base = _clean_query(users[-2]) if len(users) >= 2 else question
    extra = [e for e in answer_entities(answers[-1], limit=6)
             if e.lower() not in base.lower()][:ENRICH_MAX_ENTITIES]
    return _clean_query(" ".join([base.rstrip("?!. ")] + extra))[:QUERY_MAX_CHARS]


def _clean_query(text: str) -> str:
    # Braces are dropped: newer Open WebUI cuts the reply from its LAST "{".
    return _plain(text).replace("{", " ").replace("}", " ").strip()


# ---------------------------------------------------------------- the JSON a task's reply must be

# Per task: the longest string and the most list items the model may write when its
# reply is decoded under the schema, so the JSON closes within task_budget() tokens.
_TASK_CAPS = {
    "title": (60, 1), "tags": (30, 3), "follow_ups": (80, 3), "queries": (100, 2),
    "autocomplete": (60, 1), "image_prompt": (300, 1), "tool_selection": (100, 2),
}
_TEXT = {"type": "string", "minLength": 1}


def _keyed(key: str, value: dict) -> dict:
    return {"type": "object", "properties": {key: value}, "required": [key]}


def reply_schema(task: ClientTask) -> Optional[dict]:
    """The JSON Schema of the reply Open WebUI parses for a task the model answers
    (what the answer is validated against); None for replies read as plain text
    (emoji, early titles) and for chat."""
    if task.kind is None or task.reply_format != "json":
        return None
    if task.kind == "tool_selection":
        return _tool_selection_schema(task)
    key = task.json_key
    if task.kind in ("follow_ups", "tags"):
        return _keyed(key, {"type": "array", "items": _TEXT, "minItems": 1})
    if task.kind == "queries":
        return _keyed(key, {"type": "array", "items": _TEXT})
    if task.kind == "autocomplete":   # "" is Open WebUI's "no suggestion"
        return _keyed(key, {"type": "string"})
    return _keyed(key, _TEXT)         # title, image_prompt


def reply_caps(kind: Optional[str]) -> tuple:
    """(longest string, most list items) for decoding a task's reply under its schema."""
    return _TASK_CAPS.get(kind, (200, 5))


def _tool_call_schema(tool: dict) -> dict:
    parameters = tool.get("parameters")
    if not isinstance(parameters, dict) or not parameters or schema_problems(parameters):
        parameters = {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": tool["name"]},
                                             "parameters": parameters},
            "required": ["name", "parameters"]}


def _tool_selection_schema(task: ClientTask) -> dict:
    calls = [_tool_call_schema(tool) for tool in task.offered_tools]
    if not calls:
        calls = [{"type": "object", "properties": {"name": {"type": "string"},
                                                   "parameters": {"type": "object"}},
                  "required": ["name", "parameters"]}]
    if not task.json_key:   # early 0.5: one call object, or {} for none
        return {"anyOf": calls + [{"type": "object", "properties": {},
                                   "additionalProperties": False}]}
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return _keyed("tool_calls", {"type": "array", "items": call})


def fallback_reply(task: ClientTask) -> Optional[str]:
    """A reply Open WebUI parses, for when the model's answers did not validate twice
    (a background task needs something it can read, never an error)."""
    if task.kind is None or task.reply_format != "json":
        return None
    if task.kind == "tool_selection":
        return _dump({"tool_calls": []}) if task.json_key else "{}"
    value = {"title": make_title(_first_user(task.history) or task.question) or "Chat",
             "tags": ["General"], "follow_ups": [], "queries": [],
             "autocomplete": "", "image_prompt": task.question}.get(task.kind, "")
    return _dump({task.json_key: value})
