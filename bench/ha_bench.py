"""Home Assistant voice commands: prefill tokens and runtime runs per command.

    .venv/bin/python bench/ha_bench.py [--device npu|cpu|both] [--commands 10]

Replays Extended OpenAI Conversation's request shape (tests/fixtures/homeassistant:
a system prompt with a `Current Time:` line with microseconds near its top and a
device table, here of 30 entities; a tools request, then the follow-up carrying
the `execute_services` result with `tool_choice: "none"`). Every command is a new
conversation with a new clock, as Home Assistant sends them. The assistant message
of the follow-up is the call Home Assistant would echo (the double's and SmolLM2's
own answers are not calls). Through the whole Flask app (test client), on:

- npu-tokenizer: the librkllmrt double, the model folder holding a tokenizer
  (real turns as token input, longest-common-prefix reuse);
- npu-text: the same double without a tokenizer (the runtime's template, text turns);
- cpu: the bundled SmolLM2 on llama.cpp.

Per command: prefill tokens of both requests (X-RKLLM-Prefill-Tokens), the full
prompt of the follow-up (usage.prompt_tokens), their ratio, and runtime runs
(the double's record; the engine's finished runs on the CPU). Targets (issue 16):
commands 2-10 prefill at most a quarter of a full prompt, at most two runs each.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from rkllm_api.config import Settings  # noqa: E402
from rkllm_api.engine.manager import Engine  # noqa: E402
from rkllm_api.engine.observer import EngineObserver  # noqa: E402
from rkllm_api.models.registry import Registry  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "homeassistant")
CHAT = "/v1/chat/completions"
COMMANDS = ["turn on the living room light", "turn off the kitchen light",
            "start the coffee maker", "set the hallway to 21 degrees",
            "turn on the porch light", "switch off the office fan",
            "open the garage door", "turn on bedroom lamp two",
            "is the back door locked?", "turn everything off in the den"]
ROOMS = ["office", "bedroom", "porch", "garage", "den", "hall", "attic", "garden",
         "bathroom", "basement", "pantry", "study", "nursery", "laundry", "patio"]


def device_table(count: int = 30) -> str:
    rows = ["entity_id,name,state,aliases",
            "light.living_room,Living Room Light,off,lounge lamp",
            "light.kitchen,Kitchen Light,on,",
            "switch.coffee_maker,Coffee Maker,off,barista",
            "climate.hallway,Hallway Thermostat,heat,",
            "sensor.outdoor_temperature,Outdoor Temperature,18.5,"]
    for index in range(count - len(rows) + 1):
        room = ROOMS[index % len(ROOMS)]
        kind = ("light", "switch", "sensor")[index % 3]
        state = ("off", "on", "21.5")[index % 3]
        rows.append(f"{kind}.{room}_{index},{room.title()} {kind.title()} {index},{state},")
    return "\n".join(rows)


def system_prompt(clock: datetime) -> str:
    """The fixture's system prompt with a 30-entity table and this clock."""
    body = json.load(open(os.path.join(FIXTURES, "tools_mode.json")))
    text = body["messages"][0]["content"]
    head, rest = text.split("Current Time:", 1)
    _, rest = rest.split("\n", 1)
    table_start, table_end = rest.index("```csv\n") + 7, rest.index("\n```")
    rest = rest[:table_start] + device_table() + rest[table_end:]
    return f"{head}Current Time: {clock.isoformat(sep=' ')}\n{rest}"


def requests_of(command: str, clock: datetime, model: str, script: bool) -> tuple:
    """(tools request, follow-up) as the integration sends them for one command.
    script: the double reads its answer from a text prompt, so the command asks it
    for the very call the follow-up echoes (token input carries no directives)."""
    tools_body = json.load(open(os.path.join(FIXTURES, "tools_mode.json")))
    follow = json.load(open(os.path.join(FIXTURES, "tools_mode_tool_result.json")))
    system = system_prompt(clock)
    call = follow["messages"][2]["tool_calls"][0]["function"]
    if script:
        command += (" @@reply:<tool_call>\n" + json.dumps(
            {"name": call["name"], "arguments": json.loads(call["arguments"])})
            + "\n</tool_call>@@")
    for body in (tools_body, follow):
        body["model"] = model
        body["messages"][0]["content"] = system
        body["messages"][1]["content"] = command
        body["max_tokens"] = 400 if script else body["max_tokens"]
    return tools_body, follow


class RunCounter(EngineObserver):
    """Counts finished runs, and passes every event on to the app's own observer."""

    def __init__(self):
        self.runs = 0
        self.inner = EngineObserver()

    def generation_finished(self, report) -> None:
        self.runs += 1
        self.inner.generation_finished(report)

    def __getattribute__(self, name):
        if name in ("queue_waited", "model_loaded", "model_unloaded", "first_token"):
            return getattr(object.__getattribute__(self, "inner"), name)
        return object.__getattribute__(self, name)


def replay(app, model: str, commands: int, count_runs, script: bool = False) -> list:
    """Per command: (prefill tokens, full prompt tokens, runs, kv modes)."""
    client = app.test_client()
    clock = datetime(2025, 6, 14, 19, 42, 7, 118392).astimezone()
    rows = []
    for index in range(commands):
        clock += timedelta(seconds=37, microseconds=4321 * (index + 1))
        runs_before = count_runs()
        prefill, modes, full = 0, [], 0
        for body in requests_of(COMMANDS[index % len(COMMANDS)], clock, model, script):
            response = client.post(CHAT, json=copy.deepcopy(body))
            assert response.status_code == 200, response.get_data(as_text=True)
            prefill += int(response.headers.get("X-RKLLM-Prefill-Tokens", 0))
            modes.append(response.headers.get("X-RKLLM-KV", "-"))
            full = response.get_json()["usage"]["prompt_tokens"]
        rows.append((prefill, full, count_runs() - runs_before, modes))
    return rows


def report(label: str, rows: list) -> None:
    print(f"{label}: prefill tokens per command (both requests) vs the full prompt")
    print("   cmd  prefill   full  ratio  runs  kv")
    for number, (prefill, full, runs, modes) in enumerate(rows, 1):
        print(f"   {number:3d}  {prefill:7d}  {full:5d}  {prefill / max(full, 1):5.2f}  "
              f"{runs:4d}  {'/'.join(modes)}")
    later = rows[1:]
    worst = max(prefill / max(full, 1) for prefill, full, _, _ in later)
    most_runs = max(runs for _, _, runs, _ in later)
    met = worst <= 0.25 and most_runs <= 2
    if label == "npu-text":
        print("   (text path: the double counts words, usage estimates tokens; reference only)")
    print(f"   commands 2-{len(rows)}: worst ratio {worst:.2f} (target <= 0.25), "
          f"most runs {most_runs} (target <= 2): {'met' if met else 'NOT met'}")


def npu_app(folder: str, tokenizer: bool):
    from doubles.build import build_rkllm_double
    from support.doubles import make_fake_rkllm_model
    from support.tokenizer_files import write_tokenizer
    lib = build_rkllm_double("1.3", os.path.join(folder, "lib"))
    model_folder = os.path.join(folder, "models", "qwen3-1.7b")
    make_fake_rkllm_model(model_folder, "qwen3-1.7b")
    if tokenizer:
        write_tokenizer(model_folder)
    record = os.path.join(folder, "record.jsonl")
    os.environ["FAKE_RKLLM_RECORD"] = record
    settings = Settings(models_root=os.path.join(folder, "models"), include_bundled_model=False,
                        rkllm_lib_path=lib, idle_unload_seconds=0, heartbeat_seconds=0,
                        kv_cache_dir=os.path.join(folder, "cache"), log_level="WARNING")

    def runs() -> int:
        if not os.path.isfile(record):
            return 0
        with open(record) as handle:
            return sum(1 for line in handle if '"call": "run"' in line)
    return settings, runs


def cpu_app(folder: str, threads: int):
    settings = Settings(models_root=os.path.join(folder, "none"), include_bundled_model=True,
                        cpu_threads=threads, idle_unload_seconds=0, heartbeat_seconds=0,
                        gguf_max_context_length=4096, kv_cache_dir=os.path.join(folder, "cache"),
                        log_level="WARNING")
    return settings


def run_case(label: str, settings, model: str, commands: int, runs=None,
             script: bool = False) -> None:
    import api
    counter = RunCounter()
    registry = Registry(settings)
    engine = Engine(settings, registry)
    engine.start()
    app = api.create_app(settings, registry=registry, engine=engine)
    counter.inner, engine.observer = engine.observer or EngineObserver(), counter
    try:
        report(label, replay(app, model, commands, runs or (lambda: counter.runs), script))
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("npu", "cpu", "both"), default="both")
    parser.add_argument("--commands", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.device in ("npu", "both"):
        for label, tokenizer in (("npu-tokenizer", True), ("npu-text", False)):
            with tempfile.TemporaryDirectory() as folder:
                settings, runs = npu_app(folder, tokenizer)
                run_case(label, settings, "qwen3-1.7b", args.commands, runs,
                         script=not tokenizer)
    if args.device in ("cpu", "both"):
        with tempfile.TemporaryDirectory() as folder:
            run_case("cpu (SmolLM2)", cpu_app(folder, args.threads), "smollm2-135m-instruct",
                     args.commands)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
