"""The answer to a structured-output request: validated, retried once, or refused.

    validated_answer(contract, events, retry, live)

wraps the pipeline events of the first run (rkllm_api/pipeline.py). At the end of a
run the answer is checked against the contract (schema.OutputContract.check):

  * valid: it is the answer (Finished "stop");
  * invalid, first attempt, not live: `retry(bad_answer, error)` starts a second run
    whose prompt shows the model its answer and what was wrong with it; its events
    are checked the same way;
  * still invalid: the contract's fallback answer when it has one (Open WebUI's
    background tasks, whose callers only need something that parses), else a
    refusal: Finished("error", error=...) -- the surface writes a finish reason
    "error" and an error field instead of JSON that does not validate.

Buffered (live=False): content is held until it validated and then sent as one
delta (keep-alives and flushes still pass, so a streaming client sees the
connection alive). Live (live=True, for a runtime that decodes under the schema's
grammar): content streams as it comes and is only checked at the end, where an
answer the grammar could not finish (cut at max_tokens or by a server limit) is
refused; there is no retry, the text is already out.

Usage and timings of every attempt are added up: the reply reports all the work.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional

from rkllm_api import pipeline

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2

Retry = Callable[[str, str], Iterator]   # (bad answer, what is wrong) -> the next run's events


class _Attempt:
    """What one run produced, folded from its events."""

    def __init__(self):
        self.parts: list = []
        self.finish = "stop"
        self.usage: Optional[pipeline.Usage] = None
        self.failure: Optional[str] = None

    @property
    def content(self) -> str:
        return "".join(self.parts)


def _run_attempt(events: Iterator, attempt: _Attempt, live: bool) -> Iterator:
    """Pass on what may go out now; fold the rest into `attempt`."""
    try:
        for event in events:
            kind = type(event)
            if kind is pipeline.ContentDelta:
                attempt.parts.append(event.text)
                if live:
                    yield event
            elif kind is pipeline.Finished:
                attempt.finish = event.reason
            elif kind is pipeline.UsageReport:
                attempt.usage = event.usage
            elif kind is pipeline.Failure:
                attempt.failure = event.message
                return
            elif kind is not pipeline.ToolCallDelta:
                yield event   # reasoning, keep-alives, flushes
    finally:
        close = getattr(events, "close", None)   # a generator: end its run with it
        if close is not None:
            close()


def _cut_short(attempt: _Attempt, error: str) -> str:
    if attempt.finish == "length":
        return f"the answer was cut off before it was complete ({error})"
    return error


def validated_answer(contract, events: Iterator, retry: Retry, live: bool = False) -> Iterator:
    """The events of a reply whose content must satisfy `contract` (see module doc)."""
    usage: Optional[pipeline.Usage] = None
    error = ""
    for number in range(1, MAX_ATTEMPTS + 1):
        attempt = _Attempt()
        yield from _run_attempt(events, attempt, live)
        if attempt.failure is not None:
            yield pipeline.Failure(attempt.failure)
            return
        usage = (attempt.usage or pipeline.Usage(0, 0)).plus(usage)
        error, cleaned = contract.check(attempt.content)
        if error is None:
            if not live:
                yield pipeline.ContentDelta(cleaned)
            yield pipeline.Finished("stop")
            yield pipeline.UsageReport(usage)
            return
        error = _cut_short(attempt, error)
        log.info("structured output attempt %d rejected: %s", number, error)
        if live or number == MAX_ATTEMPTS:
            break
        try:
            events = retry(attempt.content, error)
        except Exception as exc:   # the device is busy, the model failed to load ...
            yield pipeline.Failure(f"the retry of an invalid structured answer failed: {exc}")
            return
    if contract.fallback is not None and not live:
        yield pipeline.ContentDelta(contract.fallback)
        yield pipeline.Finished("stop")
    else:
        tries = "attempt" if live else f"{MAX_ATTEMPTS} attempts"
        yield pipeline.Finished("error", error=f"the model's answer does not match the "
                                               f"requested format after {tries}: {error}")
    yield pipeline.UsageReport(usage)
