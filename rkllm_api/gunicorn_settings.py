"""gunicorn settings for rkllm-api, as an importable module so an installed
`rkllm-api` command finds them (gunicorn.conf.py at the repository root re-exports
them for `gunicorn -c gunicorn.conf.py`).

One process owns the NPU and the loaded model, so there is exactly one worker;
its threads let one request generate while others wait in the engine's FIFO queue
(or get a quick 503 when that queue is full). Bind address, port and thread count
come from the same settings the app reads (RKLLM_API_HOST, RKLLM_API_PORT,
RKLLM_API_THREADS).
"""
from rkllm_api.config import Settings


def options(settings: Settings = None) -> dict:
    s = settings or Settings.from_env()
    return {
        "wsgi_app": "api:create_app()",
        "bind": f"{s.host}:{s.port}",
        "workers": 1,
        # gthread whose main loop reads each request whole, under deadlines, before a
        # thread takes it: slow or idle clients never hold a thread (http_worker.py).
        "worker_class": "rkllm_api.http_worker.BoundedReadWorker",
        "threads": s.server_threads,
        "worker_connections": s.max_connections,
        # A gthread worker only misses its heartbeat when its main loop is stuck,
        # never because a request is long, so this is a last resort; generations are
        # bounded by the engine's own first-token / silence / total limits.
        "timeout": int(max(s.total_timeout, s.first_token_timeout)) + 60,
        # SIGTERM aborts running generations at once (api.on_worker_started), so
        # streams end quickly; this is only the bound on that.
        "graceful_timeout": 10,
        "keepalive": 5,
        # gunicorn's control socket sits at one fixed path per user, which a second
        # server (or the test suite's servers) would fight over; nothing uses it.
        "control_socket_disable": True,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": s.log_level.lower(),
        "post_worker_init": post_worker_init,
        "worker_exit": worker_exit,
    }


def post_worker_init(worker):
    import api
    api.on_worker_started(worker)


def worker_exit(server, worker):
    import api
    api.on_worker_exit(worker)
