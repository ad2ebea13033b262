"""Shape planning: which shapes an engine runs and compiles, decided from its configuration alone.

Every jitted program compiles once per shape, so the shapes are kept to a small set known before serving:
- prompt lengths pad to power-of-two buckets (`prefill_bucket`);
- a prefill of one bucket runs at a power-of-two row count (`prefill_rows`), within a token budget;
- a decode state has `state_rows` slots, and a decode call runs only its first `decode_buckets` rows;
- `warmup_programs` lists every (prefill, decode) shape a server can run, for compiling them all at start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple


def cdiv(a: int, b: int) -> int:
    """a / b rounded up."""
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    """The least multiple of `multiple` that is at least n."""
    return cdiv(n, multiple) * multiple


def bucket_length(n: int, minimum: int, maximum: int) -> int:
    """Pad prompt lengths to powers of two (at least `minimum`, at most `maximum`), so few shapes compile."""
    return min(max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1))))), maximum)


class PrefillShape(NamedTuple):
    """A prefill of `rows` prompts padded to `bucket` tokens (and the insert of its result)."""

    rows: int
    bucket: int


class DecodeShape(NamedTuple):
    """A decode call of `steps` steps over a state's first `rows` slots; `sampled`: some row samples."""

    rows: int
    steps: int
    sampled: bool


@dataclass(frozen=True)
class ShapePlan:
    """The shapes of one engine: its lengths and budgets (from EngineConfig) and how its mesh splits rows."""

    max_seq_len: int  # positions of a slot's KV cache
    min_prefill_bucket: int
    max_prefill_tokens: int  # padded prompt tokens in one prefill
    max_slots: int  # slots of a decode state when the caller does not say
    data: int  # the mesh's data size: every state's rows are a multiple of it
    leading_rows: bool  # whether a decode call may run only a state's first rows (see Layout.leading_rows)

    def prefill_bucket(self, prompt_len: int) -> int:
        """The padded length a prompt of `prompt_len` tokens is prefilled at."""
        return bucket_length(prompt_len, self.min_prefill_bucket, self.max_seq_len)

    def prefill_buckets(self) -> list[int]:
        """Every length `prefill_bucket` pads to."""
        return sorted({self.prefill_bucket(1 << k) for k in range(self.max_seq_len.bit_length() + 1)})

    def prefill_rows(self, bucket: int, slots: int | None = None) -> list[int]:
        """The row counts a server prefills prompts of this bucket in: powers of two up to the slots and to
        `max_prefill_tokens` (one row at least). A burst runs as prefills of the largest, then one of the least
        that holds the rest; every one is compiled before serving (rows x bucket shapes, a bounded set)."""
        slots = slots or self.max_slots
        by_tokens = self.max_prefill_tokens // bucket
        most = min(1 << (slots - 1).bit_length(), 1 << max(by_tokens.bit_length() - 1, 0))
        return [1 << k for k in range(most.bit_length())]

    def state_rows(self, rows: int) -> int:
        """Slots of a decode state for `rows` sequences: a multiple of `data`, at least two per device. With one
        row XLA rewrites every matmul as multiply and reduce kernels, far slower than a GEMM of two rows."""
        return round_up(max(rows, 2 * self.data), self.data)

    def decode_buckets(self, slots: int | None = None) -> list[int]:
        """The row counts a decode call of a state with `slots` slots runs at (the least that covers the highest
        live slot): powers of two from 2, then all; always all where the layout can't run leading rows alone."""
        rows = self.state_rows(slots or self.max_slots)
        if not self.leading_rows:
            return [rows]
        buckets = [2]
        while buckets[-1] * 2 < rows:
            buckets.append(buckets[-1] * 2)
        return buckets + [rows] if buckets[-1] < rows else buckets

    def decode_rows(self, highest_live: int, slots: int) -> int:
        """The decode bucket of a `slots`-slot state that runs every slot up to `highest_live` (0 when none is)."""
        return next(b for b in self.decode_buckets(slots) if b > highest_live)

    def warmup_programs(self, slots: int, steps: int) -> list[PrefillShape | DecodeShape]:
        """Every shape a server of `slots` slots running `steps` decode steps per call can run: each prompt
        bucket at each prefill row count, each decode bucket greedy and sampled."""
        prefills = [PrefillShape(rows, bucket) for bucket in self.prefill_buckets()
                    for rows in self.prefill_rows(bucket, slots)]
        decodes = [DecodeShape(rows, steps, sampled) for rows in self.decode_buckets(slots)
                   for sampled in (False, True)]
        return [*prefills, *decodes]


class PlannedShapes:
    """The shape part of the serving interface (`gptjax.engine_api.ServingEngine`), read off the engine's
    `plan`."""

    plan: ShapePlan

    def prefill_bucket(self, prompt_len: int) -> int:
        return self.plan.prefill_bucket(prompt_len)

    def prefill_buckets(self) -> list[int]:
        return self.plan.prefill_buckets()

    def prefill_rows(self, bucket: int, slots: int | None = None) -> list[int]:
        return self.plan.prefill_rows(bucket, slots)

    def decode_buckets(self, slots: int | None = None) -> list[int]:
        return self.plan.decode_buckets(slots)
