"""The pull endpoints on a live server whose HF_ENDPOINT is the fake hub and whose
system root is a fake RK3588 board with librkllmrt 1.2.1: POST /api/pull (Ollama's
NDJSON, driven by the real ollama client too), POST /v1/models/pull (SSE), DELETE
/v1/models/<id>, and their refusals."""
from __future__ import annotations

import json
import os
import time

import ollama
import pytest
import requests

from support.board import make_board

QWEN = "acme/Qwen3-0.6B-RKLLM"
QWEN_ID = "qwen3-0.6b-w8a8-rk3588-v1.2.1"   # this board's SoC and SDK generation
TINY = "acme/tiny-chat"
ADMIN, USER = "admin-key-0123456789abcdef", "user-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server(live_servers, module_fake_hub, tmp_path_factory):
    board = make_board(tmp_path_factory.mktemp("board"), soc="rk3588", runtime="1.2.1")
    return live_servers.start({"HF_ENDPOINT": module_fake_hub.url, "RKLLM_SYSTEM_ROOT": board,
                               "RKLLM_BUNDLED_MODEL": "false"})


def model_ids(server) -> list:
    return [m["id"] for m in server.get("/v1/models").json()["data"]]


def wait_for_model(server, model_id: str, present: bool = True) -> bool:
    """The registry rescans at most once a second: look a few times (bounded)."""
    for _ in range(20):
        if (model_id in model_ids(server)) == present:
            return True
        time.sleep(0.25)
    return False


def test_ollama_pull_streams_progress_then_the_model_is_listed(server):
    response = requests.post(server.url + "/api/pull", json={"model": QWEN}, stream=True,
                             timeout=60)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    events = [json.loads(line) for line in response.iter_lines() if line]
    assert events[0] == {"status": "pulling manifest"}
    assert events[-1]["status"] == "success"
    progress = [e for e in events if "digest" in e]
    assert {"status", "digest", "total", "completed"} <= set(progress[0])
    assert progress[0]["status"] == f"pulling {QWEN_ID}.rkllm"
    assert wait_for_model(server, QWEN_ID)
    models_root = server.env["RKLLM_MODELS_ROOT"]
    assert sorted(os.listdir(os.path.join(models_root, QWEN_ID))) == sorted(
        [f"{QWEN_ID}.rkllm", "vision-rk3588.rknn", "tokenizer.json", "config.json"])


def test_the_ollama_client_pulls_and_reads_progress(server):
    client = ollama.Client(host=server.url)
    statuses = [part.status for part in client.pull(TINY, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert client.pull(TINY).status == "success"   # already here: success at once


def test_openai_pull_streams_sse(server):
    response = requests.post(server.url + "/v1/models/pull",
                             json={"model": QWEN + "/qwen3-0.6b-w8a8-rk3576.rkllm"},
                             stream=True, timeout=60)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    data = [line[6:] for line in response.iter_lines() if line.startswith(b"data: ")]
    assert data[-1] == b"[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert events[0]["status"] == "pulling manifest" and events[-1]["status"] == "success"
    assert wait_for_model(server, "qwen3-0.6b-w8a8-rk3576")


def test_pull_errors_come_in_each_surface_format(server):
    refused = requests.post(server.url + "/api/pull",
                            json={"model": "acme/missing", "stream": False}, timeout=60)
    assert refused.status_code == 404
    assert "acme/missing not found" in refused.json()["error"]
    response = requests.post(server.url + "/v1/models/pull", json={"model": "acme/missing"},
                             stream=True, timeout=60)
    events = [json.loads(line[6:]) for line in response.iter_lines()
              if line.startswith(b"data: {")]
    assert events[-1]["error"]["code"] == "repo_not_found"


@pytest.mark.parametrize("body", [b'{"model": 5}', b'{"model": "a/b/../c"}', b"[1]",
                                  b'{"model": "acme/x\\ud800"}', b"not json",
                                  b'{"model": "' + b"a" * 5000 + b'/b"}'])
def test_malformed_pull_bodies_get_a_400(server, body):
    headers = {"Content-Type": "application/json"}
    ollama_refusal = requests.post(server.url + "/api/pull", data=body, headers=headers, timeout=30)
    assert ollama_refusal.status_code == 400 and isinstance(ollama_refusal.json()["error"], str)
    openai_refusal = requests.post(server.url + "/v1/models/pull", data=body, headers=headers,
                                   timeout=30)
    assert openai_refusal.status_code == 400 and openai_refusal.json()["error"]["message"]


def test_ollama_pull_reads_its_body_whatever_the_content_type(server):
    # `curl http://board:8000/api/pull -d '{...}'` (Ollama's own example) sends
    # application/x-www-form-urlencoded; the rest of the Ollama surface reads JSON anyway.
    body = json.dumps({"model": "acme/missing", "stream": False})
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {}):
        refused = requests.post(server.url + "/api/pull", data=body, headers=headers, timeout=60)
        assert refused.status_code == 404 and "acme/missing not found" in refused.json()["error"]
    wrong = requests.post(server.url + "/api/pull", json={"model": TINY, "stream": "no"},
                          timeout=30)
    assert wrong.status_code == 400 and "'stream'" in wrong.json()["error"]


def test_a_bare_model_name_is_ollamas_is_it_here_question(server):
    refused = requests.post(server.url + "/api/pull", json={"model": "nothing-here"}, timeout=30)
    assert refused.status_code == 404 and "error" in refused.json()


def test_delete_removes_a_pulled_model(server):
    requests.post(server.url + "/api/pull", json={"model": TINY, "stream": False}, timeout=60)
    assert wait_for_model(server, "tiny-chat")
    deleted = requests.delete(server.url + "/v1/models/tiny-chat", timeout=30)
    assert deleted.json() == {"id": "tiny-chat", "object": "model", "deleted": True}
    # At once again, before the registry's rescan sees the folder gone: a 404, not a 500.
    again = requests.delete(server.url + "/v1/models/tiny-chat", timeout=30)
    assert again.status_code == 404 and again.json()["error"]["code"] == "model_not_found"
    assert not os.path.exists(os.path.join(server.env["RKLLM_MODELS_ROOT"], "tiny-chat"))
    assert wait_for_model(server, "tiny-chat", present=False)
    again = requests.delete(server.url + "/v1/models/tiny-chat", timeout=30)
    assert again.status_code == 404


def test_pulling_and_deleting_need_an_admin_key(live_servers, module_fake_hub):
    keyed = live_servers.start({"HF_ENDPOINT": module_fake_hub.url, "RKLLM_BUNDLED_MODEL": "false",
                                "RKLLM_API_KEYS": USER, "RKLLM_ADMIN_KEYS": ADMIN})
    user = {"Authorization": f"Bearer {USER}"}
    for method, path in (("POST", "/api/pull"), ("POST", "/v1/models/pull"),
                         ("DELETE", "/v1/models/x")):
        response = requests.request(method, keyed.url + path, json={"model": TINY},
                                    headers=user, timeout=30)
        assert response.status_code == 403, path
    pulled = requests.post(keyed.url + "/api/pull", json={"model": TINY, "stream": False},
                           headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert pulled.json()["status"] == "success"
