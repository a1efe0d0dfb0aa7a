"""Embeddings and reranking, independent of the wire: which model embeds, and how a
rerank is scored. Surfaces (OpenAI's /v1/embeddings, the /v1/rerank of Jina and
Cohere, Ollama's /api/embed) parse their bodies into rkllm_api.request types and
call this; the vectors themselves come from Engine.embed().

Reranking scores each document by the cosine similarity of its embedding with the
query's (both unit length, so a dot product), computed in one engine call: one
hold of the device for the query and every document. The method is named in the
response's model field ("<model> (embedding similarity)").
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy

from rkllm_api.errors import model_not_found
from rkllm_api.request import EmbeddingRequest, RerankRequest

SIMILARITY_METHOD = "embedding similarity"


@dataclass(frozen=True)
class Ranking:
    model_id: str
    method: str                  # how the scores were made (SIMILARITY_METHOD)
    scores: tuple                # one per document, in document order
    prompt_tokens: int           # tokens embedded (query and documents)

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

    def embed(self, req: EmbeddingRequest):
        """engine.embedding.EmbeddingResult for the request."""
        info = self.model_for(req.model)
        return self.engine.embed(info.id, req.inputs, dimensions=req.dimensions,
                                 truncate=req.truncate, request_id=new_request_id("emb"))

    def rerank(self, req: RerankRequest) -> Ranking:
        info = self.model_for(req.model)
        # Long documents are cut rather than refused: one long page must not fail
        # the ranking of all the others.
        result = self.engine.embed(info.id, (req.query,) + tuple(req.documents),
                                   truncate=True, request_id=new_request_id("rerank"))
        vectors = numpy.asarray(result.vectors, dtype=numpy.float64)
        scores = vectors[1:] @ vectors[0]
        return Ranking(result.model.id, SIMILARITY_METHOD,
                       tuple(float(min(1.0, max(-1.0, s))) for s in scores),
                       result.prompt_tokens)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
