"""docker-compose.yml (Open WebUI + SearXNG wired to rkllm-api) and settings.yml
(SearXNG): parsed as YAML, and the settings that make the pair work are checked."""
import os
import subprocess
from urllib.parse import urlsplit

import pytest
import yaml  # PyYAML: in the test extra of pyproject.toml

from rkllm_api import envfile
from rkllm_api.config import Settings
from support.compose import interpolate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_PORT = 8000     # rkllm-api's default port (config.Settings.port)
SEARXNG_PORT = 8080    # the port SearXNG's container image serves on


def _load(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose():
    return _load("docker-compose.yml")


@pytest.fixture(scope="module")
def webui_env(compose):
    env = compose["services"]["open-webui"]["environment"]
    assert isinstance(env, dict)
    return env


@pytest.fixture(scope="module")
def searxng_settings():
    return _load("settings.yml")


def test_environment_values_are_strings(compose):
    # Compose passes values through; strings keep "True"/"0.0" exactly as written.
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            assert isinstance(value, str), key


def test_open_webui_image_can_be_overridden_for_rollback(compose):
    assert compose["services"]["open-webui"]["image"] == \
        "${OPEN_WEBUI_IMAGE:-ghcr.io/open-webui/open-webui:main}"


def test_openai_base_url_points_at_the_server_on_the_host(compose, webui_env):
    url = urlsplit(interpolate(webui_env["OPENAI_API_BASE_URL"], {}))   # no env file
    assert url.scheme == "http" and url.path == "/v1"
    assert url.port == SERVER_PORT == Settings().port
    assert url.hostname == "host.docker.internal"
    assert f"{url.hostname}:host-gateway" in compose["services"]["open-webui"]["extra_hosts"]
    assert interpolate(webui_env["OPENAI_API_KEY"], {})   # Open WebUI needs a non-empty key


def service_env_files(tmp_path) -> tuple:
    """The variables docker compose gets from the env files `setup.sh --service` writes
    (run against a temporary root, as tests/test_setup.py does), a later file winning,
    as compose reads them; and the root."""
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    done = subprocess.run(["bash", os.path.join(ROOT, "setup.sh"), "--root", str(root),
                           "--skip-venv", "--service"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    variables = {}
    for name in ("rkllm-api.env", "open-webui.env"):
        with open(root / "etc/rkllm-api" / name, encoding="utf-8") as handle:
            variables.update(envfile.parse(handle.read()))
    return variables, root


def test_open_webui_reaches_the_service_its_env_files_describe(webui_env, tmp_path):
    """`docker compose --env-file /etc/rkllm-api/rkllm-api.env --env-file
    /etc/rkllm-api/open-webui.env up`: the URL, port and key Open WebUI gets agree with
    the settings the service runs with."""
    from rkllm_api.security import KeyRing
    variables, root = service_env_files(tmp_path)
    # the service's keys file, at its place in the temporary root
    variables["RKLLM_API_KEYS_FILE"] = str(root) + variables["RKLLM_API_KEYS_FILE"]
    settings = Settings.from_env(variables)
    # the container comes in through the Docker bridge, never the host's loopback
    assert settings.host == "0.0.0.0"
    url = urlsplit(interpolate(webui_env["OPENAI_API_BASE_URL"], variables))
    assert (url.hostname, url.port) == ("host.docker.internal", settings.port)
    keys = KeyRing.from_settings(settings)
    assert keys.enabled                                   # never open to the LAN
    webui_key = keys.match(interpolate(webui_env["OPENAI_API_KEY"], variables))
    assert webui_key is not None and webui_key.name == "open-webui" and not webui_key.admin
    # the administrator moves the port and sets the keys in the env file instead
    edited = {k: v for k, v in variables.items()
              if k not in ("OPEN_WEBUI_API_KEY", "RKLLM_API_KEYS_FILE")}
    edited.update({"RKLLM_API_PORT": "9001", "RKLLM_API_KEYS": "sk-board-0123456789"})
    settings = Settings.from_env(edited)
    assert urlsplit(interpolate(webui_env["OPENAI_API_BASE_URL"], edited)).port == 9001
    keys = KeyRing.from_settings(settings)
    assert keys.match(interpolate(webui_env["OPENAI_API_KEY"], edited)) is not None
    # several keys: Open WebUI's own, named in OPEN_WEBUI_API_KEY, is one of them
    several = {**edited, "RKLLM_API_KEYS": "sk-board-0123456789,sk-webui-0123456789",
               "OPEN_WEBUI_API_KEY": "sk-webui-0123456789"}
    keys = KeyRing.from_settings(Settings.from_env(several))
    assert keys.match(interpolate(webui_env["OPENAI_API_KEY"], several)) is not None
    # no keys at all (a server run by hand without them): any key is taken
    bare = {k: v for k, v in edited.items() if k != "RKLLM_API_KEYS"}
    assert not KeyRing.from_settings(Settings.from_env(bare)).enabled
    assert interpolate(webui_env["OPENAI_API_KEY"], bare)


def test_searxng_url_matches_the_searxng_service(compose, webui_env):
    assert webui_env["ENABLE_WEB_SEARCH"] == "True"
    assert webui_env["WEB_SEARCH_ENGINE"] == "searxng"
    url = urlsplit(webui_env["SEARXNG_QUERY_URL"])
    assert url.hostname in compose["services"]
    assert url.port == SEARXNG_PORT and url.path == "/search"
    assert url.query == "q=<query>"
    searxng = compose["services"][url.hostname]
    assert "searxng" in searxng["image"]
    assert url.hostname in compose["services"]["open-webui"].get("depends_on", [])
    # Published, if at all, on the host loopback only.
    for port in searxng.get("ports", []):
        assert str(port).startswith("127.0.0.1:")


def test_web_search_and_rag_settings_for_small_models(webui_env):
    expected = {
        "WEB_SEARCH_RESULT_COUNT": "5",
        "BYPASS_WEB_SEARCH_WEB_LOADER": "True",
        "BYPASS_WEB_SEARCH_EMBEDDING_AND_RETRIEVAL": "True",
        "CHUNK_OVERLAP": "0",
        "RAG_TOP_K": "5",
        "RAG_TOP_K_RERANKER": "3",
        "RAG_RELEVANCE_THRESHOLD": "0.0",
        "ENABLE_RAG_HYBRID_SEARCH": "True",
        "ENABLE_RETRIEVAL_QUERY_GENERATION": "True",
        "ENABLE_SEARCH_QUERY_GENERATION": "True",
        "ENABLE_AUTOCOMPLETE_GENERATION": "False",
    }
    assert {k: webui_env.get(k) for k in expected} == expected
    assert "TASK_MODEL_EXTERNAL" in webui_env


def test_volumes(compose):
    webui = compose["services"]["open-webui"]
    named = [v.split(":")[0] for v in webui["volumes"] if v.endswith(":/app/backend/data")]
    assert named and named[0] in compose["volumes"]
    mounts = compose["services"]["searxng"]["volumes"]
    settings_mount = [m for m in mounts if m.split(":")[1] == "/etc/searxng/settings.yml"]
    assert settings_mount, mounts
    host_path = settings_mount[0].split(":")[0]
    assert os.path.isfile(os.path.join(ROOT, host_path))


def test_searxng_settings_serve_json(searxng_settings):
    formats = searxng_settings["search"]["formats"]
    assert "json" in formats and "html" in formats


def test_searxng_engines_are_a_short_known_list(searxng_settings):
    keep = searxng_settings["use_default_settings"]["engines"]["keep_only"]
    assert 3 <= len(keep) <= 8 and len(set(keep)) == len(keep)
    assert {"duckduckgo", "wikipedia"} <= set(keep)


def test_searxng_server_for_local_use(searxng_settings, compose):
    server = searxng_settings["server"]
    assert server["limiter"] is False
    assert server["secret_key"]     # a placeholder; SEARXNG_SECRET replaces it
    assert "SEARXNG_SECRET" in compose["services"]["searxng"]["environment"]
