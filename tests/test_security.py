"""API keys and browser origins (rkllm_api/security.py) on a live server: the real
`openai` client, requests shaped like Open WebUI's and Home Assistant's, admin-only
management, open health checks, CORS for a listed origin and none for a foreign one.
The key rules themselves (parsing, matching, refusing bad settings) run in-process."""
import copy

import ollama
import openai
import pytest
import requests

from rkllm_api.config import Settings
from rkllm_api.security import (Gate, KeylessClients, KeyRing, OriginPolicy,
                                SecurityConfigError, parse_keys_file, presented_key)
from support.client_fixtures import HA, load
from support.live_server import NPU_MODEL_ID, start_npu_server
from support.openai_types import validate_openai_payload

USER_KEY = "user-key-7f3a9c2e"
ADMIN_KEY = "admin-key-51d0b8e4"
ALLOWED = "http://allowed.example:3000"
CHAT = "/v1/chat/completions"
HELLO = {"model": NPU_MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
         "max_tokens": 8}


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs, RKLLM_API_KEYS=USER_KEY,
                            RKLLM_ADMIN_KEYS=ADMIN_KEY, CORS_ORIGINS=ALLOWED,
                            KEYLESS_CLIENTS="10.0.0.0/8, fd00::/8",   # not this client
                            KV_CACHE_DIR=live_servers.tmp_dir + "/kv-keys")


def error_of(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()
    validate_openai_payload(body)
    assert body["error"]["code"] == code
    return body["error"]


# ---- keys -------------------------------------------------------------------------

def test_openai_client_with_the_key_works_and_without_it_gets_401(server):
    good = openai.OpenAI(base_url=server.base_url, api_key=USER_KEY, max_retries=0)
    answer = good.chat.completions.create(**HELLO)
    assert answer.choices[0].message.content
    streamed = good.chat.completions.create(**HELLO, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert [m.id for m in good.models.list()] == [NPU_MODEL_ID]
    wrong = openai.OpenAI(base_url=server.base_url, api_key="not-the-key-000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.chat.completions.create(**HELLO)
    assert refused.value.status_code == 401
    assert refused.value.body["code"] == "invalid_api_key"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer"},
                                     {"Authorization": f"Basic {USER_KEY}"},
                                     bearer(USER_KEY[:-1]), bearer(USER_KEY + "x"),
                                     {"x-api-key": ""}])
def test_missing_or_wrong_keys_are_401_in_openai_format(server, headers):
    response = server.post(CHAT, json=HELLO, headers=headers)
    error_of(response, 401, "invalid_api_key")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert USER_KEY not in response.text


def test_every_route_needs_the_key_but_health_and_ready(server):
    for path in ("/v1/models", f"/v1/models/{NPU_MODEL_ID}", f"/v1/cache/{NPU_MODEL_ID}",
                 "/v1/no-such-route", "/metrics"):
        error_of(server.get(path), 401, "invalid_api_key")
    assert server.get("/health").status_code == 200
    assert server.get("/ready").status_code == 200


def test_x_api_key_and_api_key_headers_are_accepted(server):
    for name in ("x-api-key", "api-key"):
        assert server.get("/v1/models", headers={name: USER_KEY}).status_code == 200


def test_openwebui_shaped_requests_with_a_key(server):
    """Open WebUI's backend (aiohttp): Bearer key, JSON, its user-info headers."""
    headers = {**bearer(USER_KEY), "Content-Type": "application/json", "Accept": "*/*",
               "User-Agent": "Python/3.11 aiohttp/3.11.18",
               "X-OpenWebUI-User-Name": "Ada", "X-OpenWebUI-User-Id": "u-1",
               "X-OpenWebUI-User-Email": "ada@example.test", "X-OpenWebUI-User-Role": "user"}
    models = server.get("/v1/models", headers=headers)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == NPU_MODEL_ID
    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    streamed = server.post(CHAT, json=body, headers=headers, stream=True)
    assert streamed.status_code == 200
    assert b"data: [DONE]" in streamed.content
    refused = server.post(CHAT, json=body, headers={**headers, **bearer("sk-unused")})
    error_of(refused, 401, "invalid_api_key")


def test_home_assistant_shaped_request_with_a_key(server):
    """Extended OpenAI Conversation: the openai client with the integration's own body."""
    body = copy.deepcopy(load(HA, "tools_mode.json"))
    body["model"] = NPU_MODEL_ID
    client = openai.OpenAI(base_url=server.base_url, api_key=USER_KEY, max_retries=0)
    answer = client.chat.completions.create(**body)
    assert answer.choices[0].finish_reason in ("stop", "tool_calls", "length")
    without = openai.OpenAI(base_url=server.base_url, api_key="sk-no-key-required",
                            max_retries=0)   # what the integration is set up with without keys
    with pytest.raises(openai.AuthenticationError):
        without.chat.completions.create(**body)


def test_ollama_client_with_the_key_works_and_gets_ollamas_error_without(server):
    """The ollama client sends the key as a Bearer header when given headers."""
    good = ollama.Client(host=server.url, headers=bearer(USER_KEY))
    answer = good.chat(model=NPU_MODEL_ID, messages=HELLO["messages"])
    assert answer.message.content
    without = ollama.Client(host=server.url)
    with pytest.raises(ollama.ResponseError) as refused:
        without.chat(model=NPU_MODEL_ID, messages=HELLO["messages"])
    assert refused.value.status_code == 401
    raw = server.post("/api/chat", json={"model": NPU_MODEL_ID, "messages": HELLO["messages"]})
    assert raw.status_code == 401 and isinstance(raw.json()["error"], str)   # Ollama's format


def test_management_needs_an_admin_key(server):
    cache = f"/v1/cache/{NPU_MODEL_ID}/rules"
    for method, path, body in (("post", "/v1/models/select", {"model": NPU_MODEL_ID}),
                               ("post", "/v1/models/unload", {}),
                               ("post", cache, {"prompt": "Answer in French."}),
                               ("delete", cache, None)):
        refused = requests.request(method, server.url + path, json=body, timeout=30,
                                   headers=bearer(USER_KEY))
        error_of(refused, 403, "admin_key_required")
    assert server.post("/v1/models/select", json={"model": NPU_MODEL_ID},
                       headers=bearer(ADMIN_KEY)).status_code == 200
    created = server.post(cache, json={"prompt": "Answer in French."}, headers=bearer(ADMIN_KEY))
    assert created.status_code == 201, created.text
    # Reading caches and using them is for every key.
    listed = server.get(f"/v1/cache/{NPU_MODEL_ID}", headers=bearer(USER_KEY))
    assert [c["name"] for c in listed.json()["data"]] == ["rules"]
    used = server.post(CHAT, json={**HELLO, "use_cache": "rules"}, headers=bearer(USER_KEY))
    assert used.status_code == 200
    gone = requests.delete(server.url + cache, headers=bearer(ADMIN_KEY), timeout=30)
    assert gone.status_code == 200
    assert server.post("/v1/models/unload", headers=bearer(ADMIN_KEY)).status_code == 200


def test_key_names_reach_the_log_and_keys_never_do(live_servers, rkllm_double_libs, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# who may call\nkitchen-tablet-3b9e1d kitchen\n"
                    "ops-secret-55aa01f2 ops admin\n")
    server = start_npu_server(live_servers, rkllm_double_libs, RKLLM_API_KEYS_FILE=str(keys))
    assert server.get("/v1/models", headers=bearer("kitchen-tablet-3b9e1d")).status_code == 200
    assert server.post("/v1/models/unload", headers=bearer("kitchen-tablet-3b9e1d")
                       ).status_code == 403
    assert server.post("/v1/models/unload", headers=bearer("ops-secret-55aa01f2")
                       ).status_code == 200
    server.get("/v1/models", headers=bearer("wrong-guess-000000"))
    log = server.log()
    assert "key=kitchen" in log and "key=ops" in log
    for secret in ("kitchen-tablet-3b9e1d", "ops-secret-55aa01f2", "wrong-guess-000000"):
        assert secret not in log


def test_metrics_open_only_when_configured(live_servers, rkllm_double_libs):
    server = start_npu_server(live_servers, rkllm_double_libs, RKLLM_API_KEYS=USER_KEY,
                              METRICS_PUBLIC="1")
    assert server.get("/metrics").status_code == 200
    error_of(server.get("/v1/models"), 401, "invalid_api_key")


def test_keyless_clients_use_the_api_without_a_key_but_never_manage_it(
        live_servers, rkllm_double_libs):
    """Home Assistant's Ollama integration sends no key: its address may be listed."""
    server = start_npu_server(live_servers, rkllm_double_libs, RKLLM_API_KEYS=USER_KEY,
                              RKLLM_ADMIN_KEYS=ADMIN_KEY, KEYLESS_CLIENTS="127.0.0.1")
    answer = ollama.Client(host=server.url).chat(model=NPU_MODEL_ID,
                                                 messages=HELLO["messages"])
    assert answer.message.content
    assert server.post(CHAT, json=HELLO).status_code == 200
    error_of(server.post("/v1/models/unload"), 403, "admin_key_required")
    error_of(server.get("/v1/models", headers=bearer("wrong-guess-000000")), 401,
             "invalid_api_key")                      # a wrong key stays wrong
    assert server.post("/v1/models/unload", headers=bearer(ADMIN_KEY)).status_code == 200
    assert "key=keyless@127.0.0.1" in server.log()


def test_a_forwarding_header_does_not_make_a_client_keyless(server):
    for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
        value = "for=10.1.2.3" if header == "Forwarded" else "10.1.2.3"
        error_of(server.post(CHAT, json=HELLO, headers={header: value}), 401,
                 "invalid_api_key")


# ---- origins ----------------------------------------------------------------------

def preflight(server, origin):
    return requests.options(server.url + CHAT, timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_a_listed_origin_gets_cors(server):
    answer = preflight(server, ALLOWED)
    assert answer.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in answer.headers["Access-Control-Allow-Methods"]
    assert "authorization" in answer.headers["Access-Control-Allow-Headers"].lower()
    chat = server.post(CHAT, json=HELLO, headers={**bearer(USER_KEY), "Origin": ALLOWED})
    assert chat.status_code == 200
    assert chat.headers["Access-Control-Allow-Origin"] == ALLOWED


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://allowed.example",
                                    "http://allowed.example:3000.evil.example",
                                    "https://allowed.example:3000"])
def test_a_foreign_origin_gets_no_cors_and_is_refused(server, origin):
    answer = preflight(server, origin)
    assert "Access-Control-Allow-Origin" not in answer.headers
    assert "Access-Control-Allow-Methods" not in answer.headers
    chat = server.post(CHAT, json=HELLO, headers={**bearer(USER_KEY), "Origin": origin})
    error_of(chat, 403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in chat.headers


def test_the_servers_own_origin_is_allowed(server):
    chat = server.post(CHAT, json=HELLO, headers={**bearer(USER_KEY), "Origin": server.url})
    assert chat.status_code == 200


def test_without_keys_a_foreign_page_still_cannot_manage_the_server(npu_server):
    """A page's no-cors POST needs no preflight: the Origin check refuses it."""
    refused = npu_server.post("/v1/models/unload", headers={"Origin": "http://evil.example"})
    error_of(refused, 403, "origin_not_allowed")
    assert npu_server.post("/v1/models/unload").status_code == 200


# ---- the rules, in-process ----------------------------------------------------------

def settings(**values):
    return Settings(**values)


def test_keys_file_lines():
    parsed = parse_keys_file("\n# comment\nabcdefgh1\nabcdefgh2 phone\n"
                             "abcdefgh3 ops admin  # trailing comment\n")
    assert parsed == [("abcdefgh1", "line-3", False), ("abcdefgh2", "phone", False),
                      ("abcdefgh3", "ops", True)]
    for bad in ("short", "abcdefgh1 name root", "abcdefgh1 bad/name", "a b c d"):
        with pytest.raises(SecurityConfigError):
            parse_keys_file(bad)


def test_key_ring_matches_whole_keys_only_and_keeps_the_stronger_role():
    ring = KeyRing.from_settings(settings(api_keys="abcdefgh1, sharedkey9",
                                          admin_keys="sharedkey9"))
    assert ring.enabled and ring.has_admin
    assert ring.match("abcdefgh1").name == "key-1"
    assert ring.match("sharedkey9").admin
    for wrong in ("abcdefgh", "abcdefgh12", "ABCDEFGH1", "", " abcdefgh1"):
        assert ring.match(wrong) is None
    assert not KeyRing.from_settings(settings()).enabled


@pytest.mark.parametrize("values", [{"api_keys": "short"}, {"admin_keys": "has space in"},
                                    {"api_keys_file": "/nonexistent/keys"},
                                    {"cors_origins": "evil.example"},
                                    {"cors_origins": "http://ok.example/path"},
                                    {"cors_origins": "null"},
                                    {"keyless_clients": "homeassistant.local"},
                                    {"keyless_clients": "192.168.1.0/33"}])
def test_unusable_settings_refuse_to_start(values):
    with pytest.raises(SecurityConfigError):
        Gate.from_settings(settings(**values))


def test_keyless_addresses_and_networks():
    keyless = KeylessClients.from_settings(settings(
        keyless_clients="192.168.1.20, 10.0.0.0/8 ,fd00::/8,"))
    for address in ("192.168.1.20", "10.200.3.4", "::ffff:192.168.1.20", "fd12::1",
                    "fd12::1%eth0"):
        assert keyless.admits(address), address
    for address in ("192.168.1.21", "127.0.0.1", "::1", "fe80::1", "", None, "garbage"):
        assert not keyless.admits(address), address
    assert not KeylessClients.from_settings(settings()).admits("127.0.0.1")


def test_presented_key_sources():
    assert presented_key({"Authorization": "Bearer  k1 "}) == "k1"
    assert presented_key({"Authorization": "bearer k2"}) == "k2"
    assert presented_key({"x-api-key": "k3"}) == "k3"
    assert presented_key({"api-key": "k4"}) == "k4"
    assert presented_key({"Authorization": "Basic k5"}) is None
    assert presented_key({}) is None


def test_origin_policy():
    policy = OriginPolicy.from_settings(settings(cors_origins=f"{ALLOWED}, https://b.example/"))
    own = "http://192.168.1.5:8000/"
    assert policy.allows(ALLOWED, own) and policy.allows("https://b.example", own)
    assert policy.allows("http://192.168.1.5:8000", own)          # same origin
    assert not policy.allows("http://192.168.1.5:8001", own)
    assert not policy.allows("null", own)
    assert OriginPolicy.from_settings(settings(cors_origins="*")).allows("http://x", own)
