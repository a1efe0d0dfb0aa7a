"""Prometheus metrics: /metrics scraped from a live server during a streamed chat on the
librkllmrt double and parsed with prometheus_client's own parser, the NPU gauges read
from a fake sysfs tree, and a server that runs without the Prometheus packages."""
from __future__ import annotations

import os
import threading

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from rkllm_api import metrics
from rkllm_api.config import Settings
from rkllm_api.engine.manager import Engine
from rkllm_api.engine.observer import GenerationReport
from rkllm_api.models.registry import Registry
from support.board import make_board, write
from support.live_server import NPU_MODEL_ID, sse_data, start_npu_server

# Families the seed server had, then what vLLM / llama.cpp users chart, then the NPU's.
SEED_FAMILIES = ("rkllm_tokens_generated", "rkllm_prefill_duration", "rkllm_decode_duration",
                 "rkllm_tokens_per_request", "rkllm_queue_wait_seconds",
                 "rkllm_active_requests", "rkllm_model_load_seconds", "rkllm_current_model")
SERVING_FAMILIES = ("rkllm_time_to_first_token_seconds", "rkllm_inter_token_latency_seconds",
                    "rkllm_prompt_tokens", "rkllm_generation_tokens", "rkllm_requests_finished",
                    "rkllm_queue_length", "rkllm_kv_cache_hits", "rkllm_kv_cache_misses",
                    "rkllm_prefill_tokens_avoided")
NPU_FAMILIES = ("rkllm_npu_load_percent", "rkllm_npu_frequency_hertz")


def parse(text: str) -> dict:
    """{family name: {(sample name, sorted label items): value}}."""
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value
                                 for s in family.samples}
    return families


def value(families, family, sample=None, **labels) -> float:
    wanted = tuple(sorted(labels.items()))
    for (name, found), number in families[family].items():
        if name == (sample or family) and found == wanted:
            return number
    raise KeyError(f"{sample or family}{labels} not in {sorted(families[family])}")


def board_with_npu_activity(root) -> str:
    make_board(root)
    write(root, "/proc/rknpu/load", "NPU load:  Core0: 45%, Core1:  7%, Core2:  0%,\n")
    write(root, "/sys/class/devfreq/fdab0000.npu/cur_freq", "1000000000\n")
    return str(root)


# ------------------------------------------------------------------ in process

def test_reports_become_counters_and_histograms(tmp_path):
    observer = metrics.EngineMetrics()
    report = dict(model="m", device="npu", kv_mode="reuse", prompt_tokens=120,
                  prefilled_tokens=20, reused_tokens=100, generated_tokens=3,
                  prefill_seconds=0.4, decode_seconds=0.3, time_to_first_token=0.9,
                  token_gaps=(0.1, 0.2))
    observer.generation_finished(GenerationReport(finish="stop", **report))
    observer.generation_finished(GenerationReport(finish="cancelled", **{
        **report, "kv_mode": "full", "reused_tokens": 0, "token_gaps": ()}))
    observer.queue_waited("npu", 1.5)
    observer.model_loaded("m", "npu", 3.0)
    observer.first_token("m", "npu", 0.9)
    from prometheus_client import generate_latest
    found = parse(generate_latest(observer.registry).decode())
    labels = {"model": "m", "device": "npu"}
    assert value(found, "rkllm_tokens_generated", "rkllm_tokens_generated_total", **labels) == 6
    assert value(found, "rkllm_prompt_tokens", "rkllm_prompt_tokens_total", **labels) == 240
    assert value(found, "rkllm_requests_finished", "rkllm_requests_finished_total",
                 finish_reason="cancelled", **labels) == 1
    assert value(found, "rkllm_kv_cache_hits", "rkllm_kv_cache_hits_total", mode="reuse",
                 **labels) == 1
    assert value(found, "rkllm_kv_cache_misses", "rkllm_kv_cache_misses_total", **labels) == 1
    assert value(found, "rkllm_prefill_tokens_avoided", "rkllm_prefill_tokens_avoided_total",
                 **labels) == 100
    assert value(found, "rkllm_inter_token_latency_seconds",
                 "rkllm_inter_token_latency_seconds_count", **labels) == 2
    assert value(found, "rkllm_inter_token_latency_seconds",
                 "rkllm_inter_token_latency_seconds_sum", **labels) == pytest.approx(0.3)
    assert value(found, "rkllm_queue_wait_seconds", "rkllm_queue_wait_seconds_sum",
                 device="npu") == 1.5
    # buckets count "less or equal": a gap on a bound is in it, one past the last only in +Inf
    observer.generation_finished(GenerationReport(finish="stop", **{
        **report, "model": "b", "token_gaps": (0.01, 0.0100001, 5.0)}))
    found = parse(generate_latest(observer.registry).decode())
    buckets = {le: value(found, "rkllm_inter_token_latency_seconds",
                         "rkllm_inter_token_latency_seconds_bucket", model="b", device="npu", le=le)
               for le in ("0.005", "0.01", "0.02", "2.0", "+Inf")}
    assert buckets == {"0.005": 0, "0.01": 1, "0.02": 2, "2.0": 2, "+Inf": 3}
    assert value(found, "rkllm_model_load_seconds", "rkllm_model_load_seconds_count",
                 **labels) == 1


def test_state_is_read_at_scrape_time_from_the_engine_and_sysfs(tmp_path):
    root = board_with_npu_activity(tmp_path / "root")
    settings = Settings(models_root=str(tmp_path / "models"), include_bundled_model=False,
                        idle_unload_seconds=0)
    engine = Engine(settings, Registry(settings))
    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry()
    registry.register(metrics.StateCollector(engine, root))
    found = parse(generate_latest(registry).decode())
    assert value(found, "rkllm_active_requests") == 0
    assert value(found, "rkllm_queue_length", device="npu") == 0
    assert found["rkllm_current_model"] == {}      # nothing loaded
    assert [value(found, "rkllm_npu_load_percent", core=str(c)) for c in range(3)] == [45, 7, 0]
    assert value(found, "rkllm_npu_frequency_hertz") == 1e9
    write(root, "/proc/rknpu/load", "NPU load:  Core0: 99%, Core1: 98%, Core2: 97%,\n")
    again = parse(generate_latest(registry).decode())
    assert value(again, "rkllm_npu_load_percent", core="2") == 97   # read again, not cached
    bare = CollectorRegistry()
    bare.register(metrics.StateCollector(engine, str(tmp_path / "no-npu")))
    assert not set(NPU_FAMILIES) & set(parse(generate_latest(bare).decode()))


# ------------------------------------------------------------------ a live server

def test_metrics_scraped_during_a_streamed_chat(live_servers, rkllm_double_libs, tmp_path):
    root = board_with_npu_activity(tmp_path / "root")
    server = start_npu_server(live_servers, rkllm_double_libs, RKLLM_SYSTEM_ROOT=root)
    first = [{"role": "user", "content": "@@reply:one two three@@ count please"}]
    answer = server.post("/v1/chat/completions", json={"model": NPU_MODEL_ID, "messages": first})
    assert answer.status_code == 200 and answer.headers["X-RKLLM-KV"] == "full"
    second = first + [{"role": "assistant", "content": answer.json()["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "and again"}]
    reused = server.post("/v1/chat/completions", json={"model": NPU_MODEL_ID, "messages": second})
    assert reused.headers["X-RKLLM-KV"] == "reuse"

    # A slow stream: scrape while it runs, after its first tokens arrived.
    body = {"model": NPU_MODEL_ID, "stream": True,
            "messages": [{"role": "user", "content": "@@slow:150@@ @@count:40@@ stream"}]}
    response = requests.post(server.base_url + "/chat/completions", json=body, stream=True,
                             timeout=60)
    lines = response.iter_lines()
    received = [line for line, _ in zip(lines, range(4)) if line]   # role + first tokens
    assert received, "the stream produced nothing"
    found = parse(server.get("/metrics").text)
    rest = [line for line in lines if line]
    assert sse_data(received + rest)[-1] == "[DONE]"

    for family in SEED_FAMILIES + SERVING_FAMILIES + NPU_FAMILIES:
        assert family in found, family
    npu = {"model": NPU_MODEL_ID, "device": "npu"}
    # live state: the stream runs, its model is loaded, nobody waits
    assert value(found, "rkllm_active_requests") == 1
    assert value(found, "rkllm_current_model", **npu) == 1
    assert value(found, "rkllm_queue_length", device="npu") == 0
    # the two finished runs
    generated = value(found, "rkllm_tokens_generated", "rkllm_tokens_generated_total", **npu)
    usage = [answer.json()["usage"], reused.json()["usage"]]
    assert generated == sum(u["completion_tokens"] for u in usage) == \
        value(found, "rkllm_generation_tokens", "rkllm_generation_tokens_total", **npu)
    assert value(found, "rkllm_prompt_tokens", "rkllm_prompt_tokens_total", **npu) == \
        sum(u["prompt_tokens"] for u in usage)
    assert value(found, "rkllm_requests_finished", "rkllm_requests_finished_total",
                 finish_reason="stop", **npu) == 2
    assert value(found, "rkllm_kv_cache_misses", "rkllm_kv_cache_misses_total", **npu) == 1
    assert value(found, "rkllm_kv_cache_hits", "rkllm_kv_cache_hits_total", mode="reuse",
                 **npu) == 1
    avoided = value(found, "rkllm_prefill_tokens_avoided", "rkllm_prefill_tokens_avoided_total", **npu)
    assert avoided == usage[1]["prompt_tokens"] - int(reused.headers["X-RKLLM-Prefill-Tokens"]) > 0
    assert value(found, "rkllm_tokens_per_request", "rkllm_tokens_per_request_count", **npu) == 2
    assert value(found, "rkllm_prefill_duration", "rkllm_prefill_duration_count", **npu) == 2
    assert value(found, "rkllm_decode_duration", "rkllm_decode_duration_sum", **npu) >= 0
    assert value(found, "rkllm_inter_token_latency_seconds",    # one gap fewer than tokens
                 "rkllm_inter_token_latency_seconds_count", **npu) == generated - 2
    # observed at the first token: the running stream counts already
    assert value(found, "rkllm_time_to_first_token_seconds",
                 "rkllm_time_to_first_token_seconds_count", **npu) == 3
    assert value(found, "rkllm_queue_wait_seconds", "rkllm_queue_wait_seconds_count",
                 device="npu") == 3
    assert value(found, "rkllm_model_load_seconds", "rkllm_model_load_seconds_count", **npu) == 1
    assert [value(found, "rkllm_npu_load_percent", core=str(c)) for c in range(3)] == [45, 7, 0]
    assert value(found, "rkllm_npu_frequency_hertz") == 1e9
    # HTTP requests by endpoint and status (prometheus-flask-exporter)
    chat_endpoint = "openai.chat_completions/v1/chat/completions"
    assert value(found, "flask_http_request_duration_seconds",
                 "flask_http_request_duration_seconds_count", method="POST", status="200",
                 endpoint=chat_endpoint) == 3     # the stream counts once its headers went


def test_the_server_runs_without_the_prometheus_packages(live_servers, rkllm_double_libs,
                                                         tmp_path):
    blocked = tmp_path / "blocked"
    for package in ("prometheus_client", "prometheus_flask_exporter"):
        (blocked / package).mkdir(parents=True)
        (blocked / package / "__init__.py").write_text(
            f"raise ImportError('{package} is blocked for this test')\n")
    path = os.pathsep.join(filter(None, [str(blocked), os.environ.get("PYTHONPATH")]))
    server = start_npu_server(live_servers, rkllm_double_libs, PYTHONPATH=path)
    assert server.get("/metrics").status_code == 404
    chat = server.post("/v1/chat/completions", json={
        "model": NPU_MODEL_ID, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200
    assert "metrics off: prometheus-client / prometheus-flask-exporter are not installed" \
        in server.log()


def test_metrics_survive_concurrent_scrapes_and_streams(live_servers, rkllm_double_libs):
    """Scrapes while streams start and end (bounded: 3 streams, 10 scrapes)."""
    server = start_npu_server(live_servers, rkllm_double_libs)
    errors = []

    def stream():
        try:
            _, payloads = server.stream_chat({"model": NPU_MODEL_ID, "messages": [
                {"role": "user", "content": "@@slow:20@@ @@count:15@@ go"}]})
            assert payloads[-1] == "[DONE]"
        except Exception as exc:   # reported below: an assert in a thread is lost
            errors.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(10):
        response = server.get("/metrics")
        assert response.status_code == 200
        parse(response.text)
    for thread in threads:
        thread.join(60)
    assert errors == []
    final = parse(server.get("/metrics").text)
    assert value(final, "rkllm_requests_finished", "rkllm_requests_finished_total",
                 model=NPU_MODEL_ID, device="npu", finish_reason="stop") == 3
