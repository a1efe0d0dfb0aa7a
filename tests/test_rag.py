"""rag.py: detection of Open WebUI's retrieved context, the cleaning passes,
near-duplicates, scoring, the quality floor, follow-ups, the prompt and the cache.

Requests are built the way Open WebUI builds them: sources joined into a context
string, the RAG template filled, then either appended to the system message or put
in front of the last user message with a newline between."""
import threading
from datetime import date

import pytest

import rag
from rkllm_api.config import Settings
from rkllm_api.request import ImagePart, TextPart
from support.messages import typed
from support.rag_requests import (SYSTEM_PROMPT, TODAY, document_request, eiffel_request,
                                  fill, fixture, newer_context, older_context, owui_request,
                                  web_pages)


def detect(messages):
    return rag.detect(typed(messages))


def without_context(messages, found):
    return rag.without_context(typed(messages), found)


def plan_turn(messages, **kwargs):
    return rag.plan_turn(typed(messages), **kwargs)


# --- detection ---------------------------------------------------------------

def test_detects_newer_sources_prepended_to_the_user_message():
    messages = eiffel_request("user")
    found = detect(messages)
    assert found.placement == "user" and found.message_index == 1
    assert found.layout == "id-attr"
    assert found.question == "How tall is the Eiffel Tower?"
    assert [s.id for s in found.sources] == ["1", "2", "3", "4"]
    assert found.sources[1].name == "https://news.example/eiffel"
    assert found.sources[1].text == fixture("web_eiffel_syndicated.txt").strip()
    assert found.system_text == SYSTEM_PROMPT


def test_detects_newer_sources_appended_to_the_system_message():
    found = detect(eiffel_request("system"))
    assert found.placement == "system" and found.message_index == 0
    assert found.question == "How tall is the Eiffel Tower?"
    # The user's own system prompt survives; the template does not.
    assert found.system_text == SYSTEM_PROMPT
    assert len(found.sources) == 4


def test_detects_older_source_id_layout_in_the_system_message():
    found = detect(document_request("How long may probe cables be?"))
    assert found.layout == "source-id" and found.placement == "system"
    assert found.question == "How long may probe cables be?"
    # All chunks of one file share its citation label.
    assert {s.id for s in found.sources} == {"1"}
    assert {s.name for s in found.sources} == {"gh200_manual.pdf"}
    assert "30 metres" in found.sources[1].text
    assert found.system_text == SYSTEM_PROMPT


def test_older_layout_in_the_user_message_keeps_the_users_own_words():
    question = "How long may probe cables be?"
    found = detect(document_request(question, placement="user"))
    assert found.placement == "user"
    assert found.question == question  # not the template's <user_query> copy plus it
    # With nothing after the template, the <user_query> copy is the question.
    only_template = [{"role": "user", "content": fill(
        "template_older.txt", older_context([("a.txt", "Some text here.")]), question)}]
    assert detect(only_template).question == question


def test_distinct_older_source_ids_are_numbered_in_order():
    context = older_context([("a.pdf", "one"), ("b.pdf", "two"), ("a.pdf", "three")])
    found = detect([{"role": "user", "content": fill("template_older.txt", context, "q")}])
    assert [(s.id, s.name) for s in found.sources] == [("1", "a.pdf"), ("2", "b.pdf"),
                                                        ("1", "a.pdf")]


def test_extra_source_attributes_and_list_content():
    context = ('<source id="7" name="Report" resource-type="web_search">Sales rose '
               '12% in 2024.</source>')
    content = [{"type": "text", "text": fill("template_newer.txt", context, "") + "\nSales?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    messages = [{"role": "user", "content": content}]
    found = detect(messages)
    assert found.sources == (rag.Source("7", "Report", "Sales rose 12% in 2024."),)
    assert found.question == "Sales?"
    stripped = without_context(messages, found)
    assert stripped[0].parts == (TextPart("Sales?"), ImagePart("data:image/png;base64,AAAA"))


def test_single_quoted_source_tags_are_read_like_double_quoted_ones():
    pages = [("https://a.example/tides", "Tides rise twice a day."), ("b.txt", "Moon.")]
    single = detect([{"role": "user", "content": fill(
        "template_newer.txt", newer_context(pages, quote="'"), "") + "\nTides?"}])
    double = detect([{"role": "user", "content": fill(
        "template_newer.txt", newer_context(pages), "") + "\nTides?"}])
    assert single is not None and single.layout == "id-attr"
    assert single.sources == double.sources
    assert single.question == double.question == "Tides?"
    # Without the template around them, single-quoted ids still mark client sources.
    bare = "<source id='1' name='n.txt'>Tides rise twice a day.</source>\nTides?"
    found = detect([{"role": "user", "content": bare}])
    assert found.sources == (rag.Source("1", "n.txt", "Tides rise twice a day."),)
    # A double-quoted value may hold an apostrophe and the reverse.
    mixed = """<source id="2" name='say "hi"'>x</source><source id='3' name="it's">y</source>"""
    found = detect([{"role": "user", "content": mixed + "\nq?"}])
    assert [(s.id, s.name) for s in found.sources] == [("2", 'say "hi"'), ("3", "it's")]


def test_template_without_source_tags_is_one_plain_source():
    filled = fill("template_older.txt", "Chunk about tides.\n\nAnother chunk.", "Tides?")
    found = detect([{"role": "user", "content": filled}])
    assert found.layout == "plain"
    assert found.sources[0].text == "Chunk about tides.\n\nAnother chunk."


def test_no_retrieved_context_is_not_detected():
    assert detect([{"role": "user", "content": "What is 2+2?"}]) is None
    assert rag.detect(()) is None
    casual = "In XML, how do I write <context>hello</context> properly?"
    assert detect([{"role": "user", "content": casual}]) is None
    pasted = "Why does <source>a.xml</source> fail to validate in my schema?"
    assert detect([{"role": "user", "content": pasted}]) is None


def test_source_tags_without_the_context_wrapper_are_found():
    """A custom RAG template may drop <context>; the client's source tags remain."""
    text = 'Use these notes:\n<source id="1" name="n.txt">Tides rise twice a day.</source>\nTides?'
    found = detect([{"role": "user", "content": text}])
    assert found.sources == (rag.Source("1", "n.txt", "Tides rise twice a day."),)
    assert found.question == "Tides?"


def test_without_context_restores_the_plain_conversation():
    system_placed = eiffel_request("system")
    stripped = without_context(system_placed, detect(system_placed))
    assert stripped == typed([{"role": "system", "content": SYSTEM_PROMPT},
                              {"role": "user", "content": "How tall is the Eiffel Tower?"}])
    no_own_prompt = owui_request(fill("template_newer.txt", newer_context(web_pages()), "q"),
                                 "q", "system", system="")
    assert without_context(no_own_prompt, detect(no_own_prompt)) == typed([
        {"role": "user", "content": "q"}])
    user_placed = eiffel_request("user")
    assert without_context(user_placed, detect(user_placed))[-1] == typed([
        {"role": "user", "content": "How tall is the Eiffel Tower?"}])[0]


# --- cleaning passes -----------------------------------------------------------

def test_stale_date_claims_are_removed_but_dated_facts_stay():
    text = ("Today is October 26, 2025. The tower opened on 31 March 1889.\n"
            "Current local time in Paris: 14:32.\n"
            "It is currently 330 metres tall.\n"
            "The current time zone is CET, and clocks change on 29 March 2026.")
    cleaned = rag.strip_stale_dates(text)
    assert "October 26, 2025" not in cleaned and "14:32" not in cleaned
    assert "The tower opened on 31 March 1889." in cleaned
    assert "It is currently 330 metres tall." in cleaned
    assert "clocks change on 29 March 2026" in cleaned


def test_boilerplate_sentences_are_removed_but_content_stays():
    text = ("We use cookies to improve your experience. The museum opens at 9:00.\n"
            "Sign in | Register\n"
            "© 2025 Example Media. All rights reserved.\n"
            "Subscribe to our newsletter!\n"
            "Netflix had 260 million subscribers at the end of 2024.")
    cleaned = rag.strip_boilerplate(text)
    assert cleaned.splitlines() == ["The museum opens at 9:00.",
                                    "Netflix had 260 million subscribers at the end of 2024."]


@pytest.mark.parametrize("line", [
    "HomeNewsSportWeatherCareers",
    "Home > Travel > Europe > France",
    "Home | Shop | Blog | Contact",
    "Best Hotels Near The Eiffel Tower Book Now",
    "https://a.example/x https://b.example/y",
    "www.example.test/one www.example.test/two",
])
def test_navigation_lines_are_dropped(line):
    assert rag.strip_navigation(line) == ""


@pytest.mark.parametrize("line", [
    "The Eiffel Tower is 330 metres tall and was finished in 1889.",
    "| 2021 | 5.8 million | 12% |",
    "Eiffel Tower Height 330 Metres",
    "Prices start at 29 euros for adults > 25 years old.",
    "PlayStation sales reached 50 million units.",
])
def test_content_lines_survive_navigation_pass(line):
    assert rag.strip_navigation(line) == line


def test_glued_menu_is_cut_from_a_prose_line():
    line = "HomeNewsSportWeather The bridge reopened on 4 May after repairs to its deck."
    assert rag.strip_navigation(line) == "The bridge reopened on 4 May after repairs to its deck."


def test_runs_of_short_menu_lines_are_collapsed():
    menu = "Destinations\nHotels\n\nFlights\nCar Rental\nCruises"
    prose = "A paragraph of text that is long enough to count as content."
    assert rag.collapse_menus(f"{prose}\n{menu}\n{prose}") == f"{prose}\n{prose}"
    # Three short lines are below the run length; short lines with figures are data.
    short = "Hotels\nFlights\nCruises"
    assert rag.collapse_menus(short) == short
    data = "Height\n330 m\nWeight\n10,100 t\nOpened\n1889"
    assert rag.collapse_menus(data) == data
    assert rag.collapse_menus(short, min_run=3) == ""


def test_lines_without_content_signals_are_dropped():
    text = ("Related\nTrending\n"
            "Population 2,102,650\n"
            "Was this article helpful?\n"
            "A long line without any punctuation but plenty of words in it\n"
            "\n"
            "Short line.")
    assert rag.keep_content_lines(text).splitlines() == [
        "Population 2,102,650", "Was this article helpful?",
        "A long line without any punctuation but plenty of words in it", "", "Short line."]
    assert rag.keep_content_lines("Twenty-five chars of text", min_chars=20) != ""


def test_clean_text_keeps_facts_and_drops_page_noise():
    cleaned = rag.clean_text(fixture("web_eiffel_noisy.txt"))
    for fact in ("330 metres", "1889", "6.3 million", "276 m", "10,100 tonnes"):
        assert fact in cleaned
    for noise in ("cookies", "Sign in", "October 26, 2025", "HomeTravelGuides",
                  "Car Rental", "Back to top", "Montmartre Walking Tour", "https://"):
        assert noise not in cleaned
    assert len(cleaned) < len(fixture("web_eiffel_noisy.txt")) * 0.5


# --- paragraphs, duplicates, scoring -------------------------------------------

def test_hard_wrapped_document_lines_are_rejoined_web_lines_are_not():
    wrapped = ("The controller keeps working from its\ninternal battery for 12 hours when\n"
               "mains power fails.")
    assert rag.split_paragraphs(wrapped) == [
        "The controller keeps working from its internal battery for 12 hours when mains "
        "power fails."]
    web = "First sentence is here.\nSecond line is another paragraph."
    assert rag.split_paragraphs(web) == ["First sentence is here.",
                                         "Second line is another paragraph."]


def paragraph(text, position=0, source_id="1", score=0.0):
    return rag.Paragraph(source_id, "", position, text, score)


def test_near_duplicates_across_sources_are_removed_keeping_the_longer_copy():
    lead = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in "
            "Paris, built between 1887 and 1889.")
    longer = lead + " It is 330 metres tall."
    other = "About 6.3 million people visited the tower in 2023."
    kept = rag.remove_near_duplicates(
        [paragraph(lead, 0, "1"), paragraph(other, 1, "1"), paragraph(longer, 2, "2")], 0.7)
    assert [p.text for p in kept] == [longer, other]
    assert kept[0].position == 0 and kept[0].source_id == "2"
    # A threshold above their similarity keeps both.
    assert len(rag.remove_near_duplicates(
        [paragraph(lead + " Extra words make it differ by a few more tokens now."),
         paragraph(other), paragraph("Completely different text about croissants and butter.")],
        0.95)) == 3


def test_indexed_duplicate_search_matches_the_pairwise_definition():
    """The prefix-filtered index must find exactly what comparing every pair finds."""
    import random
    rng = random.Random(7)
    vocabulary = [f"word{i}" for i in range(400)]
    texts = [" ".join(rng.choices(vocabulary, k=rng.randint(5, 40))) for _ in range(150)]
    texts += [t + " plus two" for t in rng.sample(texts, 40)]  # planted near-duplicates
    items = [paragraph(t, i) for i, t in enumerate(texts)]

    def pairwise(paragraphs, threshold):
        kept, sets, openings = [], [], {}
        for p in paragraphs:
            words = rag.word_set(p.text)
            opening = " ".join(p.text.lower().split()[:12])  # same opening words: duplicate
            scores = [(rag.jaccard(words, other), -i) for i, other in enumerate(sets)]
            best = max(scores, default=(0.0, 0))
            twin = openings.get(opening, -best[1] if best[0] >= threshold else None)
            if twin is None:
                openings[opening] = len(kept)
                kept.append(p)
                sets.append(words)
            elif len(p.text) > len(kept[twin].text):
                kept[twin], sets[twin] = p, words
        return [p.text for p in kept]

    for threshold in (0.5, 0.7, 0.9):
        assert [p.text for p in rag.remove_near_duplicates(items, threshold)] == \
            pairwise(items, threshold)


def test_jaccard():
    assert rag.jaccard(frozenset("ab"), frozenset("ab")) == 1.0
    assert rag.jaccard(frozenset("ab"), frozenset("bc")) == pytest.approx(1 / 3)


def test_scoring_orders_relevant_data_over_prose_over_fragments():
    terms = rag.query_terms("How tall is the Eiffel Tower?")
    assert terms == {"tall", "eiffel", "tower"}
    relevant = ("The Eiffel Tower is 330 metres tall, including the antennas at its summit. "
                "It was finished in 1889 for the World's Fair.")
    prose = ("The weather in the city was mild for most of the year, and the parks were "
             "busy with families on the weekends. Many cafes stay open until late.")
    fragment = "Home | Hotels | Flights"
    scores = [rag.score_paragraph(t, terms) for t in (relevant, prose, fragment)]
    assert scores[0] > scores[1] > scores[2]
    assert scores[1] <= 2.5  # no query word: never above the floor on its own
    assert rag.score_paragraph(prose, terms, relevance_bonus=1.5) == scores[1] + 1.5


def test_selection_respects_score_budget_count_and_reading_order():
    items = [paragraph("a" * 100, 0, score=3.0), paragraph("b" * 100, 1, score=9.0),
             paragraph("c" * 100, 2, score=5.0), paragraph("d" * 100, 3, score=1.0)]
    chosen = rag.select_paragraphs(items, budget_chars=1000, max_paragraphs=10, min_score=2.0)
    assert [p.text[0] for p in chosen] == ["a", "b", "c"]  # d is below min, order restored
    assert [p.text[0] for p in rag.select_paragraphs(items, 1000, 2, 2.0)] == ["b", "c"]
    assert [p.text[0] for p in rag.select_paragraphs(items, 210, 10, 2.0)] == ["b", "c"]
    long_one = paragraph("Sentence one is here. " * 40, 0, score=5.0)
    cut = rag.select_paragraphs([long_one], 300, 10, 2.0)
    assert len(cut[0].text) <= 300 and cut[0].text.endswith(".")


def test_budget_follows_the_context_length():
    settings = Settings()
    small, large = rag.reference_budget(1024, settings), rag.reference_budget(32768, settings)
    assert small < large == settings.rag_max_context_chars
    prompt = rag.build_rag_prompt(detect(document_request("How often is watering allowed?")),
                                  context_length=512, today=TODAY)
    assert prompt.clean_chars <= rag.reference_budget(512, settings)
    assert "6 hours" in prompt.context


# --- quality floor, follow-ups, summary, date anchor ------------------------------

def test_useless_results_are_dropped_and_the_prompt_says_so():
    garbage = [("https://shop.example/", fixture("web_garbage.txt")),
               ("https://food.example/croissants", fixture("web_unrelated.txt"))]
    question = "Who won the 2022 football world cup?"
    messages = owui_request(fill("template_newer.txt", newer_context(garbage), question),
                            question, "user")
    prompt = rag.build_rag_prompt(detect(messages), context_length=4096, today=TODAY)
    assert prompt.dropped and prompt.context == "" and prompt.sources_used == ()
    assert "croissant" not in prompt.user.lower()
    assert "no useful results" in prompt.user and "nothing useful" in prompt.system
    assert prompt.user.rstrip().endswith(question)


def test_floor_threshold_is_a_setting_and_document_questions_bypass_it():
    found = detect(eiffel_request())
    assert not rag.build_rag_prompt(found, context_length=4096, today=TODAY).dropped
    strict = Settings().with_(rag_quality_floor_threshold=50.0)
    assert rag.build_rag_prompt(found, context_length=4096, today=TODAY, settings=strict).dropped
    # "Summarize the document" shares no word with the manual, yet uses all of it.
    doc = detect(document_request("Summarize the document"))
    prompt = rag.build_rag_prompt(doc, context_length=4096, today=TODAY, settings=strict)
    assert not prompt.dropped and "90 days" in prompt.context and "35 percent" in prompt.context


@pytest.mark.parametrize("question", [
    "Summarize the document", "What does the file say about batteries?",
    "In the article, who designed it?", "tl;dr please", "Explain the attached PDF",
])
def test_document_referential_questions_force_rag(question):
    assert rag.classify_followup(question, "unrelated words", has_history=True) == \
        rag.FollowUp.FORCE_RAG


@pytest.mark.parametrize("reply", ["thanks", "Thanks!", "ok", "great, thank you!",
                                   "tell me more", "Cool. Got it."])
def test_conversational_replies_skip_rag(reply):
    assert rag.classify_followup(reply, "The tower is 330 metres tall.", has_history=True) == \
        rag.FollowUp.SKIP_CONVERSATIONAL


def test_zero_overlap_follow_ups_skip_rag_only_in_a_conversation():
    reference = "The Eiffel Tower is 330 metres tall."
    question = "Which wine goes with salmon?"
    assert rag.classify_followup(question, reference, has_history=True) == \
        rag.FollowUp.SKIP_NO_OVERLAP
    assert rag.classify_followup(question, reference, has_history=False) == rag.FollowUp.USE_RAG
    assert rag.classify_followup("And how tall is the tower?", reference, True) == \
        rag.FollowUp.USE_RAG
    # Words known from the conversation count as overlap too.
    assert rag.classify_followup(question, reference, True, "we talked about salmon") == \
        rag.FollowUp.USE_RAG
    assert not rag.is_conversational("Thanks, now list the tower's restaurants")


def test_plan_turn_skips_sources_for_a_conversational_follow_up():
    history = [{"role": "user", "content": "How tall is the Eiffel Tower?"},
               {"role": "assistant", "content": "It is 330 metres tall [1]."}]
    messages = owui_request(fill("template_newer.txt", newer_context(web_pages()), "thanks!"),
                            "thanks!", "user", history)
    plan = plan_turn(messages, context_length=4096, today=TODAY)
    assert plan.decision == rag.FollowUp.SKIP_CONVERSATIONAL and not plan.use_sources
    assert plan.prompt is None and not plan.disable_thinking
    assert plan.messages == typed([{"role": "system", "content": SYSTEM_PROMPT}] + history + [
        {"role": "user", "content": "thanks!"}])
    assert plan_turn([{"role": "user", "content": "hi"}], context_length=4096,
                         today=TODAY) is None


def test_plan_turn_uses_sources_and_turns_thinking_off_on_small_contexts():
    plan = plan_turn(eiffel_request(), context_length=4096, today=TODAY)
    assert plan.use_sources and plan.decision == rag.FollowUp.USE_RAG
    assert plan.disable_thinking
    assert not plan_turn(eiffel_request(), context_length=16384, today=TODAY).disable_thinking


def test_should_disable_thinking_threshold():
    assert rag.should_disable_thinking(4096)
    assert not rag.should_disable_thinking(8192)
    assert not rag.should_disable_thinking(4096, Settings().with_(rag_below_ctx=2048))


def test_date_anchor_heads_the_prompt():
    assert rag.date_anchor(TODAY) == \
        "[Current date: February 10, 2026. Any conflicting dates below are outdated.]"
    assert rag.date_anchor(date(2025, 3, 5)).startswith("[Current date: March 5, 2025.")
    prompt = rag.build_rag_prompt(detect(eiffel_request()), context_length=4096,
                                  today=date(2025, 3, 5))
    assert prompt.user.startswith("[Current date: March 5, 2025.")


def test_summary_questions_get_the_stronger_instruction():
    assert rag.is_summary_request("Give me an overview") and rag.is_summary_request("TL;DR?")
    assert not rag.is_summary_request("How tall is the tower?")
    summary = rag.build_rag_prompt(detect(document_request("Summarize this document")),
                                   context_length=4096, today=TODAY)
    assert summary.summary and rag.SUMMARY_INSTRUCTION in summary.user
    plain = rag.build_rag_prompt(detect(eiffel_request()), context_length=4096, today=TODAY)
    assert not plain.summary and rag.SUMMARY_INSTRUCTION not in plain.user


# --- the prompt -----------------------------------------------------------------

def test_noisy_search_results_become_a_much_smaller_prompt_with_the_facts():
    messages = eiffel_request("user")
    raw_chars = sum(len(m["content"]) for m in messages)
    prompt = rag.build_rag_prompt(detect(messages), context_length=4096, today=TODAY)
    sent_chars = len(prompt.system) + len(prompt.user)
    assert sent_chars < raw_chars * 0.4
    for fact in ("330 metres", "1889", "6.3 million", "Gustave Eiffel", "2024"):
        assert fact in prompt.context
    for noise in ("cookie", "Sign in", "October 26", "Croissant", "newsletter", "©"):
        assert noise.lower() not in prompt.user.lower()
    # The syndicated lead paragraph appears once.
    assert prompt.context.count("wrought-iron lattice tower") == 1


def test_prompt_cites_sources_by_the_clients_ids_and_keeps_the_system_prompt():
    prompt = rag.build_rag_prompt(detect(eiffel_request("system")), context_length=4096,
                                  today=TODAY)
    assert prompt.sources_used == ("1", "2")
    assert "[1] https://travel.example/eiffel" in prompt.context
    assert "[2] https://news.example/eiffel" in prompt.context
    assert prompt.system.startswith(SYSTEM_PROMPT) and "[1]" in prompt.system
    assert prompt.user.rstrip().endswith("cite the source numbers like [1].")
    assert "How tall is the Eiffel Tower?" in prompt.user
    assert "### Task" not in prompt.user and "<source" not in prompt.user


def test_context_hash_tracks_the_cleaned_text_not_the_noise():
    question = "How tall is the Eiffel Tower?"
    pages = web_pages()
    noisier = [(pages[0][0], pages[0][1] + "\nSign in\nAccept All Cookies\nHome\nShop\nBlog\nHelp")]
    a = rag.build_rag_prompt(detect(owui_request(fill(
        "template_newer.txt", newer_context(pages[:1]), question), question, "user")),
        context_length=4096, today=TODAY)
    b = rag.build_rag_prompt(detect(owui_request(fill(
        "template_newer.txt", newer_context(noisier), question), question, "user")),
        context_length=4096, today=TODAY)
    assert a.context_hash == b.context_hash
    assert a.context_hash != rag.build_rag_prompt(detect(eiffel_request()),
                                                  context_length=4096, today=TODAY).context_hash


# --- response cache ---------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_cache_hit_miss_and_expiry():
    clock = FakeClock()
    cache = rag.ResponseCache(max_entries=5, ttl_seconds=300, clock=clock)
    key = cache.key("smollm2", "abc", "How tall is it?")
    assert cache.get(key) is None
    cache.put(key, "330 metres")
    assert cache.get(key) == "330 metres"
    assert cache.get(cache.key("smollm2", "abc", "  how TALL is   it? ")) == "330 metres"
    assert cache.get(cache.key("other-model", "abc", "How tall is it?")) is None
    assert cache.get(cache.key("smollm2", "def", "How tall is it?")) is None
    clock.now += 299
    assert cache.get(key) == "330 metres"
    clock.now += 2
    assert cache.get(key) is None and len(cache) == 0
    assert (cache.hits, cache.misses) == (3, 4)


def test_cache_evicts_the_least_recently_used():
    cache = rag.ResponseCache(max_entries=2, ttl_seconds=300, clock=FakeClock())
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1      # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2


def test_cache_settings_and_disabling():
    settings = Settings.from_env({"RAG_CACHE_TTL": "0", "RAG_CACHE_SIZE": "7"})
    cache = rag.ResponseCache.from_settings(settings, clock=FakeClock())
    assert cache.max_entries == 7 and not cache.enabled
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0


def test_cache_is_safe_and_bounded_under_threads():
    cache = rag.ResponseCache(max_entries=16, ttl_seconds=300)
    errors = []

    def worker(offset):
        try:
            for i in range(300):
                cache.put(f"{offset}-{i % 40}", i)
                cache.get(f"{offset}-{(i * 7) % 40}")
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and len(cache) <= 16


def test_rag_settings_come_from_the_environment():
    settings = Settings.from_env({
        "RAG_QUALITY_FLOOR_THRESHOLD": "4.5", "RAG_DEDUP_THRESHOLD": "0.8",
        "RAG_BELOW_CTX": "4096", "RAG_MAX_CONTEXT_CHARS": "3000",
        "RAG_MIN_QUALITY_SCORE": "1", "RAG_MAX_PARAGRAPHS": "3"})
    assert (settings.rag_quality_floor_threshold, settings.rag_dedup_threshold,
            settings.rag_below_ctx, settings.rag_max_context_chars,
            settings.rag_min_quality_score, settings.rag_max_paragraphs) == \
        (4.5, 0.8, 4096, 3000, 1.0, 3)
    defaults = Settings()
    assert (defaults.rag_quality_floor_threshold, defaults.rag_dedup_threshold,
            defaults.rag_cache_ttl, defaults.rag_cache_size, defaults.rag_below_ctx) == \
        (3.0, 0.70, 300.0, 50, 8192)
