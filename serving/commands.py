"""The commands of the engine loop: what every process runs, in the same order, with the same shapes.

Process 0's scheduler makes them (`Scheduler.schedule`), `serving.wire` carries them to the other processes,
and `serving.executor` runs them on each process's engine. They are plain values: the same command gives the
same engine calls anywhere. Only `requests` is process 0's own (whom the outputs go to); it is not sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptjax.sampling import SamplingParams


@dataclass(frozen=True)
class Row:
    """One prompt of a prefill, and the slot its K/V and sampling parameters go to."""

    prompt: tuple[int, ...]
    slot: int
    sampling: SamplingParams


@dataclass(frozen=True)
class Prefill:
    """Prefill `rows` right-padded to `bucket` tokens, then insert each into its slot. The row count is one the
    warm-up compiled: padding rows repeat the last row exactly (same slot, same values), so the writes agree.
    `requests[i]` is row i's request (process 0 only; the padding rows have none)."""

    bucket: int
    rows: tuple[Row, ...]
    requests: tuple = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Decode:
    """`steps` decode steps for every slot; `live` names the slots that hold a sequence (the others are parked).
    `sampled` False promises every live slot is greedy (a bare argmax). `requests[i]` holds slot `live[i]`
    (process 0 only)."""

    steps: int
    live: tuple[int, ...]
    sampled: bool
    requests: tuple = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Idle:
    """Nothing to run. Process 0 waits for a request, or until `until` (time.monotonic()) when set; the other
    processes get it as a heartbeat, so their wait for the next command never times out."""

    until: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Reset:
    """Drop the decode state and start from an empty one: after a device call failed while running, its state
    can't be trusted on any process."""


@dataclass(frozen=True)
class Stop:
    """The loop has ended: the other processes stop following."""


Command = Prefill | Decode | Idle | Reset | Stop
