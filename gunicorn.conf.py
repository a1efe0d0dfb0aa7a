"""`gunicorn -c gunicorn.conf.py`: the same settings `rkllm-api` uses
(rkllm_api/gunicorn_settings.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rkllm_api import gunicorn_settings  # noqa: E402

globals().update(gunicorn_settings.options())
