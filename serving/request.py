"""One request's life between the front end and the engine loop: what it asks for, and the events it gets back.

The front end makes a `Request` from a validated call, the scheduler queues it, gives it a slot and sends it
events: `Tokens` (any number), then exactly one of `Finished` or `Failed`. A waiting thread reads them with
`next_event` / `wait_ended`; an event loop registers `on_event`, which is called on the thread that delivers
the event (mostly the engine's; the cancelling one for a request cancelled while queued), one event at a time
and in order: use `loop.call_soon_threadsafe` there. `cancel()` works from any thread, at any time: a queued
request leaves the queue at once, a running one frees its slot at the next step.

`Code` is the front end's error vocabulary: the gRPC status names, mapped to HTTP statuses (and the headers that
go with some of them) in one place.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from gptjax.sampling import SamplingParams


class Code(enum.Enum):
    """Why a request failed, in gRPC's status names (the gRPC adapters use `grpc.StatusCode[code.name]`)."""

    INVALID_ARGUMENT = enum.auto()
    OUT_OF_RANGE = enum.auto()
    UNAUTHENTICATED = enum.auto()
    NOT_FOUND = enum.auto()
    DEADLINE_EXCEEDED = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()
    CANCELLED = enum.auto()
    INTERNAL = enum.auto()
    UNAVAILABLE = enum.auto()
    UNIMPLEMENTED = enum.auto()

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self]

    @property
    def http_headers(self) -> dict[str, str]:
        """The headers an HTTP error of this code carries besides its status."""
        return dict(HTTP_HEADERS.get(self, {}))


HTTP_STATUS = {Code.INVALID_ARGUMENT: 400, Code.OUT_OF_RANGE: 400, Code.UNAUTHENTICATED: 401, Code.NOT_FOUND: 404,
               Code.DEADLINE_EXCEEDED: 408, Code.RESOURCE_EXHAUSTED: 429, Code.CANCELLED: 499,
               Code.INTERNAL: 500, Code.UNAVAILABLE: 503, Code.UNIMPLEMENTED: 501}
# UNAVAILABLE (loading, draining, the job going down) sends the client elsewhere: a draining server never comes
# back, so a longer wait would only hold up a retry that another replica can take now (1 s: the shortest wait that
# clients honour; OpenAI's ignores 0); closing the connection lets that retry reach another replica, not this one.
HTTP_HEADERS = {Code.UNAVAILABLE: {"retry-after": "1", "connection": "close"}}


@dataclass(frozen=True)
class Tokens:
    """New tokens for the request, in order, with their log-probabilities."""

    ids: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class Finished:
    """The request ended normally: reason "stop" (a stop token, which is the last token sent) or "length"."""

    reason: str


@dataclass(frozen=True)
class Failed:
    """The request ended without finishing (cancelled, deadline, shutdown, engine failure)."""

    code: Code
    message: str


Event = Tokens | Finished | Failed


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset
    deadline: float | None = None  # time.monotonic() seconds
    on_event: Callable[[Event], None] | None = None  # called on the engine's thread with each event
    on_end: Callable[["Request", Event], None] | None = None  # called once, with the Finished or Failed event
    events: collections.deque = field(default_factory=collections.deque)
    generated: int = 0  # tokens sent to the caller (counted by `put`: none after the request's end)
    planned: int = 0  # tokens it will have once every device call made for it is read
    cancelled: bool = False
    # time.monotonic() seconds, for the metrics: made, given a slot, first and last token, ended
    created: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    ended_at: float | None = None
    _ready: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _ended: threading.Event = field(default_factory=threading.Event, repr=False)
    _on_cancel: Callable[["Request"], None] | None = field(default=None, repr=False)

    # ---- the caller's side ----
    def cancel(self) -> None:
        self.cancelled = True
        hook = self._on_cancel
        if hook is not None and not self._ended.is_set():
            hook(self)

    def stop_here(self) -> None:
        """The caller has all it wants (a stop string in the text): the request ends now, finished (its metrics
        count it so), and its slot frees at the scheduler's next turn."""
        self.put(Finished("stop"))
        self.cancel()

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds."""
        with self._ready:
            if not self.events and not self._ready.wait_for(lambda: self.events, timeout):
                return None
            return self.events.popleft()

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Whether the request has ended (its last event is queued), waiting up to `timeout` seconds. A caller
        that wants only the whole completion wakes once, not at every decode call."""
        return self._ended.wait(timeout)

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    # ---- the scheduler's side ----
    def when_cancelled(self, hook: Callable[["Request"], None]) -> None:
        """Call `hook(self)` on the cancelling thread when the caller cancels before the request ends (the
        scheduler frees its queue place then); at once if it is cancelled already. The hook may run twice when
        the two race, so it must be idempotent."""
        self._on_cancel = hook
        if self.cancelled and not self._ended.is_set():
            hook(self)

    def put(self, event: Event) -> None:
        """Deliver an event; after a Finished or Failed nothing more is delivered, and a Tokens event's tokens count
        in `generated` only when delivered. Events may come from two threads (the engine's, and a canceller's):
        the lock keeps them, and `on_event`'s calls, in order."""
        ends = not isinstance(event, Tokens)
        with self._ready:
            if self._ended.is_set():
                return
            now = time.monotonic()
            if ends:
                self.ended_at = now
            else:
                self.generated += len(event.ids)
                self.first_token_at = self.first_token_at or now
                self.last_token_at = now
            if self.on_event is None:
                self.events.append(event)
                self._ready.notify()
            else:
                self.on_event(event)
            if ends:  # set last: a reader woken by it (`wait_ended`, no lock) finds the event already there
                self._ended.set()
        if ends and self.on_end is not None:
            self.on_end(self, event)

    def expired(self, now: float) -> bool:
        return self.cancelled or (self.deadline is not None and now > self.deadline)

    def expiry(self) -> Failed:
        """The event for a request that expired: cancelled by its caller, or past its deadline."""
        if self.cancelled:
            return Failed(Code.CANCELLED, "the request was cancelled")
        return Failed(Code.DEADLINE_EXCEEDED, "the request passed its deadline")
