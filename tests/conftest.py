"""Shared fixtures live in tests/support/ modules, one per concern."""
import atexit
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest_plugins = [
    "support.doubles",      # compiled C doubles of librkllmrt (both ABIs)
    "support.cpu_model",    # the bundled SmolLM2 GGUF and CPU runtime fixtures
    "support.live_server",  # a real gunicorn on 127.0.0.1
    "support.conversation", # engine-level chat turns on SmolLM2
    "support.rknn_double",  # compiled C double of librknnrt (vision encoder)
    "support.image_server", # images served over HTTP from 127.0.0.1 (vision URL inputs)
    "support.lora",         # LoRA GGUF adapters for SmolLM2, written by the tests
    "support.fake_hub",     # a Hugging Face hub on 127.0.0.1 for pull tests
    "support.browser",      # headless Chromium driven by selenium (the page at /)
]


def pytest_configure(config):
    # The server keeps KV snapshots and prompt caches under ~/.cache and looks for
    # models in ~/models by default: a test run gets a home of its own so it neither
    # reads nor litters the user's.
    home = tempfile.mkdtemp(prefix="rkllm-api-tests-home-")
    os.environ["HOME"] = home
    atexit.register(shutil.rmtree, home, ignore_errors=True)
