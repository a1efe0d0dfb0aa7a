"""OpenAI's embeddings endpoint: POST /v1/embeddings (and /embeddings).

Request: `input` is a string, a list of strings, a list of token ids or a list of
token-id lists; `encoding_format` "float" (default) or "base64" (little-endian
float32, what the `openai` package asks for by default); `dimensions` keeps that
many leading values, normalised again (400 above the model's width); `model` may be
left out (EMBEDDING_MODEL, else an embedding model, else the default model). Unknown
fields (`user`, Open WebUI's prefix field) are ignored; `lora` (and an adapter's
`<model>:<adapter>` id) is a 400: no adapter applies to embeddings.

Vectors are unit length and rounded to float32, so the float and base64 forms of
one answer carry exactly the same numbers.
"""
from __future__ import annotations

import base64

import numpy
from flask import Blueprint, jsonify

from rkllm_api.errors import RequestError
from rkllm_api.request import EmbeddingRequest
from rkllm_api.responses import caller, json_body
from rkllm_api.server import current_server

blueprint = Blueprint("embeddings", __name__)

ENCODING_FORMATS = ("float", "base64")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _model(body: dict):
    value = body.get("model")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise RequestError("'model' must be a string", param="model")
    return value.strip()


def _token_ids(value: list, param: str) -> tuple:
    if not value:
        raise RequestError(f"'{param}' is an empty token array", param=param)
    if not all(_is_int(token) and 0 <= token < 2 ** 31 for token in value):
        raise RequestError(f"'{param}' must hold token ids: integers from 0 to 2^31-1",
                           param=param)
    return tuple(value)


def _text(value: str, param: str) -> str:
    if not value:
        raise RequestError(f"'{param}' is an empty string", param=param)
    return value


def parse_inputs(value, max_inputs: int) -> tuple:
    """`input` as a tuple of texts and token-id tuples."""
    if isinstance(value, str):
        return (_text(value, "input"),)
    if not isinstance(value, list) or not value:
        raise RequestError("'input' must be a non-empty string, a list of strings, a token "
                           "array or a list of token arrays", param="input")
    if len(value) > max_inputs:
        raise RequestError(f"'input' may hold at most {max_inputs} items (EMBED_MAX_INPUTS)",
                           param="input")
    if all(_is_int(item) for item in value):   # one token array
        return (_token_ids(value, "input"),)
    inputs = []
    for index, item in enumerate(value):
        param = f"input[{index}]"
        if isinstance(item, str):
            inputs.append(_text(item, param))
        elif isinstance(item, list):
            inputs.append(_token_ids(item, param))
        else:
            raise RequestError(f"'{param}' must be a string or a token array", param=param)
    return tuple(inputs)


def parse_embedding_request(body, max_inputs: int) -> tuple:
    """(EmbeddingRequest, encoding_format) for a /v1/embeddings body."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if "input" not in body:
        raise RequestError("'input' is required", param="input")
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODING_FORMATS:
        raise RequestError("'encoding_format' must be 'float' or 'base64'",
                           param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
        raise RequestError("'dimensions' must be an integer >= 1", param="dimensions")
    refuse_lora(body)
    return EmbeddingRequest(_model(body), parse_inputs(body["input"], max_inputs),
                            dimensions), encoding


def refuse_lora(body: dict) -> None:
    """The `lora` field of chat requests: a hidden-layer (or logits) run takes no
    adapter, and vectors from the base model under an adapter's name would be wrong
    without a word, so it is a 400 (also for /v1/rerank)."""
    if body.get("lora") is not None:
        raise RequestError("'lora' applies to chat and completion requests only: "
                           "embeddings and reranking take no LoRA adapter", param="lora",
                           code="lora_unsupported")


def encode_vector(vector, encoding: str):
    values = numpy.asarray(vector, dtype="<f4")
    if encoding == "base64":
        return base64.b64encode(values.tobytes()).decode("ascii")
    return values.tolist()


def embeddings_body(result, encoding: str) -> dict:
    tokens = int(result.prompt_tokens)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": index,
                  "embedding": encode_vector(vector, encoding)}
                 for index, vector in enumerate(result.vectors)],
        "model": result.model.id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def create_embeddings():
    server = current_server()
    req, encoding = parse_embedding_request(json_body(), server.settings.embed_max_inputs)
    result = server.embeddings.embed(req, caller())
    return jsonify(embeddings_body(result, encoding))


for _path in ("/v1/embeddings", "/embeddings"):
    blueprint.add_url_rule(_path, "embeddings" + _path, create_embeddings, methods=["POST"])
