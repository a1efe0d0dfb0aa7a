"""Issue 16 point 4, an NPU model without its tokenizer: the system prompt goes to
librkllmrt's own template through rkllm_set_chat_template (ChatML families, or a
template in model_config.json), never for thinking models or models whose folder
holds the tokenizer. Checked at the C boundary: the librkllmrt double's record."""
import json

import pytest

from rkllm_api.engine.generation import GenerationJob
from rkllm_api.models import system_templates
from rkllm_api.runtimes.base import EventKind, RunRequest
from rkllm_api.text import prompts
from support.doubles import chat_turn, make_fake_rkllm_model, start_npu_engine
from support.messages import typed
from support.tokenizer_files import write_tokenizer

QWEN = "qwen2.5-1.5b-instruct"
SYSTEM = "You are the garden club's assistant. Answer in one sentence."
OTHER_SYSTEM = "You translate everything into French."


def templates_set(record) -> list:
    return [e["system_prompt"] for e in record.entries("set_chat_template")]


@pytest.fixture
def engine_with(tmp_path, rkllm_double_lib, rkllm_record):
    engines = []

    def start(model, config=None, tokenizer=False):
        folder = tmp_path / "models" / model
        make_fake_rkllm_model(folder, "model")
        if config is not None:
            (folder / "model_config.json").write_text(json.dumps(config))
        if tokenizer:
            write_tokenizer(str(folder))
        engines.append(start_npu_engine(tmp_path, rkllm_double_lib))
        return engines[-1]

    yield start
    for engine in engines:
        engine.shutdown(timeout=5)


def test_the_system_prompt_goes_through_the_template_once_per_system_text(
        engine_with, rkllm_record):
    engine = engine_with(QWEN)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello!"}]
    first, answer = chat_turn(engine, QWEN, messages)
    (call,) = rkllm_record.entries("set_chat_template")
    assert call["system_prompt"] == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    assert call["prompt_prefix"] == "<|im_start|>user\n"
    assert call["prompt_postfix"] == "<|im_end|>\n<|im_start|>assistant\n"
    run = rkllm_record.last("run")
    assert run["prompt"] == "Hello!" and SYSTEM not in run["prompt"]

    # The same conversation goes on: no new template (it would clear the cache).
    messages += [{"role": "assistant", "content": answer},
                 {"role": "user", "content": "When do we meet?"}]
    second, answer = chat_turn(engine, QWEN, messages)
    assert second.kv_mode == "reuse" and len(templates_set(rkllm_record)) == 1
    assert rkllm_record.last("run")["prompt"] == "When do we meet?"

    # Another system text: the template changes and that conversation starts afresh.
    other = [{"role": "system", "content": OTHER_SYSTEM}, {"role": "user", "content": "Hi"}]
    third, _ = chat_turn(engine, QWEN, other)
    assert third.kv_mode == "full"
    assert templates_set(rkllm_record)[-1] == f"<|im_start|>system\n{OTHER_SYSTEM}<|im_end|>\n"
    assert OTHER_SYSTEM not in rkllm_record.last("run")["prompt"]

    # Back to the first conversation: its system text is set again, never sent as text.
    messages += [{"role": "assistant", "content": answer},
                 {"role": "user", "content": "Thanks."}]
    fourth, _ = chat_turn(engine, QWEN, messages)
    assert templates_set(rkllm_record)[-1] == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    assert fourth.kv_mode in ("resume", "full")
    assert all(SYSTEM not in run["prompt"] for run in rkllm_record.entries("run"))


def test_a_refused_template_fails_that_request_and_the_next_one_sets_it_again(
        engine_with, rkllm_record):
    engine = engine_with(QWEN)
    chat_turn(engine, QWEN, [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": "Hello!"}])
    refused = [{"role": "system", "content": "@@template_fail@@"},
               {"role": "user", "content": "Hi"}]
    runs = len(rkllm_record.entries("run"))
    built = prompts.PromptBuilder(engine.settings).build_chat(typed(refused),
                                                              context_length=4096)
    failed = engine.generate(GenerationJob(QWEN, RunRequest(
        prompt=built.text, keep_history=True, max_new_tokens=8), "t", built))
    errors = [e.error for e in failed.events() if e.kind is EventKind.ERROR]
    assert errors and "failed" in errors[0]              # the client's error (no details)
    assert len(rkllm_record.entries("run")) == runs     # nothing ran under that template
    # The runtime's template is unknown now: the first system text is set again.
    generation, _ = chat_turn(engine, QWEN, [{"role": "system", "content": SYSTEM},
                                             {"role": "user", "content": "Hello again!"}])
    assert templates_set(rkllm_record)[-1] == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    assert len(rkllm_record.entries("run")) == runs + 1
    assert rkllm_record.last("run")["prompt"] == "Hello again!"


def test_no_system_text_sets_no_system_part(engine_with, rkllm_record):
    engine = engine_with(QWEN)
    chat_turn(engine, QWEN, [{"role": "user", "content": "Hello!"}])
    assert templates_set(rkllm_record) == [""]
    assert rkllm_record.last("run")["prompt"] == "Hello!"


def test_an_embedding_after_a_chat_sees_no_system_text(engine_with, rkllm_record):
    engine = engine_with(QWEN)
    alone = engine.embed(QWEN, ["the same words"]).vectors[0]
    chat_turn(engine, QWEN, [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": "Hello!"}])
    after = engine.embed(QWEN, ["the same words"]).vectors[0]
    assert templates_set(rkllm_record) == ["", f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", ""]
    assert after == alone


@pytest.mark.parametrize("model,config,tokenizer", [
    ("qwen3-1.7b", None, False),                          # thinks: the switch must work
    (QWEN, None, True),                                   # real turns carry the system role
    (QWEN, {"chat_template": False}, False),              # switched off by the model's folder
    ("llama-3.2-1b-instruct", None, False),               # a template not known here
    (QWEN, {"chat_template": {"system": "no placeholder", "prefix": "", "postfix": ""}},
     False),                                              # a broken entry is ignored
])
def test_where_the_template_is_not_used_the_system_text_stays_in_the_prompt(
        engine_with, rkllm_record, model, config, tokenizer):
    engine = engine_with(model, config, tokenizer)
    chat_turn(engine, model, [{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": "Hello!"}])
    assert templates_set(rkllm_record) == []
    run = rkllm_record.last("run")
    if tokenizer:
        assert run["input_type"] == 1             # token input: the template is ours
    else:
        assert run["prompt"].startswith(SYSTEM) and run["prompt"].endswith("Hello!")


def test_model_config_spells_out_a_template_for_any_family(engine_with, rkllm_record):
    template = {"system": "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                "prefix": "<|start_header_id|>user<|end_header_id|>\n\n",
                "postfix": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"}
    engine = engine_with("llama-3.2-1b-instruct", {"chat_template": template})
    chat_turn(engine, "llama-3.2-1b-instruct", [{"role": "system", "content": "Be {brief}."},
                                                {"role": "user", "content": "Hello!"}])
    (call,) = rkllm_record.entries("set_chat_template")
    assert call["system_prompt"] == ("<|start_header_id|>system<|end_header_id|>\n\n"
                                     "Be {brief}.<|eot_id|>")   # braces in the text are kept
    assert call["prompt_prefix"] == template["prefix"]
    assert rkllm_record.last("run")["prompt"] == "Hello!"


def test_cpu_and_vision_models_take_no_system_template():
    class Model:
        def __init__(self, device, capabilities, family="qwen2", config=None):
            self.device, self.capabilities = device, capabilities
            self.family, self.config = family, config or {}

    assert system_templates.system_template_for(Model("npu", ("instruct",))) is not None
    assert system_templates.system_template_for(Model("cpu", ("instruct",))) is None
    assert system_templates.system_template_for(Model("npu", ("instruct", "vision"))) is None
