"""/v1/embeddings and /v1/rerank on a real gunicorn: the `openai` client, Open WebUI's
recorded request shapes (tests/fixtures/openwebui/v0.12.4/retrieval/), refusals in
OpenAI's error format, and a conversation in the KV cache surviving an embedding
request (SmolLM2 on the CPU; the librkllmrt double on the NPU)."""
from __future__ import annotations

import base64
import json
import os
import socket
import time

import numpy
import openai
import pytest
import requests

from support.live_server import start_cpu_server, start_npu_server

MODEL = "smollm2-135m-instruct"
RETRIEVAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "openwebui",
                         "v0.12.4", "retrieval")
TEXTS = ["The cat sat on the mat.", "Quarterly revenue grew by ten percent.", "Ça va? 你好 🗼"]


def recorded(name: str) -> dict:
    with open(os.path.join(RETRIEVAL, name), encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def server(live_servers):
    return start_cpu_server(live_servers, EMBED_MAX_INPUTS="6")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


def norm(vector) -> float:
    return float(numpy.linalg.norm(numpy.asarray(vector, dtype=numpy.float64)))


# ---- the openai client ---------------------------------------------------------------
def test_the_openai_client_gets_unit_vectors_of_the_model_width(client):
    # the client asks for base64 by default and decodes it itself
    response = client.embeddings.create(model=MODEL, input=TEXTS)
    assert response.model == MODEL and response.object == "list"
    assert [item.index for item in response.data] == [0, 1, 2]
    assert all(len(item.embedding) == 576 for item in response.data)
    assert all(norm(item.embedding) == pytest.approx(1.0, abs=1e-5) for item in response.data)
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS)


def test_base64_and_float_carry_the_same_numbers(client, server):
    as_base64 = client.embeddings.create(model=MODEL, input=TEXTS[0])
    as_float = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert as_float.data[0].embedding == as_base64.data[0].embedding
    raw = server.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64",
                                              "model": MODEL}).json()
    decoded = numpy.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == as_float.data[0].embedding


def test_the_same_input_gives_the_same_vector_alone_or_in_a_batch(client):
    batch = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    for text, item in zip(TEXTS, batch.data):
        alone = client.embeddings.create(model=MODEL, input=[text], encoding_format="float")
        assert alone.data[0].embedding == item.embedding
    assert batch.data[0].embedding != batch.data[1].embedding


def test_dimensions_shorten_and_renormalise(client):
    full = client.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float")
    short = client.embeddings.create(model=MODEL, input=TEXTS[1], dimensions=64,
                                     encoding_format="float")
    vector = short.data[0].embedding
    assert len(vector) == 64 and norm(vector) == pytest.approx(1.0, abs=1e-5)
    prefix = numpy.asarray(full.data[0].embedding[:64], dtype=numpy.float64)
    assert vector == pytest.approx((prefix / numpy.linalg.norm(prefix)).tolist(), abs=1e-6)


def test_token_arrays_embed_like_their_text(client, server):
    ids = [504, 2644, 30]
    one = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    many = client.embeddings.create(model=MODEL, input=[ids, ids[:2]], encoding_format="float")
    assert one.data[0].embedding == many.data[0].embedding
    assert len(many.data) == 2 and many.usage.prompt_tokens == 5


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input[1]"),
    ({"input": ["ok", 7]}, "input[1]"),
    ({"input": [[1, -2]]}, "input[0]"),
    ({"input": [[1, True]]}, "input[0]"),
    ({"input": [[]]}, "input[0]"),
    ({"input": {"text": "hi"}}, "input"),
    ({"input": ["a"] * 7}, "input"),                     # EMBED_MAX_INPUTS=6
    ({"input": "hi", "dimensions": 577}, "dimensions"),
    ({"input": "hi", "dimensions": 0}, "dimensions"),
    ({"input": "hi", "dimensions": "64"}, "dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": [[10 ** 8]]}, "input[0]"),               # outside the vocabulary
    ({"input": "word " * 3000}, "input[0]"),            # longer than the embedding context
    ({"input": "hi", "model": 5}, "model"),
    ({}, "input"),
])
def test_bad_requests_are_400s_naming_the_field(server, body, param):
    response = server.post("/v1/embeddings", json={"model": MODEL, **body}
                           if "model" not in body else body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_refusals_reach_the_openai_client_as_its_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")
    with pytest.raises(openai.BadRequestError, match="at most 576"):
        client.embeddings.create(model=MODEL, input="hi", dimensions=4096)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input="word " * 3000)
    assert refused.value.code == "context_length_exceeded"


def test_a_body_that_is_not_json_or_too_big_is_refused(server):
    assert server.post("/v1/embeddings", data=b"{not json",
                       headers={"Content-Type": "application/json"}).status_code == 400
    lone = b'{"input": "\\ud800"}'
    assert server.post("/v1/embeddings", data=lone,
                       headers={"Content-Type": "application/json"}).status_code == 400


# ---- Open WebUI ----------------------------------------------------------------------
def test_open_webui_embedding_request_as_it_sends_it(server):
    fixture = recorded("embeddings.json")
    response = requests.post(server.url + fixture["path"], headers=fixture["headers"],
                             data=json.dumps(fixture["body"]), timeout=120)
    response.raise_for_status()
    data = response.json()
    vectors = [elem["embedding"] for elem in data["data"]]   # how Open WebUI reads it
    assert len(vectors) == len(fixture["body"]["input"])
    assert all(len(v) == 576 and norm(v) == pytest.approx(1.0, abs=1e-5) for v in vectors)


def test_open_webui_external_reranker_request_as_it_sends_it(server):
    fixture = recorded("rerank.json")
    response = requests.post(server.url + fixture["path"], headers=fixture["headers"],
                             json=fixture["body"], timeout=120)
    response.raise_for_status()
    data = response.json()
    # ExternalReranker.predict: results sorted by index, relevance_score each
    scores = [r["relevance_score"] for r in sorted(data["results"], key=lambda x: x["index"])]
    documents = fixture["body"]["documents"]
    assert len(scores) == len(documents) and all(-1.0 <= s <= 1.0 for s in scores)
    # the document equal to the query is the query's own vector: similarity 1, first
    assert scores[1] == pytest.approx(1.0, abs=1e-6)
    assert data["results"][0]["index"] == 1
    assert [r["relevance_score"] for r in data["results"]] == sorted(scores, reverse=True)
    assert data["model"] == f"{MODEL} (embedding similarity)"
    assert data["results"][0]["document"] == {"text": documents[1]}


def test_rerank_takes_cohere_and_jina_shapes_and_top_n(server):
    body = {"query": "capital of France", "top_n": 2, "return_documents": False,
            "documents": [{"text": "Paris is the capital of France."}, "capital of France",
                          "Bananas are yellow."]}
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        data = server.post(path, json=body).json()
        assert [r["index"] for r in data["results"]][:1] == [1]
        assert len(data["results"]) == 2 and "document" not in data["results"][0]
        assert data["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("body, param", [
    ({"documents": ["a"]}, "query"),
    ({"query": "", "documents": ["a"]}, "query"),
    ({"query": "q"}, "documents"),
    ({"query": "q", "documents": []}, "documents"),
    ({"query": "q", "documents": [3]}, "documents[0]"),
    ({"query": "q", "documents": ["a", {"title": "x"}]}, "documents[1]"),
    ({"query": "q", "documents": ["a", "  "]}, "documents[1]"),
    ({"query": "q", "documents": ["a"] * 6}, "documents"),    # EMBED_MAX_INPUTS=6, query too
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ({"query": "q", "documents": ["a"], "top_n": "2"}, "top_n"),
    ({"query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents"),
])
def test_bad_rerank_requests_are_400s(server, body, param):
    response = server.post("/v1/rerank", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_an_unknown_rerank_model_is_a_404(server):
    # Open WebUI's own default model name is "reranker": it must be configured to an id
    response = server.post("/v1/rerank", json={"model": "reranker", "query": "q",
                                               "documents": ["a"]})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


# ---- the KV cache ----------------------------------------------------------------------
def chat(server, messages) -> requests.Response:
    response = server.post("/v1/chat/completions", json={
        "model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    return response


def test_a_conversation_continues_with_reuse_after_an_embedding_request(server, client):
    first = [{"role": "user", "content": "Name three colours of the rainbow."}]
    answer = chat(server, first).json()["choices"][0]["message"]["content"]
    client.embeddings.create(model=MODEL, input=TEXTS)
    follow = first + [{"role": "assistant", "content": answer},
                      {"role": "user", "content": "And three more?"}]
    second = chat(server, follow)
    assert second.headers["X-RKLLM-KV"] == "reuse"


def test_npu_embeddings_and_the_conversation_on_the_double(live_servers, rkllm_double_libs):
    npu = start_npu_server(live_servers, rkllm_double_libs)
    npu_client = openai.OpenAI(base_url=npu.base_url, api_key="none", max_retries=0)
    first = [{"role": "user", "content": "@@reply:apples@@ hello"}]
    response = npu.post("/v1/chat/completions", json={"model": "fake-npu-model",
                                                      "messages": first})
    answer = response.json()["choices"][0]["message"]["content"]
    result = npu_client.embeddings.create(model="fake-npu-model", input=["alpha beta", "gamma"])
    assert [len(item.embedding) for item in result.data] == [64, 64]
    assert result.usage.prompt_tokens == 3       # the double: one row per word
    outputs = npu.record.entries("hidden_layer")
    assert len(outputs) == 2 and all(o["released"] for o in outputs)   # ABI 1.3
    follow = first + [{"role": "assistant", "content": answer},
                      {"role": "user", "content": "more"}]
    back = npu.post("/v1/chat/completions", json={"model": "fake-npu-model",
                                                  "messages": follow})
    # the hidden-layer runs needed an empty cache: the conversation comes back from
    # the snapshot saved during its last turn, not from a full prefill
    assert back.headers["X-RKLLM-KV"] == "resume"
    with pytest.raises(openai.BadRequestError, match="text only"):
        npu_client.embeddings.create(model="fake-npu-model", input=[[1, 2, 3]])


# ---- the Ollama surface, the NPU double failing, a client that leaves ------------------
def test_ollama_embed_keeps_to_embed_max_inputs(server):
    # /api/embed had no bound: one request held the device for any number of inputs
    response = server.post("/api/embed", json={"model": MODEL, "input": ["a"] * 7})
    assert response.status_code == 400
    assert set(response.json()) == {"error"} and "at most 6" in response.json()["error"]


def test_rerank_return_documents_null_is_the_default(server):
    data = server.post("/v1/rerank", json={"query": "q", "documents": ["a b"],
                                           "return_documents": None, "top_n": None}).json()
    assert data["results"][0]["document"] == {"text": "a b"}


@pytest.fixture(scope="module")
def npu(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs)


def test_the_library_failing_in_an_embedding_run_is_a_500_and_the_next_one_works(npu):
    first = [{"role": "user", "content": "@@reply:apples@@ hello"}]
    answer = npu.post("/v1/chat/completions", json={"model": "fake-npu-model",
                                                    "messages": first}).json()
    for text in ("@@error:0@@ x", "@@crash:segv@@ x"):
        for path in ("/v1/embeddings", "/api/embed"):
            failed = npu.post(path, json={"model": "fake-npu-model", "input": ["ok", text]})
            assert failed.status_code == 500, failed.text
            # as for a chat (README "When the runtime crashes"): no signal, no library
            message = str(failed.json()["error"])
            assert "SIG" not in message and "rkllm" not in message.lower()
        works = npu.post("/v1/embeddings", json={"model": "fake-npu-model", "input": "ok"})
        assert works.status_code == 200 and len(works.json()["data"][0]["embedding"]) == 64
    assert [c["kind"] for c in npu.record.entries("crash")] == ["segv", "segv"]
    # the conversation goes on (the runtime that held it died: a full prefill)
    follow = first + [answer["choices"][0]["message"], {"role": "user", "content": "more"}]
    back = npu.post("/v1/chat/completions", json={"model": "fake-npu-model", "messages": follow})
    assert back.status_code == 200 and back.headers["X-RKLLM-KV"] == "full"


def _device_busy(server) -> bool:
    return server.get("/health").json()["devices"]["npu"]["busy"]


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/rerank"])
def test_a_client_that_leaves_stops_its_batch(npu, path):
    # 24 inputs at 150 ms each: the batch stops at the next chunk of 8 once the client
    # is gone, instead of holding the device for all of them
    texts = [f"@@prefill:150@@ doc{i}" for i in range(24)]
    body = ({"model": "fake-npu-model", "input": texts} if path == "/v1/embeddings" else
            {"model": "fake-npu-model", "query": "q", "documents": texts})
    before = len(npu.record.entries("hidden_layer"))
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", npu.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        for _ in range(300):                      # until the batch has begun
            if len(npu.record.entries("hidden_layer")) > before:
                break
            time.sleep(0.02)
    for _ in range(600):                          # the client is gone: the device frees
        if not _device_busy(npu):
            break
        time.sleep(0.05)
    assert not _device_busy(npu)
    runs = len(npu.record.entries("hidden_layer")) - before
    assert 0 < runs <= 16                        # not all 24 (25 with the query)
    assert npu.post("/v1/embeddings", json={"model": "fake-npu-model",
                                            "input": "next"}).status_code == 200
