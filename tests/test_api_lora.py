"""LoRA through the HTTP API on a real gunicorn: adapters listed as `<model>:<adapter>`
models, picked by that id or by the `lora` field, with the `openai` client; the
adapters are GGUF files the test suite writes for SmolLM2 (tests/support/lora.py)."""
from __future__ import annotations

import openai
import pytest

from support.live_server import start_cpu_server
from support.lora import make_model_with_adapters

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(live_servers, tmp_path_factory, smollm_path, smollm_lora_files):
    root = tmp_path_factory.mktemp("lora-models")
    make_model_with_adapters(root, smollm_path, smollm_lora_files)
    return start_cpu_server(live_servers, RKLLM_MODELS_ROOT=str(root))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


def ask(client, model, messages=QUESTION, **extra):
    response = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, temperature=0, max_tokens=16,
        extra_body=extra or None)
    completion = response.parse()
    return completion, response.headers


def test_adapters_are_listed_as_models(client):
    models = {m.id: m for m in client.models.list().data}
    assert {"smol", "smol:pirate", "smol:poet"} <= set(models)
    card = client.models.retrieve("smol:poet")
    assert card.id == "smol:poet" and card.parent == "smol"
    assert card.lora == {"name": "poet", "scale": 1.0}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("smol:sailor")


def test_an_adapter_changes_the_answer_and_the_base_answer_stays(client):
    base, _ = ask(client, "smol")
    pirate, _ = ask(client, "smol:pirate")
    by_field, _ = ask(client, "smol", lora="pirate")
    poet, _ = ask(client, "smol", lora={"name": "poet", "scale": 1.0})
    again, _ = ask(client, "smol")
    assert pirate.model == "smol:pirate" and poet.model == "smol:poet" and base.model == "smol"
    content = lambda c: c.choices[0].message.content   # noqa: E731
    assert content(pirate) == content(by_field)
    assert len({content(base), content(pirate), content(poet)}) == 3
    assert content(again) == content(base)


def test_alternating_adapters_never_reuse_each_others_kv(client):
    pirate, _ = ask(client, "smol:pirate")
    _, poet_headers = ask(client, "smol:poet")
    assert poet_headers["X-RKLLM-KV"] == "full"
    follow = QUESTION + [{"role": "assistant", "content": pirate.choices[0].message.content},
                         {"role": "user", "content": "And of Germany?"}]
    _, back = ask(client, "smol:pirate", follow)
    assert back["X-RKLLM-KV"] == "resume"
    _, base_continues = ask(client, "smol", follow)   # the pirate's history, no adapter
    assert base_continues["X-RKLLM-KV"] != "reuse"


def test_completions_take_an_adapter_too(client):
    plain = client.completions.create(model="smol", prompt="The capital of France is",
                                      max_tokens=8, temperature=0)
    adapted = client.completions.create(model="smol:poet", prompt="The capital of France is",
                                        max_tokens=8, temperature=0)
    assert adapted.model == "smol:poet" and adapted.choices[0].text != plain.choices[0].text


@pytest.mark.parametrize("model, extra, status, code", [
    ("smol", {"lora": "sailor"}, 404, "adapter_not_found"),
    ("smol:sailor", {}, 404, "model_not_found"),
    ("smol:pirate", {"lora": "poet"}, 400, None),
    ("smol", {"lora": {"name": "pirate", "scale": 100}}, 400, None),
    ("smol", {"lora": ["pirate"]}, 400, None),
    ("smol", {"lora": "pirate", "use_cache": "mine"}, 400, None),
    ("smollm2-135m-instruct", {"lora": "pirate"}, 404, "adapter_not_found"),
])
def test_bad_adapter_requests_are_refused_in_openai_format(server, model, extra, status, code):
    response = server.post("/v1/chat/completions", json={"model": model, "messages": QUESTION,
                                                         "max_tokens": 4, **extra})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_a_path_is_never_taken_from_the_client(server):
    for name in ("../smol/lora/pirate", "/etc/passwd", "lora/pirate.gguf"):
        response = server.post("/v1/chat/completions", json={
            "model": "smol", "messages": QUESTION, "max_tokens": 4, "lora": name})
        assert response.status_code == 404, response.text


def test_a_broken_adapter_file_is_a_500_without_paths_and_the_model_still_serves(
        server, client):
    root = server.env["RKLLM_MODELS_ROOT"]
    with open(f"{root}/smol/lora/broken.gguf", "wb") as handle:
        handle.write(b"GGUF but not really an adapter")
    response = server.post("/v1/chat/completions", json={
        "model": "smol:broken", "messages": QUESTION, "max_tokens": 4})
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "runtime_error" and root not in error["message"]
    assert "broken" in error["message"]
    completion, _ = ask(client, "smol")
    assert completion.choices[0].message.content


def test_embeddings_and_rerank_refuse_an_adapter_instead_of_ignoring_it(server):
    # the id is in /v1/models, so "does not exist" would be wrong; and the `lora` field
    # used to be dropped without a word, giving the base model's vectors
    for path, body in (("/v1/embeddings", {"input": "hi"}),
                       ("/v1/rerank", {"query": "q", "documents": ["a"]})):
        by_id = server.post(path, json={"model": "smol:pirate", **body})
        assert by_id.status_code == 400, by_id.text
        assert by_id.json()["error"]["param"] == "model"
        assert by_id.json()["error"]["code"] == "lora_unsupported"
        by_field = server.post(path, json={"model": "smol", "lora": "pirate", **body})
        assert by_field.status_code == 400, by_field.text
        assert by_field.json()["error"]["param"] == "lora"
    assert server.post("/v1/embeddings", json={"model": "smol:sailor",
                                               "input": "hi"}).status_code == 404
    assert server.post("/v1/embeddings", json={"model": "smol", "input": "hi"}).status_code == 200
