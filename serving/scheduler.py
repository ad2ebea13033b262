"""The engine loop: continuous batching over the engine's slots, driven by process 0, followed by the rest.

Process 0 takes validated requests from a bounded queue. Each turn of the loop it prefills the queued
requests that fit in free slots (batched prefills, by prompt bucket), inserts them, then runs a few decode
steps for every slot; a request's slot frees the moment it finishes, is cancelled or passes its deadline, and
a new request takes it at the next turn. Every device call is first announced as a small command array,
broadcast from process 0 to every process, so the other processes make the same engine calls with the same
shapes:

    header  int32[4]            [op, rows, bucket, steps]
    payload int32[rows, bucket + 6]   (PREFILL) prompt tokens, then length, slot, temperature (float32
                                      bits), top_k, top_p (float32 bits), seed (uint32 bits)
            int32[slots]              (DECODE) 1 for each slot a request holds, 0 for the free ones

Nothing compiles in the loop (a compile there would stall every stream for seconds): a burst is prefilled by
prompt bucket, in prefills of the row counts `Engine.prefill_rows` allows (bounded by the slots and a token
budget), and warm-up compiles each of those shapes and every decode program, on several threads.

Requests are serving.request's `Request`; the loop sends each its events (`Tokens`, then one `Finished` or
`Failed`). Tokens are ints; text is the caller's business (off the engine's thread).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial

import jax
import numpy as np

from gptjax import distributed
from gptjax.engine import SamplingArrays, layout_of
from serving.request import Code, Failed, Finished, Request, Tokens

log = logging.getLogger("gptjax.serving")

OP_IDLE, OP_PREFILL, OP_DECODE, OP_STOP = 0, 1, 2, 3
HEADER = 4
PAYLOAD_EXTRA = 6
IDLE_HEARTBEAT_S = 1.0  # with several processes, an idle loop still broadcasts this often
COMPILE_THREADS = min(8, os.cpu_count() or 1)  # warm-up's compiles at once (XLA compiles without the GIL)


class QueueFull(Exception):
    pass


class NotAccepting(Exception):
    """The loop is not running yet or is draining."""


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


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

    def _ensure_state(self):
        """The decode state, made on first use (every process makes its own, of the same layout)."""
        if self._state is None:
            self._state = self.engine.new_state(self.slots)
        return self._state

    def _execute(self, header, payload):
        """Run one command on the engine; -> host arrays (prefill: first tokens, logprobs; decode: [steps, slots])."""
        op, rows, bucket, steps = (int(v) for v in header)
        self._ensure_state()
        if op == OP_PREFILL:
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
        self.stopped.set()

    # ---- process 0 ----------------------------------------------------------------------------------
    def _prefill_commands(self, requests: list[Request], slots: list[int]):
        """The prefills of a burst: by prompt bucket, in groups of the bucket's largest row count, the last one
        padded to a power of two (shapes that warm-up compiled) -> [(header, payload, [(slot, request)])]."""
        by_bucket = collections.defaultdict(list)
        for s, r in zip(slots, requests):
            by_bucket[self.engine.prefill_bucket(len(r.prompt))].append((s, r))
        commands = []
        for bucket, pairs in sorted(by_bucket.items()):
            most = self.engine.prefill_rows(bucket, self.slots)[-1]
            for start in range(0, len(pairs), most):
                group = pairs[start:start + most]
                header, payload = self._prefill_command([r for _, r in group], [s for s, _ in group],
                                                        _pow2_at_least(len(group)), bucket)
                commands.append((header, payload, group))
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
        """Compile every program the loop runs before serving: prefill and insert of every prompt bucket and row
        count it allows, decode of every row bucket (greedy and sampled); several at once, as XLA compiles
        without the GIL. Every process compiles the same programs."""
        layout = layout_of(self._ensure_state())
        jobs = [partial(self.engine.compile_prefill, rows, bucket, layout)
                for bucket in self.engine.prefill_buckets() for rows in self.engine.prefill_rows(bucket, self.slots)]
        jobs += [partial(self.engine.compile_decode, layout, self.steps, sampled, rows)
                 for rows in self.engine.decode_buckets(self.slots) for sampled in (False, True)]
        start, report = time.monotonic(), max(1, len(jobs) // 10)
        with ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="compile") as pool:
            for done, job in enumerate(as_completed([pool.submit(job) for job in jobs]), 1):
                job.result()  # a failed compile fails the start
                if done % report == 0 or done == len(jobs):
                    log.info("compiled %d/%d programs in %.0f s", done, len(jobs), time.monotonic() - start)

    def _decode_command(self, sampled: int, live_slots) -> tuple[np.ndarray, np.ndarray]:
        live = np.zeros(self.slots, np.int32)
        live[list(live_slots)] = 1
        return np.array([OP_DECODE, sampled, 0, self.steps], np.int32), live

    def _take(self, free: int, now: float) -> list[Request]:
        taken = []
        while self._queue and len(taken) < free:
            r = self._queue.popleft()
            if r.expired(now):
                r.put(r.expiry())
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
                r.put(Failed(Code.INTERNAL, f"the engine failed: {type(e).__name__}: {e}"))
            raise
        finally:
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
                        r.put(Failed(Code.UNAVAILABLE, "the server is shutting down"))
                    self._queue.clear()
                    self._live.clear()
                if self._stop and not self._queue and not self._live:
                    break
                for slot, r in list(self._live.items()):
                    if r.expired(now):
                        r.put(r.expiry())
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
                slots, given = free[: len(admitted)], time.monotonic()
                for s, r in zip(slots, admitted):
                    self._live[s] = r
                    r.admitted = given

            if idle:  # a heartbeat, so the followers' wait for the next command never times out
                self._broadcast(np.array([OP_IDLE, 0, 0, 0], np.int32))
                continue
            prefilled = []  # (slot/request pairs, first tokens, logprobs): read once the next decode is queued
            if admitted:
                for header, payload, group in self._prefill_commands(admitted, slots):
                    prefilled.append((group, *self._execute(*self._broadcast(header, payload))))
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
            r.put(Tokens(ids, lps))
            if ids[-1] in r.stop_ids:
                r.put(Finished("stop"))
                finished.append(s)
            elif r.generated >= r.max_new_tokens:
                r.put(Finished("length"))
                finished.append(s)
        if finished:
            with self._cv:
                for s in finished:
                    if self._live.get(s) is reqs[s]:
                        del self._live[s]
