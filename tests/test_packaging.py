"""The installed `rkllm-api` command imports the flat modules from the installed
package, not from the checkout: every module must be listed in pyproject.toml."""
import glob
import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_module_is_packaged():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["py-modules"])
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))
               if not p.endswith("gunicorn.conf.py")}
    assert modules == listed


def test_app_imports_outside_the_checkout(tmp_path):
    # As the console script does: sys.path without the repository root.
    code = ("import os, api, config, gunicorn_settings; "
            f"api.create_app(config.Settings(models_root={str(tmp_path)!r}, "
            "include_bundled_model=False, log_file='')); print('ok', flush=True); os._exit(0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": ""})
    assert done.stdout.strip() == "ok", done.stderr
