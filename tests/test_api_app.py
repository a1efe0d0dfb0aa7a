"""The app factory in-process (Flask test client, real registry and engine) and the
import-time and command-line contracts of api.py."""
import json
import logging
import os
import subprocess
import sys

import pytest

import api
from rkllm_api.config import Settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_does_no_work():
    """Importing api starts no thread, installs no signal handler, loads no engine
    or registry, and creates no module-level app."""
    probe = (
        "import signal, sys, threading\n"
        "before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}\n"
        "import api\n"
        "after = {s: signal.getsignal(s) for s in before}\n"
        "print(threading.active_count(), after == before, hasattr(api, 'app'),\n"
        "      'engine' in sys.modules, 'registry' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert out == ["1", "True", "False", "False", "False"]


@pytest.fixture
def app(tmp_path):
    settings = Settings(models_root=str(tmp_path / "models"), include_bundled_model=False,
                        log_file=str(tmp_path / "logs" / "api.log"), idle_unload_seconds=0)
    os.makedirs(settings.models_root)
    app = api.create_app(settings)
    yield app
    api.server_of(app).shut_down()


def test_ready_and_health_turn_503_at_shutdown(app):
    client = app.test_client()
    assert client.get("/ready").status_code == 200
    assert client.get("/health").get_json()["status"] == "ok"
    api.server_of(app).shut_down()
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.get_json()["ready"] is False
    assert client.get("/health").get_json()["status"] == "shutting_down"


def test_an_unexpected_failure_is_a_500_in_openai_format_without_details(app, caplog):
    """The last entry of the error table: anything no other handler knows."""
    def broken_view():
        raise RuntimeError("secret detail at /srv/models/x.rkllm")

    app.add_url_rule("/v1/broken", "broken", broken_view)
    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/v1/broken")
    assert response.status_code == 500
    error = response.get_json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert "secret" not in error["message"] and "/srv" not in error["message"]
    assert "secret detail" in caplog.text          # the log keeps what the client does not see


def test_no_model_at_all_is_a_404_in_openai_format(app):
    response = app.test_client().post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "model_not_found"


def test_log_file_is_written(app, tmp_path):
    app.test_client().get("/v1/models/missing")
    for handler in logging.getLogger().handlers:
        handler.flush()
    with open(tmp_path / "logs" / "api.log", encoding="utf-8") as fh:
        assert "rkllm-api" in fh.read()


def test_create_app_twice_keeps_one_set_of_log_handlers(app, tmp_path):
    second = api.create_app(api.server_of(app).settings)
    try:
        ours = [h for h in logging.getLogger().handlers if getattr(h, "rkllm_api", False)]
        assert len(ours) == 2  # stderr + the file, not four
    finally:
        api.server_of(second).shut_down()


def test_main_options_reach_the_settings(monkeypatch):
    for variable in api._OPTION_ENV.values():
        monkeypatch.delenv(variable, raising=False)
    args = api.parse_args(["--host", "0.0.0.0", "--port", "9001", "--models-root", "/m",
                           "--threads", "3"])
    assert (args.host, args.port, args.models_root, args.threads) == ("0.0.0.0", 9001, "/m", 3)
    defaults = api.parse_args([])
    assert defaults.host is None and defaults.port is None  # the settings' defaults apply
    assert (Settings().host, Settings().port) == ("127.0.0.1", 8000)


def test_gunicorn_conf_settings():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_API_")}
    probe = ("import json, runpy; c = runpy.run_path('gunicorn.conf.py'); print(json.dumps("
             "{k: c[k] for k in ('bind', 'workers', 'worker_class', 'threads', "
             "'graceful_timeout', 'timeout', 'wsgi_app')}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, timeout=60,
                         capture_output=True, text=True, check=True).stdout
    conf = json.loads(out)
    assert conf["bind"] == "127.0.0.1:8000" and conf["workers"] == 1
    # gthread, with the read layer in front of its thread pool (http_worker.py)
    from gunicorn.util import load_class
    from gunicorn.workers.gthread import ThreadWorker
    assert issubclass(load_class(conf["worker_class"]), ThreadWorker) and conf["threads"] >= 4
    assert conf["graceful_timeout"] == 10 and conf["timeout"] >= 600
    assert conf["wsgi_app"] == "api:create_app()"
