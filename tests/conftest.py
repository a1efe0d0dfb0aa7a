"""Shared fixtures live in tests/support/ modules, one per concern."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest_plugins = [
    "support.doubles",      # compiled C doubles of librkllmrt (both ABIs) and librknnrt
    "support.cpu_model",    # the bundled SmolLM2 GGUF and CPU runtime fixtures
    "support.live_server",  # a real gunicorn on 127.0.0.1
]
