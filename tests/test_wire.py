"""serving/wire.py: every command survives the trip through its int32 arrays, and a value that doesn't fit its
field is refused by name before anything is packed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptjax.sampling import SamplingParams
from serving import wire
from serving.commands import Decode, Idle, Prefill, Reset, Row, Stop

SLOTS = 8


def float32s(low, high):
    """Floats that float32 holds exactly, so a round trip gives them back equal."""
    return st.floats(low, high, width=32)


samplings = st.builds(SamplingParams, temperature=float32s(0, 100), top_k=st.integers(0, 2**31 - 1),
                      top_p=float32s(2.0**-20, 1), seed=st.integers(0, 2**32 - 1))


@st.composite
def prefills(draw):
    bucket = draw(st.integers(1, 64))
    rows = draw(st.lists(st.builds(Row, prompt=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=bucket)
                                   .map(tuple), slot=st.integers(0, SLOTS - 1), sampling=samplings),
                         min_size=1, max_size=6))
    return Prefill(bucket, tuple(rows))


decodes = st.builds(Decode, steps=st.integers(0, 64), sampled=st.booleans(),
                    live=st.sets(st.integers(0, SLOTS - 1)).map(sorted).map(tuple))


@settings(max_examples=100, deadline=None)
@given(st.one_of(prefills(), decodes, st.sampled_from([Idle(), Stop(), Reset()])))
def test_every_command_round_trips_through_its_arrays(command):
    header, payload = wire.encode(command, SLOTS)
    assert header.dtype == np.int32 and header.shape == (wire.HEADER,)
    shape = wire.payload_shape(header, SLOTS)
    assert (payload is None and shape is None) or (payload.dtype == np.int32 and payload.shape == shape)
    assert wire.decode(header, payload) == command


def test_floats_travel_as_float32_and_seeds_modulo_2_to_the_32():
    rng = np.random.default_rng()
    temperature, top_p = float(rng.uniform(0.1, 2)), float(rng.uniform(0.1, 1))
    seeds = [2**64 - 1, -1, int(rng.integers(2**32, 2**63))]
    rows = tuple(Row((int(rng.integers(50257)),), slot, SamplingParams(temperature, 5, top_p, seed))
                 for slot, seed in enumerate(seeds))
    out = wire.decode(*wire.encode(Prefill(4, rows), SLOTS))
    for row, seed in zip(out.rows, seeds):
        assert row.sampling.temperature == np.float32(temperature) and row.sampling.top_p == np.float32(top_p)
        assert row.sampling.seed == seed % 2**32


def prefill_of(prompt=(1, 2), slot=0, bucket=4, **sampling):
    return Prefill(bucket, (Row(tuple(prompt), slot, SamplingParams(**sampling)),))


@pytest.mark.parametrize("command, field", [
    (prefill_of(top_k=2**31), "top_k"),
    (prefill_of(prompt=(1, 2**31)), "token id"),
    (prefill_of(prompt=(-1, 2)), "token id"),
    (prefill_of(prompt=()), "prompt length"),
    (prefill_of(prompt=(1,) * 5), "prompt length"),
    (prefill_of(slot=SLOTS), "slot"),
    (prefill_of(slot=-1), "slot"),
    (prefill_of(top_p=1e-46), "top_p"),  # > 0 as a float64, 0 as float32
    (Decode(2, (0, SLOTS), False), "slot"),
    (Decode(2**31, (0,), False), "steps"),
])
def test_a_value_outside_its_field_is_refused_by_name(command, field):
    with pytest.raises(wire.OutOfRange, match=field):
        wire.encode(command, SLOTS)


@pytest.mark.parametrize("command", [
    prefill_of(top_k=2**31 - 1), prefill_of(prompt=(0, 2**31 - 1)), prefill_of(prompt=(1,) * 4),
    prefill_of(slot=SLOTS - 1, temperature=3e38, seed=2**64 - 1),
])
def test_values_at_their_fields_bounds_pass(command):
    assert wire.decode(*wire.encode(command, SLOTS)).rows[0].prompt == command.rows[0].prompt
