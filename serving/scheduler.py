"""The engine loop: continuous batching over the engine's slots, driven by process 0, followed by the rest.

Process 0 takes validated requests from a bounded queue. Each turn of the loop it prefills the queued
requests that fit in free slots (one batched prefill), inserts them, then runs a few decode steps for every
slot; a request's slot frees the moment it finishes, is cancelled or passes its deadline, and a new request
takes it at the next turn. Every device call is first announced as a small command array, broadcast from
process 0 to every process, so the other processes make the same engine calls with the same shapes:

    header  int32[4]            [op, rows, bucket, steps]
    payload int32[rows, bucket + 6]   (PREFILL) prompt tokens, then length, slot, temperature (float32
                                      bits), top_k, top_p (float32 bits), seed (uint32 bits)
            int32[slots]              (DECODE) 1 for each slot a request holds, 0 for the free ones
            none                      (COMPILE) start compiling the prefill of `rows` x `bucket` aside

Nothing compiles in the loop: warm-up compiles every decode program, a prefill of one row at every prompt
bucket and of every row count at the smallest. A burst whose prefill shape is not compiled yet runs as
prefills of compiled row counts while a background thread compiles that shape for the next one (a compile
in the loop would stall every stream for seconds).

Requests talk to their callers through a queue of events: ("tokens", ids, logprobs), then ("done", reason)
or ("error", code, message). Tokens are ints; text is the caller's business (off the engine's thread).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import jax
import numpy as np

from gptjax import distributed
from gptjax.engine import SamplingArrays
from gptjax.sampling import SamplingParams

log = logging.getLogger("gptjax.serving")

OP_IDLE, OP_PREFILL, OP_DECODE, OP_STOP, OP_COMPILE = 0, 1, 2, 3, 4
HEADER = 4
PAYLOAD_EXTRA = 6
IDLE_HEARTBEAT_S = 1.0  # with several processes, an idle loop still broadcasts this often


class QueueFull(Exception):
    pass


class NotAccepting(Exception):
    """The loop is not running yet or is draining."""


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset
    deadline: float | None = None  # time.monotonic() seconds
    events: "collections.deque" = field(default_factory=collections.deque)
    _ready: threading.Condition = field(default_factory=threading.Condition)
    _ended: threading.Event = field(default_factory=threading.Event)  # "done" or "error" is queued
    cancelled: bool = False
    generated: int = 0  # tokens sent to the caller
    planned: int = 0  # tokens it will have once every device call made for it is read

    # ---- the caller's side ----
    def cancel(self) -> None:
        self.cancelled = True

    def next_event(self, timeout: float | None = None):
        """The next event, or None after `timeout` seconds."""
        with self._ready:
            if not self.events and not self._ready.wait_for(lambda: self.events, timeout):
                return None
            return self.events.popleft()

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Whether the request has ended (its last event is queued), waiting up to `timeout` seconds. A caller
        that wants only the whole completion wakes once, not at every decode call: with hundreds of requests
        in flight those wake-ups take the interpreter from the engine loop."""
        return self._ended.wait(timeout)

    # ---- the loop's side ----
    def _put(self, *event) -> None:
        with self._ready:
            self.events.append(event)
            self._ready.notify()
        if event[0] != "tokens":
            self._ended.set()

    def _expired(self, now: float) -> bool:
        return self.cancelled or (self.deadline is not None and now > self.deadline)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _done() -> Future:
    """A compile that has finished (one warm-up made before serving)."""
    future = Future()
    future.set_result(None)
    return future


class Scheduler:
    def __init__(self, engine, max_queued: int | None = None):
        ec = engine.engine_config
        self.engine = engine
        self.slots = ec.max_slots
        self.steps = ec.decode_steps_per_call
        self.batch_window_s = ec.batch_window_ms / 1e3
        self.max_queued = max_queued or ec.max_queued_requests
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._live: dict[int, Request] = {}
        self._accepting = False
        self._stop = False
        self._abort = False
        self._state = None
        self.stopped = threading.Event()
        self._prefill_shapes: dict[tuple[int, int], Future] = {}  # (rows, bucket) compiled or being compiled
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile")

    # ---- the callers' side (any thread) -------------------------------------------------------------
    def submit(self, requests: list[Request]) -> None:
        """Queue requests together (all or none); raise QueueFull or NotAccepting."""
        with self._cv:
            if not self._accepting:
                raise NotAccepting()
            if len(self._queue) + len(requests) > self.max_queued:
                raise QueueFull(f"the server's queue is full ({self.max_queued} requests); retry later")
            self._queue.extend(requests)
            self._cv.notify()

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
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._queue) + len(self._live)

    def active(self) -> int:
        with self._cv:
            return len(self._live)

    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    # ---- both sides: one command, executed identically on every process ---------------------------
    def _broadcast(self, header: np.ndarray, payload: np.ndarray | None = None):
        header = distributed.broadcast_from_main(np.asarray(header, np.int32))
        op, rows, bucket, _ = (int(v) for v in header)
        shape = {OP_PREFILL: (rows, bucket + PAYLOAD_EXTRA), OP_DECODE: (self.slots,)}.get(op)
        if shape is not None:
            payload = distributed.broadcast_from_main(payload if payload is not None else np.zeros(shape, np.int32))
        return header, payload

    def _execute(self, header, payload):
        """Run one command on the engine; -> host arrays (prefill: first tokens, logprobs; decode: [steps, slots])."""
        op, rows, bucket, steps = (int(v) for v in header)
        if self._state is None:
            self._state = self.engine.new_state(self.slots)
            self._state_layout = jax.tree.map(  # what a compile aside needs of the state, which donation replaces
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), self._state)
        if op == OP_COMPILE:
            self._compile_aside(rows, bucket)
            return None
        if op == OP_PREFILL:
            if (rows, bucket) in self._prefill_shapes:  # a follower may still be compiling what process 0 has
                wait([self._prefill_shapes[rows, bucket]])
            tokens = payload[:, :bucket]
            extra = payload[:, bucket:]
            samp = SamplingArrays(extra[:, 2].view(np.float32).copy(), extra[:, 3].copy(),
                                  extra[:, 4].view(np.float32).copy(), extra[:, 5].view(np.uint32).copy())
            prefix = self.engine.prefill(tokens, extra[:, 0].copy(), samp)
            self._state = self.engine.insert(prefix, self._state, extra[:, 1].copy())
            return prefix.first_tokens, prefix.first_logprobs  # device arrays, read by the caller
        if op == OP_DECODE:  # `rows` says whether any live slot samples: all-greedy runs a bare argmax
            # dispatched, not waited for: device arrays (read them with distributed.to_host)
            self._state, tokens, logprobs = self.engine.generate_steps(self._state, steps, sampled=bool(rows),
                                                                       live=payload.astype(bool))
            return tokens, logprobs
        return None

    # ---- the followers (every process but 0) ------------------------------------------------------
    def follow(self) -> None:
        """Make the engine calls that process 0 announces, until it says stop."""
        while True:
            header, payload = self._broadcast(np.zeros(HEADER, np.int32))
            if int(header[0]) == OP_STOP:
                break
            self._execute(header, payload)
        self._compiler.shutdown(wait=False, cancel_futures=True)
        self.stopped.set()

    # ---- process 0 ----------------------------------------------------------------------------------
    def _compile_aside(self, rows: int, bucket: int) -> None:
        """Compile the prefill of this shape on the background thread (once)."""
        if (rows, bucket) not in self._prefill_shapes:
            self._prefill_shapes[rows, bucket] = self._compiler.submit(self._compile_prefill, rows, bucket,
                                                                       self._state_layout)

    def _compile_prefill(self, rows: int, bucket: int, state) -> None:
        start = time.monotonic()
        try:
            self.engine.compile_prefill(rows, bucket, state)
            log.info("compiled the prefill of %d x %d tokens in %.1f s", rows, bucket, time.monotonic() - start)
        except Exception:  # the shape stays unready: process 0 keeps splitting such prefills
            log.exception("compiling the prefill of %d x %d tokens failed", rows, bucket)
            raise

    def _compiled(self, rows: int, bucket: int) -> bool:
        shape = self._prefill_shapes.get((rows, bucket))
        return shape is not None and shape.done() and shape.exception() is None

    def _prefill_commands(self, requests: list[Request], slots: list[int]):
        """One prefill of every request if its shape is compiled; otherwise compile that shape aside and run the
        requests in groups of the largest compiled row counts (one row always is)."""
        bucket = self.engine.prefill_bucket(max(len(r.prompt) for r in requests))
        rows = min(_pow2_at_least(len(requests)), _pow2_at_least(self.slots))
        group = lambda start, n: list(zip(slots[start:start + n], requests[start:start + n]))
        ready = [r for r in (1 << k for k in range(rows.bit_length())) if self._compiled(r, bucket)]
        if self._compiled(rows, bucket) or not ready:  # (nothing ready: no warm-up, so compile here)
            return [(*self._prefill_command(requests, slots, rows, bucket), group(0, len(requests)))]
        commands = []
        if (rows, bucket) not in self._prefill_shapes:
            commands.append((np.array([OP_COMPILE, rows, bucket, 0], np.int32), None, []))
        start = 0
        while start < len(requests):
            n = max(r for r in ready if r <= len(requests) - start)
            commands.append((*self._prefill_command(requests[start:start + n], slots[start:start + n], n, bucket),
                             group(start, n)))
            start += n
        return commands

    def _prefill_command(self, requests: list[Request], slots: list[int], rows: int, bucket: int):
        payload = np.zeros((rows, bucket + PAYLOAD_EXTRA), np.int32)
        for i in range(rows):
            # padding rows repeat the last request exactly (same slot, same values): the writes agree
            j = min(i, len(requests) - 1)
            r, s = requests[j], slots[j]
            payload[i, : len(r.prompt)] = r.prompt
            p = r.sampling
            payload[i, bucket:] = [len(r.prompt), s, np.float32(p.temperature).view(np.int32), p.top_k,
                                   np.float32(p.top_p).view(np.int32), np.uint32(int(p.seed) % 2**32).view(np.int32)]
        return np.array([OP_PREFILL, rows, bucket, 0], np.int32), payload

    def warmup(self) -> None:
        """Compile decode (every row bucket, greedy and sampled) and prefill (one row at every prompt bucket,
        every row count at the smallest) before serving."""
        dummy = SamplingParams(temperature=0.0)
        smallest, *buckets = self.engine.prefill_buckets()
        rows = 1
        while rows <= _pow2_at_least(self.slots):
            reqs = [Request([0], 1, dummy, frozenset())] * min(rows, self.slots)
            self._execute(*self._broadcast(*self._prefill_command(reqs, list(range(len(reqs))), rows, smallest)))
            self._prefill_shapes[rows, smallest] = _done()
            rows *= 2
        for bucket in buckets:
            self.engine.compile_prefill(1, bucket, self._state_layout)
            self._prefill_shapes[1, bucket] = _done()
        for rows in self.engine.decode_buckets(self.slots):
            for sampled in (0, 1):
                self._execute(*self._broadcast(*self._decode_command(sampled, range(min(rows, self.slots)))))
        jax.block_until_ready(self._state)  # the calls were only dispatched

    def _decode_command(self, sampled: int, live_slots) -> tuple[np.ndarray, np.ndarray]:
        live = np.zeros(self.slots, np.int32)
        live[list(live_slots)] = 1
        return np.array([OP_DECODE, sampled, 0, self.steps], np.int32), live

    def _take(self, free: int, now: float) -> list[Request]:
        taken = []
        while self._queue and len(taken) < free:
            r = self._queue.popleft()
            if r._expired(now):
                r._put("error", "CANCELLED" if r.cancelled else "DEADLINE_EXCEEDED", "the request expired in the queue")
            else:
                taken.append(r)
        return taken

    def run(self) -> None:
        """Process 0's loop (on its own thread): until stop() and everything queued or live is answered."""
        try:
            self._run()
        except BaseException as e:  # answer everyone, then let the error end the process
            log.exception("engine loop failed")
            with self._cv:
                waiting = list(self._queue) + list(self._live.values())
                self._queue.clear()
                self._live.clear()
                self._accepting = False
            for r in waiting:
                r._put("error", "INTERNAL", f"the engine failed: {type(e).__name__}: {e}")
            raise
        finally:
            self._compiler.shutdown(wait=False, cancel_futures=True)
            self.stopped.set()

    def _run(self) -> None:
        """Each turn: admit and prefill; dispatch the next decode call; then read the prefills' first tokens
        and the decode call before. The device always has the next call queued while this thread reads,
        streams and dispatches (a decode call of the 345M model cost 1.2-2.1 ms more than its steps inside
        `generate` when each was read before the next was sent, H100); a request that stops on a stop token
        (or on its first token) has its slot stepped once more for nothing."""
        multi = jax.process_count() > 1
        in_flight = None  # the last decode call, dispatched and not read: (its live slots, tokens, logprobs)
        while True:
            with self._cv:
                now = time.monotonic()
                if self._abort:
                    for r in list(self._queue) + list(self._live.values()):
                        r._put("error", "UNAVAILABLE", "the server is shutting down")
                    self._queue.clear()
                    self._live.clear()
                if self._stop and not self._queue and not self._live:
                    break
                for slot, r in list(self._live.items()):
                    if r._expired(now):
                        r._put("error", "CANCELLED" if r.cancelled else "DEADLINE_EXCEEDED", "the request was cancelled")
                        del self._live[slot]
                free = [s for s in range(self.slots) if s not in self._live]
                admitted = self._take(len(free), now)
                if admitted and not self._live and len(admitted) < len(free):
                    # concurrent clients' requests reach an idle server over a millisecond or two: wait that
                    # long so that they share one prefill and step together, instead of the first one alone
                    deadline = now + self.batch_window_s
                    while len(admitted) < len(free) and (left := deadline - time.monotonic()) > 0:
                        self._cv.wait(left)
                        admitted += self._take(len(free) - len(admitted), time.monotonic())
                idle = not admitted and not self._live and in_flight is None
                if idle and self._cv.wait(IDLE_HEARTBEAT_S if multi else None):
                    continue
                slots = free[: len(admitted)]
                for s, r in zip(slots, admitted):
                    self._live[s] = r

            if idle:  # a heartbeat, so the followers' wait for the next command never times out
                self._broadcast(np.array([OP_IDLE, 0, 0, 0], np.int32))
                continue
            prefilled = []  # (slot/request pairs, first tokens, logprobs): read once the next decode is queued
            if admitted:
                for header, payload, group in self._prefill_commands(admitted, slots):
                    out = self._execute(*self._broadcast(header, payload))
                    if group:  # none for a compile command
                        prefilled.append((group, *out))
                        for _, r in group:
                            r.planned = 1
                self._read(in_flight)  # read while the prefills run; its tokens go before their first ones
                in_flight = None
                with self._cv:  # prefill first: requests that arrived meanwhile join before the next decode
                    more = self._queue and len(self._live) < self.slots and not self._stop
                if more:
                    self._read_first(prefilled)
                    continue

            with self._cv:  # the requests that still need tokens once the call in flight is read
                live = {s: r for s, r in self._live.items() if r.planned < r.max_new_tokens}
            call = None
            if live:
                sampled = any(r.sampling.temperature > 0 for r in live.values())
                call = (live, *self._execute(*self._broadcast(*self._decode_command(int(sampled), live))))
                for r in live.values():
                    r.planned += self.steps
            self._read_first(prefilled)
            self._read(in_flight)
            in_flight = call

        self._broadcast(np.array([OP_STOP, 0, 0, 0], np.int32))

    def _read_first(self, prefilled: list) -> None:
        """Wait for prefills and send each request its first token."""
        for group, first, first_lp in prefilled:
            first, first_lp = distributed.to_host(first).tolist(), distributed.to_host(first_lp).tolist()
            for i, (s, r) in enumerate(group):
                self._emit({s: r}, {s: ([first[i]], [first_lp[i]])})

    def _read(self, call) -> None:
        """Wait for a dispatched decode call (if any) and send its tokens."""
        if call is not None:
            live, tokens, logprobs = call
            self._emit(live, self._new_tokens(live, distributed.to_host(tokens), distributed.to_host(logprobs)))

    @staticmethod
    def _new_tokens(live: dict, tokens: np.ndarray, logprobs: np.ndarray) -> dict:
        """Each live slot's share of a decode call's [steps, slots] output: up to its token budget and its first
        stop token. One conversion to lists per call (not per token): 256 slots x 8 steps of numpy scalar
        reads took milliseconds of the engine thread, while the GPU waited."""
        token_rows, logprob_rows = tokens.T.tolist(), logprobs.T.tolist()
        out = {}
        for s, r in live.items():
            ids = token_rows[s][: max(0, r.max_new_tokens - r.generated)]
            if r.stop_ids:
                ids = ids[: next((j + 1 for j, t in enumerate(ids) if t in r.stop_ids), len(ids))]
            out[s] = (ids, logprob_rows[s][: len(ids)])
        return out

    def _emit(self, reqs: dict, out: dict) -> None:
        """Send each request its new tokens; free the slots of the finished ones."""
        finished = []
        for s, r in reqs.items():
            ids, lps = out[s]
            if not ids or self._live.get(s) is not r:  # it finished, was cancelled or expired meanwhile
                continue
            r.generated += len(ids)
            r._put("tokens", ids, lps)
            if ids[-1] in r.stop_ids:
                r._put("done", "stop")
                finished.append(s)
            elif r.generated >= r.max_new_tokens:
                r._put("done", "length")
                finished.append(s)
        if finished:
            with self._cv:
                for s in finished:
                    if self._live.get(s) is reqs[s]:
                        del self._live[s]
