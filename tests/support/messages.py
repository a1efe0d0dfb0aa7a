"""Typed request messages from the OpenAI dicts tests write, through the real wire
parser (so tests of prompts, clients and RAG see what a request would carry)."""
from rkllm_api.openai.protocol import parse_messages


def typed(messages) -> tuple:
    return parse_messages(list(messages))
