"""Shape planning: which shapes an engine runs and compiles, decided from its configuration alone.

Every jitted program compiles once per shape, so the shapes are kept to a small set known before serving:
- prompt lengths pad to power-of-two buckets (`prefill_bucket`);
- a prefill of one bucket runs at a power-of-two row count (`prefill_rows`), within a token budget;
- a decode state has `state_rows` slots, and a decode call runs only its first `decode_buckets` rows;
- `warmup_programs` lists every (prefill, decode) shape a server can run, for compiling them all at start;
- `MemoryPlan` says what the weights and a KV cache take on each device, so that a configuration whose state can't
  fit is refused, naming its fields, before anything is allocated (not by an out-of-memory error deep inside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from gptjax.config import DTYPE_BYTES, EngineConfig, MeshShape, ModelConfig


def cdiv(a: int, b: int) -> int:
    """a / b rounded up."""
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    """The least multiple of `multiple` that is at least n."""
    return cdiv(n, multiple) * multiple


def bucket_length(n: int, minimum: int, maximum: int) -> int:
    """Pad prompt lengths to powers of two (at least `minimum`, at most `maximum`), so few shapes compile."""
    return min(max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1))))), maximum)


def generate_cache_len(bucket: int, n_new: int, max_seq_len: int) -> int:
    """The cache a `complete` call's one program holds: its prompts' bucket and the new tokens, rounded up to 64
    positions (few programs for nearby lengths), at most the engine's `max_seq_len`."""
    return min(max_seq_len, max(bucket, round_up(bucket + n_new, 64)))


def state_rows(rows: int, data: int) -> int:
    """Slots of a decode state for `rows` sequences on a mesh of `data` rows of devices (`ShapePlan.state_rows`)."""
    return round_up(max(rows, 2 * data), data)


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
        return state_rows(rows, self.data)

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


# ---- memory -------------------------------------------------------------------------------------------------
def weight_bytes(model: ModelConfig, mesh: MeshShape) -> int:
    """Bytes of parameters on each device of `mesh`, as the rules table splits them (gptjax/rules.py): a layer's
    QKV, MLP and output-projection weights over `tensor` (the output projections' biases and the LayerNorms whole),
    the layers over `stage`, `wte` padded to a multiple of `tensor` rows and split over it; `wpe` and the final
    LayerNorm whole on every device; nothing split over `data`."""
    c, f, t = model.hidden, model.ffn_hidden, mesh.tensor
    split = 3 * c * c + 3 * c + c * c + c * f + f + f * c  # qkv, attn_out and mlp kernels, qkv and mlp_in biases
    whole = 2 * c + 4 * c  # attn_out and mlp_out biases, ln_1 and ln_2
    layer = cdiv(split, t) + whole
    rest = round_up(model.vocab_size, t) * c // t + model.n_positions * c + 2 * c
    return (model.n_layers // mesh.stage * layer + rest) * DTYPE_BYTES[model.dtype]


def kv_cache_bytes(model: ModelConfig, mesh: MeshShape, rows: int, positions: int) -> int:
    """Bytes of a KV cache of `rows` slots and `positions` positions on each device of `mesh`: K and V for every
    layer, [rows, positions, heads, head_dim], the slots split over `data`, the heads over `tensor` and the layers
    over `stage` (gptjax/layout.py)."""
    per_layer = 2 * cdiv(rows, mesh.data) * positions * cdiv(model.n_heads, mesh.tensor) * model.head_dim
    return model.n_layers // mesh.stage * per_layer * DTYPE_BYTES[model.dtype]


def format_bytes(n: int, exact: bool = True) -> str:
    """`n` bytes in the largest binary unit under it, and exactly unless not `exact`: `1.5 GiB (1610612736 bytes)`."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")
    exponent = min(len(units) - 1, max(0, (n.bit_length() - 1) // 10))
    if exponent == 0:
        return f"{n} bytes"
    return f"{n / 1024 ** exponent:.1f} {units[exponent]}" + (f" ({n} bytes)" if exact else "")


@dataclass(frozen=True)
class MemoryPlan:
    """What each device of `mesh` holds for a model's weights and for a KV cache of `rows` slots x `positions`.
    Activations, a prefill's own K/V and the compiled programs come on top: a plan that fits may still run out,
    but one that does not fit can't run at all."""

    model: ModelConfig
    mesh: MeshShape
    rows: int
    positions: int

    @property
    def weights(self) -> int:
        return weight_bytes(self.model, self.mesh)

    @property
    def kv_cache(self) -> int:
        return kv_cache_bytes(self.model, self.mesh, self.rows, self.positions)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def rows_that_fit(self, available: int) -> int:
        """The most slots (a multiple of `data`) whose cache of `positions` fits beside the weights."""
        per_row = kv_cache_bytes(self.model, self.mesh, self.mesh.data, self.positions)  # one slot per device
        return max(available - self.weights, 0) // per_row * self.mesh.data

    def positions_that_fit(self, available: int) -> int:
        """The most positions whose cache of `rows` slots fits beside the weights."""
        return max(available - self.weights, 0) // kv_cache_bytes(self.model, self.mesh, self.rows, 1)

    def check(self, available: int | None, cache: str, fix: str, weights_held: bool = False) -> None:
        """Raise ValueError when the weights and the cache need more than `available` bytes on a device (None: not
        known, as on CPU: no check). `cache` names what sized the cache (the fields, with their values), `fix` says
        what to change. `weights_held`: the weights are on the devices already, `available` is what they left."""
        weights = 0 if weights_held else self.weights
        if available is None or weights + self.kv_cache <= available:
            return
        if weights > available:
            smaller = " or use a 2-byte dtype (bfloat16)" if DTYPE_BYTES[self.model.dtype] > 2 else ""
            raise ValueError(f"the model's weights need {format_bytes(weights)} on each device ({self.model.dtype}, "
                             f"mesh {self.mesh}), more than the {format_bytes(available)} it has: split them over "
                             f"more devices (a larger tensor or stage in the mesh){smaller}")
        if weights_held:
            need = f"the KV cache needs {format_bytes(self.kv_cache)} on each device, more than the " \
                   f"{format_bytes(available)} the weights left free"
        else:
            kv, w = format_bytes(self.kv_cache, exact=False), format_bytes(weights, exact=False)
            need = f"the KV cache ({kv}) and the weights ({w}) need {format_bytes(weights + self.kv_cache)} on each " \
                   f"device, more than the {format_bytes(available)} it has"
        raise ValueError(f"{cache}: {need}; {fix}")


def serving_memory(model: ModelConfig, engine_config: EngineConfig) -> MemoryPlan:
    """The memory of a server's decode state: `state_rows(max_slots)` slots of the engine's max_seq_len."""
    ec = engine_config
    return MemoryPlan(model, ec.mesh, state_rows(ec.max_slots, ec.mesh.data), ec.seq_len(model))


def check_serving_memory(model: ModelConfig, engine_config: EngineConfig, available: int | None,
                         weights_held: bool = False) -> MemoryPlan:
    """ValueError naming max_slots and max_seq_len when a server's decode state and the weights can't fit in
    `available` bytes per device (`device_memory`; None: no check); -> the plan."""
    ec, plan = engine_config, serving_memory(model, engine_config)
    if available is None:
        return plan
    room = available + (plan.weights if weights_held else 0)
    rows, positions = plan.rows_that_fit(room), plan.positions_that_fit(room)
    if rows >= state_rows(1, ec.mesh.data):
        fix = f"lower max_slots (at most {rows} fit with max_seq_len={plan.positions}) or max_seq_len"
    else:
        fix = f"lower max_seq_len (at most {positions} fit with {plan.rows} slots) or max_slots"
    capped = "" if ec.max_seq_len == plan.positions else " (the model's n_positions)"
    seq = f"max_seq_len={plan.positions}{capped}"
    plan.check(available, f"max_slots={ec.max_slots} x {seq}", f"{fix}, or split the cache over more devices "
               "(a larger data or tensor in the mesh)", weights_held)
    return plan


def check_state_memory(model: ModelConfig, mesh: MeshShape, rows: int, positions: int, devices,
                       weights_held: bool) -> None:
    """ValueError naming the slots when a decode state of `rows` slots x `positions` can't fit on `devices` (a
    notebook's `Engine.new_state`, where XLA's own error would be an out-of-memory traceback; the CLI checks its
    runs before it builds the engine). `weights_held`: the weights are on the devices already."""
    plan, available = MemoryPlan(model, mesh, rows, positions), device_memory(devices)
    room = None if available is None else available + (plan.weights if weights_held else 0)
    most = "none" if room is None else plan.rows_that_fit(room)
    plan.check(available, f"a decode state of {rows} slots x max_seq_len={positions}",
               f"ask for fewer slots (at most {most} fit) or a shorter max_seq_len", weights_held)


def device_memory(devices) -> int | None:
    """The fewest bytes free on any of `devices` as JAX reports them (`memory_stats()`: bytes_limit less
    bytes_in_use, on GPUs and TPUs); None when a device reports no limit (CPU): a limit is not guessed."""
    free = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except (NotImplementedError, RuntimeError):  # a backend without the statistics
            return None
        if not stats or not stats.get("bytes_limit"):
            return None
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(free) if free else None
