"""The generation pipeline's stages on scripted event lists (no server needed)."""
import json

import pytest

from rkllm_api.errors import RequestError
from rkllm_api.openai import protocol
from rkllm_api.openai.routes import collect_body, render_sse
from rkllm_api.responses import FLUSH_MARK, coalesced
from rkllm_api.pipeline import (FLUSH, KEEP_ALIVE, ContentDelta, Failure, Finished, KeepAlive,
                                ReasoningDelta, StopSequenceFilter, ThinkingTransform,
                                ToolCallDelta, Usage, UsageReport, merge_tool_call_delta,
                                run_pipeline)

USAGE = UsageReport(Usage(5, 3))
split_thinking = ThinkingTransform()


def tokens(*texts, reason="stop"):
    return [ContentDelta(t) for t in texts] + [Finished(reason), USAGE]


def run_stop_filter(stops, events):
    hits = []
    out = list(StopSequenceFilter(stops, lambda: hits.append(True))(iter(events)))
    return out, len(hits)


def texts(events):
    return "".join(e.text for e in events if type(e) is ContentDelta)


def test_stop_sequence_split_across_tokens_is_cut_and_aborts():
    out, hits = run_stop_filter(["END"], tokens("Hello E", "N", "D more", "ignored"))
    assert texts(out) == "Hello "
    assert hits == 1
    finishes = [e.reason for e in out if type(e) is Finished]
    assert finishes == ["stop"]                      # the run's own Finished is swallowed
    assert type(out[-1]) is UsageReport              # usage still reaches the client


def test_stop_filter_holds_back_only_a_possible_prefix():
    events = iter(tokens("abc", "xy", "z"))
    stage = StopSequenceFilter(["xyz!"], lambda: None)(events)
    assert next(stage).text == "abc"      # nothing of "abc" can start the stop sequence
    # "xy" might grow into "xyz!": held; "xyz" too; at the end it is released.
    rest = list(stage)
    assert texts(rest) == "xyz" and rest[-2].reason == "stop"


def test_stop_filter_releases_near_miss_and_picks_earliest_stop():
    out, hits = run_stop_filter(["xyz"], tokens("x", "y", "a"))
    assert texts(out) == "xya" and hits == 0
    out, _ = run_stop_filter(["lo", "He"], tokens("Hello"))
    assert texts(out) == ""
    out, _ = run_stop_filter(["\n\n", "o w"], tokens("hell", "o world\n\n"))
    assert texts(out) == "hell"


def test_stop_at_very_start_emits_no_content():
    out, hits = run_stop_filter(["<|end|>"], tokens("<|", "end|>", "tail"))
    assert texts(out) == "" and hits == 1


def test_stop_filter_flushes_held_text_before_a_failure():
    out, _ = run_stop_filter(["STOP"], [ContentDelta("ok ST"), Failure("boom")])
    assert texts(out) == "ok ST" and type(out[-1]) is Failure


def test_split_thinking_turns_think_blocks_into_reasoning():
    out = list(split_thinking(iter(tokens("<thi", "nk>why", " so</th", "ink>Answer"))))
    reasoning = "".join(e.text for e in out if type(e) is ReasoningDelta)
    assert reasoning == "why so" and texts(out) == "Answer"
    assert type(out[-2]) is Finished and type(out[-1]) is UsageReport


def test_pipeline_chains_transforms_in_order():
    seen = []

    def tag(name):
        def transform(events):
            for event in events:
                seen.append(name)
                yield event
        return transform

    list(run_pipeline(iter([Finished("stop")]), [tag("a"), tag("b")]))
    assert seen == ["a", "b"]


def sse_payloads(lines):
    payloads = []
    for line in lines:
        if line.startswith("data: ") and line != protocol.DONE_LINE:
            payloads.append(json.loads(line[6:]))
    return payloads


def test_render_sse_order_role_content_finish_usage_done():
    chunks = protocol.ChatChunks("m", "fp", include_usage=True)
    events = [KEEP_ALIVE, ContentDelta("Hi"), ReasoningDelta("r"), Finished("length"), USAGE]
    lines = list(render_sse(iter(events), chunks))
    assert lines[1] == protocol.KEEP_ALIVE_LINE and lines[-1] == protocol.DONE_LINE
    payloads = sse_payloads(lines)
    assert [list(p["choices"][0]["delta"]) if p["choices"] else "usage" for p in payloads] == [
        ["role", "content"], ["content"], ["reasoning_content"], [], "usage"]
    assert payloads[3]["choices"][0]["finish_reason"] == "length"
    assert payloads[4]["usage"]["total_tokens"] == 8


def test_render_sse_without_include_usage_drops_usage():
    chunks = protocol.ChatChunks("m", "fp")
    payloads = sse_payloads(render_sse(iter(tokens("a")), chunks))
    assert all(p["choices"] for p in payloads) and all("usage" not in p for p in payloads)


def test_render_sse_failure_becomes_error_event_then_done():
    chunks = protocol.ChatChunks("m", "fp")
    lines = list(render_sse(iter([ContentDelta("a"), Failure("runtime broke")]), chunks))
    error = json.loads(lines[-2][6:])
    assert error["error"]["message"] == "runtime broke"
    assert error["error"]["type"] == "server_error" and lines[-1] == protocol.DONE_LINE


def test_collect_body_accumulates_the_same_events():
    chunks = protocol.ChatChunks("m", "fp")
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": ""}}
    events = [ReasoningDelta("why"), ContentDelta("a"), ContentDelta("b"),
              ToolCallDelta([call]), ToolCallDelta([{"index": 0, "function": {"arguments": "{}"}}]),
              Finished("tool_calls"), USAGE]
    body = collect_body(iter(events), chunks)
    message = body["choices"][0]["message"]
    assert message["content"] == "ab" and message["reasoning_content"] == "why"
    assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "f", "arguments": "{}"}}]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_collect_body_failure_is_a_500():
    with pytest.raises(RequestError) as err:
        collect_body(iter([ContentDelta("a"), Failure("x")]), protocol.ChatChunks("m", "fp"))
    assert err.value.status == 500


def test_merge_tool_call_delta_by_index():
    calls = []
    merge_tool_call_delta(calls, {"index": 1, "id": "b", "function": {"name": "g"}})
    merge_tool_call_delta(calls, {"index": 1, "function": {"arguments": "{\"x\":"}})
    merge_tool_call_delta(calls, {"index": 1, "function": {"arguments": "1}"}})
    assert calls[1]["function"] == {"name": "g", "arguments": "{\"x\":1}"}
    assert isinstance(KEEP_ALIVE, KeepAlive)


# ---- write coalescing ----

def test_coalesced_writes_the_first_piece_alone_then_joins_up_to_each_flush():
    pieces = ["role", "a", "b", FLUSH_MARK, "c", FLUSH_MARK, FLUSH_MARK, "d"]
    assert list(coalesced(iter(pieces))) == ["role", "ab", "c", "d"]


def test_coalesced_writes_at_least_every_max_batch_pieces():
    pieces = ["role"] + [str(i) for i in range(10)]   # a runtime faster than the writer
    assert list(coalesced(iter(pieces), max_batch=4)) == ["role", "0123", "4567", "89"]


def test_flush_events_become_flush_marks_and_change_nothing_else():
    chunks = protocol.ChatChunks("m", "fp")
    events = [ContentDelta("a"), FLUSH, ContentDelta("b"), Finished("stop"), USAGE]
    lines = list(render_sse(iter(events), chunks))
    assert FLUSH_MARK in lines
    written = "".join(coalesced(iter(lines)))
    assert written == "".join(line for line in lines if line)
