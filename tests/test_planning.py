"""Shape planning (`gptjax/planning.py`): the shapes an engine runs, and the warm-up list that covers them."""

from __future__ import annotations

import pytest

from gptjax.planning import DecodeShape, PrefillShape, ShapePlan, bucket_length, cdiv, round_up


def plan(**changes) -> ShapePlan:
    values = dict(max_seq_len=64, min_prefill_bucket=16, max_prefill_tokens=64, max_slots=6, data=1, leading_rows=True)
    return ShapePlan(**{**values, **changes})


def test_arithmetic():
    assert [cdiv(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert [round_up(n, 3) for n in (1, 3, 4)] == [3, 3, 6]
    assert [bucket_length(n, 16, 64) for n in (1, 16, 17, 33, 64, 100)] == [16, 16, 32, 64, 64, 64]


def test_prompt_buckets_and_rows():
    p = plan()
    assert p.prefill_buckets() == [16, 32, 64]
    assert [p.prefill_bucket(n) for n in (1, 17, 63)] == [16, 32, 64]
    assert p.prefill_rows(16) == [1, 2, 4]  # 64 tokens hold 4 rows of 16
    assert p.prefill_rows(16, slots=2) == [1, 2]  # never more rows than slots
    assert p.prefill_rows(64) == [1]


@pytest.mark.parametrize("data, leading_rows, slots, rows, buckets", [
    (1, True, 6, 6, [2, 4, 6]),
    (1, True, 1, 2, [2]),  # at least two rows per device
    (2, True, 5, 6, [2, 4, 6]),
    (4, False, 5, 8, [8]),  # a layout that can't run leading rows alone runs them all
])
def test_state_rows_and_decode_buckets(data, leading_rows, slots, rows, buckets):
    p = plan(data=data, leading_rows=leading_rows)
    assert p.state_rows(slots) == rows
    assert p.decode_buckets(slots) == buckets
    assert [p.decode_rows(highest, slots) for highest in (0, rows - 1)] == [buckets[0], buckets[-1]]


def test_warmup_lists_every_shape_a_server_runs():
    p = plan()
    programs = p.warmup_programs(slots=6, steps=4)
    assert programs == [PrefillShape(1, 16), PrefillShape(2, 16), PrefillShape(4, 16), PrefillShape(1, 32),
                        PrefillShape(2, 32), PrefillShape(1, 64),
                        *(DecodeShape(rows, 4, sampled) for rows in (2, 4, 6) for sampled in (False, True))]
    # every prompt length and live-slot set a server can meet lands on a listed shape
    prefills = {(s.rows, s.bucket) for s in programs if isinstance(s, PrefillShape)}
    for length in range(1, 64):
        bucket = p.prefill_bucket(length)
        assert {(rows, bucket) for rows in p.prefill_rows(bucket, 6)} <= prefills
    decodes = {s.rows for s in programs if isinstance(s, DecodeShape)}
    assert {p.decode_rows(highest, 6) for highest in range(6)} <= decodes
