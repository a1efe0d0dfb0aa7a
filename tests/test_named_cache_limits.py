"""Named prompt caches under limits (live server, librkllmrt double): how many and how
large per model, prompts checked against the context, and a damaged cache file that
is dropped instead of failing requests: 409 "recreate it" when the damage shows
before the run, a full prefill with X-RKLLM-Cache-Dropped when the runtime refuses
the file."""
import os
import threading

import pytest
import requests

from support.live_server import NPU_MODEL_ID, start_npu_server

CHAT = "/v1/chat/completions"
CACHES = f"/v1/cache/{NPU_MODEL_ID}"


def chat(server, cache, stream=False):
    return server.post(CHAT, json={"model": NPU_MODEL_ID, "use_cache": cache, "stream": stream,
                                   "messages": [{"role": "user", "content": "hello"}],
                                   "max_tokens": 4})


def create(server, name, prompt="Always answer in French."):
    return server.post(f"{CACHES}/{name}", json={"prompt": prompt})


def listed(server) -> list:
    return [c["name"] for c in server.get(CACHES).json()["data"]]


def error(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code
    assert "/" not in body["message"], body["message"]   # no server paths
    return body


@pytest.fixture
def server(live_servers, rkllm_double_libs, tmp_path):
    kv = tmp_path / "kv"
    server = start_npu_server(live_servers, rkllm_double_libs, KV_CACHE_DIR=str(kv),
                              NAMED_CACHE_MAX_COUNT="2")
    server.cache_file = lambda name: kv / NPU_MODEL_ID / "named" / f"{name}.cache"
    return server


def test_count_limit_and_taken_names_are_409(server):
    assert create(server, "a").status_code == 201
    assert create(server, "b").status_code == 201
    error(create(server, "c"), 409, "cache_conflict")
    error(create(server, "a", "Something else."), 409, "cache_conflict")
    assert listed(server) == ["a", "b"]
    assert requests.delete(server.url + f"{CACHES}/a", timeout=30).status_code == 200
    assert create(server, "c").status_code == 201
    assert listed(server) == ["b", "c"]


def test_two_creates_of_one_name_at_once_keep_one_and_refuse_the_other(server):
    # The second create queues behind the first's prefill (@@prefill@@ makes it long)
    # after both found the name free: it must not overwrite the first one's cache.
    statuses = []

    def make(text):
        statuses.append(create(server, "same", f"@@prefill:600@@ {text}").status_code)

    threads = [threading.Thread(target=make, args=(text,)) for text in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(statuses) == [201, 409]
    assert listed(server) == ["same"]


def test_size_limit_is_413_and_keeps_nothing(live_servers, rkllm_double_libs, tmp_path):
    server = start_npu_server(live_servers, rkllm_double_libs, KV_CACHE_DIR=str(tmp_path),
                              NAMED_CACHE_MAX_MB="0")
    error(create(server, "big"), 413, "cache_too_large")
    assert listed(server) == []


def test_a_prompt_longer_than_the_context_is_400_before_any_run(server):
    runs_before = len(server.record.entries("run"))
    response = create(server, "huge", "word " * 20000)      # the model's context is 4096
    error(response, 400, "context_length_exceeded")
    assert response.json()["error"]["param"] == "prompt"
    assert len(server.record.entries("run")) == runs_before
    assert listed(server) == []


def test_a_cut_cache_is_dropped_and_the_request_asked_to_recreate_it(server):
    assert create(server, "rules").status_code == 201
    path = server.cache_file("rules")
    path.write_bytes(path.read_bytes()[:5])          # cut short, as a full disk would
    body = error(chat(server, "rules"), 409, "cache_damaged")
    assert "recreate" in body["message"]
    assert listed(server) == [] and not path.exists()
    error(chat(server, "rules"), 404, "cache_not_found")
    assert create(server, "rules").status_code == 201  # and it can be made again


def test_a_cut_cache_is_not_listed(server):
    assert create(server, "rules").status_code == 201
    path = server.cache_file("rules")
    path.write_bytes(b"")
    assert listed(server) == []
    assert not os.path.exists(path)


@pytest.mark.parametrize("stream", [False, True])
def test_a_cache_the_runtime_refuses_falls_back_to_a_full_prefill(server, stream):
    assert create(server, "rules").status_code == 201
    path = server.cache_file("rules")
    path.write_bytes(b"x" * path.stat().st_size)     # same size, not a cache any more
    response = chat(server, "rules", stream=stream)
    assert response.status_code == 200, response.text
    assert response.headers["X-RKLLM-Cache-Dropped"] == "rules"
    if not stream:   # a stream's headers leave before the run is over
        assert response.headers["X-RKLLM-KV"] == "full"
    last_run = server.record.entries("run")[-1]
    assert "hello" in last_run["prompt"]
    assert listed(server) == []
    error(chat(server, "rules"), 404, "cache_not_found")
