"""Reranking by a reranker model (rkllm_api/relevance.py): which scoring a rerank request
gets, the yes/no logit score on the CPU for real (SmolLM2 judging), checked against the
same computation done here independently with llama-cpp-python from Qwen3-Reranker's
published prompt; a live server with SmolLM2 as the reranker (Open WebUI's external
reranker request, top_n, return_documents, errors, a conversation in the KV cache
surviving); the NPU path on the librkllmrt double (the GET_LOGITS run recorded and its
output released on 1.3).

SmolLM2-135M cannot tell relevant from irrelevant reliably (tried: the right document
wins about half the time), so the tests check the computation, not the judgement."""
from __future__ import annotations

import json
import math
import os

import pytest
import requests

from rkllm_api import relevance
from rkllm_api.config import Settings
from rkllm_api.embeddings import SIMILARITY_METHOD, EmbeddingService
from rkllm_api.errors import RequestError
from rkllm_api.models.registry import Registry
from support.doubles import make_fake_rkllm_model
from support.live_server import start_npu_server

MODEL = "smollm2-135m-instruct"
MARKED = "smol-judge"        # SmolLM2 again, marked as a reranker by model_config.json
RETRIEVAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "openwebui",
                         "v0.12.4", "retrieval")
# Qwen3-Reranker's prompt as its model card writes it (ChatML, which SmolLM2 speaks
# too; SmolLM2 does not think, so its assistant turn has no empty think block).
QWEN3_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and '
                'the Instruct provided. Note that the answer can only be "yes" or "no".')
QWEN3_INSTRUCTION = ("Given a web search query, retrieve relevant passages that answer the "
                     "query")


def qwen3_reranker_text(query: str, document: str) -> str:
    return (f"<|im_start|>system\n{QWEN3_SYSTEM}<|im_end|>\n<|im_start|>user\n"
            f"<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"
            "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def reference(smollm_path):
    """P(yes) between yes and no, computed with llama-cpp-python alone."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(smollm_path, n_ctx=1024, n_batch=512, n_threads=1, verbose=False)
    yes, no = (llm.tokenize(word, add_bos=False, special=False) for word in (b"yes", b"no"))
    assert len(yes) == len(no) == 1        # one token each, so "the first token" is exact

    def score(query: str, document: str) -> float:
        tokens = llm.tokenize(qwen3_reranker_text(query, document).encode("utf-8"),
                              add_bos=True, special=True)
        llm.reset()
        llm.eval(tokens)
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)     # the last position's
        y, n = float(logits[yes[0]]), float(logits[no[0]])
        return math.exp(y) / (math.exp(y) + math.exp(n))

    yield score
    llm.close()


@pytest.fixture(scope="module")
def judge(smollm_path):
    """SmolLM2 on the CPU runtime with a short context (cuts are cheap to reach) and one
    thread (on a busy machine llama.cpp's threads spin against each other)."""
    pytest.importorskip("llama_cpp")
    from rkllm_api.runtimes.llamacpp import LlamaCppRuntime
    runtime = LlamaCppRuntime(smollm_path, context_length=160, settings=Settings(cpu_threads=1))
    yield runtime
    runtime.close()


def recorded(name: str) -> dict:
    with open(os.path.join(RETRIEVAL, name), encoding="utf-8") as handle:
        return json.load(handle)


# ---- the score -------------------------------------------------------------------------
@pytest.mark.parametrize("yes, no", [(0.0, 0.0), (3.0, 1.0), (-2.5, 4.0), (31.2, 30.9),
                                     (1000.0, -1000.0), (-1000.0, 1000.0)])
def test_the_score_is_the_softmax_of_yes_against_no(yes, no):
    got = relevance.score(yes, no)
    assert 0.0 <= got <= 1.0
    assert got + relevance.score(no, yes) == pytest.approx(1.0)
    if abs(yes - no) < 50:
        assert got == pytest.approx(math.exp(yes) / (math.exp(yes) + math.exp(no)))
    assert (got > 0.5) == (yes > no)


# ---- which scoring a request gets ---------------------------------------------------------
def npu_model(root, model_id, config=None):
    make_fake_rkllm_model(os.path.join(root, model_id), model_id)
    if config is not None:
        with open(os.path.join(root, model_id, "model_config.json"), "w") as handle:
            json.dump(config, handle)


@pytest.fixture
def models_root(tmp_path):
    root = tmp_path / "models"
    npu_model(root, "qwen3-1.7b")
    npu_model(root, "bge-m3")                                   # an embedding model
    npu_model(root, "judge", {"capabilities": ["reranker"],
                              "reranker": {"tokens": {"yes": 7, "no": 8},
                                           "instruction": "Find recipes"}})
    return str(root)


def service(root, **settings) -> EmbeddingService:
    settings = Settings(models_root=root, include_bundled_model=False, **settings)
    return EmbeddingService(settings, Registry(settings), engine=None)


def scorer(svc, name=None):
    info, method = svc.scorer_for(name)
    return info.id, method


def test_reranker_models_are_known_by_name_or_model_config(models_root):
    npu_model(models_root, "Qwen3-Reranker-0.6B")
    npu_model(models_root, "bge-reranker-v2-m3")       # "bge" alone would mean embedding
    registry = Registry(Settings(models_root=models_root, include_bundled_model=False))
    found = {m.id: m for m in registry.models()}
    assert found["qwen3-reranker-0.6b"].capabilities == ("reranker",)
    assert found["bge-reranker-v2-m3"].capabilities == ("reranker",)
    assert found["judge"].capabilities == ("reranker",)
    assert "reranker" not in found["bge-m3"].capabilities
    assert relevance.choices_for(found["judge"]) == (7, 8)
    assert relevance.choices_for(found["qwen3-reranker-0.6b"]) == ("yes", "no")
    assert relevance.instruction_for(found["judge"]) == "Find recipes"
    assert relevance.instruction_for(found["bge-m3"]) == relevance.INSTRUCTION


def test_a_named_model_scores_as_a_reranker_only_when_it_is_one(models_root):
    svc = service(models_root)
    assert scorer(svc, "judge") == ("judge", relevance.METHOD)
    assert scorer(svc, "qwen3-1.7b") == ("qwen3-1.7b", SIMILARITY_METHOD)
    with pytest.raises(RequestError) as refused:
        svc.scorer_for("reranker")             # Open WebUI's placeholder is no model
    assert refused.value.status == 404


def test_without_a_name_the_configured_then_the_first_marked_reranker_scores(models_root):
    assert scorer(service(models_root)) == ("judge", relevance.METHOD)
    configured = service(models_root, rerank_model="qwen3-1.7b")
    assert scorer(configured) == ("qwen3-1.7b", relevance.METHOD)
    assert scorer(configured, "qwen3-1.7b") == ("qwen3-1.7b", relevance.METHOD)
    assert scorer(configured, "judge") == ("judge", relevance.METHOD)
    assert scorer(configured, "bge-m3") == ("bge-m3", SIMILARITY_METHOD)
    os.remove(os.path.join(models_root, "judge", "model_config.json"))
    # no reranker anywhere: embedding similarity with the embedding model
    assert scorer(service(models_root)) == ("bge-m3", SIMILARITY_METHOD)


def test_a_configured_reranker_that_does_not_exist_is_a_404_only_when_used(models_root):
    svc = service(models_root, rerank_model="no-such-model")
    with pytest.raises(RequestError) as refused:
        svc.scorer_for(None)
    assert refused.value.status == 404 and "no-such-model" in str(refused.value)
    assert scorer(svc, "bge-m3") == ("bge-m3", SIMILARITY_METHOD)


# ---- the CPU runtime, for real ---------------------------------------------------------
def test_cpu_logits_are_the_independent_computation(judge, reference):
    query = "How tall is the Eiffel Tower?"
    documents = ["The tower is 330 metres tall.", "Bananas are rich in potassium."]
    prompts = [relevance.judging_prompt(query, d) for d in documents]
    rows = judge.next_token_logits(prompts, ["yes", "no"], system=relevance.SYSTEM)
    for (yes, no), document in zip(rows, documents):
        assert relevance.score(yes, no) == pytest.approx(reference(query, document), abs=1e-4)
    # a word is its token; one prompt alone gives what it gave in the batch
    yes_id = judge._llama.tokenize(b"yes", add_bos=False, special=False)[0]
    alone = judge.next_token_logits(prompts[1:], [yes_id], system=relevance.SYSTEM)
    assert alone == [[rows[1][0]]]


def test_cpu_scoring_leaves_the_conversation_alone_and_cuts_long_documents(judge):
    from rkllm_api.runtimes.base import EmbeddingInputError, RunRequest, SamplingParams
    small = judge
    small.clear_kv_cache()
    try:
        small.run(RunRequest("Name a colour.", keep_history=True, max_new_tokens=4,
                             sampling=SamplingParams(temperature=0.0)), lambda event: None)
        held = small.kv_length
        short = relevance.judging_prompt("q", "word " * 60)
        longer = relevance.judging_prompt("q", "word " * 60 + "more " * 400)
        cut, uncut = small.next_token_logits([longer, short], ["yes", "no"], relevance.SYSTEM)
        assert all(math.isfinite(v) for v in cut + uncut) and cut != uncut
        assert small.kv_length == held and held > 0
        with pytest.raises(EmbeddingInputError) as refused:
            small.next_token_logits([short, longer], ["yes"], relevance.SYSTEM, truncate=False)
        assert refused.value.too_long and refused.value.index == 1
        for bad in ([-1], [10 ** 9], [""]):
            with pytest.raises(EmbeddingInputError) as refused:
                small.next_token_logits(["a"], bad)
            assert refused.value.index == -1
        with pytest.raises(EmbeddingInputError):
            small.next_token_logits([""], ["yes"])
    finally:
        small.clear_kv_cache()


REFUSES_SYSTEM = ("{% for m in messages %}{% if m.role == 'system' %}"
                  "{{ raise_exception('no system turns') }}{% endif %}"
                  "<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
                  "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_a_template_without_system_turns_gets_the_system_text_in_the_user_turn(judge):
    from rkllm_api.runtimes.llamacpp import ChatTemplate
    refusing = ChatTemplate(REFUSES_SYSTEM)
    assert refusing.standalone_segments("Judge.") is None
    assert refusing.standalone_segments("") == ("<user>", "</user><assistant>")
    chatml = judge.template.standalone_segments("Judge.")
    assert chatml[0].endswith("<|im_start|>system\nJudge.<|im_end|>\n<|im_start|>user\n")
    kept = judge.template
    judge.template = refusing
    try:
        tokens = judge._judged_tokens("Is it?", "Judge.", 0, True)
    finally:
        judge.template = kept
    expected = judge._llama.tokenize(b"<user>Judge.\n\nIs it?</user><assistant>",
                                     add_bos=True, special=True)
    assert tokens == expected


# ---- a live server with SmolLM2 as the reranker ----------------------------------------------
@pytest.fixture(scope="module")
def server(live_servers, smollm_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank-models")
    os.makedirs(root / MARKED)
    os.symlink(smollm_path, root / MARKED / "smol.gguf")
    (root / MARKED / "model_config.json").write_text(json.dumps(
        {"capabilities": ["reranker"], "context_length": 2048}))
    return live_servers.start({"RKLLM_BUNDLED_MODEL": "true", "CPU_THREADS": "1",
                               "RKLLM_MODELS_ROOT": str(root), "RERANK_MODEL": MODEL,
                               "EMBED_MAX_INPUTS": "6"})


def rerank(server, body, status=200) -> dict:
    response = server.post("/v1/rerank", json=body)
    assert response.status_code == status, response.text
    return response.json()


def test_open_webui_external_reranker_request_gets_the_models_judgement(server, reference):
    fixture = recorded("rerank.json")
    body = fixture["body"]
    response = requests.post(server.url + fixture["path"], headers=fixture["headers"],
                             json=body, timeout=120)
    response.raise_for_status()
    data = response.json()
    assert data["model"] == f"{MODEL} (reranker)"       # RERANK_MODEL names it
    # ExternalReranker.predict: results sorted by index, relevance_score each
    scores = [r["relevance_score"] for r in sorted(data["results"], key=lambda x: x["index"])]
    expected = [reference(body["query"], document) for document in body["documents"]]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert [r["relevance_score"] for r in data["results"]] == sorted(scores, reverse=True)
    assert all(r["document"]["text"] == body["documents"][r["index"]] for r in data["results"])
    assert data["usage"]["prompt_tokens"] == data["usage"]["total_tokens"] > len(scores)


def test_top_n_and_cohere_shapes_with_the_reranker(server):
    # no model named: RERANK_MODEL; the same documents, the same scores
    body = {"query": "capital of France", "top_n": 1, "return_documents": False,
            "documents": [{"text": "Paris is the capital of France."}, "Bananas are yellow."]}
    full = rerank(server, {**body, "top_n": None})
    assert full["model"] == f"{MODEL} (reranker)" and len(full["results"]) == 2
    top = rerank(server, body)
    assert top["results"] == full["results"][:1] and "document" not in top["results"][0]


@pytest.mark.parametrize("body, param", [
    ({"query": "q", "documents": ["a", ""]}, "documents[1]"),
    ({"query": "q", "documents": ["a"] * 6}, "documents"),        # EMBED_MAX_INPUTS=6
    ({"query": "q", "documents": ["a"], "top_n": -3}, "top_n"),
    ({"query": ["q"], "documents": ["a"]}, "query"),
    ({"query": "q", "documents": "a"}, "documents"),
])
def test_bad_requests_to_the_reranker_are_400s(server, body, param):
    assert rerank(server, body, 400)["error"]["param"] == param


def test_a_lone_surrogate_is_refused_not_a_500(server):
    raw = '{"query": "q", "documents": ["ok", "bad \\ud800"]}'
    response = server.post("/v1/rerank", data=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def test_a_conversation_continues_with_reuse_after_reranking(server):
    def chat(messages):
        response = server.post("/v1/chat/completions", json={
            "model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0})
        assert response.status_code == 200, response.text
        return response

    first = [{"role": "user", "content": "Name three colours of the rainbow."}]
    answer = chat(first).json()["choices"][0]["message"]["content"]
    rerank(server, {"model": MODEL, "query": "colours", "documents": ["red", "tax law"]})
    follow = first + [{"role": "assistant", "content": answer},
                      {"role": "user", "content": "And three more?"}]
    assert chat(follow).headers["X-RKLLM-KV"] == "reuse"


def test_a_model_marked_in_model_config_is_a_reranker(server):
    data = rerank(server, {"model": MARKED, "query": "q", "documents": ["a"]})
    assert data["model"] == f"{MARKED} (reranker)"
    assert 0.0 <= data["results"][0]["relevance_score"] <= 1.0


# ---- the NPU double ----------------------------------------------------------------------
def test_npu_reranking_runs_get_logits_on_the_double(live_servers, rkllm_double_libs):
    npu = start_npu_server(
        live_servers, rkllm_double_libs, extra_models=("npu-judge",),
        model_configs={"npu-judge": {"capabilities": ["reranker"],
                                     "reranker": {"tokens": {"yes": 7, "no": 8}}}})
    first = [{"role": "user", "content": "@@reply:apples@@ hello"}]
    chat = {"model": "npu-judge", "messages": first}
    answer = npu.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]
    documents = ["good @@logits:7=3.5,8=-1@@", "bad @@logits:7=-2,8=2@@", "plain"]
    data = rerank(npu, {"query": "q", "documents": documents})
    assert data["model"] == "npu-judge (reranker)"
    scores = {r["index"]: r["relevance_score"] for r in data["results"]}
    assert scores[0] == pytest.approx(relevance.score(3.5, -1.0), abs=1e-6)
    assert scores[1] == pytest.approx(relevance.score(-2.0, 2.0), abs=1e-6)
    assert scores[2] == pytest.approx(0.5)                  # both logits 0
    assert [r["index"] for r in data["results"]] == [0, 2, 1]
    runs = [r for r in npu.record.entries("run") if r["mode"] == 2]     # GET_LOGITS
    assert len(runs) == 3 and all(r["keep_history"] == 0 and not r["enable_thinking"]
                                  for r in runs)
    assert runs[0]["prompt"].startswith(relevance.SYSTEM) and "<Query>: q" in runs[0]["prompt"]
    outputs = npu.record.entries("logits")
    assert len(outputs) == 3 and all(o["released"] for o in outputs)   # ABI 1.3
    # the logits runs needed an empty cache: the conversation resumes from its snapshot
    follow = first + [answer, {"role": "user", "content": "more"}]
    back = npu.post("/v1/chat/completions", json={"model": "npu-judge", "messages": follow})
    assert back.headers["X-RKLLM-KV"] == "resume"
    # an NPU reranker without token ids cannot score: no tokenizer to find "yes" with
    refused = rerank(npu, {"model": "fake-npu-model", "query": "q", "documents": ["a"]})
    assert refused["model"] == "fake-npu-model (embedding similarity)"
    configured = start_npu_server(live_servers, rkllm_double_libs,
                                  RERANK_MODEL="fake-npu-model")
    error = rerank(configured, {"query": "q", "documents": ["a"]}, 400)["error"]
    assert error["code"] == "reranker_tokens_missing" and error["param"] == "model"
