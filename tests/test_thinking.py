"""thinking.py: streaming <think> splitting and the thinking decision."""
import pytest

from rkllm_api.text.thinking import (ThinkSplitter, remove_soft_switches, resolve_thinking,
                                     split_think, strip_think)


def run_chunks(chunks, starts_inside=False):
    """Feed chunks, merge the events across calls, return (reasoning, content, events)."""
    splitter = ThinkSplitter(starts_inside=starts_inside)
    events = []
    for chunk in chunks:
        events.extend(splitter.feed(chunk))
    events.extend(splitter.finish())
    for kind, text in events:
        assert kind in ("reasoning", "content", "answer")
        assert text, "no empty events"
    if events and events[-1][0] == "answer":
        # The whole reply's view: the reasoning was the answer (thinking.ANSWER).
        assert all(k == "reasoning" for k, _ in events[:-1])
        assert "".join(t for _, t in events[:-1]) == events[-1][1]
        return "", events[-1][1], events
    assert "answer" not in [k for k, _ in events]
    reasoning = "".join(t for k, t in events if k == "reasoning")
    content = "".join(t for k, t in events if k == "content")
    return reasoning, content, events


def kinds_in_order(events):
    order = []
    for kind, _ in events:
        if not order or order[-1] != kind:
            order.append(kind)
    return order


SCRIPTED = "<think>\nThe user greets me.\nI greet back.\n</think>\n\nHello there!\nHow are you?"


@pytest.mark.parametrize("cut", range(len(SCRIPTED) + 1))
def test_split_at_every_position(cut):
    reasoning, content, events = run_chunks([SCRIPTED[:cut], SCRIPTED[cut:]])
    assert reasoning == "The user greets me.\nI greet back."
    assert content == "Hello there!\nHow are you?"
    assert kinds_in_order(events) == ["reasoning", "content"]


@pytest.mark.parametrize("first,second", [(a, b) for a in range(0, 20, 3) for b in range(20, len(SCRIPTED), 7)])
def test_split_at_two_positions(first, second):
    chunks = [SCRIPTED[:first], SCRIPTED[first:second], SCRIPTED[second:]]
    assert run_chunks(chunks)[:2] == ("The user greets me.\nI greet back.",
                                      "Hello there!\nHow are you?")


def test_one_char_at_a_time():
    reasoning, content, _ = run_chunks(list(SCRIPTED))
    assert (reasoning, content) == ("The user greets me.\nI greet back.", "Hello there!\nHow are you?")


def test_held_back_only_possible_tag_prefix():
    splitter = ThinkSplitter()
    assert splitter.feed("Plain answer, no tags") == [("content", "Plain answer, no tags")]
    # A '<' mid-line cannot open a block, so nothing is held.
    assert splitter.feed(" a<b") == [("content", " a<b")]
    splitter = ThinkSplitter()
    assert splitter.feed("<thi") == []
    assert splitter.feed("nk>x") == [("reasoning", "x")]


@pytest.mark.parametrize("text", [
    "Hello world",
    "  indented start\n\nwith blank lines\n",
    "a < b and c > d",
    "Use the <think> tag to show reasoning.",
    "x = '</thin'",
    "",
])
def test_text_without_blocks_is_untouched(text):
    for chunks in ([text], list(text)):
        reasoning, content, _ = run_chunks(chunks)
        assert reasoning == ""
        assert content == text


def test_literal_tag_mid_sentence_stays_content():
    text = "Write <think> at the start of a line to begin reasoning."
    assert split_think(text) == ("", text)


def test_tag_inside_code_fence_stays_content():
    text = "<think>plan</think>Here is code:\n```xml\n<think>\nnot reasoning\n</think>\n```\nDone."
    reasoning, content = split_think(text)
    assert reasoning == "plan"
    assert content == "Here is code:\n```xml\n<think>\nnot reasoning\n</think>\n```\nDone."


def test_starts_inside_template_opened_block():
    text = "Let me think.\n</think>\n\nThe answer is 4."
    for cut in range(len(text) + 1):
        reasoning, content, _ = run_chunks([text[:cut], text[cut:]], starts_inside=True)
        assert (reasoning, content) == ("Let me think.", "The answer is 4.")


def test_starts_inside_swallows_a_leading_open_tag():
    text = "\n<think>\nsteps\n</think>\nAnswer"
    for cut in range(len(text) + 1):
        assert run_chunks([text[:cut], text[cut:]], starts_inside=True)[:2] == ("steps", "Answer")


def test_close_before_open_is_detected_in_whole_text():
    assert split_think("hidden steps</think>\n\nvisible") == ("hidden steps", "visible")


def test_close_before_open_in_stream_drops_the_tag():
    # Streamed text cannot be taken back: it stays content, the tag disappears.
    reasoning, content, _ = run_chunks(["steps", "</think>", "\n\nvisible"])
    assert reasoning == ""
    assert content == "stepsvisible"


def test_an_unclosed_block_without_content_is_the_answer():
    """Never an empty answer because of the parsing: with no `</think>` and no
    content, what was streamed as reasoning is handed back as the answer."""
    text = "<think>\nstill thinking when the tokens ran out </th"
    for cut in range(len(text) + 1):
        reasoning, content, events = run_chunks([text[:cut], text[cut:]])
        assert (reasoning, content) == ("", "still thinking when the tokens ran out </th")
        assert events[-1][0] == "answer"
    assert split_think(text) == ("", "still thinking when the tokens ran out </th")


def test_an_unclosed_block_after_content_stays_reasoning():
    text = "<think>a</think>\nFirst answer.\n<think>\nmore thoughts that never end"
    for cut in range(len(text) + 1):
        reasoning, content, events = run_chunks([text[:cut], text[cut:]])
        assert reasoning == "amore thoughts that never end"
        assert content == "First answer.\n"
        assert "answer" not in [k for k, _ in events]


def test_a_closed_empty_answer_is_not_turned_into_content():
    # The model thought and then said nothing: that is its answer, not ours to invent.
    for starts_inside in (False, True):
        reasoning, content, events = run_chunks(["<think>x</think>\n"], starts_inside)
        assert (reasoning, content) == ("x", "")


def test_multiple_blocks():
    text = "<think>one</think>\nFirst.\n<think>\ntwo\n</think>\nSecond."
    for cut in range(len(text) + 1):
        reasoning, content, events = run_chunks([text[:cut], text[cut:]])
        assert reasoning == "onetwo"
        assert content == "First.\nSecond."
        assert kinds_in_order(events) == ["reasoning", "content", "reasoning", "content"]


def test_empty_block_gives_no_reasoning():
    reasoning, content, events = run_chunks(["<think>\n\n</think>\n\nHi"])
    assert events == [("content", "Hi")]


def test_leading_whitespace_before_block_is_dropped():
    assert split_think("\n\n<think>r</think>c") == ("r", "c")


def test_whitespace_after_close_trimmed_across_chunks():
    reasoning, content, _ = run_chunks(["<think>r</think>", "\n", " \n", "\tanswer  end"])
    assert content == "answer  end"


def test_many_blocks_stay_fast_and_exact():
    text = "".join(f"<think>r{i}</think>\nc{i}\n" for i in range(10_000))
    reasoning, content = split_think(text)
    assert reasoning == "".join(f"r{i}" for i in range(10_000))
    assert content == "".join(f"c{i}\n" for i in range(10_000))


def test_multibyte_text_split_everywhere():
    text = "<think>Überlegung 🤔</think>Grüße 👋"
    for cut in range(len(text) + 1):
        assert run_chunks([text[:cut], text[cut:]])[:2] == ("Überlegung 🤔", "Grüße 👋")


def test_strip_think_for_history():
    assert strip_think("<think>\nsecret\n</think>\n\nAnswer.") == "Answer."
    assert strip_think("secret</think>Answer.") == "Answer."
    assert strip_think("Answer only.") == "Answer only."
    assert strip_think("Answer.\n<think>unfinished") == "Answer."
    openwebui = ('<details type="reasoning" done="true" duration="3">\n<summary>Thought for 3 '
                 'seconds</summary>\n&gt; secret\n</details>\nAnswer.')
    assert strip_think(openwebui) == "Answer."


# -- soft switches and the decision ---------------------------------------------

@pytest.mark.parametrize("text,cleaned,switch", [
    ("Hello /no_think", "Hello", False),
    ("/think Solve x+1=2", "Solve x+1=2", True),
    ("a /no_think b /think", "a b", True),
    ("no switch here", "no switch here", None),
    ("look in /usr/think/file and /thinking", "look in /usr/think/file and /thinking", None),
    ("path a/no_think", "path a/no_think", None),
    ("Stop /no_think.", "Stop .", False),
    ("line one\n/no_think\nline two", "line one\nline two", False),
])
def test_remove_soft_switches(text, cleaned, switch):
    assert remove_soft_switches(text) == (cleaned, switch)


@pytest.mark.parametrize("can,requested,text,policy,expected", [
    (True, None, "hi", False, (True, "hi")),
    (False, None, "hi /think", False, (False, "hi")),          # capability first
    (True, None, "hi /think", True, (False, "hi")),            # policy beats the user switch
    (True, False, "hi /think", False, (False, "hi")),          # an explicit off is hard
    (True, True, "hi /no_think", False, (False, "hi")),
    (True, None, "hi /no_think", False, (False, "hi")),
    (True, True, "hi", False, (True, "hi")),
    (True, None, None, False, (True, "")),
])
def test_resolve_thinking_precedence(can, requested, text, policy, expected):
    assert resolve_thinking(can, requested, text, policy) == expected


def test_starts_inside_with_an_immediate_close():
    text = "</think>\n\nDirect answer."
    for cut in range(len(text) + 1):
        reasoning, content, events = run_chunks([text[:cut], text[cut:]], starts_inside=True)
        assert (reasoning, content) == ("", "Direct answer.")
        assert kinds_in_order(events) == ["content"]


def test_no_tags_with_starts_inside_is_the_answer():
    """A non-thinking model behind a template that opens the block (Qwen3
    Instruct-2507) never writes </think>: its text is the answer, not reasoning."""
    text = "Just an answer.\nIn two lines."
    for cut in range(len(text) + 1):
        reasoning, content, events = run_chunks([text[:cut], text[cut:]], starts_inside=True)
        assert (reasoning, content) == ("", text)
        assert kinds_in_order(events) == ["reasoning", "answer"]
