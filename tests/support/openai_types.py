"""Every OpenAI-format body a live server sends, checked against the `openai`
package's own types (strict pydantic validation): chat completions, their chunks,
text completions, embeddings (float format) and error objects. live_server.py runs this on every JSON reply
and every SSE payload, so each live test validates the wire as a side effect."""
from __future__ import annotations

from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.shared import ErrorObject

_BY_OBJECT = {"chat.completion": ChatCompletion, "chat.completion.chunk": ChatCompletionChunk,
              "text_completion": Completion}


def validate_openai_payload(payload) -> None:
    """Raise (pydantic.ValidationError or AssertionError) when payload is not what
    the openai package accepts. Bodies of other surfaces pass through."""
    if not isinstance(payload, dict):
        return
    kind = _BY_OBJECT.get(payload.get("object"))
    if kind is Completion and payload.get("choices") and \
            payload["choices"][0].get("finish_reason") is None:
        # The SDK types a completion's finish_reason as never null, yet a stream
        # carries null until its last chunk (so does OpenAI's own API, and the SDK
        # builds stream chunks without validating them): check the rest.
        payload = {**payload, "choices": [{**payload["choices"][0], "finish_reason": "stop"}]}
    if kind is None and _is_float_embedding_list(payload):
        kind = CreateEmbeddingResponse
    if kind is not None:
        kind.model_validate(payload, strict=True)
    elif isinstance(payload.get("error"), dict):
        ErrorObject.model_validate(payload["error"], strict=True)
        assert payload["error"]["message"], payload


def _is_float_embedding_list(payload: dict) -> bool:
    """An /v1/embeddings body in the float format (the SDK types base64 bodies only
    after decoding them itself)."""
    data = payload.get("data")
    return (payload.get("object") == "list" and isinstance(data, list) and bool(data)
            and all(isinstance(item, dict) and item.get("object") == "embedding"
                    and isinstance(item.get("embedding"), list) for item in data))
