"""Runtimes in child processes (issue 14): a crash of librkllmrt ends its child, never
the server. Real gunicorn servers on 127.0.0.1, the librkllmrt doubles of both ABIs
scripted to die (tests/doubles/fake_rkllmrt.c: @@crash:KIND@@ in a prompt,
@@init_crash:KIND@@ heading a model file)."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from support.doubles import RkllmRecord, make_fake_rkllm_model
from support.live_server import NPU_MODEL_ID, sse_data, streamed_content
from support.processes import children_of, gunicorn_worker, running, wait_until_gone

CRASH_KINDS = ("segv", "abort", "ill", "exit")
HOW = {"segv": "killed by SIGSEGV", "abort": "killed by SIGABRT", "ill": "killed by SIGILL",
       "exit": "exited with status 3"}


def start_crash_server(live_servers, lib: str, abi: str, **env):
    """An NPU server on the double with the normal model and one model per crash kind
    whose init dies (init-segv, init-abort, ...)."""
    folder = os.path.join(live_servers.tmp_dir, f"crash{len(live_servers.started)}")
    models = os.path.join(folder, "models")
    make_fake_rkllm_model(os.path.join(models, NPU_MODEL_ID), NPU_MODEL_ID)
    for kind in CRASH_KINDS:
        path = make_fake_rkllm_model(os.path.join(models, f"init-{kind}"), f"init-{kind}")
        with open(path, "w", encoding="ascii") as handle:
            handle.write(f"@@init_crash:{kind}@@\n")
    record = os.path.join(folder, "record.jsonl")
    server = live_servers.start({"RKLLM_MODELS_ROOT": models, "RKLLM_BUNDLED_MODEL": "false",
                                 "RKLLM_LIB_PATH": lib, "RKLLM_ABI": abi,
                                 "FAKE_RKLLM_RECORD": record, "SSE_HEARTBEAT_SECONDS": "0",
                                 **env})
    server.record = RkllmRecord(record)
    server.worker_pid = gunicorn_worker(server.proc.pid)
    return server


@pytest.fixture(scope="module", params=("1.2", "1.3"), ids=lambda abi: f"abi{abi}")
def server(request, live_servers, rkllm_double_libs):
    return start_crash_server(live_servers, rkllm_double_libs[request.param], request.param)


def chat(prompt: str, model: str = NPU_MODEL_ID) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}]}


def runtime_pid(server) -> int:
    pid = server.get("/health").json()["devices"]["npu"]["runtime_pid"]
    assert pid and running(pid)
    return pid


def crashes(server, model: str) -> dict:
    return server.get("/health").json()["runtime_processes"]["models"].get(model, {})


def served_normally(server) -> None:
    answer = server.post("/v1/chat/completions", json=chat("@@reply:still here@@"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "still here"


def assert_gone(server, old_child: int) -> None:
    """The dead child was reaped (no zombie) and the worker is the same process."""
    assert wait_until_gone(old_child), f"child {old_child} still runs"
    assert old_child not in children_of(server.worker_pid), "a zombie was left"
    assert gunicorn_worker(server.proc.pid) == server.worker_pid
    assert server.running


@pytest.mark.parametrize("kind", CRASH_KINDS)
def test_a_crash_mid_stream_ends_that_stream_with_an_error_and_the_next_request_runs(server, kind):
    served_normally(server)
    child, before = runtime_pid(server), crashes(server, NPU_MODEL_ID).get("crashes", 0)
    response, payloads = server.stream_chat(chat(f"@@count:5@@ @@crash:{kind}@@ @@crash_after:2@@"))
    assert response.status_code == 200
    assert streamed_content(payloads) == "tok0 tok1"    # what came before the crash
    assert payloads[-1] == "[DONE]"
    error = payloads[-2]["error"]
    assert "the model failed while answering" in error["message"]
    assert "librkllmrt" not in error["message"] and "SIG" not in error["message"]
    assert_gone(server, child)
    served_normally(server)                              # loaded again in a new child
    assert runtime_pid(server) != child
    record = crashes(server, NPU_MODEL_ID)
    assert record["crashes"] == before + 1 and record["restarts"] >= 1
    assert record["last_crash"]["how"] == HOW[kind]
    assert record["last_crash"]["during"] == "a run"
    assert server.record.last("crash")["kind"] == kind


@pytest.mark.parametrize("kind", ("segv",))
def test_a_crash_before_the_first_token_is_a_500_in_openai_format(server, kind):
    served_normally(server)
    child = runtime_pid(server)
    for stream in (False, True):
        response = server.post("/v1/chat/completions", stream=stream,
                               json={**chat(f"@@crash:{kind}@@ @@crash_after:0@@"),
                                     "stream": stream})
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "runtime_error" and "failed while answering" in error["message"]
        served_normally(server)
    assert_gone(server, child)


@pytest.mark.parametrize("kind", CRASH_KINDS)
def test_a_crash_during_init_is_a_500_and_other_models_still_load(server, kind):
    model = f"init-{kind}"
    failed = server.post("/v1/chat/completions", json=chat("hello", model))
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["code"] == "runtime_error" and "rkllm" not in error["message"].lower()
    record = crashes(server, model)
    assert record["crashes"] >= 1 and record["last_crash"] == {
        **record["last_crash"], "how": HOW[kind], "during": "init"}
    served_normally(server)
    npu_children = [pid for pid in children_of(server.worker_pid) if running(pid)]
    assert npu_children == [runtime_pid(server)]        # the dead init child is gone
    assert gunicorn_worker(server.proc.pid) == server.worker_pid


def test_a_model_that_keeps_crashing_is_loaded_again_only_after_a_pause(server):
    model = "init-abort"
    for _ in range(3):
        failed = server.post("/v1/chat/completions", json=chat("hello", model))
        assert failed.status_code == 500
    record = crashes(server, model)
    assert record["crashes_in_a_row"] >= 3 and record["restarts"] >= 2
    assert f"{model} crashed repeatedly; waiting" in server.log()   # the third load waited
    served_normally(server)


def test_queued_requests_wait_for_the_reload_then_run(server):
    served_normally(server)
    results = {}

    def ask(name: str, prompt: str) -> None:
        results[name] = requests.post(server.base_url + "/chat/completions",
                                      json=chat(prompt), timeout=60)
    crashing = threading.Thread(target=ask, args=(
        "crash", "@@slow:200@@ @@count:50@@ @@crash:segv@@ @@crash_after:3@@"))
    crashing.start()
    queued = [threading.Thread(target=ask, args=(f"queued{i}", f"@@reply:queued {i}@@"))
              for i in range(2)]
    for thread in queued:
        thread.start()
    for thread in [crashing] + queued:
        thread.join(60)
    assert results["crash"].status_code == 500
    for i in range(2):
        assert results[f"queued{i}"].status_code == 200
        assert results[f"queued{i}"].json()["choices"][0]["message"]["content"] == f"queued {i}"


def test_health_and_metrics_report_crashes_and_restarts(server):
    served_normally(server)
    server.post("/v1/chat/completions", json=chat("@@crash:abort@@ @@crash_after:0@@"))
    served_normally(server)
    report = server.get("/health").json()["runtime_processes"]
    assert report["isolated"] is True and report["crashes"] >= 1 and report["restarts"] >= 1
    metrics = server.get("/metrics").text
    assert f'rkllm_runtime_crashes_total{{cause="killed by SIGABRT",model="{NPU_MODEL_ID}"}}' \
        in metrics
    assert f'rkllm_runtime_restarts_total{{model="{NPU_MODEL_ID}"}}' in metrics


# ---------------------------------------------------------------- the server's exit

def loaded_child(server) -> int:
    served_normally(server)
    child = runtime_pid(server)
    assert child in children_of(server.worker_pid)
    return child


def test_sigkill_of_the_server_leaves_no_child_behind(live_servers, rkllm_double_libs):
    server = start_crash_server(live_servers, rkllm_double_libs["1.2"], "1.2")
    child = loaded_child(server)
    # Not the process group (that would kill the child too): the two server processes.
    os.kill(server.worker_pid, signal.SIGKILL)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.wait(15)
    assert wait_until_gone(child), "the runtime's child outlived the server"


# ---------------------------------------------------------------- two NPU models at once

def test_two_npu_models_stay_resident_in_their_own_domains_and_a_third_is_refused(
        live_servers, rkllm_double_libs, tmp_path):
    folder = tmp_path / "two"
    models = folder / "models"
    for name in ("text-model", "vl-model", "third-model"):
        make_fake_rkllm_model(models / name, name)
    big = make_fake_rkllm_model(models / "big-model", "big-model")
    os.truncate(big, 2 * 1024 ** 3)          # a 2 GB model file (sparse: costs nothing)
    meminfo = folder / "system" / "proc" / "meminfo"
    meminfo.parent.mkdir(parents=True)
    meminfo.write_text("MemTotal: 4194304 kB\nMemAvailable: 1048576 kB\n")   # 1 GB free
    record = str(folder / "record.jsonl")
    server = live_servers.start({"RKLLM_MODELS_ROOT": str(models), "RKLLM_BUNDLED_MODEL": "0",
                                 "RKLLM_LIB_PATH": rkllm_double_libs["1.3"], "RKLLM_ABI": "1.3",
                                 "FAKE_RKLLM_RECORD": record, "NPU_RESIDENT_MODELS": "2",
                                 "RKLLM_SYSTEM_ROOT": str(folder / "system")})
    server.record = RkllmRecord(record)
    for name in ("text-model", "vl-model", "text-model"):
        answer = server.post("/v1/chat/completions", json=chat("@@reply:ok@@", name))
        assert answer.status_code == 200, answer.text
    npu = server.get("/health").json()["devices"]["npu"]
    assert npu["model"] == "text-model"
    assert [r["model"] for r in npu["resident"]] == ["vl-model"]
    pids = {npu["runtime_pid"], npu["resident"][0]["runtime_pid"]}
    assert len(pids) == 2 and all(running(pid) for pid in pids)
    assert {npu["domain"], npu["resident"][0]["domain"]} == {0, 1}
    inits = server.record.entries("init")
    assert len(inits) == 2                            # going back to text-model loaded nothing
    assert sorted(i["base_domain_id"] for i in inits) == [0, 1]

    refused = server.post("/v1/chat/completions", json=chat("hello", "big-model"))
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "insufficient_memory" and "big-model" in error["message"]
    assert "1024 MB available" in error["message"] and "text-model" in error["message"]
    assert sorted(server.get("/health").json()["loaded_models"]) == ["text-model", "vl-model"]

    # a third that fits: the longest set aside (vl-model) makes room, its child ends
    assert server.post("/v1/chat/completions", json=chat("hi", "third-model")).status_code == 200
    assert sorted(server.get("/health").json()["loaded_models"]) == ["text-model", "third-model"]
    assert wait_until_gone(npu["resident"][0]["runtime_pid"])
    # unloading the resident one ends its child; SIGTERM closes the other with the server
    third = server.get("/health").json()["devices"]["npu"]["runtime_pid"]
    assert server.post("/v1/models/unload", json={"model": "text-model"}).json()["unloaded"] \
        == ["text-model"]
    assert wait_until_gone(npu["runtime_pid"]) and running(third)
    server.terminate()
    assert server.wait(15) == 0
    assert wait_until_gone(third)
    # every runtime was closed by the library (text, vl, third), none just killed
    assert len(server.record.entries("destroy")) == len(server.record.entries("init")) == 3


# ---------------------------------------------------------------- the backoff

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_repeated_crashes_back_off_doubling_and_a_completed_run_resets_them():
    from rkllm_api.engine.crashes import CALM_SECONDS, MAX_BACKOFF_SECONDS, CrashLog
    clock = FakeClock()
    log = CrashLog(clock)
    log.crashed("m", "killed by SIGSEGV", "init")
    assert log.backoff("m") == 0.0                    # one crash: reload at once
    pauses = []
    for _ in range(7):
        log.crashed("m", "killed by SIGSEGV", "init")
        pauses.append(log.backoff("m"))
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, MAX_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS]
    clock.now += 5.0
    assert log.backoff("m") == MAX_BACKOFF_SECONDS - 5.0   # counted from the last crash
    assert log.restarting("m") and not log.restarting("m")  # one restart per crash
    log.ran("m")
    assert log.backoff("m") == 0.0
    log.crashed("m", "exited with status 3", "a run")
    log.crashed("m", "exited with status 3", "a run")
    clock.now += CALM_SECONDS + 1
    assert log.backoff("m") == 0.0                    # quiet for a minute: no pause
    report = log.describe()
    assert report["crashes"] == 10 and report["restarts"] == 1
    assert report["models"]["m"]["by_cause"] == {"killed by SIGSEGV": 8,
                                                 "exited with status 3": 2}


# ---------------------------------------------------------------- the CPU runtime

def test_the_cpu_runtime_dying_mid_answer_ends_that_answer_and_smollm2_answers_again(
        live_servers):
    from support.live_server import start_cpu_server
    server = start_cpu_server(live_servers, SSE_HEARTBEAT_SECONDS="0")
    worker = gunicorn_worker(server.proc.pid)
    body = {"model": "smollm2-135m-instruct", "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a fox."}]}
    response = server.post("/v1/chat/completions", json={**body, "stream": True},
                           stream=True, timeout=120)
    assert response.status_code == 200
    lines = response.iter_lines()
    next(line for line in lines if b'"content"' in line)     # SmolLM2 is answering
    child = server.get("/health").json()["devices"]["cpu"]["runtime_pid"]
    os.kill(child, signal.SIGSEGV)                            # llama.cpp "crashes"
    payloads = sse_data([line for line in lines if line])
    assert payloads[-1] == "[DONE]" and "error" in payloads[-2]
    assert wait_until_gone(child) and child not in children_of(worker)
    again = server.post("/v1/chat/completions", json={**body, "max_tokens": 8}, timeout=120)
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"]
    report = server.get("/health").json()["runtime_processes"]["models"]
    assert report["smollm2-135m-instruct"]["last_crash"]["how"] == "killed by SIGSEGV"
    assert gunicorn_worker(server.proc.pid) == worker


def test_a_child_killed_while_idle_is_reported_and_the_model_loads_again(server):
    served_normally(server)
    child = runtime_pid(server)
    before = crashes(server, NPU_MODEL_ID).get("crashes", 0)
    os.kill(child, signal.SIGKILL)                 # what the OOM killer does
    assert wait_until_gone(child)
    deadline = time.monotonic() + 15               # the idle monitor looks every second
    while crashes(server, NPU_MODEL_ID).get("crashes", 0) == before:
        assert time.monotonic() < deadline, "the idle child's death was not noticed"
        time.sleep(0.1)
    last = crashes(server, NPU_MODEL_ID)["last_crash"]
    assert (last["how"], last["during"]) == ("killed by SIGKILL", "idle")
    assert child not in children_of(server.worker_pid)
    served_normally(server)


def test_a_run_wedged_past_its_abort_loses_its_process_and_waiting_requests_run(
        live_servers, rkllm_double_libs):
    """A prefill the runtime never leaves (the double's is not abortable, like the
    real one's): the client gets its limit error, and ABORT_KILL_SECONDS later the
    child is killed, counted, reaped, and the request waiting behind it is served by
    a new child; the server's worker stays."""
    server = start_crash_server(live_servers, rkllm_double_libs["1.3"], "1.3",
                                FIRST_TOKEN_TIMEOUT="1", ABORT_KILL_SECONDS="2")
    served_normally(server)
    child, runs = runtime_pid(server), len(server.record.entries("run"))
    results = {}

    def ask(name: str, prompt: str) -> None:
        results[name] = requests.post(server.base_url + "/chat/completions",
                                      json=chat(prompt), timeout=60)
    wedged = threading.Thread(target=ask, args=("wedged", "@@prefill:600000@@ hello"))
    wedged.start()
    deadline = time.monotonic() + 10
    while len(server.record.entries("run")) == runs:   # the wedged run is in the child
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    waiting = threading.Thread(target=ask, args=("waiting", "@@reply:after the kill@@"))
    waiting.start()
    for thread in (wedged, waiting):
        thread.join(60)
    assert results["wedged"].status_code >= 500
    assert "no first token within 1 s" in results["wedged"].json()["error"]["message"]
    assert results["waiting"].status_code == 200, results["waiting"].text
    assert results["waiting"].json()["choices"][0]["message"]["content"] == "after the kill"
    assert_gone(server, child)
    assert runtime_pid(server) != child
    record = crashes(server, NPU_MODEL_ID)
    assert record["last_crash"]["how"].startswith("killed by the server")
    assert record["last_crash"]["during"] == "a run"
