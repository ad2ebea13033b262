"""A decode layer's products after attention in one persistent kernel: attention out + bias + residual, then
LayerNorm + MLP in + bias + GELU, then MLP out + bias + residual.

Why one kernel: at 1-16 rows each of these products reads its weights in 0.5-2 us on an H200, but as a kernel of
its own (`decode_matmul`) it takes 4-8 us: the launch, the first loads' latency, the split sums' second pass
(RESULTS.md, decode matmuls, runs 13-14). Here one launch runs the three products as phases on `programs`
programs, no more than the GPU holds at once, with a grid-wide barrier between phases; before a program waits at
a barrier it issues the loads of its next phase's weights, whose read does not depend on the phase before, so
the weights stream while the phases hand over.

The phases, by program (H hidden, F the MLP's width; at 345M, H = 1024 and F = 4096, 128 programs):
1. attention out: h = x + b_o + attn @ w_o for H / `out_cols` column blocks, the whole K in one tile each;
   h goes to a float32 buffer.
2. MLP in: g = gelu(LayerNorm(h) @ w_i + b_i) for F / `in_cols` column blocks; every program takes the
   LayerNorm statistics of the whole h itself (a few KB from L2) rather than wait at one more barrier.
3. MLP out: out = h + b_m + g @ w_m, K split in `splits`; a column block's last split to finish (an atomic
   counter, as in `decode_matmul`) adds the splits' parts in split order, so the sum is the same every run.

The barrier is sense-reversing on two int32s (arrivals, generation): the last program to arrive zeroes the
arrivals and bumps the generation the others spin on, so the pair is ready for the next launch with no memset.
They spin on atomic reads: one thread reads and the program's threads share its answer, so they leave the loop
together. Spinning on volatile loads, each thread leaves when it sees the change, and on the H200 programs of 8
and 16 warps then read the MLP's activations before they were written (errors of 10-18%; RESULTS run 15).
It needs every program resident at once, which `programs` <= the multiprocessor count and one program per
multiprocessor guarantee on an otherwise idle stream. The interpreter runs programs one at a time, where a
barrier would wait forever: there the phases are the grid's outer axis (every program's phase 1, then every
program's phase 2, ...), the same order of writes and reads that the barriers give.

`decode_tail_reference` is the same arithmetic in plain `jnp`: the three products of `decode_matmul_reference`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptjax.kernels.decode_matmul import MATRIX_ROWS, _activation, decode_matmul_reference

MAX_ROWS = 16  # one 16-row tile of activations: the matrix units' smallest M
MAX_PROGRAMS = 128  # <= the multiprocessors of an H100 or H200 (132): every program resident at once
TILE_BYTES = 64 << 10  # a phase's weight tile per program, held in registers across a barrier (8 warps: 64 each)
SPLITS = 2  # MLP out's K splits: twice the programs of its narrow output, one pass to sum them


class TailPlan(NamedTuple):
    """How the phases divide the work: column blocks of attention out and MLP out (`out_cols`), of MLP in
    (`in_cols`), MLP out's K splits, and how many programs run."""

    out_cols: int
    in_cols: int
    splits: int
    programs: int


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def plan(hidden: int, ffn: int, itemsize: int = 2) -> TailPlan | None:
    """64 column blocks of attention out and MLP out, 128 of MLP in (at least 16 columns each), MLP out's K in
    two; None where the kernel does not fit: sizes not powers of two (Triton's blocks are), or a program's
    weight tile over `TILE_BYTES` (models past ~400M parameters: their products are long enough that
    `decode_matmul`'s launches cost less of them)."""
    if not (_power_of_two(hidden) and _power_of_two(ffn)) or hidden < 64 or ffn < 128:
        return None
    out_cols, in_cols = max(MATRIX_ROWS, hidden // 64), max(MATRIX_ROWS, ffn // 128)
    tiles = (hidden * out_cols, hidden * in_cols, ffn // SPLITS * out_cols)
    programs = max(hidden // out_cols * SPLITS, ffn // in_cols)
    if max(tiles) * itemsize > TILE_BYTES or programs > MAX_PROGRAMS:
        return None
    return TailPlan(out_cols, in_cols, SPLITS, programs)


def supports(rows: int, hidden: int, ffn: int, itemsize: int = 2) -> bool:
    return 0 < rows <= MAX_ROWS and plan(hidden, ffn, itemsize) is not None


class Options(NamedTuple):
    """Launch choices the GPU run times against each other (benchmarks/decode_matmul_bench.py --tail): whether a
    program loads its next phase's weights before the barrier (`prefetch`), whether the barrier spins on
    volatile loads or on atomic reads (`spin`), warps per program, and `work=False` to run the barriers alone
    (what they cost)."""

    prefetch: bool = True
    spin: str = "atomic"
    num_warps: int = 8
    work: bool = True


class _Shape(NamedTuple):
    rows: int
    hidden: int
    ffn: int
    plan: TailPlan
    eps: float
    activation: str
    interpret: bool
    options: Options = Options()


class _Refs(NamedTuple):
    attn: object
    x: object
    w_o: object
    b_o: object
    ln_scale: object
    ln_shift: object
    w_i: object
    b_i: object
    w_m: object
    b_m: object
    out: object
    h: object
    g: object
    parts: object
    sync: object
    counts: object


def _rows_ok(width: int):
    return lax.broadcasted_iota(jnp.int32, (MAX_ROWS, width), 0)


def _load_rows(ref, c0, width: int, rows: int, fresh: bool = False):
    """Rows [0, 16) of ref[:, c0:c0 + width] (rows past `rows` read as zeros); `fresh`: not from L1, for what
    another program wrote in this launch."""
    ok = _rows_ok(width) < rows
    return plgpu.load(ref.at[pl.ds(0, MAX_ROWS), pl.ds(c0, width)], mask=ok, other=0.0, volatile=fresh)


def _store_rows(ref, c0, value, rows: int):
    plgpu.store(ref.at[pl.ds(0, MAX_ROWS), pl.ds(c0, value.shape[1])], value.astype(ref.dtype),
                mask=_rows_ok(value.shape[1]) < rows)


def _dot(a, w):
    return jnp.dot(a.astype(w.dtype), w, preferred_element_type=jnp.float32)


# the three phases: each loads its weight tile (`*_tile`, issued before the barrier on the GPU) and runs its
# unit of work with it; unit numbers past a phase's units are clamped for the load and skip the work

def _out_tile(r: _Refs, s: _Shape, unit):
    c0 = jnp.minimum(unit, s.hidden // s.plan.out_cols - 1) * s.plan.out_cols
    return r.w_o[pl.ds(0, s.hidden), pl.ds(c0, s.plan.out_cols)]


def _attention_out(r: _Refs, s: _Shape, unit, w):
    """h[:, block] = x + b_o + attn @ w_o."""
    cols = s.plan.out_cols
    c0 = unit * cols
    acc = _dot(_load_rows(r.attn, 0, s.hidden, s.rows), w)
    acc += r.b_o[pl.ds(c0, cols)].astype(jnp.float32)[None, :] + _load_rows(r.x, c0, cols, s.rows)
    _store_rows(r.h, c0, acc, s.rows)


def _in_tile(r: _Refs, s: _Shape, unit):
    c0 = jnp.minimum(unit, s.ffn // s.plan.in_cols - 1) * s.plan.in_cols
    return r.w_i[pl.ds(0, s.hidden), pl.ds(c0, s.plan.in_cols)]


def _mlp_in(r: _Refs, s: _Shape, unit, w):
    """g[:, block] = gelu(LayerNorm(h) @ w_i + b_i)."""
    cols = s.plan.in_cols
    c0 = unit * cols
    h = _load_rows(r.h, 0, s.hidden, s.rows, fresh=True)
    mean = jnp.sum(h, axis=1) / s.hidden
    centered = h - mean[:, None]
    rstd = lax.rsqrt(jnp.sum(centered * centered, axis=1) / s.hidden + s.eps)
    normed = (centered * rstd[:, None] * r.ln_scale[...].astype(jnp.float32)[None, :]
              + r.ln_shift[...].astype(jnp.float32)[None, :])
    acc = _dot(normed, w) + r.b_i[pl.ds(c0, cols)].astype(jnp.float32)[None, :]
    _store_rows(r.g, c0, _activation(s.activation, acc) if s.activation else acc, s.rows)


def _split_of(s: _Shape, unit):
    """MLP out's unit -> (column block, split): a column block's splits go to programs far apart."""
    n_cols = s.hidden // s.plan.out_cols
    return lax.rem(unit, jnp.int32(n_cols)), lax.div(unit, jnp.int32(n_cols))


def _mlp_out_tile(r: _Refs, s: _Shape, unit):
    col, split = _split_of(s, jnp.minimum(unit, s.hidden // s.plan.out_cols * s.plan.splits - 1))
    chunk = s.ffn // s.plan.splits
    return r.w_m[pl.ds(split * chunk, chunk), pl.ds(col * s.plan.out_cols, s.plan.out_cols)]


def _mlp_out(r: _Refs, s: _Shape, unit, w):
    """out[:, block] = h + b_m + g @ w_m: this split's part; the block's last split to finish sums them."""
    cols, chunk = s.plan.out_cols, s.ffn // s.plan.splits
    col, split = _split_of(s, unit)
    c0 = col * cols
    part = _dot(_load_rows(r.g, split * chunk, chunk, s.rows, fresh=True), w)
    tile = (pl.ds(0, MAX_ROWS), pl.ds(c0, cols))
    ok = _rows_ok(cols) < s.rows
    plgpu.store(r.parts.at[(split, *tile)], part, mask=ok)
    if not s.interpret:
        plgpu.debug_barrier()  # every thread's part is stored before the counter says so
    finished = plgpu.atomic_add(r.counts, (col,), jnp.int32(1))  # acq-rel, GPU scope

    @pl.when(finished == s.plan.splits - 1)
    def _():
        total = r.b_m[pl.ds(c0, cols)].astype(jnp.float32)[None, :] + _load_rows(r.h, c0, cols, s.rows, fresh=True)
        for p in range(s.plan.splits):
            total += plgpu.load(r.parts.at[(jnp.int32(p), *tile)], mask=ok, other=0.0, volatile=True)
        _store_rows(r.out, c0, total, s.rows)
        r.counts[col] = 0  # every split has counted: zero again for the next kernel


PHASES = ((_out_tile, _attention_out, lambda s: s.hidden // s.plan.out_cols),
          (_in_tile, _mlp_in, lambda s: s.ffn // s.plan.in_cols),
          (_mlp_out_tile, _mlp_out, lambda s: s.hidden // s.plan.out_cols * s.plan.splits))


def _generation(sync_ref, spin: str = "volatile"):
    if spin == "atomic":
        return plgpu.atomic_add(sync_ref, (jnp.int32(1),), jnp.int32(0))
    return jnp.sum(plgpu.load(sync_ref.at[pl.ds(1, 1)], volatile=True))


def _grid_barrier(sync_ref, programs: int, spin: str = "volatile"):
    """Wait until every program of the launch has arrived: what each stored before is then visible to all."""
    plgpu.debug_barrier()  # this program's threads have issued their stores
    generation = _generation(sync_ref)  # stable until this program arrives: the barrier cannot open before
    arrived = plgpu.atomic_add(sync_ref, (jnp.int32(0),), jnp.int32(1))  # acq-rel: the stores go first

    @pl.when(arrived == programs - 1)
    def _():  # the last: reset the arrivals, then open the barrier
        plgpu.atomic_xchg(sync_ref, (jnp.int32(0),), jnp.int32(0))
        plgpu.atomic_add(sync_ref, (jnp.int32(1),), jnp.int32(1))

    lax.while_loop(lambda g: g == generation, lambda _: _generation(sync_ref, spin), generation)
    plgpu.atomic_add(sync_ref, (jnp.int32(1),), jnp.int32(0))  # acquire: the others' stores are seen after it
    plgpu.debug_barrier()


def _unpack(refs) -> _Refs:
    """The pallas_call's refs: ten inputs, the aliased sync and counts inputs, then the outputs."""
    inputs, outputs = refs[:10], refs[12:]
    return _Refs(*inputs, *outputs)


def _kernel(*refs, s: _Shape):
    r = _unpack(refs)
    if s.interpret:  # grid (phase, program): each phase of every program before the next phase
        phase, program = pl.program_id(0), pl.program_id(1)
        for i, (tile, run, units) in enumerate(PHASES):
            pl.when((phase == i) & (program < units(s)))(
                functools.partial(lambda t, f: f(r, s, program, t(r, s, program)), tile, run))
        return
    program, o = pl.program_id(0), s.options
    w = PHASES[0][0](r, s, program)
    for i, (_, run, units) in enumerate(PHASES):
        if o.work:
            pl.when(program < units(s))(functools.partial(run, r, s, program, w))
        if i + 1 < len(PHASES):
            if o.prefetch:
                w = PHASES[i + 1][0](r, s, program)  # the next phase's weights: in flight during the barrier
            _grid_barrier(r.sync, s.plan.programs, o.spin)
            if not o.prefetch:
                w = PHASES[i + 1][0](r, s, program)


def new_sync():
    """The barrier's (arrivals, generation), zeros; `decode_tail` leaves them ready for its next launch."""
    return jnp.zeros((2,), jnp.int32)


def _check(attn, x, w_o, w_i, w_m, counts, plan_: TailPlan | None):
    rows, hidden = x.shape
    ffn = w_i.shape[1]
    want = {"attn": (rows, hidden), "w_o": (hidden, hidden), "w_i": (hidden, ffn), "w_m": (ffn, hidden)}
    for name, a in (("attn", attn), ("w_o", w_o), ("w_i", w_i), ("w_m", w_m)):
        if a.shape != want[name]:
            raise ValueError(f"decode_tail: {name} is {a.shape}, expected {want[name]} for x {x.shape}")
    if plan_ is None or not 0 < rows <= MAX_ROWS:
        raise ValueError(f"decode_tail: hidden {hidden}, MLP {ffn}, {rows} rows do not fit the kernel "
                         f"(1-{MAX_ROWS} rows, sizes powers of two, weight tiles <= {TILE_BYTES} bytes)")
    if counts.shape[0] < hidden // plan_.out_cols:
        raise ValueError(f"decode_tail: {counts.shape[0]} counters for {hidden // plan_.out_cols} column blocks")


@functools.partial(jax.jit, static_argnames=("eps", "activation", "interpret", "options"))
def decode_tail(attn, x, w_o, b_o, ln_scale, ln_bias, w_i, b_i, w_m, b_m, *, sync, counters,
                activation: str = "gelu_new", eps: float = 1e-5, interpret: bool = False,
                options: Options = Options()):
    """x + attention out, then + MLP(LayerNorm(that)): the next residual stream [rows, H] in float32, with the
    barrier state and the counters to hand to the next launch: (out, sync, counters).

    attn: [rows, H], the attention's output; x: [rows, H] the residual stream (float32); w_o: [H, H], w_i:
    [H, F], w_m: [F, H] and their biases; ln_scale, ln_bias: [H], the MLP's LayerNorm. sync: `new_sync()` or
    what the last launch returned; counters: int32 zeros, at least H / 16 (`decode_matmul.new_counters`),
    left at zero."""
    out, _, _, sync, counters = decode_tail_buffers(
        attn, x, w_o, b_o, ln_scale, ln_bias, w_i, b_i, w_m, b_m, sync=sync, counters=counters,
        activation=activation, eps=eps, interpret=interpret, options=options)
    return out, sync, counters


def decode_tail_buffers(attn, x, w_o, b_o, ln_scale, ln_bias, w_i, b_i, w_m, b_m, *, sync, counters,
                        activation: str = "gelu_new", eps: float = 1e-5, interpret: bool = False,
                        options: Options = Options()):
    """`decode_tail` with the phases' buffers too: (out, h = x + attention out, g = the MLP's hidden
    activations, sync, counters); the GPU run checks each phase's output by them."""
    rows, hidden = x.shape
    ffn = w_i.shape[1]
    p = plan(hidden, ffn, w_i.dtype.itemsize)
    _check(attn, x, w_o, w_i, w_m, counters, p)
    s = _Shape(rows, hidden, ffn, p, eps, activation, interpret, options)
    inputs = [attn, x.astype(jnp.float32), w_o, b_o, ln_scale, ln_bias, w_i, b_i, w_m, b_m, sync, counters]
    out_shape = [jax.ShapeDtypeStruct((rows, hidden), jnp.float32),  # out
                 jax.ShapeDtypeStruct((rows, hidden), jnp.float32),  # h: x + attention out
                 jax.ShapeDtypeStruct((rows, ffn), w_i.dtype),  # g: the MLP's hidden activations
                 jax.ShapeDtypeStruct((p.splits, rows, hidden), jnp.float32),  # MLP out's split parts
                 jax.ShapeDtypeStruct(sync.shape, jnp.int32), jax.ShapeDtypeStruct(counters.shape, jnp.int32)]
    out, h, g, _, sync, counters = pl.pallas_call(
        functools.partial(_kernel, s=s), out_shape=out_shape,
        grid=(len(PHASES), p.programs) if interpret else (p.programs,),
        input_output_aliases={10: 4, 11: 5},
        compiler_params=plgpu.CompilerParams(num_warps=options.num_warps, num_stages=1),
        interpret=interpret, name=f"decode_tail_{hidden}x{ffn}",
    )(*inputs)
    return out, h, g, sync, counters


def decode_tail_reference(attn, x, w_o, b_o, ln_scale, ln_bias, w_i, b_i, w_m, b_m, *, sync=None, counters=None,
                          activation: str = "gelu_new", eps: float = 1e-5):
    """The same arithmetic in plain `jnp` (the same arguments and results)."""
    h = decode_matmul_reference(w_o, attn, bias=b_o, residual=x)
    g = decode_matmul_reference(w_i, h, ln_scale, ln_bias, bias=b_i, activation=activation, out_dtype=w_i.dtype,
                                eps=eps)
    return decode_matmul_reference(w_m, g, bias=b_m, residual=h), sync, counters
