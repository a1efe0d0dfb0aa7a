"""The engine on real runtimes: the librkllmrt C double (scripted by @@directives@@
in the prompt) through rkllm_ctypes, and llama.cpp on the bundled SmolLM2."""
import threading
import time

import pytest

from rkllm_api.config import Settings
from rkllm_api.engine.errors import (ModelLoadFailed, ModelNotFound, ModelUnavailable,
                                     QueueFull, QueueTimeout, ShuttingDown)
from rkllm_api.engine.generation import GenerationJob, Heartbeat
from rkllm_api.engine.manager import Engine
from rkllm_api.models.registry import Registry
from rkllm_api.runtimes.base import EventKind, FinishReason, RunRequest, TokenEvent
from rkllm_api.runtimes.factory import open_runtime
from support.doubles import make_fake_rkllm_model

WAIT_LIMIT = 10.0  # seconds any polling loop in these tests may take


def wait_until(predicate, timeout=WAIT_LIMIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def job(prompt, request_id="req", model="npu-a", **run):
    return GenerationJob(model=model, run=RunRequest(prompt, **run), request_id=request_id)


def drain(generation):
    """All events of a generation: (text of TEXT events, heartbeats, final event)."""
    texts, heartbeats, final = [], [], None
    for item in generation.events():
        if isinstance(item, Heartbeat):
            heartbeats.append(item)
        elif item.kind is EventKind.TEXT:
            texts.append(item.text)
        else:
            final = item
    return "".join(texts), heartbeats, final


def npu(engine):
    return engine.health()["devices"]["npu"]


@pytest.fixture
def models_root(tmp_path):
    root = tmp_path / "models"
    make_fake_rkllm_model(root / "npu-a", "a")
    make_fake_rkllm_model(root / "npu-b", "b")
    return root


@pytest.fixture
def make_engine(models_root, rkllm_double_libs, rkllm_record):
    """Builds engines on the 1.3 double over models_root; shuts them all down after."""
    engines = []

    def build(runtime_factory=open_runtime, **overrides):
        values = dict(models_root=str(models_root), rkllm_lib_path=rkllm_double_libs["1.3"],
                      include_bundled_model=False, idle_unload_seconds=0,
                      heartbeat_seconds=0)
        values.update(overrides)
        settings = Settings(**values)
        engine = Engine(settings, Registry(settings), runtime_factory)
        engine.start()
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.shutdown(timeout=5)


def start_thread(target, *args):
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


# ---- a plain run ----
def test_generation_streams_the_answer_and_frees_the_slot(make_engine):
    engine = make_engine()
    generation = engine.generate(job("hello", "r1"))
    text, _, final = drain(generation)
    assert text == "Hello from the NPU double."
    assert final.kind is EventKind.FINISH and final.finish_reason is FinishReason.STOP
    assert generation.result.text == text and generation.stop_cause is None
    assert npu(engine)["busy"] is False and npu(engine)["model"] == "npu-a"


def test_limits_and_heartbeat_set_to_zero_are_disabled(make_engine):
    engine = make_engine(first_token_timeout=0, silence_timeout=0, total_timeout=0,
                         heartbeat_seconds=0, repetition_threshold=0)
    text, heartbeats, final = drain(engine.generate(job("@@slow:30@@ @@count:3@@", "z")))
    assert text == "tok0 tok1 tok2" and heartbeats == [] and final.kind is EventKind.FINISH


def test_unknown_model_raises_model_not_found(make_engine):
    engine = make_engine()
    with pytest.raises(ModelNotFound) as caught:
        engine.generate(job("hello", model="no-such-model"))
    assert caught.value.model == "no-such-model"


def test_thinking_is_turned_off_for_models_without_the_capability(make_engine, rkllm_record):
    engine = make_engine()
    drain(engine.generate(job("hello", enable_thinking=True)))
    assert rkllm_record.last("run")["enable_thinking"] in (0, False)


# ---- queueing ----
def test_waiting_requests_are_served_in_arrival_order(make_engine, rkllm_record):
    engine = make_engine()
    served = []
    holder = engine.generate(job("@@slow:150@@ @@count:3@@ first", "r0"))

    def client(number):
        generation = engine.generate(job(f"@@count:1@@ waiter-{number}", f"r{number}"))
        served.append(number)
        drain(generation)

    threads = []
    for number in range(1, 5):
        threads.append(start_thread(client, number))
        assert wait_until(lambda: npu(engine)["queue_length"] == number)
    drain(holder)
    for thread in threads:
        thread.join(WAIT_LIMIT)
    assert sorted(served) == [1, 2, 3, 4]
    # The double's record is the order the runs really happened in (a client thread
    # may append to `served` late, after the next one was already granted the slot).
    prompts = [entry["prompt"] for entry in rkllm_record.entries("run")]
    assert [p.split()[-1] for p in prompts] == ["first"] + [f"waiter-{n}" for n in range(1, 5)]


def test_full_queue_raises_queue_full_with_retry_after(make_engine):
    engine = make_engine(queue_max_length=1)
    holder = engine.generate(job("@@hang@@", "holder"))
    outcome = {}
    waiter = start_thread(lambda: outcome.setdefault("gen", engine.generate(job("x", "w"))))
    assert wait_until(lambda: npu(engine)["queue_length"] == 1)
    with pytest.raises(QueueFull) as caught:
        engine.generate(job("x", "rejected"))
    assert caught.value.retry_after >= 1
    holder.cancel()
    waiter.join(WAIT_LIMIT)
    text, _, final = drain(outcome["gen"])
    assert final.finish_reason is FinishReason.STOP


def test_queue_wait_is_bounded_by_queue_timeout(make_engine):
    engine = make_engine(queue_timeout_seconds=0.3)
    holder = engine.generate(job("@@hang@@", "holder"))
    with pytest.raises(QueueTimeout) as caught:
        engine.generate(job("x", "late"))
    assert caught.value.retry_after >= 1
    assert npu(engine)["queue_length"] == 0
    assert npu(engine)["request_id"] == "holder"
    holder.cancel()


# ---- cancel ----
def test_cancel_frees_the_slot_and_stops_the_run(make_engine):
    engine = make_engine(queue_max_length=0)  # a busy slot would reject at once
    generation = engine.generate(job("@@slow:10@@ @@count:2000@@", "c1"))
    events = generation.events()
    first = [next(events) for _ in range(3)]
    assert all(e.kind is EventKind.TEXT for e in first)
    generation.cancel()
    # When cancel() returns the run is over and the device free (not "soon").
    assert generation.done and npu(engine)["busy"] is False
    assert generation.result.finish_reason is FinishReason.ABORTED
    assert generation.result.perf.generate_tokens < 100  # nowhere near the 2000 asked
    generation.cancel()  # idempotent
    text, _, final = drain(engine.generate(job("hello", "c2")))
    assert text == "Hello from the NPU double."


def test_cancel_ends_a_hanging_run(make_engine):
    engine = make_engine()
    generation = engine.generate(job("@@hang@@", "h1"))
    events = generation.events()  # kept: a dropped generator would cancel by itself
    assert next(events).kind is EventKind.TEXT
    assert npu(engine)["busy"] is True
    generation.cancel()
    assert generation.done and npu(engine)["busy"] is False


def test_closing_the_event_stream_early_cancels(make_engine):
    engine = make_engine()
    generation = engine.generate(job("@@slow:10@@ @@count:2000@@", "g1"))
    events = generation.events()
    next(events)
    events.close()
    assert generation.stop_cause == "cancelled"
    assert generation.wait(1.0) and npu(engine)["busy"] is False


# ---- limits, heartbeat, repetition ----
def test_first_token_limit_aborts_with_an_error_naming_it(make_engine):
    engine = make_engine(first_token_timeout=0.2)
    generation = engine.generate(job("@@slow:5000@@ @@count:3@@", "f1"))
    text, _, final = drain(generation)
    assert text == ""
    assert final.kind is EventKind.ERROR and "first_token_timeout" in final.error
    assert generation.stop_cause == "first_token_timeout"
    assert generation.result.finish_reason is FinishReason.ERROR
    assert npu(engine)["busy"] is False


def test_silence_limit_aborts_a_hang_after_the_first_token(make_engine):
    engine = make_engine(silence_timeout=0.2)
    generation = engine.generate(job("@@hang@@", "s1"))
    text, _, final = drain(generation)
    assert text != ""
    assert final.kind is EventKind.ERROR and "silence_timeout" in final.error
    assert npu(engine)["busy"] is False


def test_total_limit_aborts_a_long_run(make_engine):
    engine = make_engine(total_timeout=0.3)
    generation = engine.generate(job("@@slow:20@@ @@count:2000@@", "t1"))
    text, _, final = drain(generation)
    assert 0 < len(text.split()) < 2000
    assert final.kind is EventKind.ERROR and "total_timeout" in final.error
    assert generation.result.error == final.error


def test_total_limit_holds_while_tokens_never_stop_coming(make_engine):
    """A runtime faster than the reader never lets the queue run dry: the total
    limit must still end the run (it is checked per token, not only on waits)."""
    engine = make_engine(total_timeout=0.3, silence_timeout=0, first_token_timeout=0)
    generation = engine.generate(job("@@count:2000000@@", "t2", max_new_tokens=2_000_001))
    text, _, final = drain(generation)
    assert final.kind is EventKind.ERROR and "total_timeout" in final.error
    assert 0 < len(text.split()) < 2_000_000


def test_heartbeats_flow_while_the_first_token_is_slow(make_engine):
    engine = make_engine(heartbeat_seconds=0.05)
    generation = engine.generate(job("@@slow:400@@ @@count:2@@", "hb"))
    items = list(generation.events())
    first_text = next(i for i, item in enumerate(items) if isinstance(item, TokenEvent))
    assert first_text >= 2
    assert all(isinstance(item, Heartbeat) and item.waiting_for_first_token
               for item in items[:first_text])
    assert items[-1].kind is EventKind.FINISH


def test_repetition_guard_stops_a_looping_answer(make_engine, rkllm_record):
    engine = make_engine()
    paragraph = "The answer is forty two, as everybody knows. "
    reply = paragraph * 8 + "THE-END"
    generation = engine.generate(job(f"@@slow:3@@ @@reply:{reply}@@", "loop"))
    text, _, final = drain(generation)
    assert final.kind is EventKind.FINISH and final.finish_reason is FinishReason.STOP
    assert "THE-END" not in text
    assert paragraph * 2 in text and len(text) < len(paragraph) * 4
    assert generation.stop_cause == "repetition"
    assert generation.result.finish_reason is FinishReason.STOP
    assert rkllm_record.entries("abort")  # the run itself was stopped, not just hidden
    assert generation.result.perf.generate_tokens < len(reply)


# ---- model management ----
def test_hot_switch_closes_the_previous_model_before_loading_the_next(make_engine, rkllm_record):
    engine = make_engine()
    drain(engine.generate(job("hello", "a1", model="npu-a")))
    drain(engine.generate(job("hello", "b1", model="npu-b")))
    calls = [(e["call"], e.get("model_path", "").rsplit("/", 1)[-1])
             for e in rkllm_record.entries() if e["call"] in ("init", "destroy")]
    assert calls == [("init", "a.rkllm"), ("destroy", ""), ("init", "b.rkllm")]
    assert engine.health()["loaded_models"] == ["npu-b"]


def test_idle_model_is_unloaded(make_engine, rkllm_record):
    engine = make_engine(idle_unload_seconds=0.2)
    engine.start()
    drain(engine.generate(job("hello", "i1")))
    assert wait_until(lambda: engine.health()["loaded_models"] == [])
    assert rkllm_record.entries("destroy")


def test_load_and_unload(make_engine):
    engine = make_engine()
    assert engine.load("npu-a").id == "npu-a"
    assert engine.health()["loaded_models"] == ["npu-a"]
    assert engine.unload("npu-b") == []
    assert engine.unload() == ["npu-a"]
    assert engine.health()["loaded_models"] == []
    with pytest.raises(ModelNotFound):
        engine.unload("no-such-model")


def test_load_failure_raises_and_leaves_the_slot_free(make_engine, models_root):
    broken = models_root / "broken"
    broken.mkdir()
    # the double refuses it at rkllm_init (an empty file the registry refuses already)
    (broken / "broken.rkllm").write_bytes(b"@@init_fail@@")
    engine = make_engine(queue_max_length=0)
    with pytest.raises(ModelLoadFailed) as caught:
        engine.generate(job("hello", "bad", model="broken"))
    assert caught.value.message
    assert npu(engine)["busy"] is False and npu(engine)["model"] is None
    text, _, _ = drain(engine.generate(job("hello", "good")))
    assert text == "Hello from the NPU double."


def test_aborted_run_makes_the_kv_cache_unknown_and_it_is_cleared_before_reuse(
        make_engine, rkllm_record):
    engine = make_engine()
    generation = engine.generate(job("@@hang@@", "k1", keep_history=True))
    events = generation.events()
    next(events)
    generation.cancel()
    assert npu(engine)["kv_cache"]["known"] is False
    drain(engine.generate(job("hello", "k2", keep_history=True)))
    calls = [e["call"] for e in rkllm_record.entries() if e["call"] in ("run", "clear_kv_cache")]
    assert calls == ["run", "clear_kv_cache", "run"]
    assert npu(engine)["kv_cache"]["known"] is True


# ---- devices and shutdown ----
def test_cpu_model_answers_while_the_npu_is_busy(make_engine, smollm_path):
    pytest.importorskip("llama_cpp")
    engine = make_engine(include_bundled_model=True, gguf_max_context_length=512, cpu_threads=1)
    npu_generation = engine.generate(job("@@hang@@", "npu-busy"))
    npu_events = npu_generation.events()
    next(npu_events)
    cpu_generation = engine.generate(job("Hi", "cpu-1", model="smollm2", max_new_tokens=3))
    text, _, final = drain(cpu_generation)
    assert final.kind is EventKind.FINISH and text
    health = engine.health()["devices"]
    assert health["npu"]["busy"] is True and health["npu"]["request_id"] == "npu-busy"
    assert health["cpu"]["model"] == "smollm2-135m-instruct"
    npu_generation.cancel()


def test_shutdown_aborts_work_refuses_new_work_and_meets_its_timeout(make_engine, rkllm_record):
    engine = make_engine()
    running = engine.generate(job("@@hang@@", "running"))
    events = running.events()
    next(events)
    refused = []

    def waiter():
        try:
            engine.generate(job("x", "waiting"))
        except ShuttingDown as exc:
            refused.append(exc)

    thread = start_thread(waiter)
    assert wait_until(lambda: npu(engine)["queue_length"] == 1)
    engine.shutdown(timeout=2.0)
    assert running.done    # the hanging run was aborted, not left behind
    thread.join(WAIT_LIMIT)
    assert len(refused) == 1 and isinstance(refused[0], QueueFull)
    final = [e for e in events if isinstance(e, TokenEvent)][-1]
    assert final.kind is EventKind.ERROR and "shutting down" in final.error
    with pytest.raises(ShuttingDown):
        engine.generate(job("x", "after"))
    assert engine.health()["accepting"] is False
    assert engine.health()["loaded_models"] == []
    assert rkllm_record.entries("destroy")


def test_a_file_that_cannot_be_a_model_is_refused_before_loading(make_engine, models_root,
                                                                  rkllm_record):
    broken = models_root / "broken"
    broken.mkdir()
    (broken / "broken.rkllm").write_bytes(b"")
    engine = make_engine()
    with pytest.raises(ModelUnavailable) as caught:
        engine.generate(job("hello", "bad", model="broken"))
    assert caught.value.reason.startswith("empty file") and str(models_root) not in str(caught.value)
    assert rkllm_record.entries("init") == []          # the library never saw it
    with pytest.raises(ModelNotFound) as unknown:
        engine.generate(job("hello", "bad", model="nope"))
    assert set(unknown.value.known) == {"broken", "npu-a", "npu-b"}
