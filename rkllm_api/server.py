"""What one app instance owns: settings, registry, engine, the chat service, and
its shutdown state. Blueprints reach it through current_server()."""
from __future__ import annotations

import logging
import threading

from flask import current_app

from rkllm_api.chat import ChatService
from rkllm_api.embeddings import EmbeddingService
from rkllm_api.vision_service import VisionService

log = logging.getLogger(__name__)

APP_EXTENSION = "rkllm_api"
# How long shutdown waits for aborted runs to end before it gives up on them. An abort
# ends a decode within a token; a prefill on the NPU cannot be aborted, and waiting for
# it would only hold the exit past gunicorn's graceful timeout (10 s) and its SIGKILL.
SHUTDOWN_SECONDS = 3.0


class Server:
    def __init__(self, settings, registry, engine):
        self.settings = settings
        self.registry = registry
        self.engine = engine
        self.vision = VisionService(settings)   # the vision models' encoders
        self.chat = ChatService(settings, registry, engine, vision=self.vision)
        self.embeddings = EmbeddingService(settings, registry, engine)
        self.shutting_down = False
        self.checks = None                   # doctor's report from the startup checks
        self.runtime_left_running = False    # shutdown gave up on a runtime still in a call
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
            self.runtime_left_running = not self.engine.shutdown(SHUTDOWN_SECONDS)
            self.vision.close()


def current_server() -> Server:
    return current_app.extensions[APP_EXTENSION]
