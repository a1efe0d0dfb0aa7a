"""`pip install .` must install the rkllm_api package and the design card's root
modules only (no generic top-level names such as `config` or `tools` in anyone's
site-packages), and the installed `rkllm-api` must boot from outside the checkout."""
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import requests

from support.live_server import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_MODULES = {"api", "rag", "rkllm_ctypes", "rknn_ctypes"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path_factory.mktemp("source") / "rkllm-api"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(out), str(source)], check=True, timeout=600,
                   capture_output=True)
    (path,) = out.glob("rkllm_api-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel):
    """A new venv holding only our wheel; the dependencies come from the test venv's
    site-packages through a .pth line (which does not run that venv's editable
    install hooks, so nothing of the checkout leaks in)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dependencies = [p for p in sys.path if p.endswith("site-packages")]
    with open(os.path.join(site, "zz_test_dependencies.pth"), "w") as pth:
        pth.write("\n".join(dependencies) + "\n")
    return venv


def test_wheel_holds_the_package_and_the_root_modules_only(wheel):
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()
                if not name.split("/")[0].endswith(".dist-info")}
    names = {name[:-3] if name.endswith(".py") else name for name in tops}
    assert "rkllm_api" in names
    assert names - {"rkllm_api"} <= ROOT_MODULES, names


@pytest.mark.parametrize("generic", ["config", "tools", "engine", "runtime", "registry",
                                     "prompts", "protocol", "clients", "thinking"])
def test_generic_module_names_are_not_installed(fresh_venv, tmp_path, generic):
    done = subprocess.run([str(fresh_venv / "bin" / "python"), "-c", f"import {generic}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode != 0
    assert "ModuleNotFoundError" in done.stderr


def test_modules_come_from_the_venv(fresh_venv, tmp_path):
    code = "import api, rag, rkllm_ctypes, rkllm_api; print(api.__file__, rkllm_api.__file__)"
    done = subprocess.run([str(fresh_venv / "bin" / "python"), "-c", code], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    for path in done.stdout.split():
        assert path.startswith(str(fresh_venv)), path


def test_installed_command_boots_outside_the_checkout(fresh_venv, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": "", "RKLLM_MODELS_ROOT": str(tmp_path / "models"),
           "RKLLM_API_LOG_FILE": ""}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([str(fresh_venv / "bin" / "rkllm-api"), "--host", "127.0.0.1",
                             "--port", str(port)], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, models = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert models is not None and models.status_code == 200, \
            (tmp_path / "server.log").read_text()
        assert any(m["id"] for m in models.json()["data"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        log.close()
