"""From a runtime's last hidden layer to embedding vectors: pooling, L2 normalisation
and shortening, done here and nowhere else (runtimes hand over unpooled rows).

Pooling per model, first found wins:
  model_config.json "pooling" ("mean", "last", "first"; "cls" means "first")
  -> what the model file declares (a GGUF's <arch>.pooling_type, via the runtime)
  -> the name: decoder embedding models that read the last token (Qwen3-Embedding,
     gte-Qwen, e5-mistral, SFR-Embedding) -> "last"
  -> "mean" (what any chat model embeds with).
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Optional

import numpy

CONFIG_KEY = "pooling"
# Decoder-only embedding models trained to read the hidden state of the last token.
_LAST_TOKEN_NAMES = re.compile(r"qwen3-embed|gte-qwen|e5-mistral|sfr-embed|linq-embed|"
                               r"nv-embed|llm2vec")


class Pooling(str, enum.Enum):
    MEAN = "mean"      # average of every token's row
    LAST = "last"      # the last token's row
    FIRST = "first"    # the first token's row (BERT's [CLS])

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value) -> Optional["Pooling"]:
        if not isinstance(value, str):
            return None
        value = value.strip().lower()
        if value == "cls":
            return cls.FIRST
        try:
            return cls(value)
        except ValueError:
            return None


def pooling_for(model, declared: Optional[str] = None) -> Pooling:
    """The pooling to use for a registry.ModelInfo; `declared` is the runtime's
    embedding_pooling (None when the model file says nothing)."""
    for candidate in ((model.config or {}).get(CONFIG_KEY), declared):
        pooling = Pooling.parse(candidate)
        if pooling is not None:
            return pooling
    if _LAST_TOKEN_NAMES.search(model.id):
        return Pooling.LAST
    return Pooling.MEAN


def pool(rows, pooling: Pooling) -> numpy.ndarray:
    """One vector from a (tokens x width) array. Summed in float64 so the result does
    not depend on how the rows were laid out in memory."""
    rows = numpy.asarray(rows, dtype=numpy.float64)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError("the runtime returned no hidden-layer rows")
    if pooling is Pooling.LAST:
        return rows[-1].copy()
    if pooling is Pooling.FIRST:
        return rows[0].copy()
    return rows.mean(axis=0)


def normalise(vector: numpy.ndarray) -> numpy.ndarray:
    """Unit length (L2); a zero vector stays zero rather than becoming NaN."""
    norm = float(numpy.linalg.norm(vector))
    return vector / norm if norm > 0.0 else vector


def embedding_vector(rows, pooling: Pooling, dimensions: Optional[int] = None) -> list:
    """Pool, normalise, and when `dimensions` is given keep that many leading values
    and normalise again (what OpenAI's `dimensions` does). A list of Python floats."""
    vector = normalise(pool(rows, pooling))
    if dimensions is not None and dimensions < vector.shape[0]:
        vector = normalise(vector[:dimensions])
    return vector.tolist()


@dataclass(frozen=True)
class EmbeddingResult:
    """What Engine.embed() returns."""
    model: object            # registry.ModelInfo of the model that embedded
    vectors: list            # one list of floats per input, unit length, in input order
    prompt_tokens: int       # hidden-layer rows over all inputs (tokens embedded)
    pooling: Pooling
    width: int               # the model's full width (before `dimensions`)
