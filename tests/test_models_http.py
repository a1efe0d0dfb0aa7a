"""Models as clients see them, in process (Flask test client, real registry and engine,
the librkllmrt double): files in the models root, a file that cannot be a model,
the 404 that lists what exists, MODEL_ALIASES, /models, and the seed server's
/health keys."""
from __future__ import annotations

import pytest

import api
from rkllm_api.config import Settings
from support.doubles import make_fake_rkllm_model


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    make_fake_rkllm_model(root / "Qwen3-1.7B", "qwen3-1.7b_rk3588")
    make_fake_rkllm_model(root, "gemma-3-1b")                  # directly in the root
    (root / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01")   # header cut short
    return root


@pytest.fixture
def client(models, tmp_path, rkllm_double_libs):
    settings = Settings(models_root=str(models), include_bundled_model=False, log_file="",
                        idle_unload_seconds=0, rkllm_lib_path=rkllm_double_libs["1.3"],
                        model_aliases="gpt-4o-mini=qwen3,gpt-3.5-turbo=gemma-3-1b",
                        kv_cache_dir=str(tmp_path / "cache"))
    app = api.create_app(settings)
    yield app.test_client()
    api.server_of(app).shut_down()


def chat(client, model, text="hi"):
    body = {"messages": [{"role": "user", "content": text}]}
    if model is not None:
        body["model"] = model
    return client.post("/v1/chat/completions", json=body)


def test_models_list_marks_the_file_that_cannot_be_a_model(client, tmp_path):
    listed = {m["id"]: m for m in client.get("/v1/models").get_json()["data"]}
    assert sorted(listed) == ["broken", "gemma-3-1b", "qwen3-1.7b"]
    assert listed["qwen3-1.7b"]["available"] and "problem" not in listed["qwen3-1.7b"]
    broken = listed["broken"]
    assert broken["available"] is False and "GGUF header does not parse" in broken["problem"]
    assert str(tmp_path) not in str(listed)
    assert client.get("/models").get_json() == client.get("/v1/models").get_json()


def test_a_request_for_it_is_a_clear_400_without_paths(client, tmp_path):
    for response in (chat(client, "broken"),
                     client.post("/v1/models/select", json={"model": "broken"})):
        assert response.status_code == 400
        error = response.get_json()["error"]
        assert error["code"] == "model_unavailable" and error["param"] == "model"
        assert error["message"].startswith("The model 'broken' cannot be served: GGUF header")
        assert str(tmp_path) not in error["message"] and ".gguf" not in error["message"]


def test_an_unknown_model_lists_the_ids_that_exist(client):
    for response in (chat(client, "llama-70b"), client.get("/v1/models/llama-70b")):
        assert response.status_code == 404
        error = response.get_json()["error"]
        assert error["code"] == "model_not_found"
        assert error["message"] == ("The model 'llama-70b' does not exist; available: "
                                    "qwen3-1.7b, broken, gemma-3-1b")


def test_names_clients_hard_code_reach_local_models(client):
    answer = chat(client, "gpt-4o-mini")
    assert answer.status_code == 200 and answer.get_json()["model"] == "qwen3-1.7b"
    assert chat(client, "GPT-3.5-Turbo").get_json()["model"] == "gemma-3-1b"
    card = client.get("/v1/models/gpt-4o-mini").get_json()
    assert card["id"] == "qwen3-1.7b" and "gpt-4o-mini" in card["aliases"]


def test_a_request_without_model_gets_the_npu_model_not_the_demo(client):
    answer = chat(client, None)
    assert answer.status_code == 200 and answer.get_json()["model"] == "qwen3-1.7b"


def test_health_carries_the_seed_servers_keys(client):
    before = client.get("/health").get_json()
    assert (before["current_model"], before["model_loaded"], before["active_request"]) == \
        (None, False, None)
    assert before["models_available"] == 2          # broken does not count
    assert before["status"] == "ok" and "devices" in before
    assert before["checks"]["npu"] in ("warn", "error")   # this machine has no NPU
    chat(client, "gemma-3-1b")
    after = client.get("/health").get_json()
    assert (after["current_model"], after["model_loaded"]) == ("gemma-3-1b", True)
