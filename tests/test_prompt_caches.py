"""Prompt caches and the snapshot store: file naming and bounds (kvcache.py), the
system prompt cache through the engine on the CPU runtime (SmolLM2)."""
from __future__ import annotations

import os

import pytest

from rkllm_api.engine import kvcache
from rkllm_api.engine.kvcache import CacheNameError, PromptCacheFiles, Snapshot, SnapshotStore
from support.conversation import MODEL, turn, user

LONG_SYSTEM = ("You are Gardener, a patient assistant for allotment holders. You answer in "
               "short, practical sentences, name plants by their common names, mention the "
               "month when something should be sown or harvested, and warn about frost. "
               "You never recommend chemical pesticides; suggest companion planting, "
               "netting or hand picking instead. When a question is unclear, ask one "
               "short question back before answering. Keep every answer under five sentences "
               "and end with one tip the reader can try this weekend.")


# ---- names and identities ------------------------------------------------------------
@pytest.mark.parametrize("name", ["system", "a.b-c_1", "X" * 64, "v1.2"])
def test_good_cache_names_pass(name):
    assert kvcache.check_cache_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "..", "../etc", "a/b", "a\\b", "x" * 65,
                                  "with space", "a..b", None, 5, "é", "a\n"])
def test_bad_cache_names_are_refused(name):
    with pytest.raises(CacheNameError):
        kvcache.check_cache_name(name)


def test_model_identity_follows_size_and_mtime(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"one")
    first = kvcache.model_identity(str(model))
    assert kvcache.model_identity(str(model)) == first
    os.utime(model, ns=(1, 1))
    assert kvcache.model_identity(str(model)) != first


def test_system_cache_is_keyed_by_model_file_and_text(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights")
    files = PromptCacheFiles(str(tmp_path / "cache"))
    path = files.system_path("m", str(model), "be brief")
    assert path != files.system_path("m", str(model), "be verbose")
    open(path, "wb").write(b"state")
    files.remember_system("m", str(model), "be brief")
    assert files.preload_path("m", str(model)) == path
    os.utime(model, ns=(5, 5))   # the model file changed: the cache is void
    assert files.preload_path("m", str(model)) is None
    assert files.system_path("m", str(model), "be brief") != path
    files.remember_system("m", str(model), "be brief")
    assert not os.path.exists(path), "the cache of the old model file was not deleted"


def test_named_caches_stay_inside_the_cache_folder(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights")
    files = PromptCacheFiles(str(tmp_path / "cache"))
    with pytest.raises(CacheNameError):
        files.named_path("m", "../../escape")
    path = files.named_path("../../m", "ok")
    assert os.path.realpath(path).startswith(os.path.realpath(str(tmp_path / "cache")))
    open(files.named_path("m", "ok"), "wb").write(b"state")
    cache = files.save_named("m", str(model), "ok", prompt_tokens=12)
    assert cache.as_dict()["prompt_tokens"] == 12 and cache.size_bytes == 5
    assert [c.name for c in files.list_named("m", str(model))] == ["ok"]
    assert files.delete_named("m", "ok") and files.named("m", str(model), "ok") is None
    assert not files.delete_named("m", "ok")


# ---- the snapshot store ------------------------------------------------------------
def _snapshot(store, key, size=10, model="m"):
    path = store.new_path(model)
    with open(path, "wb") as fh:
        fh.write(b"x" * size)
    store.put(Snapshot(model, path, holds=key, resumes=key))
    return path


def test_snapshot_store_is_a_bounded_lru(tmp_path):
    store = SnapshotStore(str(tmp_path / "snaps"), max_entries=2, max_bytes=1000)
    store.start()
    first = _snapshot(store, ("a",))
    _snapshot(store, ("b",))
    _snapshot(store, ("c",))
    assert store.take("m", ("a",)) is None and not os.path.exists(first)
    taken = store.take("m", ("b",))
    assert taken is not None and os.path.exists(taken.path)
    store.discard(taken)
    assert not os.path.exists(taken.path)
    small = SnapshotStore(str(tmp_path / "small"), max_entries=10, max_bytes=25)
    small.start()
    _snapshot(small, ("a",))
    _snapshot(small, ("b",))
    _snapshot(small, ("c",))
    assert small.describe() == {"entries": 2, "bytes": 20}


def test_a_later_snapshot_of_a_conversation_replaces_the_earlier(tmp_path):
    store = SnapshotStore(str(tmp_path / "snaps"), max_entries=5, max_bytes=1000)
    store.start()
    early = _snapshot(store, ("sys", "u1", "a1"))
    _snapshot(store, ("sys", "u1", "a1", "u2", "a2"))
    assert not os.path.exists(early) and store.describe()["entries"] == 1


# ---- the system prompt cache through the engine --------------------------------------
def system_turn(engine, system=LONG_SYSTEM):
    return turn(engine, [{"role": "system", "content": system}, user("When do I sow peas?")])


OTHER_SYSTEM = LONG_SYSTEM.replace("Gardener", "Botanist")


def seen_twice(engine, system=LONG_SYSTEM, other=OTHER_SYSTEM):
    """A system cache is made only for a system text seen before, when the KV cache
    does not already start with it: the text, another one, the text again. Returns
    the last turn (the one that built the cache)."""
    system_turn(engine, system)
    system_turn(engine, other)
    return system_turn(engine, system)


def cache_files(tmp_path):
    folder = tmp_path / "cache" / "smollm2-135m-instruct"
    return sorted(p.name for p in folder.glob("system-*.cache")) if folder.exists() else []


def kv_text(engine) -> str:
    runtime = engine._slots["cpu"].runtime
    tokens = runtime._llama.input_ids[:runtime._llama.n_tokens].tolist()
    return runtime._llama.detokenize(tokens, special=True).decode("utf-8", "replace")


def test_system_prompt_cache_is_saved_then_preloaded_by_a_cold_model(make_engine, tmp_path):
    plain, _ = system_turn(make_engine(system_prompt_cache=False))
    assert cache_files(tmp_path) == []
    engine = make_engine()
    system_turn(engine)
    assert cache_files(tmp_path) == []      # seen once: no extra run, no file
    first, _ = seen_twice(engine)
    assert len(cache_files(tmp_path)) == 1  # only the text seen twice
    cold = make_engine()
    cold.load(MODEL)
    assert cold.health()["devices"]["cpu"]["kv_cache"]["prompt_cache"] == "system-cache"
    cached, _ = system_turn(cold)
    assert cached.prefilled_tokens + 80 < plain.prefilled_tokens
    # the request that built the cache reports the building run's tokens too
    assert first.extra_prefill_tokens > 80
    assert first.prefilled_tokens - first.extra_prefill_tokens == cached.prefilled_tokens
    assert cached.prefilled_tokens + cached.kv_reused_tokens == cached.prompt_tokens


def test_changed_system_text_gets_its_own_cache(make_engine, tmp_path):
    engine = make_engine()
    seen_twice(engine)
    system_turn(engine, OTHER_SYSTEM)     # seen before too, and not what the cache holds
    assert len(cache_files(tmp_path)) == 2
    assert "Botanist" in kv_text(engine) and "Gardener" not in kv_text(engine)
    cold = make_engine()
    cold.load(MODEL)   # the newest system text is the one preloaded
    assert "Botanist" in kv_text(cold)


def test_short_system_texts_are_not_cached(make_engine, tmp_path):
    system_turn(make_engine(), "Be brief.")
    assert cache_files(tmp_path) == []


# ---- through the live HTTP server ------------------------------------------------------
import requests  # noqa: E402

from support.live_server import start_cpu_server, start_npu_server  # noqa: E402

CHAT = "/v1/chat/completions"


def test_http_next_turn_prefills_only_the_new_message(live_servers, smollm_available):
    server = start_cpu_server(live_servers, KV_CACHE_DIR=live_servers.tmp_dir + "/kv")
    messages = [user("Name three rivers in Europe and say one thing about each.")]
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
    first = server.post(CHAT, json=body)
    assert first.status_code == 200 and first.headers["X-RKLLM-KV"] == "full"
    answer = first.json()["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": answer}, user("Which is longest?")]
    second = server.post(CHAT, json={**body, "messages": messages})
    assert second.headers["X-RKLLM-KV"] == "reuse"
    prefilled = int(second.headers["X-RKLLM-Prefill-Tokens"])
    assert prefilled < 20 < int(first.headers["X-RKLLM-Prefill-Tokens"])
    assert second.json()["usage"]["prompt_tokens"] > prefilled + 20  # the whole prompt
    assert "X-RKLLM-Sampling-Unapplied" not in second.headers


def test_http_named_cache_round_trip_and_validation(live_servers, rkllm_double_libs):
    server = start_npu_server(live_servers, rkllm_double_libs,
                              KV_CACHE_DIR=live_servers.tmp_dir + "/kv-npu")
    created = server.post("/v1/cache/fake-npu-model/house-rules",
                          json={"prompt": "Always answer in French."})
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "house-rules"
    listed = server.get("/v1/cache/fake-npu-model").json()["data"]
    assert [c["name"] for c in listed] == ["house-rules"]
    assert server.get("/v1/cache/fake-npu-model/house-rules").json()["prompt_tokens"] > 0
    chat = server.post(CHAT, json={"model": "fake-npu-model", "use_cache": "house-rules",
                                   "messages": [user("hello")], "max_tokens": 4})
    assert chat.status_code == 200, chat.text
    loads = server.record.entries("load_prompt_cache")
    assert loads and loads[-1]["path"].endswith("house-rules.cache")
    for bad in ("%2E%2E", ".hidden", "%2E%2E%2Fescape", "a%2Fb", "x" * 65):
        response = server.post(f"/v1/cache/fake-npu-model/{bad}", json={"prompt": "x"})
        assert response.status_code == 400, (bad, response.text)
    assert server.get("/v1/cache/fake-npu-model/missing").status_code == 404
    assert server.get("/v1/cache/no-such-model").status_code == 404
    unknown = server.post(CHAT, json={"model": "fake-npu-model", "use_cache": "missing",
                                      "messages": [user("hi")]})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "cache_not_found"
    assert server.post(CHAT, json={"model": "fake-npu-model", "use_cache": "../x",
                                   "messages": [user("hi")]}).status_code == 400
    gone = requests.delete(server.url + "/v1/cache/fake-npu-model/house-rules", timeout=30)
    assert gone.status_code == 200
    again = requests.delete(server.url + "/v1/cache/fake-npu-model/house-rules", timeout=30)
    assert again.status_code == 404


@pytest.mark.parametrize("abi, header", [("1.2", "temperature"), ("1.3", None)])
def test_http_unapplied_sampling_header(live_servers, rkllm_double_libs, abi, header):
    server = start_npu_server(live_servers, rkllm_double_libs, abi=abi,
                              KV_CACHE_DIR=live_servers.tmp_dir + f"/kv-{abi}")
    response = server.post(CHAT, json={"model": "fake-npu-model", "temperature": 0.01,
                                       "messages": [user("hi")], "max_tokens": 4})
    assert response.status_code == 200
    assert response.headers.get("X-RKLLM-Sampling-Unapplied") == header
    # A streamed reply says it too: the header is known before the run starts.
    streamed, payloads = server.stream_chat({"model": "fake-npu-model", "temperature": 0.01,
                                             "messages": [user("hi")], "max_tokens": 4})
    assert streamed.status_code == 200 and payloads[-1] == "[DONE]"
    assert streamed.headers.get("X-RKLLM-Sampling-Unapplied") == header


def test_a_corrupt_system_prompt_cache_is_dropped_and_rebuilt(make_engine, tmp_path):
    first, answer = seen_twice(make_engine())
    (name,) = cache_files(tmp_path)
    path = tmp_path / "cache" / "smollm2-135m-instruct" / name
    broken = path.read_bytes()[:100]          # cut short, as a full disk would leave it
    path.write_bytes(broken)
    cold = make_engine()
    cold.load(MODEL)      # the preload fails quietly and drops the file
    assert cold.health()["devices"]["cpu"]["kv_cache"]["prompt_cache"] is None
    assert not path.exists()
    again, again_answer = system_turn(cold)
    assert again.kv_mode == "full" and again_answer == answer   # greedy: the same answer
    assert again.prefilled_tokens == again.prompt_tokens        # all of it, no file made
    # Seen again later: a good cache is built for the same system text.
    seen_twice(cold)
    assert cache_files(tmp_path) == [name] and path.read_bytes() != broken


def test_snapshot_folders_of_dead_processes_are_removed_at_start(tmp_path):
    root = tmp_path / "snapshots"
    dead = root / "pid-999999999"          # no such process
    alive = root / f"pid-{os.getppid()}"   # the test runner's parent is alive
    other = root / "keep-me"
    for folder in (dead, alive, other):
        folder.mkdir(parents=True)
        (folder / "a.kv").write_bytes(b"x")
    store = SnapshotStore(str(root / f"pid-{os.getpid()}"), max_entries=2, max_bytes=100)
    assert dead.exists()                   # the constructor touches nothing on disk
    store.start()
    assert not dead.exists()
    assert alive.exists() and other.exists()
    assert (root / f"pid-{os.getpid()}").is_dir()
