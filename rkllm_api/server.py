"""What one app instance owns: settings, registry, engine, the chat service, and
its shutdown state. Blueprints reach it through current_server()."""
from __future__ import annotations

import logging
import threading

from flask import current_app

from rkllm_api.chat import ChatService

log = logging.getLogger(__name__)

APP_EXTENSION = "rkllm_api"


class Server:
    def __init__(self, settings, registry, engine):
        self.settings = settings
        self.registry = registry
        self.engine = engine
        self.chat = ChatService(settings, registry, engine)
        self.shutting_down = False
        self._shutdown_lock = threading.Lock()
        self._shut_down = False

    def shut_down(self) -> None:
        """Abort running generations and free the runtimes; safe to call twice."""
        self.shutting_down = True
        with self._shutdown_lock:
            if self._shut_down:
                return
            self._shut_down = True
            log.info("shutting down: aborting generations and closing runtimes")
            self.engine.shutdown()


def current_server() -> Server:
    return current_app.extensions[APP_EXTENSION]
