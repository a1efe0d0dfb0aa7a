"""README must stay true to the code: its settings table names every setting, and
its test command is the one CI runs."""
import os
import re
from dataclasses import fields

from rkllm_api.config import Settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_every_setting_is_documented():
    readme = read("README.md")
    missing = [f.metadata["env"] for f in fields(Settings)
               if f"`{f.metadata['env']}`" not in readme]
    assert missing == []


def test_documented_variables_exist():
    names = {f.metadata["env"] for f in fields(Settings)}
    table = read("README.md").split("## Settings", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    assert documented - names == set()


def test_ci_runs_the_readme_test_command():
    readme = read("README.md")
    command = "./setup.sh --test && .venv/bin/python -m pytest -q tests"
    assert command in readme
    assert command in read(".ci/run")
