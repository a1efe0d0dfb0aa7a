"""Real clients against a live server: the official `openai` package and LiteLLM,
streaming and not, on the NPU double and on the CPU runtime (bundled SmolLM2)."""
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch at import

import openai  # noqa: E402
import pytest  # noqa: E402

from support.live_server import NPU_MODEL_ID  # noqa: E402

CPU_MODEL_ID = "smollm2-135m-instruct"
DOUBLE_ANSWER = "Hello from the NPU double."
MESSAGES = [{"role": "user", "content": "Say hello in three words."}]
MAX_TOKENS = 12
# LiteLLM trips over pydantic deprecations of its own; they are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", params=["npu", "cpu"])
def target(request):
    """(server, model id, expected answer or None for a real model)."""
    if request.param == "npu":
        return request.getfixturevalue("npu_server"), NPU_MODEL_ID, DOUBLE_ANSWER
    return request.getfixturevalue("cpu_server"), CPU_MODEL_ID, None


def check_answer(text, expected):
    assert isinstance(text, str) and text
    if expected is not None:
        assert text == expected


def check_usage(usage):
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.fixture(scope="module")
def client(target):
    server, _, _ = target
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def test_openai_lists_the_model(client, target):
    _, model, _ = target
    assert model in [m.id for m in client.models.list()]
    assert client.models.retrieve(model).id == model


def test_openai_chat(client, target):
    _, model, expected = target
    reply = client.chat.completions.create(model=model, messages=MESSAGES,
                                           max_tokens=MAX_TOKENS)
    assert reply.model == model and reply.system_fingerprint
    check_answer(reply.choices[0].message.content, expected)
    assert reply.choices[0].finish_reason in ("stop", "length")
    check_usage(reply.usage)


def test_openai_chat_stream_with_usage(client, target):
    _, model, expected = target
    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check_answer(text, expected)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].choices == []
    check_usage(chunks[-1].usage)
    assert chunks[-1].usage.completion_tokens == (len(chunks) - 3 if expected else
                                                  chunks[-1].usage.completion_tokens)


def test_openai_completions(client, target):
    _, model, expected = target
    reply = client.completions.create(model=model, prompt="Once upon a time",
                                      max_tokens=MAX_TOKENS)
    check_answer(reply.choices[0].text, expected)
    check_usage(reply.usage)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=MAX_TOKENS, stream=True)
        if c.choices)
    check_answer(streamed, expected)


def test_openai_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)


def test_litellm_chat_and_stream(target):
    import litellm
    server, model, expected = target
    common = {"model": f"openai/{model}", "api_base": server.base_url, "api_key": "x",
              "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    reply = litellm.completion(**common)
    check_answer(reply.choices[0].message.content, expected)
    check_usage(reply.usage)
    chunks = list(litellm.completion(**common, stream=True,
                                     stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check_answer(text, expected)
    usages = [getattr(c, "usage", None) for c in chunks]
    check_usage([u for u in usages if u is not None][-1])
