"""Embeddings and reranking, independent of the wire: which model embeds, and how a
rerank is scored. Surfaces (OpenAI's /v1/embeddings, the /v1/rerank of Jina and
Cohere, Ollama's /api/embed) parse their bodies into rkllm_api.request types and
call this; the vectors themselves come from Engine.embed().

Reranking scores each document in one of two ways, named in the response's model
field: by a reranker model ("<model> (reranker)": the probability of a "yes" answer
to a relevance question, rkllm_api/relevance.py) when the request names a model
marked as a reranker, or names none and a reranker is configured (RERANK_MODEL, else
the first model marked "reranker"); otherwise by the cosine similarity of each
document's embedding with the query's (both unit length, so a dot product;
"<model> (embedding similarity)"). Either way one engine call: one hold of the
device for the query and every document.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy

from rkllm_api import relevance
from rkllm_api.errors import RequestError, model_not_found
from rkllm_api.models import adapters
from rkllm_api.request import EmbeddingRequest, RerankRequest

SIMILARITY_METHOD = "embedding similarity"


@dataclass(frozen=True)
class Ranking:
    model_id: str
    method: str                  # how the scores were made (SIMILARITY_METHOD, relevance.METHOD)
    scores: tuple                # one per document, in document order
    prompt_tokens: int           # tokens embedded (query and documents), or judged

    @property
    def label(self) -> str:
        """The response's model field: the model, and how it scored."""
        return f"{self.model_id} ({self.method})"

    def order(self, top_n=None) -> list:
        """Document indexes, best first (ties keep document order), at most top_n."""
        ranked = sorted(range(len(self.scores)), key=lambda i: -self.scores[i])
        return ranked[:top_n] if top_n is not None else ranked


class EmbeddingService:
    def __init__(self, settings, registry, engine):
        self.settings = settings
        self.registry = registry
        self.engine = engine

    def model_for(self, name):
        """The model to embed with: the one named; else EMBEDDING_MODEL; else the first
        model marked "embedding"; else the default model. 404 when none resolves."""
        if name:
            info = self.registry.resolve(name)
            if info is None:
                _refuse_adapter_id(self.registry, name)
                raise model_not_found(name)
            return info
        configured = self.settings.embedding_model
        if configured:
            info = self.registry.resolve(configured)
            if info is None:
                raise model_not_found(configured)
            return info
        models = [m for m in self.registry.models() if getattr(m, "available", True)]
        marked = [m for m in models if "embedding" in m.capabilities]
        info = marked[0] if marked else self.registry.default_model()
        if info is None:
            raise model_not_found("(default)")
        return info

    def embed(self, req: EmbeddingRequest, caller=None):
        """engine.embedding.EmbeddingResult for the request. caller: the surface's
        responses.Caller (queue order, and a client that left stops the batch)."""
        info = self.model_for(req.model)
        return self.engine.embed(info.id, req.inputs, dimensions=req.dimensions,
                                 truncate=req.truncate, request_id=new_request_id("emb"),
                                 **_caller_options(caller))

    def scorer_for(self, name):
        """(ModelInfo, method) for a rerank request naming `name` (or None): a named
        model scores as a reranker when marked as one or when it is RERANK_MODEL, else
        by embedding similarity; without a name, RERANK_MODEL, else the first model
        marked "reranker", else the embedding model (model_for) by similarity."""
        configured = relevance.configured_model(self.settings)
        chosen = self.registry.resolve(configured) if configured else None
        if name:
            info = self.model_for(name)
            as_reranker = relevance.is_reranker(info) or (chosen is not None
                                                          and chosen.id == info.id)
            return info, relevance.METHOD if as_reranker else SIMILARITY_METHOD
        if configured and chosen is None:
            raise model_not_found(configured)
        if chosen is None:
            marked = [m for m in self.registry.models()
                      if getattr(m, "available", True) and relevance.is_reranker(m)]
            chosen = marked[0] if marked else None
        if chosen is not None:
            return chosen, relevance.METHOD
        return self.model_for(None), SIMILARITY_METHOD

    def rerank(self, req: RerankRequest, caller=None) -> Ranking:
        info, method = self.scorer_for(req.model)
        if method == relevance.METHOD:
            return self._judge(info, req, caller)
        # Long documents are cut rather than refused: one long page must not fail
        # the ranking of all the others.
        result = self.engine.embed(info.id, (req.query,) + tuple(req.documents),
                                   truncate=True, request_id=new_request_id("rerank"),
                                   **_caller_options(caller))
        vectors = numpy.asarray(result.vectors, dtype=numpy.float64)
        scores = vectors[1:] @ vectors[0]
        return Ranking(result.model.id, SIMILARITY_METHOD,
                       tuple(float(min(1.0, max(-1.0, s))) for s in scores),
                       result.prompt_tokens)

    def _judge(self, info, req: RerankRequest, caller=None) -> Ranking:
        """Scores from the reranker model: P(yes) for each document (0 to 1). Long
        documents lose their end rather than failing the ranking."""
        instruction = relevance.instruction_for(info)
        prompts = [relevance.judging_prompt(req.query, document, instruction)
                   for document in req.documents]
        model, rows, tokens = self.engine.next_token_logits(
            info.id, prompts, relevance.choices_for(info), system=relevance.SYSTEM,
            truncate=True, param="documents", request_id=new_request_id("rerank"),
            **_caller_options(caller))
        return Ranking(model.id, relevance.METHOD,
                       tuple(relevance.score(yes, no) for yes, no in rows), tokens)


def _refuse_adapter_id(registry, name: str) -> None:
    """A `<model>:<adapter>` id from /v1/models names a LoRA adapter: hidden-layer and
    logits runs take no adapter, so say so (400) rather than "does not exist" (404)
    for an id the model list shows."""
    base, adapter = adapters.split_id(name)
    info = registry.resolve(base) if adapter else None
    if info is not None and adapters.find(info, adapter) is not None:
        raise RequestError(f"'{name}' is a LoRA adapter of '{info.id}': embeddings and "
                           f"reranking take no adapter; use '{info.id}'", param="model",
                           code="lora_unsupported")


def _caller_options(caller) -> dict:
    """Engine.embed()/next_token_logits() keywords for a responses.Caller (or None)."""
    if caller is None:
        return {}
    return {"arrival": caller.arrival, "client_gone": caller.gone}


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
