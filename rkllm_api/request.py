"""The typed request every surface parses its body into, once.

A surface (OpenAI today, Ollama next) validates its wire format and builds these
objects; from then on nobody reads the raw body. Content is typed parts (text,
image), so "the text of a message" and "the images of a message" are answered in
exactly one place (Message.text, Message.images).

Roles are normalised here: "developer" is a system message, "function" (the legacy
OpenAI name) a tool result.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Optional, Union

from rkllm_api.runtimes.base import SamplingParams

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    url: str               # a data: URL (what Open WebUI sends) or an http(s) URL
    detail: str = "auto"
    # The digest of the image's bytes, once read (vision_service): an http(s) URL may
    # serve other bytes tomorrow, so the URL alone cannot key the KV cache.
    content_digest: str = ""

    @property
    def digest(self) -> str:
        """Identifies the image in KV keys without keeping its bytes."""
        if self.content_digest:
            return self.content_digest
        return hashlib.sha1(self.url.encode("utf-8", "surrogatepass")).hexdigest()[:16]


ContentPart = Union[TextPart, ImagePart]


@dataclass(frozen=True)
class ToolCall:
    """A call the assistant made, as history: arguments are JSON text."""
    name: str
    arguments: str = ""
    id: str = ""


@dataclass(frozen=True)
class Message:
    role: str                               # one of ROLES
    parts: tuple = ()                       # ContentPart, in order
    tool_calls: tuple = ()                  # ToolCall (assistant)
    tool_call_id: str = ""                  # tool: the call this result answers
    name: str = ""                          # tool: the function; others: the author

    @property
    def text(self) -> str:
        return "\n".join(p.text for p in self.parts if type(p) is TextPart)

    @property
    def images(self) -> tuple:
        return tuple(p for p in self.parts if type(p) is ImagePart)

    def with_text(self, text: str) -> "Message":
        """The same message with its text replaced; its images stay, after the text."""
        return replace(self, parts=(TextPart(text),) + self.images)


def last_index(messages, role: str) -> Optional[int]:
    """Index of the last message with this role, or None."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == role:
            return index
    return None


@dataclass(frozen=True)
class ToolFunction:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=dict)

    def as_openai(self) -> dict:
        function = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolSpec:
    functions: tuple
    choice: str = "auto"              # "auto" | "none" | "required" | "named"
    forced_name: Optional[str] = None  # the function to call when choice == "named"
    legacy: bool = False              # functions/function_call request: answer with function_call
    parallel: bool = True             # several calls per answer allowed

    @property
    def names(self) -> tuple:
        return tuple(f.name for f in self.functions)

    def function(self, name: str) -> Optional[ToolFunction]:
        return next((f for f in self.functions if f.name == name), None)


@dataclass(frozen=True)
class ResponseFormat:
    kind: str = "text"                # "text" | "json_object" | "json_schema"
    schema: Optional[dict] = None
    name: str = ""
    strict: bool = False
    source: str = "response_format"   # the request field it came from (named in errors)


@dataclass(frozen=True)
class ChatRequest:
    model: Optional[str]              # None: the server's default model
    messages: tuple                   # Message
    stream: bool = False
    include_usage: bool = False
    max_tokens: Optional[int] = None  # the answer budget; None: the server's default
    stop: tuple = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tools: Optional[ToolSpec] = None
    thinking: Optional[bool] = None   # what the request asks: True, False, None (nothing)
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    use_cache: str = ""               # a named prompt cache of the model to start from
    context_length: Optional[int] = None  # a smaller prompt window than the model's (Ollama num_ctx)
    lora: Optional["LoraChoice"] = None   # a LoRA adapter of the model (`lora`, `<model>:<adapter>`)


@dataclass(frozen=True)
class CompletionRequest:
    model: Optional[str]
    prompt: str
    stream: bool = False
    include_usage: bool = False
    max_tokens: Optional[int] = None
    stop: tuple = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    context_length: Optional[int] = None  # a smaller prompt window than the model's
    lora: Optional["LoraChoice"] = None


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA adapter of the model, by name (never a path), and its weight; None
    scale = the adapter's default (model_config.json, else 1.0)."""
    name: str
    scale: Optional[float] = None


@dataclass(frozen=True)
class EmbeddingRequest:
    model: Optional[str]              # None: EMBEDDING_MODEL, an embedding model, the default
    inputs: tuple                     # str, or a tuple of token ids, per input
    dimensions: Optional[int] = None  # keep this many leading values (re-normalised)
    truncate: bool = False            # cut an input that is too long instead of refusing it


@dataclass(frozen=True)
class RerankRequest:
    model: Optional[str]
    query: str
    documents: tuple                  # str
    top_n: Optional[int] = None       # None: every document
    return_documents: bool = True
