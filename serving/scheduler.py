"""The engine loop: continuous batching over the engine's slots, driven by process 0, followed by the rest.

Process 0 takes validated requests from a bounded queue. Each turn `schedule(now)` decides what runs next:
the prefills of the queued requests that fit in free slots (batched by prompt bucket), else a decode call of
a few steps for every live slot, else nothing. A request's slot frees the moment it finishes, is cancelled
or passes its deadline, and a new request takes it at the next turn; a queued request that is cancelled or
passes its deadline leaves the queue at once. Every command (`serving.commands`) goes to the other processes
first (`serving.wire`), and every process runs it through the same `serving.executor.Executor`, so they make
the same engine calls with the same shapes. `deliver` hands a command's outputs to its requests.

Nothing compiles in the loop (a compile there would stall every stream for seconds): a burst is prefilled by
prompt bucket, in prefills of the row counts `Engine.prefill_rows` allows (bounded by the slots and a token
budget), and warm-up compiles each of those shapes and every decode program.

The device always has the next call queued while this thread reads, streams and dispatches: each decode call
is dispatched before the one before it is read, and a prefill's first tokens are read once the next prefill of
its burst, or the decode after it, is queued. A request that stops on a stop token (or on its first token)
has its slot stepped once more for nothing.

Requests are serving.request's `Request` (re-exported here); each gets events: `Tokens`, then one `Finished`
or `Failed`. A request whose values don't fit the commands' fields fails with INVALID_ARGUMENT at `submit`;
a command the engine fails on ends only its own requests (all live ones when the decode state went with it),
with INTERNAL. A broadcast to the other processes that fails while this process's devices still answer means
one of them is gone, and the job with it (`PeerLost`): every request ends with UNAVAILABLE, for the client to
retry elsewhere, and the loop ends. (A lost process that leaves a collective waiting instead of failing ends
this one by the heartbeats: its clients see their connections drop.)
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import threading
import time
from typing import Iterable, NamedTuple

import jax

from gptjax import distributed
from serving import wire
from serving.commands import Command, Decode, Idle, Prefill, Reset, Row, Stop
from serving.config import SchedulerConfig
from serving.executor import CommandFailed, Executor, Outputs
from serving.request import Code, Event, Failed, Finished, Request, Tokens
from serving.watchdog import Watchdog

__all__ = ["NotAccepting", "PeerLost", "QueueFull", "Request", "Scheduler"]

log = logging.getLogger("gptjax.serving")

IDLE_HEARTBEAT_S = 1.0  # with several processes, an idle loop still sends a command this often
REPORT_S = 30.0  # a busy loop logs its load this often
STUCK_TURN_S = 60.0  # a turn of the loop this long is logged with the loop's stack (serving.watchdog)


class QueueFull(Exception):
    @classmethod
    def of(cls, max_queued: int) -> "QueueFull":
        return cls(f"the server's queue is full ({max_queued} requests); retry later")


class NotAccepting(Exception):
    """The loop is not running yet or is draining."""


class PeerLost(Exception):
    """Process 0 can no longer reach the job's other processes: a command's broadcast failed while its own devices
    still answer. A broadcast runs no engine code, so this is no bug of the engine's: a process is gone, and the
    job will end (by the heartbeats) and be restarted."""

    @classmethod
    def of(cls, command: Command, cause: BaseException) -> "PeerLost":
        return cls(f"a process of this server's job is gone (broadcasting the {type(command).__name__} command to "
                   f"the other processes failed: {type(cause).__name__}: {cause})")


class _Pending(NamedTuple):
    """A command dispatched and not read yet; `epoch` is the decode state it ran on (a Reset starts a new one)."""

    command: Prefill | Decode
    outputs: Outputs
    epoch: int


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _describe(commands: list) -> str:
    """A busy turn's commands in a few words, for the watchdog's line."""
    if not commands:
        return "reading the last decode call's tokens"
    if isinstance(commands[0], Decode):
        return f"a decode call of {commands[0].steps} steps over {len(commands[0].live)} slots"
    shapes = ", ".join(f"{len(c.rows)} rows x {c.bucket}" for c in commands)
    return f"prefills of {shapes}"


class _LoadReport:
    """A log line every REPORT_S while the loop works: what it holds and how fast commands go, so a slow or
    stuck server shows in its log. A window starts at its first command, so idle time before it does not read
    as a slow rate."""

    def __init__(self):
        self.since: float | None = None
        self.prefills = self.decodes = self.tokens = 0

    def count(self, command: Prefill | Decode) -> bool:
        """Count a dispatched command -> whether a report is due."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        if isinstance(command, Prefill):
            self.prefills += 1
        else:
            self.decodes += 1
            self.tokens += command.steps * len(command.requests)
        return now - self.since >= REPORT_S

    def report(self, active: int, queued: int) -> None:
        seconds = time.monotonic() - self.since  # a report comes only after a window's REPORT_S
        log.info("%d running, %d queued; in %.0f s: %d prefills, %d decode calls, %d tokens (%.0f/s)", active,
                 queued, seconds, self.prefills, self.decodes, self.tokens, self.tokens / seconds)
        self.__init__()


class Scheduler:
    def __init__(self, engine, config: SchedulerConfig = SchedulerConfig()):
        self.engine = engine
        self.slots = engine.engine_config.max_slots
        self.steps = config.decode_steps_per_call
        self.batch_window_s = config.batch_window_ms / 1e3
        self.max_queued = config.max_queued_requests
        self.executor = Executor(engine, self.slots)
        self.stopped = threading.Event()
        self.failure: BaseException | None = None  # what ended the loop, where something did (run)
        self._multi = jax.process_count() > 1
        self._cv = threading.Condition()
        # under the lock: the queue (oldest first), the queued requests' deadlines (a heap), the live slots
        self._queue: collections.OrderedDict[Request, bool] = collections.OrderedDict()
        self._deadlines: list[tuple[float, int, Request]] = []
        self._order = itertools.count()
        self._live: dict[int, Request] = {}
        self._window_ends: float | None = None  # an idle loop gathers a burst until then
        self._changed = False  # a request came or left, or stop(): the loop looks again before it waits
        self._accepting = self._stop = self._abort = False
        # the loop's thread only: what is dispatched and not read yet
        self._first_reads: list[_Pending] = []  # prefills, read once the next decode is queued
        self._in_flight: _Pending | None = None  # the last decode call
        self._epoch = 0
        self._last_sent = time.monotonic()
        self._load = _LoadReport()

    # ---- the callers' side (any thread) -------------------------------------------------------------
    def submit(self, requests: list[Request]) -> None:
        """Queue requests together (all or none); raise QueueFull or NotAccepting. A request whose values
        don't fit the commands' fields ends at once with Failed(INVALID_ARGUMENT) instead."""
        problems = [self._problem(r) for r in requests]
        fit = [r for r, problem in zip(requests, problems) if problem is None]
        with self._cv:
            gone = self._expire_queued(time.monotonic())
            if not self._accepting:
                refusal = NotAccepting()
            # the queue's limit is on requests waiting for a slot: those that free slots will take (an idle loop
            # holds a burst for its batch window first) are not counted against it
            elif len(self._queue) + len(fit) - (self.slots - len(self._live)) > self.max_queued:
                refusal = QueueFull.of(self.max_queued)
            else:
                refusal = None
                for r in fit:
                    self._queue[r] = True
                    if r.deadline is not None:
                        heapq.heappush(self._deadlines, (r.deadline, next(self._order), r))
                self._changed = True
                self._cv.notify()
        self._end(gone)
        if refusal is not None:
            raise refusal
        for r, problem in zip(requests, problems):
            if problem is not None:
                r.put(Failed(Code.INVALID_ARGUMENT, problem))
        for r in fit:
            r.when_cancelled(self._cancel_queued)

    def _problem(self, r: Request) -> str | None:
        """Why a request can't run, or None."""
        if r.max_new_tokens < 1:
            return f"max_new_tokens {r.max_new_tokens} is under 1"
        try:
            wire.check_request(r.prompt, self.engine.prefill_bucket(len(r.prompt)), r.sampling)
        except wire.OutOfRange as e:
            return str(e)
        return None

    def _cancel_queued(self, r: Request) -> None:
        """A request was cancelled: if it is still queued, it leaves the queue and ends now."""
        with self._cv:
            queued = self._queue.pop(r, False)
            self._changed = True
            self._cv.notify()
        if queued:
            r.put(r.expiry())

    @property
    def accepting(self) -> bool:
        return self._accepting

    def accept(self) -> None:
        with self._cv:
            self._accepting = True

    def stop(self, drain: bool = True) -> None:
        """Stop taking requests; the loop ends when the queued and live ones are answered (or at once)."""
        with self._cv:
            self._accepting = False
            self._stop = True
            self._abort = self._abort or not drain
            self._changed = True
            self._cv.notify()

    def pending(self) -> int:
        return self.queued() + self.active()

    def active(self) -> int:
        with self._cv:
            return len(self._live)

    def live_requests(self) -> list[Request]:
        """The requests holding a slot now (a snapshot)."""
        with self._cv:
            return list(self._live.values())

    def queued(self) -> int:
        """Requests waiting for a slot (those past their deadline have left already)."""
        with self._cv:
            gone = self._expire_queued(time.monotonic())
            n = len(self._queue)
        self._end(gone)
        return n

    # ---- the policy (process 0) ---------------------------------------------------------------------
    def schedule(self, now: float) -> list[Command]:
        """What runs next: [Stop()] once stopped and everything is answered; the prefills of the queued
        requests given free slots now; else [Decode] for the live requests that need more tokens; else []
        (nothing to dispatch: the loop reads what is in flight); else [Idle(until)] (wait for requests, or
        until an idle loop's batch window closes). Ends the requests that expired, or every request after
        stop(drain=False)."""
        with self._cv:
            self._changed = False
            ended = self._sweep(now)
            done = self._stop and not self._queue and not self._live
            taken, until = ([], None) if done else self._admit(now, ended)
            needing = {} if done or taken else {s: r for s, r in self._live.items() if r.planned < r.max_new_tokens}
            idle = not self._live and not self._first_reads and self._in_flight is None
        self._end(ended)
        if done:
            return [Stop()]
        if taken:
            return self._prefills(taken)
        if needing:
            return [Decode(self.steps, tuple(needing), any(r.sampling.temperature > 0 for r in needing.values()),
                           tuple(needing.values()))]
        return [Idle(until)] if idle else []

    def _sweep(self, now: float) -> list[tuple[Request, Event]]:
        """Under the lock: end the queued requests past their deadline and the live ones cancelled or past it
        (their slots free now); after stop(drain=False), every request."""
        if self._abort:
            failed = Failed(Code.UNAVAILABLE, "the server is shutting down")
            ended = [(r, failed) for r in itertools.chain(self._queue, self._live.values())]
            self._queue.clear()
            self._deadlines.clear()
            self._live.clear()
            return ended
        ended = self._expire_queued(now)
        for slot, r in list(self._live.items()):
            if r.expired(now):
                ended.append((r, r.expiry()))
                del self._live[slot]
        return ended

    def _expire_queued(self, now: float) -> list[tuple[Request, Event]]:
        """Under the lock: take the queued requests whose deadline has passed out of the queue -> their ends."""
        gone = []
        while self._deadlines and self._deadlines[0][0] < now:
            r = heapq.heappop(self._deadlines)[2]
            if self._queue.pop(r, False):
                gone.append((r, r.expiry()))
        return gone

    def _admit(self, now: float, ended: list) -> tuple[list[tuple[int, Request]], float | None]:
        """Under the lock: give free slots to queued requests, oldest first -> (slot, request) pairs, and, when
        an idle loop waits for a burst to gather, when that wait ends. Expired requests met go to `ended`."""
        free = [s for s in range(self.slots) if s not in self._live]
        if not free or not self._queue:
            self._window_ends = None
            return [], None
        if not self._live and len(self._queue) < len(free) and self.batch_window_s > 0:
            # concurrent clients' requests reach an idle server over a millisecond or two: wait that long so
            # that they share one prefill and step together, instead of the first one alone
            if self._window_ends is None:
                self._window_ends = now + self.batch_window_s
            if now < self._window_ends:
                return [], self._window_ends
        self._window_ends = None
        taken, given = [], time.monotonic()
        while self._queue and len(taken) < len(free):
            r = self._queue.popitem(last=False)[0]
            if r.expired(now):
                ended.append((r, r.expiry()))
                continue
            slot = free[len(taken)]
            self._live[slot] = r
            r.admitted = given
            taken.append((slot, r))
        if len(self._deadlines) > 2 * len(self._queue) + 64:  # drop the admitted ones: they hold their requests
            self._deadlines = [entry for entry in self._deadlines if entry[2] in self._queue]
            heapq.heapify(self._deadlines)
        return taken, None

    def _prefills(self, taken: list[tuple[int, Request]]) -> list[Prefill]:
        """The prefills of a burst: by prompt bucket, in groups of the bucket's largest row count, the last one
        padded to a power of two (shapes that warm-up compiled)."""
        by_bucket = collections.defaultdict(list)
        for slot, r in taken:
            by_bucket[self.engine.prefill_bucket(len(r.prompt))].append((slot, r))
        commands = []
        for bucket, pairs in sorted(by_bucket.items()):
            most = self.engine.prefill_rows(bucket, self.slots)[-1]
            for start in range(0, len(pairs), most):
                group = pairs[start:start + most]
                rows = [Row(tuple(r.prompt), slot, r.sampling) for slot, r in group]
                rows += rows[-1:] * (_pow2_at_least(len(rows)) - len(rows))
                commands.append(Prefill(bucket, tuple(rows), tuple(r for _, r in group)))
        return commands

    # ---- delivery (process 0) -----------------------------------------------------------------------
    def deliver(self, command: Prefill | Decode, outputs: Outputs) -> None:
        """Hand a command's outputs (host arrays) to its requests: their new tokens, then Finished at a stop
        token or at the token budget, which frees the slot. A request that ended meanwhile gets nothing."""
        if isinstance(command, Prefill):
            first, first_lp = outputs.tokens.tolist(), outputs.logprobs.tolist()
            new = {row.slot: (r, first[i:i + 1], first_lp[i:i + 1])
                   for i, (row, r) in enumerate(zip(command.rows, command.requests))}
        else:
            new = self._new_tokens(command, outputs)
        finished = []
        for slot, (r, ids, logprobs) in new.items():
            if not ids or self._live.get(slot) is not r:  # it finished, was cancelled or expired meanwhile
                continue
            r.put(Tokens(ids, logprobs))  # counts them in r.generated, unless its caller ended it meanwhile
            if ids[-1] in r.stop_ids or r.generated >= r.max_new_tokens:
                r.put(Finished("stop" if ids[-1] in r.stop_ids else "length"))
                finished.append((slot, r))
        if finished:
            with self._cv:
                for slot, r in finished:
                    if self._live.get(slot) is r:
                        del self._live[slot]

    @staticmethod
    def _new_tokens(command: Decode, outputs: Outputs) -> dict:
        """Each live slot's share of a decode call's [steps, slots] output: up to its token budget and its first
        stop token -> {slot: (request, ids, logprobs)}. One conversion to lists per call, not per token."""
        token_rows, logprob_rows = outputs.tokens.T.tolist(), outputs.logprobs.T.tolist()
        out = {}
        for slot, r in zip(command.live, command.requests):
            ids = token_rows[slot][: max(0, r.max_new_tokens - r.generated)]
            if r.stop_ids:
                ids = ids[: next((j + 1 for j, t in enumerate(ids) if t in r.stop_ids), len(ids))]
            out[slot] = (r, ids, logprob_rows[slot][: len(ids)])
        return out

    @staticmethod
    def _end(ended: Iterable[tuple[Request, Event]]) -> None:
        """Send each request its last event (outside the lock: events may call back into the caller)."""
        for r, event in ended:
            r.put(event)

    # ---- process 0's loop ---------------------------------------------------------------------------
    def warmup(self, stop: threading.Event | None = None) -> bool:
        """Compile every program the loop runs, before serving (every process compiles the same ones); False
        where `stop` was set first."""
        return self.executor.warmup(self.steps, stop)

    def run(self) -> None:
        """Process 0's loop (on its own thread): until stop() and everything queued or live is answered. A
        command the engine fails on ends its own requests and the loop goes on; a lost process (PeerLost) ends
        every request (UNAVAILABLE: the job is going down, so retrying elsewhere is right) and the loop;
        anything else that raises ends every request (INTERNAL) and the loop. Either is kept in `failure` and
        raised again."""
        try:
            self._run()
        except BaseException as e:
            self.failure = e
            if isinstance(e, PeerLost):
                log.error("%s: the job is going down; ending every request", e)
                failed = Failed(Code.UNAVAILABLE, f"{e}; the job is going down: retry on another server")
            else:
                log.exception("engine loop failed")
                failed = Failed(Code.INTERNAL, f"the engine failed: {type(e).__name__}: {e}")
            with self._cv:
                waiting = list(self._queue) + list(self._live.values())
                self._queue.clear()
                self._live.clear()
                self._accepting = False
            self._end((r, failed) for r in waiting)
            raise
        finally:
            self.stopped.set()

    def _run(self) -> None:
        self._load = _LoadReport()  # from the first turn, not from the warm-up
        watchdog = Watchdog(STUCK_TURN_S)
        try:
            self._turns(watchdog)
        finally:
            watchdog.close()

    def _turns(self, watchdog: Watchdog) -> None:
        while True:
            commands = self.schedule(time.monotonic())
            head = commands[0] if commands else None
            if isinstance(head, Stop):
                self._send(head)
                return
            if isinstance(head, Idle):
                watchdog.idle()
                self._idle(head)
                continue
            watchdog.turn(_describe(commands))
            if isinstance(head, Prefill):
                self._read_first()  # an earlier burst's first tokens, before more prefills queue behind them
                for command in commands:
                    if all(r.ended for r in command.requests):  # a failure before ended them: nothing to run
                        continue
                    if (pending := self._dispatch(command)) is not None:
                        # the prefills before this one hand out their first tokens while the device runs it
                        self._read_first()
                        self._first_reads.append(pending)
                # read the decode call before while the prefills run (its tokens go before their first ones);
                # no decode yet: requests that arrived meanwhile are prefilled first, at the next turn
                self._read(self._take_in_flight())
            else:  # a decode call, or none: queue it, then read the first tokens and the call before
                before = self._take_in_flight()
                self._in_flight = None if head is None else self._dispatch(head)
                self._read_first()
                self._read(before)

    def _idle(self, command: Idle) -> None:
        """Wait for a request (or the end of `command.until`); with other processes, send them a heartbeat at
        least every IDLE_HEARTBEAT_S."""
        timeout = None if command.until is None else max(0.0, command.until - time.monotonic())
        if self._multi:
            beat = max(0.0, self._last_sent + IDLE_HEARTBEAT_S - time.monotonic())
            timeout = beat if timeout is None else min(timeout, beat)
        with self._cv:
            self._cv.wait_for(lambda: self._changed, timeout)
        if self._multi and time.monotonic() - self._last_sent >= IDLE_HEARTBEAT_S:
            self._send(Idle())

    def _send(self, command: Command) -> None:
        """Broadcast a command to the other processes; raises PeerLost when that fails while this process's own
        devices still answer (else what the broadcast raised: a fault here, which is the engine's)."""
        if not self._multi:
            return
        try:
            wire.send(command, self.slots)
        except wire.OutOfRange:
            raise
        except Exception as e:
            if self.executor.devices_answer():
                raise PeerLost.of(command, e) from e
            raise
        self._last_sent = time.monotonic()

    def _dispatch(self, command: Prefill | Decode) -> _Pending | None:
        """Send a command and run it here -> what to read later; None when it failed (its requests have
        ended, and the loop goes on)."""
        try:
            self._send(command)
        except wire.OutOfRange as e:  # nothing was sent: `submit` checks each request, so this is a bug here
            log.error("a %s command did not fit the wire: %s", type(command).__name__, e)
            self._fail(command.requests, Failed(Code.INTERNAL, f"the request did not fit the engine's command: {e}"))
            return None
        try:
            outputs = self.executor.run(command)
        except CommandFailed as e:
            self._command_failed(e)
            return None
        for r in command.requests:
            r.planned = 1 if isinstance(command, Prefill) else r.planned + command.steps
        if self._load.count(command):
            self._load.report(self.active(), self.queued())
        return _Pending(command, outputs, self._epoch)

    def _take_in_flight(self) -> _Pending | None:
        pending, self._in_flight = self._in_flight, None
        return pending

    def _read_first(self) -> None:
        """Wait for the prefills dispatched and hand each request its first token."""
        reads, self._first_reads = self._first_reads, []
        for pending in reads:
            self._read(pending)

    def _read(self, pending: _Pending | None) -> None:
        """Wait for a dispatched command's outputs (if any, and of the current state) and deliver them."""
        if pending is None or pending.epoch != self._epoch:
            return
        try:
            tokens, logprobs = pending.outputs
            outputs = Outputs(*distributed.to_host((tokens, logprobs)))
        except Exception as e:  # it failed on the device: the state it left can't be trusted anywhere
            log.exception("a %s command failed while it ran", type(pending.command).__name__)
            self._send(Reset())  # PeerLost when the others can't take it: the call failed for want of one of them
            self.executor.run(Reset())
            self._lose_state(f"the engine failed: {type(e).__name__}: {e}")
            return
        self.deliver(pending.command, outputs)

    # ---- failures (process 0) -----------------------------------------------------------------------
    def _command_failed(self, failure: CommandFailed) -> None:
        log.error("%s", failure, exc_info=failure.cause)
        message = f"the engine failed: {type(failure.cause).__name__}: {failure.cause}"
        if failure.state_lost:  # every process lost it alike, and starts from an empty one
            self._lose_state(message)
        else:
            self._fail(failure.command.requests, Failed(Code.INTERNAL, message))

    def _lose_state(self, message: str) -> None:
        """The decode state is gone: every live request fails, and what is unread belongs to the old state."""
        self._epoch += 1
        self._first_reads, self._in_flight = [], None
        with self._cv:
            live = list(self._live.values())
        self._fail(live, Failed(Code.INTERNAL, f"{message} (the decode state was lost)"))

    def _fail(self, requests: Iterable[Request], event: Failed) -> None:
        """End these requests with `event` and free their slots."""
        requests = set(requests)
        with self._cv:
            for slot, r in list(self._live.items()):
                if r in requests:
                    del self._live[slot]
        self._end((r, event) for r in requests)

    # ---- every process but 0 ------------------------------------------------------------------------
    def follow(self) -> None:
        """Run the commands process 0 sends, until Stop. A command that fails here ends this process: process 0
        may not have failed alike, and would then wait for this one in a collective that never completes; its
        end takes the job down (heartbeats), so that a launcher restarts it rather than serving a hang."""
        while not isinstance(command := wire.receive(self.slots), Stop):
            try:
                self.executor.run(command)
            except CommandFailed as e:
                log.critical("%s; ending this process, and so the job, so that it can be restarted", e,
                             exc_info=e.cause)
                logging.shutdown()
                os._exit(1)  # no clean shutdown: it would wait on the other processes first
        self.stopped.set()
