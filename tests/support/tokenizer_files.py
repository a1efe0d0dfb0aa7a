"""A small Hugging Face tokenizer for a model folder, written with the `tokenizers`
package: a byte-level BPE trained on a few sentences (so any text encodes), ChatML
special tokens, and a tokenizer_config.json with a ChatML chat template."""
from __future__ import annotations

import json
import os

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "You are a helpful assistant. Answer briefly and to the point.",
    "What is my name? My name is Alex. Turn on the kitchen light, please.",
    "The living room lamp is on. Current time: 12:00:00. Available devices: light, switch.",
    "Tool result: the service was called. The weather is sunny and warm today.",
]


def write_tokenizer(folder: str, template: str = CHATML_TEMPLATE) -> str:
    """tokenizer.json + tokenizer_config.json in folder; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    config = {"chat_template": template, "bos_token": None, "eos_token": "<|im_end|>"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return folder


def encode(folder: str, text: str) -> list:
    """Token ids of text by the folder's tokenizer (special tokens in the text count)."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids


def render_chatml(messages) -> str:
    """The CHATML_TEMPLATE's rendering of (role, content) pairs, written out by hand
    so the test does not use the code it checks."""
    text = ""
    if messages[0][0] != "system":
        text += "<|im_start|>system\nYou are a test model.<|im_end|>\n"
    for role, content in messages:
        text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"
