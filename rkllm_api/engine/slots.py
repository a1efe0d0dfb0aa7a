"""A device's slot: its loaded runtime, who holds it, and who waits, in order."""
from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Optional

from rkllm_api.engine.errors import ClientGone, QueueFull, QueueTimeout, ShuttingDown
from rkllm_api.engine.kv_session import KvServices, KvSession

if TYPE_CHECKING:
    from rkllm_api.engine.generation import Generation

log = logging.getLogger(__name__)

DEFAULT_HOLD_SECONDS = 10.0  # assumed length of a generation before any was measured
ORDER_GRACE_SECONDS = 0.5    # a free device waits this long for an earlier arrival
STALE_ARRIVAL_SECONDS = 30.0  # an arrival not reported gone after this is skipped
CLIENT_CHECK_SECONDS = 0.25  # a waiter looks whether its client is still there this often


class ArrivalOrder:
    """Numbers requests in the order they arrived (the HTTP worker issues a number
    once it has read a request whole) and tells which are still on their way to a
    device queue. A number `leaves` when its request took its place in a queue, or
    was answered without one; a device that is free goes to the earliest waiter only
    when no earlier arrival is still on its way (for ORDER_GRACE_SECONDS at most),
    so two requests a moment apart cannot swap places on their way in.
    Thread-safe."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 1
        self._low = 1                  # every number below it has left
        self._left: set = set()        # numbers >= _low that left
        self._issued_at: dict = {}     # numbers not left yet -> issue time

    def issue(self) -> int:
        with self._lock:
            number = self._next
            self._next += 1
            self._issued_at[number] = self._clock()
            return number

    def leave(self, number: Optional[int]) -> None:
        """Idempotent; None is ignored."""
        if number is None:
            return
        with self._lock:
            self._issued_at.pop(number, None)
            if number >= self._low:
                self._left.add(number)
            self._advance()

    def issue_and_leave(self) -> int:
        """A number for work that comes without one (an engine call outside HTTP):
        after everything issued so far, and already in its queue."""
        number = self.issue()
        self.leave(number)
        return number

    def earlier_on_the_way(self, number: int) -> bool:
        """True when a request that arrived before `number` has not left yet."""
        with self._lock:
            self._skip_stale()
            return self._low < number

    def _advance(self) -> None:
        while self._low in self._left:
            self._left.discard(self._low)
            self._low += 1

    def _skip_stale(self) -> None:
        """A number whose request never reported back (a bug, a thread killed) must
        not hold every later one up for good."""
        limit = self._clock() - STALE_ARRIVAL_SECONDS
        while self._low < self._next:
            issued = self._issued_at.get(self._low)
            if issued is None or issued > limit:
                return
            log.warning("request number %d never left the arrival order; skipped", self._low)
            self._issued_at.pop(self._low, None)
            self._left.add(self._low)
            self._advance()


class _Ticket:
    __slots__ = ("number",)

    def __init__(self, number: int):
        self.number = number


def _number(ticket: "_Ticket") -> int:
    return ticket.number


class DeviceSlot:
    """One device: its loaded runtime, who holds it, and who waits, in order.

    Fairness: each waiter holds a ticket with its arrival number (ArrivalOrder),
    kept sorted; the slot goes to the ticket at the head, and a free slot waits
    briefly for an earlier arrival still on its way, so requests are served in
    arrival order whatever the thread scheduler does. `cond` guards every field;
    the runtime itself is only used by the holder.
    """

    def __init__(self, device: str, kv_services: Optional[KvServices] = None,
                 arrivals: Optional[ArrivalOrder] = None):
        self.device = device
        self.cond = threading.Condition()
        self.arrivals = arrivals or ArrivalOrder()
        self.waiting: list = []                  # _Tickets, by arrival number
        self.holder: Optional[str] = None        # label of whoever holds the slot
        self.held_since = 0.0
        self.runtime = None
        self.model = None                        # registry.ModelInfo of the runtime
        self.kv = KvSession(kv_services)
        self.generation: Optional["Generation"] = None
        self.last_used = time.monotonic()
        # Seconds the loaded model stays once idle, as a client asked (Ollama's
        # keep_alive; math.inf: until unloaded); None: IDLE_UNLOAD_TIMEOUT.
        self.keep_alive: Optional[float] = None
        self.average_hold = DEFAULT_HOLD_SECONDS

    def acquire(self, label: str, timeout: float, max_waiting: int, stopping,
                arrival: Optional[int] = None, client_gone=None) -> None:
        """Take the slot, in arrival order (`arrival`: the request's ArrivalOrder
        number; None = after everything issued so far), waiting at most `timeout`
        behind at most `max_waiting` others. `client_gone()` is asked while waiting
        and right before taking the slot: a request whose client left never gets
        the device (ClientGone)."""
        order = self.arrivals
        number = order.issue_and_leave() if arrival is None else arrival
        try:
            with self.cond:
                if stopping():
                    raise ShuttingDown()
                if len(self.waiting) >= max_waiting and (self.waiting or self.holder):
                    raise QueueFull(f"{self.device} queue is full ({len(self.waiting)} waiting)",
                                    self.retry_after())
                ticket = _Ticket(number)
                bisect.insort(self.waiting, ticket, key=_number)
                order.leave(number)   # in its queue: no longer on its way
                try:
                    self._wait_turn(ticket, label, time.monotonic() + timeout, timeout,
                                    stopping, client_gone)
                except BaseException:
                    self.waiting.remove(ticket)
                    self.cond.notify_all()  # the next ticket may now be at the head
                    raise
        finally:
            order.leave(number)

    def _wait_turn(self, ticket: _Ticket, label: str, deadline: float, timeout: float,
                   stopping, client_gone) -> None:
        grace_until = None
        while True:
            if stopping():
                raise ShuttingDown()
            if client_gone is not None and client_gone():
                raise ClientGone()
            now = time.monotonic()
            if self.holder is None and self.waiting[0] is ticket:
                grace_until = grace_until or now + ORDER_GRACE_SECONDS
                if now >= grace_until or not self.arrivals.earlier_on_the_way(ticket.number):
                    self.waiting.pop(0)
                    self.take(label)
                    return
                self.cond.wait(0.01)   # an earlier request is about to queue
                continue
            remaining = deadline - now
            if remaining <= 0:
                raise QueueTimeout(f"waited {timeout:g} s for the {self.device}",
                                   self.retry_after())
            self.cond.wait(min(remaining, CLIENT_CHECK_SECONDS) if client_gone else remaining)

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
