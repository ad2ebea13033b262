"""A watch on the engine loop: when one turn of it (a command dispatched, outputs read) runs past a limit, the log
gets one line naming the turn's command and the loop thread's stack, so a device call that never returns (a
kernel that hangs, a collective waiting on a dead process) shows where it is instead of a silent server."""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback

log = logging.getLogger("gptjax.serving")


class Watchdog:
    """`turn(what)` at the start of each busy turn, `idle()` before waiting for work; `close()` at the end."""

    def __init__(self, limit_s: float = 60.0):
        self.limit_s, self.poll_s = limit_s, min(5.0, limit_s / 4)  # a stall is seen within a quarter of the limit
        self._lock = threading.Lock()
        self._what: str | None = None  # the busy turn's command; None while idle
        self._since = time.monotonic()
        self._reported = False
        self._thread_id: int | None = None
        self._closed = threading.Event()
        threading.Thread(target=self._watch, name="engine-watchdog", daemon=True).start()

    def turn(self, what: str) -> None:
        with self._lock:
            self._what, self._since, self._reported = what, time.monotonic(), False
            self._thread_id = threading.get_ident()

    def idle(self) -> None:
        with self._lock:
            self._what = None

    def close(self) -> None:
        self._closed.set()

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_s):
            with self._lock:
                stuck = self._what is not None and not self._reported and \
                    time.monotonic() - self._since > self.limit_s
                what, since, thread_id = self._what, self._since, self._thread_id
                self._reported = self._reported or stuck
            if stuck:
                frame = sys._current_frames().get(thread_id)
                stack = "".join(traceback.format_stack(frame)) if frame is not None else "(the thread has ended)\n"
                log.warning("the engine loop has spent %.0f s in one turn (%s); it is at:\n%s",
                            time.monotonic() - since, what, stack.rstrip())
