"""`rkllm-api pull | run | ps | list | rm` as a person runs them (a subprocess of the
rkllm-api command) against a live server on the bundled SmolLM2, whose HF_ENDPOINT
is the fake hub."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support.live_server import ROOT, start_cpu_server

SMOLLM = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server(live_servers, module_fake_hub):
    # Short answers: the CLI sends no max_tokens, the server's default applies.
    return start_cpu_server(live_servers, HF_ENDPOINT=module_fake_hub.url,
                            DEFAULT_MAX_TOKENS="24")


def rkllm_api(server, *args, stdin: str = "", url: bool = True):
    command = [sys.executable, "-c", "import sys, api; sys.exit(api.main())", *args]
    if url:
        command += ["--url", server.url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_API")}
    return subprocess.run(command, cwd=ROOT, input=stdin, capture_output=True, text=True,
                          timeout=300, env=env)


def test_list_shows_the_models(server):
    done = rkllm_api(server, "list")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["NAME", "DEVICE", "CONTEXT", "CAPABILITIES", "STATUS"]
    assert any(row.split()[:2] == [SMOLLM, "cpu"] and row.split()[-1] == "ok" for row in rows)


def chat_posts(server) -> int:
    return server.log().count("POST /v1/chat/completions 200")


def test_run_chats_until_bye_then_ps_shows_the_model_loaded(server):
    before = chat_posts(server)
    done = rkllm_api(server, "run", SMOLLM, stdin="Say hello.\nName a colour.\n/bye\nignored\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert chat_posts(server) - before == 2   # two turns, nothing after /bye
    ps = rkllm_api(server, "ps")
    assert ps.returncode == 0, ps.stderr
    header, *rows = ps.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "DEVICE", "SIZE"]
    row = next(r for r in rows if r.startswith(SMOLLM))
    assert " cpu " in row and "idle" in row and "minutes" in row


def test_run_with_a_prompt_answers_once(server):
    done = rkllm_api(server, "run", SMOLLM, "Say", "hi.")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_run_names_an_unknown_model(server):
    done = rkllm_api(server, "run", "no-such-model", stdin="hi\n")
    assert done.returncode == 1
    assert "no-such-model" in done.stderr and "Traceback" not in done.stderr


def test_pull_shows_a_bar_per_file_and_rm_removes_the_model(server):
    done = rkllm_api(server, "pull", "acme/tiny-chat")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("pulling manifest") and out.rstrip().endswith("success")
    for name in ("models/tiny-chat.rkllm", "models/tokenizer_config.json"):
        assert name in out
    assert "100%" in out and "24.0M" in out   # tqdm's size
    listed = rkllm_api(server, "list").stdout
    assert "tiny-chat" in listed
    removed = rkllm_api(server, "rm", "tiny-chat")
    assert removed.returncode == 0 and "deleted tiny-chat" in removed.stdout
    assert rkllm_api(server, "rm", "tiny-chat").returncode == 1


def test_pull_errors_are_one_sentence(server):
    done = rkllm_api(server, "pull", "acme/missing")
    assert done.returncode == 1 and "not found" in done.stderr and "Traceback" not in done.stderr


def test_no_server_is_one_sentence(server):
    done = subprocess.run([sys.executable, "-c", "import sys, api; sys.exit(api.main())",
                           "ps", "--url", "http://127.0.0.1:9"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "no rkllm-api server answers" in done.stderr
