"""The engine loop's commands as the int32 arrays process 0 broadcasts to the other processes, and the checks
that every value fits its field before anything is packed.

    header   int32[4]                   [op, a, b, c]
      IDLE     [0, 0, 0, 0]
      PREFILL  [1, rows, bucket, 0]     payload int32[rows, bucket + 6]: the prompt's tokens right-padded with
                                        0, then length, slot, temperature (float32 bits), top_k, top_p (float32
                                        bits), seed (uint32 bits: the seed modulo 2**32)
      DECODE   [2, sampled, 0, steps]   payload int32[slots]: 1 for each live slot, 0 for the free ones
      STOP     [3, 0, 0, 0]
      RESET    [4, 0, 0, 0]

The header goes first: every process needs the payload's shape before the payload's broadcast. Both
broadcasts are collectives, so process 0 calls `send` exactly when every other process calls `receive`.
`check_request` holds a request to the same bounds before it is queued, so a value out of range ends that
request (the front end's INVALID_ARGUMENT) and never the loop.
"""

from __future__ import annotations

import jax
import numpy as np

from gptjax import distributed
from gptjax.engine import SamplingArrays
from gptjax.sampling import SamplingParams
from serving.commands import Command, Decode, Idle, Prefill, Reset, Row, Stop

OP_IDLE, OP_PREFILL, OP_DECODE, OP_STOP, OP_RESET = 0, 1, 2, 3, 4
HEADER = 4
ROW_FIELDS = 6  # after a prefill row's tokens: length, slot, temperature, top_k, top_p, seed
INT32_MAX = 2**31 - 1
_BARE = {OP_IDLE: Idle, OP_STOP: Stop, OP_RESET: Reset}
_BARE_OPS = {Idle: OP_IDLE, Stop: OP_STOP, Reset: OP_RESET}


class OutOfRange(ValueError):
    """A value that does not fit the field it travels in; the message names the field."""


# ---- the bounds -------------------------------------------------------------------------------------------
def _float32(value: float, name: str) -> np.float32:
    with np.errstate(over="ignore"):
        f = np.float32(value)
    if not np.isfinite(f):
        raise OutOfRange(f"{name} {value} does not fit float32")
    return f


def check_sampling(p: SamplingParams) -> None:
    """Sampling parameters that fit their fields (the seed travels modulo 2**32, so any integer does)."""
    if _float32(p.temperature, "temperature") < 0:
        raise OutOfRange(f"temperature {p.temperature} is negative")
    if not 0 <= p.top_k <= INT32_MAX:
        raise OutOfRange(f"top_k {p.top_k} is outside [0, 2**31)")
    if not 0 < _float32(p.top_p, "top_p") <= 1:
        raise OutOfRange(f"top_p {p.top_p} is outside (0, 1] as float32")


def check_prompt(prompt, bucket: int) -> None:
    """A prompt of 1 to `bucket` token ids, each in [0, 2**31)."""
    if not 1 <= len(prompt) <= bucket:
        raise OutOfRange(f"prompt length {len(prompt)} is outside [1, {bucket}]")
    low, high = min(prompt), max(prompt)
    if low < 0 or high > INT32_MAX:
        raise OutOfRange(f"prompt token id {low if low < 0 else high} is outside [0, 2**31)")


def check_request(prompt, bucket: int, sampling: SamplingParams) -> None:
    """Whether a request's values fit a prefill row padded to `bucket` tokens; raises OutOfRange."""
    check_prompt(prompt, bucket)
    check_sampling(sampling)


def _check_slot(slot: int, slots: int) -> None:
    if not 0 <= slot < slots:
        raise OutOfRange(f"slot {slot} is outside [0, {slots})")


# ---- encoding ---------------------------------------------------------------------------------------------
def encode(command: Command, slots: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A command -> (header, payload or None); raises OutOfRange, naming the field, before packing anything."""
    if isinstance(command, Prefill):
        return _encode_prefill(command, slots)
    if isinstance(command, Decode):
        for slot in command.live:
            _check_slot(slot, slots)
        if not 0 <= command.steps <= INT32_MAX:
            raise OutOfRange(f"steps {command.steps} is outside [0, 2**31)")
        live = np.zeros(slots, np.int32)
        live[list(command.live)] = 1
        return np.array([OP_DECODE, int(command.sampled), 0, command.steps], np.int32), live
    return np.array([_BARE_OPS[type(command)], 0, 0, 0], np.int32), None


def _encode_prefill(command: Prefill, slots: int) -> tuple[np.ndarray, np.ndarray]:
    rows, bucket = len(command.rows), command.bucket
    if not 1 <= rows <= INT32_MAX or not 1 <= bucket <= INT32_MAX:
        raise OutOfRange(f"a prefill of {rows} rows of {bucket} tokens")
    for row in command.rows:
        check_request(row.prompt, bucket, row.sampling)
        _check_slot(row.slot, slots)
    payload = np.zeros((rows, bucket + ROW_FIELDS), np.int32)
    for i, row in enumerate(command.rows):
        payload[i, : len(row.prompt)] = row.prompt
    samp = SamplingArrays.from_params([row.sampling for row in command.rows])
    extra = payload[:, bucket:]
    extra[:, 0] = [len(row.prompt) for row in command.rows]
    extra[:, 1] = [row.slot for row in command.rows]
    extra[:, 2] = samp.temperature.view(np.int32)
    extra[:, 3] = samp.top_k
    extra[:, 4] = samp.top_p.view(np.int32)
    extra[:, 5] = samp.seed.view(np.int32)
    return np.array([OP_PREFILL, rows, bucket, 0], np.int32), payload


def payload_shape(header: np.ndarray, slots: int) -> tuple[int, ...] | None:
    """The shape of the payload that follows `header` (None: no payload)."""
    op, rows, bucket, _ = (int(v) for v in header)
    return {OP_PREFILL: (rows, bucket + ROW_FIELDS), OP_DECODE: (slots,)}.get(op)


def decode(header: np.ndarray, payload: np.ndarray | None) -> Command:
    """(header, payload) -> the command `encode` made (floats as float32, the seed modulo 2**32)."""
    op, a, b, c = (int(v) for v in header)
    if op == OP_DECODE:
        return Decode(steps=c, live=tuple(np.flatnonzero(payload).tolist()), sampled=bool(a))
    if op != OP_PREFILL:
        return _BARE[op]()
    bucket = b
    tokens, extra = payload[:, :bucket], payload[:, bucket:]
    temperature, top_p = extra[:, 2].view(np.float32).tolist(), extra[:, 4].view(np.float32).tolist()
    seed = extra[:, 5].view(np.uint32).tolist()
    rows = tuple(Row(prompt=tuple(tokens[i, : extra[i, 0]].tolist()), slot=int(extra[i, 1]),
                     sampling=SamplingParams(temperature[i], int(extra[i, 3]), top_p[i], seed[i]))
                 for i in range(a))
    return Prefill(bucket, rows)


# ---- the broadcast ----------------------------------------------------------------------------------------
def send(command: Command, slots: int) -> None:
    """Process 0: broadcast `command` to every other process (each is in `receive` meanwhile)."""
    header, payload = encode(command, slots)
    distributed.broadcast_from_main(header)
    if payload is not None:
        distributed.broadcast_from_main(payload)


def wait_for_every_process(name: str, timeout_s: float) -> None:
    """Every process: return once all have called this with `name` (each name once). A collective waits only
    about 30 s for a late process (gloo's rendezvous), so a process that is minutes ahead, say one whose
    warm-up read its programs from the compilation cache while another compiled them, waits here instead.
    The coordination service's barrier, which a dead process still ends early (its heartbeat stops)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # no public form of the barrier in jax 0.10 or 0.11

    jax_distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def receive(slots: int) -> Command:
    """Every other process: the next command process 0 sends."""
    header = distributed.broadcast_from_main(np.zeros(HEADER, np.int32))
    shape = payload_shape(header, slots)
    payload = None if shape is None else distributed.broadcast_from_main(np.zeros(shape, np.int32))
    return decode(header, payload)
