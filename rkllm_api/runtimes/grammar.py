"""JSON Schema -> llama.cpp grammar (GBNF), for constrained decoding on the CPU runtime.

llama-cpp-python ships llama.cpp's schema converter (llama_cpp.llama_grammar); this
module adapts its output in one place: the converter's string rule lets raw control
characters (a newline, a tab) into a JSON string, which no JSON parser accepts, so
they are excluded here and a string can only hold them escaped.

The schema has been checked by rkllm_api.structured.schema before it gets here, so
only features the converter renders exactly arrive (see that module).
"""
from __future__ import annotations

import json

# The converter's rule for one character of a JSON string, and the JSON-safe one
# (the same exclusions as llama.cpp's own json.gbnf).
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


class GrammarError(ValueError):
    """The schema could not be turned into a grammar llama.cpp accepts."""


def gbnf_for_schema(schema_text: str) -> str:
    """The GBNF grammar (root rule "root") that only admits JSON valid against the
    schema (JSON text)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        json.loads(schema_text)
        grammar = json_schema_to_gbnf(schema_text)
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
        raise GrammarError(f"cannot build a grammar from the schema: {exc}") from exc
    return "\n".join(_JSON_CHAR + line[len(_LOOSE_CHAR):] if line.startswith(_LOOSE_CHAR)
                     else line for line in grammar.split("\n"))


class ConstrainedSampler:
    """Samples from a native sampler chain (llama_cpp's LlamaSampler.sampler) only tokens
    the schema's grammar allows; called like llama_sampler_sample(chain, ctx, idx).

    Applying a grammar to every token of the vocabulary each step is costly (tens of
    thousands of candidates against the grammar's stacks), so, as llama.cpp's own
    common sampler does: sample without the grammar first and ask the grammar about
    that one token; only when it refuses, apply the grammar to the whole vocabulary
    and sample again. Both samplers then accept the token. close() frees the grammar."""

    def __init__(self, lib, vocab, n_vocab: int, schema_text: str):
        import numpy

        self._lib, self._numpy, self._n_vocab = lib, numpy, n_vocab
        grammar = gbnf_for_schema(schema_text).encode("utf-8")
        self._grammar = lib.llama_sampler_init_grammar(vocab, grammar, b"root")
        if not self._grammar:
            raise GrammarError("llama.cpp could not compile the grammar made from the schema")
        kind = numpy.dtype([("id", numpy.intc), ("logit", numpy.single), ("p", numpy.single)],
                           align=True)
        self._ids = numpy.arange(n_vocab, dtype=numpy.intc)
        self._all = numpy.recarray((n_vocab,), dtype=kind)
        self._all_array = self._array(self._all)
        self._one = numpy.recarray((1,), dtype=kind)
        self._one_array = self._array(self._one)

    def _array(self, data):
        return self._lib.llama_token_data_array(
            data=data.ctypes.data_as(self._lib.llama_token_data_p), size=len(data),
            selected=-1, sorted=False)

    def __call__(self, chain, ctx, idx: int = -1) -> int:
        import ctypes

        lib = self._lib
        logits = self._numpy.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, idx),
                                                shape=(self._n_vocab,))
        token = self._pick(chain, logits, constrained=False)
        self._one[0] = (token, 0.0, 0.0)
        self._one_array.size, self._one_array.selected = 1, -1
        lib.llama_sampler_apply(self._grammar, ctypes.byref(self._one_array))
        if not self._numpy.isfinite(self._one.logit[0]):
            token = self._pick(chain, logits, constrained=True)
        lib.llama_sampler_accept(self._grammar, token)
        lib.llama_sampler_accept(chain, token)
        return token

    def _pick(self, chain, logits, constrained: bool) -> int:
        import ctypes

        data, array = self._all, self._all_array
        data.id[:] = self._ids
        data.logit[:] = logits
        data.p[:] = 0.0
        array.size, array.selected, array.sorted = self._n_vocab, -1, False
        if constrained:
            self._lib.llama_sampler_apply(self._grammar, ctypes.byref(array))
        self._lib.llama_sampler_apply(chain, ctypes.byref(array))
        return int(data.id[array.selected])

    def close(self) -> None:
        if self._grammar:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None
