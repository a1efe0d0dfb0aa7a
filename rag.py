"""Retrieved context (RAG): find it in a chat request, clean it, score it, and
turn it into a prompt a small model can answer from; plus a response cache.

Open WebUI runs web searches and document retrieval itself and pastes the results
into the request through its RAG template. Two tag layouts exist:

    newer:  <source id="1" name="https://...">text</source>
    older:  <source><source_id>name</source_id><source_context>text</source_context></source>

wrapped in `<context>...</context>` after "### Task:" instructions (older templates
also repeat the question in `<user_query>...</user_query>`). The filled template
lands either at the end of the system message (RAG_SYSTEM_CONTEXT=True on the Open
WebUI side) or in front of the last user message, separated from the user's own
words by a newline (the default).

Web pages arrive full of menus, cookie banners, share buttons and stale "today is"
claims; a 1-4B model reads all of it and answers worse. The pipeline here:

    detect -> clean (5 passes per source) -> paragraphs -> near-duplicate removal
    -> score (jusText-like + query overlap) -> keep the best within a budget
    -> quality floor -> reading-comprehension prompt with a date anchor

Everything is pure text processing: no model, no I/O, nothing at import time.
"""
from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date
from typing import Any, Callable, Optional

from rkllm_api.config import Settings
from rkllm_api.request import Message, TextPart, last_index
from rkllm_api.text.prompts import CHARS_PER_TOKEN  # the project's one token estimate (chars per token)

# A small English stopword list of our own: function words whose share in a
# paragraph separates prose (high share) from menus and link lists (low share).
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been
before being below between both but by can could did do does doing down during each
few for from further had has have having he her here hers him his how i if in into is
it its itself just me more most my no nor not now of off on once only or other our
ours out over own same she should so some such than that the their theirs them then
there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your yours may might must shall
""".split())

# Words that carry no topic in a question ("tell me about X"): ignored for overlap.
QUESTION_FILLER = frozenset("""
tell explain describe give show know please want need like information info details
thing things something anything everything way ways kind lot much many get got
""".split())


# ---------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One retrieved chunk. `id` is the citation label the client understands
    ("1" for `<source id="1">`; for the older layout, the 1-based position of its
    distinct source_id)."""
    id: str
    name: str
    text: str


@dataclass(frozen=True)
class RagInput:
    sources: tuple            # of Source, in the order the client sent them
    question: str             # the user's own words, template boilerplate removed
    placement: str            # "system" or "user": which message carried the context
    message_index: int        # index of that message in the request's messages
    system_text: str          # the system prompt outside the RAG block ("" if none)
    layout: str               # "id-attr" (newer), "source-id" (older) or "plain"

    @property
    def reference_text(self) -> str:
        return "\n\n".join(s.text for s in self.sources)


@dataclass(frozen=True)
class Paragraph:
    source_id: str
    source_name: str
    position: int             # order of appearance over all sources
    text: str
    score: float = 0.0


@dataclass(frozen=True)
class RagPrompt:
    system: str               # system text for the turn
    user: str                 # reading-comprehension user text
    context: str              # the cleaned reference block ("" when dropped)
    context_hash: str         # sha256 of the cleaned reference, for the response cache
    sources_used: tuple       # citation ids present in the context
    dropped: bool             # quality floor fired: the results were useless
    summary: bool             # the question asks for a summary
    best_score: float
    raw_chars: int            # characters of source text before cleaning
    clean_chars: int          # characters of kept reference text


class FollowUp:
    """Outcome of classify_followup(): whether this turn should use the sources."""
    FORCE_RAG = "document-referential"   # "summarize the document": always use them
    USE_RAG = "use-sources"
    SKIP_CONVERSATIONAL = "conversational"  # "thanks", "ok": answer from the chat
    SKIP_NO_OVERLAP = "no-overlap"          # follow-up unrelated to the sources

    SKIPS = (SKIP_CONVERSATIONAL, SKIP_NO_OVERLAP)


# ---------------------------------------------------------------------------
# Detection: where is the retrieved context, and what did the user ask?
# ---------------------------------------------------------------------------

_SOURCE_TAG = re.compile(r"<source\b([^>]*)>(.*?)</source>", re.S | re.I)
# Attribute values in double or single quotes: Open WebUI writes `id="1"`, other
# clients (and a peer's test suite) write `id='1'`.
_ATTRIBUTE = re.compile(r"""([\w-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_OLD_SOURCE_ID = re.compile(r"<source_id>(.*?)</source_id>", re.S | re.I)
_OLD_SOURCE_BODY = re.compile(r"<source_context>(.*?)</source_context>", re.S | re.I)
_CONTEXT_OPEN = re.compile(r"<context>", re.I)
_CONTEXT_CLOSE = re.compile(r"</context>", re.I)
_USER_QUERY = re.compile(r"<user_query>(.*?)</user_query>", re.S | re.I)
# First lines of the templates Open WebUI has shipped: a RAG block in a system
# message starts here, whatever system prompt precedes it stays the user's own.
_TEMPLATE_OPENERS = re.compile(r"^[ \t]*(?:###\s*Task:|You are given a user query)",
                               re.I | re.M)
# Without source tags (oldest versions joined raw chunks), a <context> block is
# only taken as retrieval when the template around it is recognisable.
_TEMPLATE_SIGNATURE = re.compile(r"###\s*Task:|<user_query>|<rules>", re.I)


def _parse_sources(block: str) -> tuple[tuple, str]:
    """Sources inside a RAG block and the layout they were written in."""
    tags = _SOURCE_TAG.findall(block)
    if not tags:
        return (Source("1", "", block.strip()),), "plain"
    sources, old_ids = [], {}
    layout = "id-attr"
    for attributes, body in tags:
        attrs = _attributes(attributes)
        old_body = _OLD_SOURCE_BODY.search(body)
        if old_body:
            layout = "source-id"
            found = _OLD_SOURCE_ID.search(body)
            name = found.group(1).strip() if found else ""
            label = old_ids.setdefault(name, str(len(old_ids) + 1))
            sources.append(Source(label, name, old_body.group(1).strip()))
        else:
            label = attrs.get("id", str(len(sources) + 1))
            sources.append(Source(label, attrs.get("name", ""), body.strip()))
    return tuple(sources), layout


def _attributes(text: str) -> dict:
    """name -> value of a tag's attributes, whichever quotes each value used."""
    return {name: double or single
            for name, double, single in _ATTRIBUTE.findall(text)}


def _client_source(tag: re.Match) -> bool:
    """A <source> tag as Open WebUI writes it, not one pasted by the user (HTML, XML):
    with an id attribute or the older source_id/source_context children."""
    return bool(re.search(r"""\bid\s*=\s*["']""", tag.group(1))
                or _OLD_SOURCE_BODY.search(tag.group(2)))


def _rag_span(text: str) -> Optional[tuple[int, int, str]]:
    """(start, end, template_question) of the RAG block in text, or None."""
    opened, closed = _CONTEXT_OPEN.search(text), None
    if opened:
        closed = _CONTEXT_CLOSE.search(text, opened.end())
    tags = list(_SOURCE_TAG.finditer(text))
    if opened and closed:
        inner = text[opened.end():closed.start()]
        if not _SOURCE_TAG.search(inner) and not _TEMPLATE_SIGNATURE.search(text):
            return None
        start, end = opened.start(), closed.end()
    elif any(_client_source(tag) for tag in tags):
        start, end = tags[0].start(), tags[-1].end()
    else:
        return None
    openers = [m.start() for m in _TEMPLATE_OPENERS.finditer(text, 0, start)]
    if openers:
        start = openers[-1]
    question = ""
    asked = _USER_QUERY.search(text, end)
    if asked:
        question, end = asked.group(1).strip(), asked.end()
    return start, end, question


def _context_block(text: str, start: int, end: int) -> str:
    opened = _CONTEXT_OPEN.search(text, start, end)
    closed = _CONTEXT_CLOSE.search(text, opened.end(), end) if opened else None
    if opened and closed:
        return text[opened.end():closed.start()]
    return text[start:end]


def detect(messages) -> Optional[RagInput]:
    """Retrieved context in the last user message (checked first: Open WebUI's
    default placement) or in a system message; None when the request has none.
    messages: typed request Messages (rkllm_api.request)."""
    last_user = last_index(messages, "user")
    candidates = [] if last_user is None else [(last_user, "user")]
    candidates += [(i, "system") for i, m in enumerate(messages) if m.role == "system"]
    for index, placement in candidates:
        text = messages[index].text
        span = _rag_span(text)
        if span is None:
            continue
        start, end, template_question = span
        sources, layout = _parse_sources(_context_block(text, start, end))
        if placement == "user":
            # The template was put in front of the user's words: what follows it is theirs.
            question = text[end:].strip() or template_question
            system_text = next((m.text.strip() for m in messages if m.role == "system"), "")
        else:
            user_text = "" if last_user is None else messages[last_user].text.strip()
            question = user_text or template_question
            system_text = (text[:start] + text[end:]).strip()
        return RagInput(sources, question, placement, index, system_text, layout)
    return None


def without_context(messages, rag: RagInput) -> tuple:
    """The messages with the retrieved context taken out again, for turns answered
    from the conversation alone (follow-up skip). Images of the carrier stay."""
    result = list(messages)
    carrier = result[rag.message_index]
    if rag.placement == "system" and not rag.system_text:
        del result[rag.message_index]
    else:
        text = rag.system_text if rag.placement == "system" else rag.question
        result[rag.message_index] = carrier.with_text(text)
    return tuple(result)


# ---------------------------------------------------------------------------
# Cleaning: five passes over one source's text, each line-based and small
# ---------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[A-Z0-9\"'(\[])")
_PROSE_END = re.compile(r"[.!?][\"')\]]*$")
_SENTENCE_PUNCT = re.compile(r"[.!?][\"')\]]*(?:\s|$)")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’-]*")

# Claims about "now" copied from cached pages ("Today is October 26, 2025"):
# they contradict the real date the prompt gives, and small models believe them.
_STALE_NOW = re.compile(
    r"\btoday(?:'s date)?\s+is\b|\bdate\s+today\s+is\b"
    r"|\bcurrent(?:\s+local)?\s+(?:date|time)(?!\s*zone)\b"
    r"|\blocal\s+time\s+(?:is|in|now)\b|\btime\s+now\b",
    re.I)

_BOILERPLATE = re.compile(
    r"\b(?:accept(?:\s+all)?\s+cookies|cookie\s+(?:policy|settings|preferences|consent)"
    r"|(?:we|site|website)\s+uses?\s+cookies|sign\s+(?:in|up)|log\s+in|login"
    r"|create\s+(?:an\s+|a\s+free\s+)?account|subscribe|newsletter|privacy\s+policy"
    r"|terms\s+of\s+(?:service|use)|all\s+rights\s+reserved|skip\s+to\s+(?:main\s+)?content"
    r"|follow\s+us|share\s+(?:this|on)|advertisement|sponsored|enable\s+javascript"
    r"|click\s+here|read\s+more|back\s+to\s+top|related\s+(?:articles|posts|stories)"
    r"|you\s+may\s+also\s+like|trending\s+now|most\s+popular|earn\s+a\s+commission"
    r"|affiliate\s+links?)\b|©|\(c\)\s*\d{4}",
    re.I)

_CAMEL_RUN = re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+){2,}\b")
_URL = re.compile(r"https?://\S+|www\.\S+", re.I)
_CRUMB_SEPARATOR = re.compile(r"\s+(?:>|/|»|›|→)\s+|\s*[|»›•·→]\s*")
_DIGIT = re.compile(r"\d")


def _sentences(line: str) -> list:
    return [s for s in _SENTENCE_END.split(line) if s.strip()]


def _drop_sentences(text: str, pattern: re.Pattern) -> str:
    """Remove every sentence matching pattern; lines left empty disappear."""
    kept_lines = []
    for line in text.splitlines():
        if not line.strip():
            kept_lines.append("")
            continue
        kept = [s.strip() for s in _sentences(line) if not pattern.search(s)]
        if kept:
            kept_lines.append(" ".join(kept))
    return "\n".join(kept_lines)


def strip_stale_dates(text: str) -> str:
    """Pass 0: sentences claiming what today's date or the current time is."""
    return _drop_sentences(text, _STALE_NOW)


def strip_boilerplate(text: str) -> str:
    """Pass 1: cookie banners, sign-in and subscribe prompts, legal footers."""
    return _drop_sentences(text, _BOILERPLATE)


def _is_prose(line: str) -> bool:
    return bool(_PROSE_END.search(line.strip())) and len(_WORD.findall(line)) >= 6


def _title_case_heavy(line: str) -> bool:
    if _DIGIT.search(line):
        return False  # a heading with figures is worth more than the risk
    words = [w for w in _WORD.findall(line) if w[0].isalpha()]
    capitalised = sum(1 for w in words if w[0].isupper())
    return len(words) >= 4 and capitalised / len(words) >= 0.75


def _url_cluster(line: str) -> bool:
    urls = _URL.findall(line)
    return len(urls) >= 2 or (bool(urls) and sum(map(len, urls)) * 2 > len(line.strip()))


def _breadcrumb(line: str) -> bool:
    parts = [p for p in _CRUMB_SEPARATOR.split(line.strip()) if p.strip()]
    with_figures = sum(1 for p in parts if _DIGIT.search(p))
    # Table rows share the separators but carry figures in most cells.
    return (len(parts) >= 3 and with_figures * 2 < len(parts)
            and all(len(_WORD.findall(p)) <= 4 for p in parts))


def is_navigation_line(line: str) -> bool:
    if not line.strip() or _is_prose(line):
        return False
    return bool(_CAMEL_RUN.search(line) or _title_case_heavy(line)
                or _url_cluster(line) or _breadcrumb(line))


def strip_navigation(text: str) -> str:
    """Pass 2: menu bars glued into CamelCase runs, title-case link rows, URL
    clusters, breadcrumbs. Prose lines only lose a glued menu run at their edge."""
    kept = []
    for line in text.splitlines():
        if is_navigation_line(line):
            continue
        if _CAMEL_RUN.search(line):
            line = _CAMEL_RUN.sub("", line).strip()
        kept.append(line)
    return "\n".join(kept)


def _menu_item(line: str, max_chars: int) -> bool:
    stripped = line.strip()
    return (0 < len(stripped) <= max_chars and not _DIGIT.search(stripped)
            and not _PROSE_END.search(stripped))


def collapse_menus(text: str, min_run: int = 4, max_chars: int = 30) -> str:
    """Pass 3: a run of min_run or more short lines without digits is a menu.
    Blank lines inside a run do not break it; a line with digits does (tables)."""
    lines = text.splitlines()
    drop, run, blanks = set(), [], []
    for index, line in enumerate(lines + ["a line long enough to end any run of menu items"]):
        if not line.strip():
            blanks.append(index)
            continue
        if _menu_item(line, max_chars):
            run.extend(blanks if run else [])  # blank lines inside a run go with it
            run.append(index)
        else:
            if sum(1 for i in run if lines[i].strip()) >= min_run:
                drop.update(run)
            run = []
        blanks = []
    return "\n".join(line for i, line in enumerate(lines) if i not in drop)


def keep_content_lines(text: str, min_chars: int = 40) -> str:
    """Pass 4: keep blank lines and lines with a content signal: digits,
    sentence punctuation, or at least min_chars characters."""
    kept = []
    for line in text.splitlines():
        stripped = line.strip()
        if (not stripped or _DIGIT.search(stripped) or _SENTENCE_PUNCT.search(stripped)
                or len(stripped) >= min_chars):
            kept.append(line)
    return "\n".join(kept)


def _squeeze_blank_lines(text: str) -> str:
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def clean_text(text: str, settings: Optional[Settings] = None) -> str:
    """All five passes, in order."""
    settings = settings or Settings()
    text = strip_stale_dates(text)
    text = strip_boilerplate(text)
    text = strip_navigation(text)
    text = collapse_menus(text, settings.rag_menu_run_lines, settings.rag_menu_line_chars)
    text = keep_content_lines(text, settings.rag_min_line_chars)
    return _squeeze_blank_lines(text)


# ---------------------------------------------------------------------------
# Paragraphs, near-duplicates, scoring, selection
# ---------------------------------------------------------------------------

def _is_hard_wrapped(lines: list) -> bool:
    """Lines of one paragraph broken at a fixed width (PDF text) rather than one
    block per line (web text): most lines do not end a sentence."""
    if len(lines) < 2:
        return False
    open_ended = sum(1 for line in lines[:-1] if not _PROSE_END.search(line.strip()))
    return open_ended * 2 > len(lines) - 1


def split_paragraphs(text: str) -> list:
    """Blank-line separated blocks; a block of web lines becomes one paragraph per
    line, a hard-wrapped block is joined back into one paragraph."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if _is_hard_wrapped(lines):
            paragraphs.append(" ".join(lines))
        else:
            paragraphs.extend(lines)
    return paragraphs


def word_set(text: str) -> frozenset:
    """Lower-cased topic words of a text (stopwords carry no identity)."""
    return frozenset(w for w in (w.lower() for w in _WORD.findall(text))
                     if w not in STOPWORDS)


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class _DuplicateIndex:
    """Word sets of the kept paragraphs, searchable for near-duplicates without
    comparing against every one of them (a long document has thousands).

    Prefix filtering: order every set's words the same fixed way, rarest first;
    two sets with Jaccard >= t must share a word among the first
    len - ceil(t * len) + 1 of either, so only those prefix words are indexed and
    probed. Rare words have short postings; candidates are then checked exactly."""

    def __init__(self, threshold: float, frequency: dict):
        self.threshold = min(max(threshold, 0.01), 1.0)
        self.frequency = frequency        # word -> paragraphs containing it
        self.sets: list = []
        self.postings: dict = {}

    def _prefix(self, words: frozenset) -> list:
        ordered = sorted(words, key=lambda w: (self.frequency.get(w, 0), w))
        return ordered[:len(ordered) - math.ceil(self.threshold * len(ordered)) + 1]

    def most_similar(self, words: frozenset) -> Optional[int]:
        candidates: set = set()
        for word in self._prefix(words):
            candidates.update(self.postings.get(word, ()))
        best, best_score = None, 0.0
        for index in sorted(candidates):   # the earliest paragraph wins a tie
            other = self.sets[index]
            shared = len(words & other)
            score = shared / (len(words) + len(other) - shared)
            if score >= self.threshold and score > best_score:
                best, best_score = index, score
        return best

    def set(self, index: int, words: frozenset) -> None:
        if index < len(self.sets):
            for word in self._prefix(self.sets[index]):
                self.postings[word].discard(index)
            self.sets[index] = words
        else:
            self.sets.append(words)
        for word in self._prefix(words):
            self.postings.setdefault(word, set()).add(index)


def remove_near_duplicates(paragraphs: list, threshold: float) -> list:
    """One paragraph per group whose topic-word sets overlap by `threshold`
    (Jaccard) or share their opening words: the same text syndicated on several
    sites shows up once. The longer copy wins (copies often differ by an added
    sentence), in the place of the first."""
    word_sets = [word_set(p.text) for p in paragraphs]
    frequency: dict = {}
    for words in word_sets:
        for word in words:
            frequency[word] = frequency.get(word, 0) + 1
    kept, prefixes, index = [], {}, _DuplicateIndex(threshold, frequency)
    for paragraph, words in zip(paragraphs, word_sets):
        prefix = " ".join(w.lower() for w in _WORD.findall(paragraph.text)[:12])
        twin = prefixes.get(prefix)
        if twin is None and words:
            twin = index.most_similar(words)
        if twin is None:
            prefixes[prefix] = len(kept)
            index.set(len(kept), words)
            kept.append(paragraph)
        elif len(paragraph.text) > len(kept[twin].text):
            first = kept[twin]
            kept[twin] = Paragraph(paragraph.source_id, paragraph.source_name,
                                   first.position, paragraph.text, paragraph.score)
            index.set(twin, words)
    return kept


def _stem(word: str) -> str:
    """Just enough folding for overlap counting: case, possessives, plurals."""
    word = word.lower().replace("’", "'")
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def query_terms(question: str) -> frozenset:
    """The topic words of a question: no stopwords, no filler, no tiny words."""
    return frozenset(_stem(w) for w in _WORD.findall(question)
                     if len(w) > 2 and w.lower() not in STOPWORDS
                     and w.lower() not in QUESTION_FILLER)


def score_paragraph(text: str, terms: frozenset, relevance_bonus: float = 0.0) -> float:
    """jusText-like quality plus relevance. Good prose with figures but no query
    word tops out at 2.5; each matched query word adds 1.5 (up to four)."""
    words = _WORD.findall(text)
    if not words:
        return -5.0
    stop_share = sum(1 for w in words if w.lower() in STOPWORDS) / len(words)
    score = 1.0 if stop_share >= 0.30 else 0.5 if stop_share >= 0.15 else -1.0
    score += 0.5 if len(text) >= 150 else -1.0 if len(text) < 40 else 0.0
    score += 0.5 if len(_SENTENCE_PUNCT.findall(text)) >= 2 else 0.0
    score += 0.5 if _DIGIT.search(text) else 0.0
    if _BOILERPLATE.search(text):
        score -= 1.0
    if is_navigation_line(text):
        score -= 1.0
    matched = len(terms & {_stem(w) for w in words})
    return score + 1.5 * min(matched, 4) + relevance_bonus


def select_paragraphs(paragraphs: list, budget_chars: int, max_paragraphs: int,
                      min_score: float) -> list:
    """The best paragraphs (score >= min_score) that fit the budget, returned in
    their original order so the text still reads in sequence."""
    ranked = sorted(paragraphs, key=lambda p: (-p.score, p.position))
    chosen, used = [], 0
    for paragraph in ranked:
        if paragraph.score < min_score or len(chosen) >= max_paragraphs:
            break
        length = len(paragraph.text) + 2
        if used + length > budget_chars:
            if chosen:
                continue  # a smaller paragraph further down may still fit
            paragraph = _truncate(paragraph, budget_chars)
            length = len(paragraph.text)
        chosen.append(paragraph)
        used += length
    return sorted(chosen, key=lambda p: p.position)


def _truncate(paragraph: Paragraph, budget_chars: int) -> Paragraph:
    """Cut an oversized first paragraph at a sentence end inside the budget."""
    text = paragraph.text[:budget_chars]
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    if cut > budget_chars // 2:
        text = text[:cut + 1]
    return Paragraph(paragraph.source_id, paragraph.source_name, paragraph.position,
                     text, paragraph.score)


def score_paragraphs(paragraphs: list, terms: frozenset, forced: bool) -> list:
    """Score every paragraph. For an ordinary question, sources in which no
    paragraph mentions a query word are left out whole: a search result that never
    names the topic is noise however well written. A question about the document
    (forced) counts every paragraph as relevant instead."""
    bonus = 1.5 if forced else 0.0
    scored = [Paragraph(p.source_id, p.source_name, p.position, p.text,
                        score_paragraph(p.text, terms, bonus)) for p in paragraphs]
    if forced or not terms:
        return scored
    relevant = {p.source_id for p in paragraphs
                if terms & {_stem(w) for w in _WORD.findall(p.text)}}
    return [p for p in scored if p.source_id in relevant]


def reference_budget(context_length: int, settings: Settings) -> int:
    """Characters of reference text a model of this context length can take,
    leaving the rest for instructions, the question and the answer."""
    by_context = int(context_length * settings.rag_context_share * CHARS_PER_TOKEN)
    return max(200, min(by_context, settings.rag_max_context_chars))


# ---------------------------------------------------------------------------
# Follow-ups, summaries, the date anchor
# ---------------------------------------------------------------------------

# Questions about "the document / the file / the article" mean the attached text
# is the subject even when none of their words occur in it.
_DOCUMENT_REFERENCE = re.compile(
    r"\b(?:summari[sz]e|summary|tl;?dr|(?:the|this|that|attached|uploaded)\s+"
    r"(?:document|doc|file|pdf|article|paper|report|text|page|attachment|upload|"
    r"transcript|essay|chapter|source|link|website)s?)\b"
    r"|\b(?:attached|uploaded)\b|\bin\s+the\s+(?:article|document|file|text|pdf)\b",
    re.I)

_SUMMARY_REQUEST = re.compile(
    r"\b(?:summari[sz]e|summary|summaries|tl;?dr|overview|outline|recap)\b", re.I)

# A reply made only of these words is conversation, not a search ("ok thanks!").
_CONVERSATIONAL_WORDS = frozenset("""
thanks thank thx ty you ok okay k kk great cool nice yes yeah yep yup no nope sure
got it tell me more go on continue why how so really awesome perfect lol hi hello hey
bye good fine alright right understood i see wow interesting makes sense and very
much a lot that's is helpful agreed please again what else cheers indeed
""".split())

SUMMARY_INSTRUCTION = ("Cover all major points, sections, and key details. "
                       "Use multiple paragraphs.")


def is_document_reference(question: str) -> bool:
    return bool(_DOCUMENT_REFERENCE.search(question))


def is_summary_request(question: str) -> bool:
    return bool(_SUMMARY_REQUEST.search(question))


def is_conversational(question: str) -> bool:
    words = [w.lower() for w in re.findall(r"[A-Za-z']+", question)]
    return 0 < len(words) <= 6 and all(w in _CONVERSATIONAL_WORDS for w in words)


def classify_followup(question: str, reference_text: str, has_history: bool,
                      history_text: str = "") -> str:
    """Whether this turn should be answered from the sources (a FollowUp value).

    Layer 0: a question about the document always uses it.
    Layer 1: a purely conversational reply never does.
    Layer 2: in a running conversation, a question sharing no topic word with the
    sources or the conversation is off-topic for them: Open WebUI searched the web
    with the raw message and the results are noise."""
    if is_document_reference(question):
        return FollowUp.FORCE_RAG
    if is_conversational(question):
        return FollowUp.SKIP_CONVERSATIONAL
    terms = query_terms(question)
    if has_history and terms:
        known = {_stem(w) for w in _WORD.findall(reference_text + "\n" + history_text)}
        if not terms & known:
            return FollowUp.SKIP_NO_OVERLAP
    return FollowUp.USE_RAG


def format_date(day: date) -> str:
    return f"{day:%B} {day.day}, {day.year}"


def date_anchor(today: date) -> str:
    """Put the real date right above the web text, whose own dates may be stale."""
    return f"[Current date: {format_date(today)}. Any conflicting dates below are outdated.]"


def should_disable_thinking(context_length: int, settings: Optional[Settings] = None) -> bool:
    """RAG on a small context: the reasoning would eat the room the answer needs."""
    settings = settings or Settings()
    return context_length < settings.rag_below_ctx


# ---------------------------------------------------------------------------
# The prompt
# ---------------------------------------------------------------------------

_ANSWER_RULES = (
    "Answer the question from the reference text the user gives you. Use its facts, "
    "names and numbers. After a fact taken from a numbered source, write the source "
    "number in brackets, like [1]. If the reference text does not contain the "
    "answer, say so plainly.")

_NOTHING_FOUND_RULES = (
    "The search for this question found nothing useful. Tell the user so in one "
    "sentence. If you know the answer yourself, give it and say that it comes from "
    "your own knowledge, not from the search.")


def _paragraphs_of(sources: tuple, settings: Settings) -> list:
    paragraphs = []
    for source in sources:
        for text in split_paragraphs(clean_text(source.text, settings)):
            paragraphs.append(Paragraph(source.id, source.name, len(paragraphs), text))
    return paragraphs


def _reference_block(chosen: list) -> str:
    """Paragraphs grouped under their source label, so [n] points somewhere."""
    parts, current = [], None
    for paragraph in chosen:
        if paragraph.source_id != current:
            current = paragraph.source_id
            name = paragraph.source_name if len(paragraph.source_name) <= 100 else ""
            parts.append(f"[{current}] {name}".rstrip())
        parts.append(paragraph.text)
    return "\n\n".join(parts)


def build_rag_prompt(rag: RagInput, *, context_length: int, today: date,
                     settings: Optional[Settings] = None, forced: Optional[bool] = None,
                     ) -> RagPrompt:
    """Clean, deduplicate, score and select the sources, then write the turn.

    forced: the question is about the document itself (default: detected from
    the question); its paragraphs all count as relevant and the floor is off."""
    settings = settings or Settings()
    if forced is None:
        forced = is_document_reference(rag.question)
    summary = is_summary_request(rag.question)
    paragraphs = remove_near_duplicates(_paragraphs_of(rag.sources, settings),
                                        settings.rag_dedup_threshold)
    scored = score_paragraphs(paragraphs, query_terms(rag.question), forced)
    best = max((p.score for p in scored), default=float("-inf"))
    dropped = not scored or (not forced and best < settings.rag_quality_floor_threshold)
    chosen = [] if dropped else select_paragraphs(
        scored, reference_budget(context_length, settings),
        settings.rag_max_paragraphs, settings.rag_min_quality_score)
    dropped = dropped or not chosen
    context = "" if dropped else _reference_block(chosen)
    return RagPrompt(
        system=_system_text(rag.system_text, dropped),
        user=_user_text(context, rag.question, today, summary, dropped),
        context=context,
        context_hash=hashlib.sha256(context.encode("utf-8")).hexdigest(),
        sources_used=tuple(dict.fromkeys(p.source_id for p in chosen)),
        dropped=dropped, summary=summary,
        best_score=best if scored else 0.0,
        raw_chars=sum(len(s.text) for s in rag.sources),
        clean_chars=sum(len(p.text) for p in chosen))


def _system_text(own_system_prompt: str, dropped: bool) -> str:
    rules = _NOTHING_FOUND_RULES if dropped else _ANSWER_RULES
    return f"{own_system_prompt}\n\n{rules}" if own_system_prompt else rules


def _user_text(context: str, question: str, today: date, summary: bool,
               dropped: bool) -> str:
    """Reading-comprehension layout: reference first, the question last, so a
    small model reads the facts before it is asked about them."""
    anchor = date_anchor(today)
    if dropped:
        return (f"{anchor}\n\nThe search returned no useful results for this "
                f"question.\n\nQuestion: {question}")
    ask = (f"Based on the reference text above, answer this question: {question}\n"
           "Answer in detail with the specific facts from the reference text, and "
           "cite the source numbers like [1].")
    if summary:
        ask += " " + SUMMARY_INSTRUCTION
    return f"{anchor}\n\nReference text:\n\n{context}\n\n{ask}"


# ---------------------------------------------------------------------------
# One call for the request path
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RagPlan:
    rag: RagInput
    decision: str                  # a FollowUp value
    prompt: Optional[RagPrompt]    # None when the sources are skipped
    messages: tuple                # the request's messages with the context taken out
    disable_thinking: bool         # RAG turn on a context below rag_below_ctx

    @property
    def use_sources(self) -> bool:
        return self.prompt is not None

    def turn_messages(self) -> tuple:
        """The standalone reading-comprehension turn (use_sources only)."""
        return (Message("system", (TextPart(self.prompt.system),)),
                Message("user", (TextPart(self.prompt.user),)))


def plan_turn(messages, *, context_length: int, today: date,
              settings: Optional[Settings] = None) -> Optional[RagPlan]:
    """detect + classify_followup + build_rag_prompt; None without retrieved context.

    When plan.use_sources, run plan.prompt as a standalone turn (keep_history=0,
    conversation KV untouched); otherwise answer plan.messages normally."""
    settings = settings or Settings()
    rag = detect(messages)
    if rag is None:
        return None
    stripped = without_context(messages, rag)
    last_user = last_index(stripped, "user")
    earlier = stripped[:last_user] if last_user is not None else stripped
    has_history = any(m.role == "assistant" for m in earlier)
    history_text = "\n".join(m.text for m in earlier if m.role in ("user", "assistant"))
    decision = classify_followup(rag.question, rag.reference_text, has_history, history_text)
    if decision in FollowUp.SKIPS:
        return RagPlan(rag, decision, None, stripped, False)
    prompt = build_rag_prompt(rag, context_length=context_length, today=today,
                              settings=settings, forced=decision == FollowUp.FORCE_RAG)
    return RagPlan(rag, decision, prompt, stripped,
                   should_disable_thinking(context_length, settings))


# ---------------------------------------------------------------------------
# Response cache
# ---------------------------------------------------------------------------

class ResponseCache:
    """LRU cache with a time-to-live for finished RAG answers, so a repeated
    question over the same cleaned sources skips inference. Thread-safe.

    Keys come from key(model, context_hash, question); values are whatever the
    caller stores (the answer text and its reasoning, typically)."""

    def __init__(self, max_entries: int = 50, ttl_seconds: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_entries = max(0, int(max_entries))
        self.ttl_seconds = float(ttl_seconds)
        self._clock = clock
        self._entries: OrderedDict = OrderedDict()   # key -> (expires_at, value)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_settings(cls, settings: Settings, clock: Callable[[], float] = time.monotonic):
        return cls(settings.rag_cache_size, settings.rag_cache_ttl, clock)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.ttl_seconds > 0

    @staticmethod
    def key(model: str, context_hash: str, question: str) -> str:
        normalised = " ".join(question.lower().split())
        raw = "\x1f".join((model, context_hash, normalised))
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()

    def get(self, key: str) -> Optional[Any]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] <= self._clock():
                if entry is not None:
                    del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: str, value: Any) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = self._clock()
            self._entries[key] = (now + self.ttl_seconds, value)
            self._entries.move_to_end(key)
            for stale in [k for k, (expires, _) in self._entries.items() if expires <= now]:
                del self._entries[stale]
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
