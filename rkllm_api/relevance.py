"""Relevance scored by a reranker model: the judging prompt, the answer's two choices
and the score they give. Wire-independent; EmbeddingService.rerank() uses it and the
engine runs it (Engine.next_token_logits).

The method is Qwen3-Reranker's: a causal LM is asked whether a document meets a
query ("the answer can only be yes or no") and the score is the probability of "yes"
against "no" as the first token of its answer, from the logits of that one position
(nothing is generated). Qwen3-Reranker was trained on exactly this prompt; any chat
model can be asked it (how well a small one judges is another matter).

A model is a reranker when its name says so (registry: "rerank") or its
model_config.json lists the capability "reranker"; RERANK_MODEL names the model a
rerank request without a model uses, and makes that model score as a reranker even
when unmarked. model_config.json's "reranker" block may set "instruction" (the
<Instruct> line) and "tokens" ({"yes": id, "no": id}): the NPU runtime has no
tokenizer, so there the answer's tokens must be given as ids.
"""
from __future__ import annotations

import math
from typing import Optional

CAPABILITY = "reranker"
METHOD = "reranker"                  # the response's model field: "<model> (reranker)"
CONFIG_KEY = "reranker"
# Qwen3-Reranker's system text and default instruction, word for word.
SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the '
          'Instruct provided. Note that the answer can only be "yes" or "no".')
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
YES, NO = "yes", "no"


def is_reranker(model) -> bool:
    """A registry.ModelInfo marked as a reranker (by name or model_config.json)."""
    return CAPABILITY in model.capabilities


def _block(model) -> dict:
    block = (model.config or {}).get(CONFIG_KEY)
    return block if isinstance(block, dict) else {}


def instruction_for(model) -> str:
    text = _block(model).get("instruction")
    return text.strip() if isinstance(text, str) and text.strip() else INSTRUCTION


def choices_for(model) -> tuple:
    """(yes, no) as the runtime takes them: token ids from model_config.json when both
    are given (the NPU needs them), else the words (the CPU tokenizes them)."""
    tokens = _block(model).get("tokens")
    if isinstance(tokens, dict):
        yes, no = tokens.get(YES), tokens.get(NO)
        if all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in (yes, no)):
            return yes, no
    return YES, NO


def judging_prompt(query: str, document: str, instruction: str = INSTRUCTION) -> str:
    """The user turn: the document last, so a prompt too long loses the document's end."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def score(yes_logit: float, no_logit: float) -> float:
    """P(yes) between the two answers: softmax over (yes, no) = sigmoid(yes - no), 0 to 1,
    written so that a large difference neither overflows nor loses the result."""
    difference = float(yes_logit) - float(no_logit)
    if difference >= 0:
        return 1.0 / (1.0 + math.exp(-difference))
    odds = math.exp(difference)
    return odds / (1.0 + odds)


def configured_model(settings) -> Optional[str]:
    """RERANK_MODEL, or None when unset."""
    name = (getattr(settings, "rerank_model", "") or "").strip()
    return name or None
