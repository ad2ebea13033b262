"""Runs the engine loop's commands on this process's engine. Process 0 and every follower run the same
commands through this one class, so each process makes the same engine calls, in the same order, with the
same shapes.

A command that raises leaves the decode state as follows, on every process alike (the same command fails
the same way everywhere: its values were checked before it was sent):
- a prefill that fails before its insert leaves the state untouched: the slots it named stay free (a free
  slot is parked at position 0, and the next insert into it overwrites its K/V);
- an insert or decode that fails after taking the state (donated: its buffers are gone) loses it, and the
  executor starts from an empty one at its next command; one that fails before taking it leaves it whole;
- a call that fails while running on the device shows only when process 0 reads its outputs: process 0 then
  sends `Reset`, since the state came out of that call.
A fault on one process alone (its device, its memory) can't be told from here; the processes then leave
lock step, and the job is restarted from outside. Process 0 tells a broadcast that failed for a lost process from
one that failed for its own device by `devices_answer`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from functools import partial
from typing import Any, NamedTuple

import jax
import numpy as np

from gptjax import compile_cache
from gptjax.engine import SamplingArrays, layout_of
from serving import wire
from serving.commands import Command, Decode, Prefill, Reset

log = logging.getLogger("gptjax.serving")

COMPILE_THREADS = min(8, os.cpu_count() or 1)  # warm-up's compiles at once (XLA compiles without the GIL)
WARMUP_WAIT_S = 3600  # how long a process that has warmed up waits for the others


class Outputs(NamedTuple):
    """A command's results as device arrays (read them with `distributed.to_host`): a prefill's first token and
    its log-probability per row ([rows]); a decode's tokens and log-probabilities ([steps, slots])."""

    tokens: Any
    logprobs: Any


class CommandFailed(Exception):
    """The engine raised running `command`; `state_lost`: the decode state went with it."""

    def __init__(self, command: Command, cause: BaseException, state_lost: bool):
        super().__init__(f"{type(command).__name__} failed: {type(cause).__name__}: {cause}")
        self.command, self.cause, self.state_lost = command, cause, state_lost


def _deleted(leaf) -> bool:
    is_deleted = getattr(leaf, "is_deleted", None)
    return bool(is_deleted and is_deleted())


def prefill_inputs(command: Prefill) -> tuple[np.ndarray, np.ndarray, np.ndarray, SamplingArrays]:
    """A prefill's engine inputs: tokens [rows, bucket] right-padded, lengths, slots, per-row sampling."""
    tokens = np.zeros((len(command.rows), command.bucket), np.int32)
    for i, row in enumerate(command.rows):
        tokens[i, : len(row.prompt)] = row.prompt
    lengths = np.array([len(row.prompt) for row in command.rows], np.int32)
    slots = np.array([row.slot for row in command.rows], np.int32)
    return tokens, lengths, slots, SamplingArrays.from_params([row.sampling for row in command.rows])


class Executor:
    """One process's engine and decode state (`slots` slots), driven by commands."""

    def __init__(self, engine, slots: int):
        self.engine = engine
        self.slots = slots
        self._state = None

    @property
    def state(self):
        """The decode state, made on first use (every process makes its own, of the same layout)."""
        if self._state is None:
            self._state = self.engine.new_state(self.slots)
        return self._state

    def run(self, command: Command) -> Outputs | None:
        """Run one command -> its outputs (a prefill or a decode; dispatched, not waited for), else None.
        Raises CommandFailed when the engine raises."""
        if isinstance(command, Prefill):
            return self._prefill(command)
        if isinstance(command, Decode):
            return self._decode(command)
        if isinstance(command, Reset):
            self._state = None
        return None

    def _prefill(self, command: Prefill) -> Outputs:
        state = self.state
        try:
            tokens, lengths, slots, samp = prefill_inputs(command)
            prefix = self.engine.prefill(tokens, lengths, samp)
        except Exception as e:
            raise CommandFailed(command, e, state_lost=False) from e
        try:
            self._state = self.engine.insert(prefix, state, slots)
        except Exception as e:
            raise self._failed(command, e, state) from e
        return Outputs(prefix.first_tokens, prefix.first_logprobs)

    def _decode(self, command: Decode) -> Outputs:
        state = self.state
        live = np.zeros(self.slots, bool)
        live[list(command.live)] = True
        try:
            self._state, tokens, logprobs = self.engine.generate_steps(state, command.steps, sampled=command.sampled,
                                                                       live=live)
        except Exception as e:
            raise self._failed(command, e, state) from e
        return Outputs(tokens, logprobs)

    def _failed(self, command: Command, cause: Exception, state) -> CommandFailed:
        """A call that took the state failed: the state is lost if its buffers went (donated)."""
        lost = any(_deleted(leaf) for leaf in jax.tree.leaves(state))
        if lost:
            self._state = None
        return CommandFailed(command, cause, lost)

    def devices_answer(self) -> bool:
        """Whether this process's own devices still run a program. A broadcast to the other processes that fails
        while they do failed for want of those processes; one that fails with them is a fault here (a device
        error that every later call meets)."""
        try:
            for device in jax.local_devices():
                jax.device_get(jax.device_put(np.int32(1), device) + 1)
        except Exception:  # noqa: BLE001 - whatever it raises, the device does not answer
            return False
        return True

    def warmup(self, steps: int, stop: threading.Event | None = None) -> bool:
        """Compile every program the loop can run before serving: prefill and insert of every prompt bucket and
        row count allowed, decode of every row bucket (greedy and sampled) at `steps` steps; several at once,
        as XLA compiles without the GIL. Every process compiles the same programs, then waits for the others:
        the first command is a collective, which would time out on a process still compiling. -> False, at
        once (what is compiling finishes on its own), where `stop` is set first: a shutdown while loading."""
        engine, layout = self.engine, layout_of(self.state)
        jobs = [partial(engine.compile_prefill, rows, bucket, layout)
                for bucket in engine.prefill_buckets() for rows in engine.prefill_rows(bucket, self.slots)]
        jobs += [partial(engine.compile_decode, layout, steps, sampled, rows)
                 for rows in engine.decode_buckets(self.slots) for sampled in (False, True)]
        if jax.process_index() > 0:
            # only process 0 writes JAX's compilation cache: a follower that shares its folder (the processes of one
            # host) compiles from the other end, and reads what process 0 has written by the time it gets there
            jobs.reverse()
        start, report = time.monotonic(), max(1, len(jobs) // 10)
        hits, lookups, loaded = compile_cache.hits(), compile_cache.lookups(), compile_cache.loaded()
        pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="compile")
        try:
            pending, done = {pool.submit(job) for job in jobs}, 0
            while pending:
                if stop is not None and stop.is_set():
                    log.info("prepared %d/%d shapes when asked to stop", done, len(jobs))
                    return False
                finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                for job in finished:
                    job.result()  # a failed compile fails the start
                    done += 1
                    if done % report == 0 or done == len(jobs):
                        # a shape is one or two XLA programs (a prefill and its insert): the cache counts programs
                        log.info("prepared %d/%d shapes in %.0f s: %d programs loaded whole, %d of %d compiles "
                                 "read from the compilation cache", done, len(jobs), time.monotonic() - start,
                                 compile_cache.loaded() - loaded, compile_cache.hits() - hits,
                                 compile_cache.lookups() - lookups)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        wire.wait_for_every_process("gptjax-warmup", WARMUP_WAIT_S)
        return True
