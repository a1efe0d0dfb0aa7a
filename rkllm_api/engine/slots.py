"""A device's slot: its loaded runtime, who holds it, and who waits, in order."""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Optional

from rkllm_api.engine.errors import QueueFull, QueueTimeout, ShuttingDown
from rkllm_api.engine.kv_session import KvServices, KvSession

if TYPE_CHECKING:
    from rkllm_api.engine.generation import Generation

log = logging.getLogger(__name__)

DEFAULT_HOLD_SECONDS = 10.0  # assumed length of a generation before any was measured


class DeviceSlot:
    """One device: its loaded runtime, who holds it, and who waits, in order.

    Fairness: each waiter appends a ticket; the slot goes to the ticket at the head
    of the queue, so requests are served in arrival order whatever the thread
    scheduler does. `cond` guards every field; the runtime itself is only used by
    the holder.
    """

    def __init__(self, device: str, kv_services: Optional[KvServices] = None):
        self.device = device
        self.cond = threading.Condition()
        self.waiting: collections.deque = collections.deque()
        self.holder: Optional[str] = None        # label of whoever holds the slot
        self.held_since = 0.0
        self.runtime = None
        self.model = None                        # registry.ModelInfo of the runtime
        self.kv = KvSession(kv_services)
        self.generation: Optional["Generation"] = None
        self.last_used = time.monotonic()
        self.average_hold = DEFAULT_HOLD_SECONDS

    def acquire(self, label: str, timeout: float, max_waiting: int, stopping) -> None:
        with self.cond:
            if stopping():
                raise ShuttingDown()
            if self.holder is None and not self.waiting:
                self.take(label)
                return
            if len(self.waiting) >= max_waiting:
                raise QueueFull(f"{self.device} queue is full ({len(self.waiting)} waiting)",
                                self.retry_after())
            ticket = object()
            self.waiting.append(ticket)
            deadline = time.monotonic() + timeout
            try:
                while True:
                    if stopping():
                        raise ShuttingDown()
                    if self.holder is None and self.waiting[0] is ticket:
                        self.waiting.popleft()
                        self.take(label)
                        return
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise QueueTimeout(f"waited {timeout:g} s for the {self.device}",
                                           self.retry_after())
                    self.cond.wait(remaining)
            except BaseException:
                if ticket in self.waiting:
                    self.waiting.remove(ticket)
                    self.cond.notify_all()  # the next ticket may now be at the head
                raise

    def try_acquire_if_idle(self, label: str) -> bool:
        with self.cond:
            if self.holder is not None or self.waiting:
                return False
            self.take(label)
            return True

    def release(self, measured: bool = False) -> None:
        """Free the slot; `measured` (a generation ended) feeds the retry estimate."""
        with self.cond:
            if measured:
                held = time.monotonic() - self.held_since
                self.average_hold = 0.7 * self.average_hold + 0.3 * held
            self.holder = None
            self.generation = None
            self.last_used = time.monotonic()
            self.cond.notify_all()

    def retry_after(self) -> int:
        """Seconds a client should wait before retrying: the queue ahead of it times
        the recent average hold, kept between 1 s and 2 min."""
        estimate = self.average_hold * (len(self.waiting) + 1)
        return int(min(120, max(1, math.ceil(estimate))))

    def take(self, label: str) -> None:
        """Mark the slot held (the caller holds `cond`)."""
        self.holder = label
        self.held_since = time.monotonic()
