"""Error bodies never name server paths or native libraries; the log keeps them
(live server on the librkllmrt double, and the net beneath in-process)."""
import pytest

from rkllm_api.errors import public_text
from support.live_server import NPU_MODEL_ID, start_npu_server

BROKEN = "broken-npu-model"
CHAT = "/v1/chat/completions"
SECRETS = ("/", "librkllmrt", "rkllm_", ".rkllm", "ctypes", "Traceback")


@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs):
    server = start_npu_server(live_servers, rkllm_double_libs, extra_models=(BROKEN,))
    with open(f"{server.env['RKLLM_MODELS_ROOT']}/{BROKEN}/{BROKEN}.rkllm", "wb") as model:
        model.write(b"@@init_fail@@\n")   # the double's rkllm_init fails on it
    return server


def message_of(response) -> str:
    payload = response.json()
    return payload["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_that_fails_to_load(server, stream):
    response = server.post(CHAT, json={"model": BROKEN, "stream": stream,
                                       "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 500
    message = message_of(response)
    assert BROKEN in message and not any(s in message for s in SECRETS), message
    assert f"{BROKEN}.rkllm" in server.log()   # the details are in the log


def test_a_runtime_error_during_the_answer(server):
    response = server.post(CHAT, json={"model": NPU_MODEL_ID, "messages": [
        {"role": "user", "content": "@@count:5@@ @@error:2@@"}]})
    assert response.status_code == 500
    message = message_of(response)
    assert "server log" in message and not any(s in message for s in SECRETS), message


def test_the_net_beneath():
    assert public_text("rkllm_load_prompt_cache failed (code -1) for /var/lib/m/a.cache") == \
        "the runtime failed (code -1) for [path]"
    assert public_text("cannot load /usr/lib/librkllmrt.so: bad ELF") == \
        "cannot load [path]: bad ELF"
    assert public_text("llama_cpp could not load ~/models/x.gguf") == \
        "the runtime could not load [path]"
    kept = "no first token within 3 s (first_token_timeout); generation aborted"
    assert public_text(kept) == kept
    assert public_text("see http://example.test/a") == "see http://example.test/a"
