"""The rerank surface: POST /v1/rerank (also /rerank and /v2/rerank), in the shape
Jina and Cohere define and Open WebUI's external reranker sends:

    {"model": "...", "query": "...", "documents": ["...", ...], "top_n": 3}

Documents may also be objects with a "text" (Jina, Cohere v1). The answer lists the
documents best first, each with its `index` in the request and its
`relevance_score`; `return_documents` (default true) adds `{"text": ...}`.
Scores come from a reranker model (0 to 1, "<model> (reranker)" in the response's
model field) or are cosine similarities of embeddings (-1 to 1, "<model> (embedding
similarity)"); which one is EmbeddingService.scorer_for's choice (embeddings.py).
Refusals use OpenAI's error format, like every surface without its own.
"""
from __future__ import annotations

from flask import Blueprint, jsonify

from rkllm_api.embeddings import new_request_id
from rkllm_api.errors import RequestError
from rkllm_api.openai.embeddings import refuse_lora
from rkllm_api.request import RerankRequest
from rkllm_api.responses import caller, json_body
from rkllm_api.server import current_server

blueprint = Blueprint("rerank", __name__)


def _document_text(item, index: int) -> str:
    param = f"documents[{index}]"
    if isinstance(item, dict):
        item = item.get("text")
    if not isinstance(item, str):
        raise RequestError(f"'{param}' must be a string or an object with a 'text' string",
                           param=param)
    if not item.strip():
        raise RequestError(f"'{param}' is empty", param=param)
    return item


def parse_rerank_request(body, max_documents: int) -> RerankRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", param="model")
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise RequestError("'query' must be a non-empty string", param="query")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise RequestError("'documents' must be a non-empty list", param="documents")
    if len(documents) >= max_documents:
        raise RequestError(f"'documents' may hold at most {max_documents - 1} items "
                           "(EMBED_MAX_INPUTS, the query included)", param="documents")
    top_n = body.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool)
                              or top_n < 1):
        raise RequestError("'top_n' must be an integer >= 1", param="top_n")
    return_documents = body.get("return_documents")
    if return_documents is None:   # null is the default, as for top_n
        return_documents = True
    if not isinstance(return_documents, bool):
        raise RequestError("'return_documents' must be a boolean", param="return_documents")
    refuse_lora(body)
    return RerankRequest(
        model=(model or "").strip() or None, query=query,
        documents=tuple(_document_text(item, i) for i, item in enumerate(documents)),
        top_n=top_n, return_documents=return_documents)


def rerank_body(req: RerankRequest, ranking) -> dict:
    results = []
    for index in ranking.order(req.top_n):
        result = {"index": index, "relevance_score": ranking.scores[index]}
        if req.return_documents:
            result["document"] = {"text": req.documents[index]}
        results.append(result)
    tokens = ranking.prompt_tokens
    return {"id": new_request_id("rerank"), "object": "list", "model": ranking.label,
            "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def rerank():
    server = current_server()
    req = parse_rerank_request(json_body(), server.settings.embed_max_inputs)
    return jsonify(rerank_body(req, server.embeddings.rerank(req, caller())))


for _path in ("/v1/rerank", "/rerank", "/v2/rerank"):
    blueprint.add_url_rule(_path, "rerank" + _path, rerank, methods=["POST"])
