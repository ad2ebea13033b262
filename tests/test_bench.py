"""`gptjax bench` on CPU: both implementations measured, rows sane (no timings asserted)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, run_cli_here


def test_bench_json_has_gptjax_and_the_hf_peer():
    out = run_cli("bench", "-b", "2", "-i", "8", "-o", "4", "-n", "2", "--peer", "hf", "--json").stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["impl"] for r in rows] == ["gptjax", "hf"]
    for r in rows:
        assert (r["batch"], r["input_len"], r["output_len"], r["runs"]) == (2, 8, 4, 2)
        assert r["latency_ms"] > 0 and r["floor_ms"] > 0 and r["device"]
        assert abs(r["tokens_per_s"] - 2 * 4 / (r["latency_ms"] / 1e3)) < 1e-3 * r["tokens_per_s"] + 1e-3
        assert r["decode_ms_per_token"] is not None


def test_the_timed_gptjax_run_is_ids_to_ids_with_generates_tokens():
    """The in-process row times `Engine.complete` on the padded prompts (ids in, ids out, as the peer): the same new
    tokens as `generate` gives those prompts, greedy with no stop token."""
    import numpy as np

    import gptjax
    from benchmarks.bench import gptjax_runner

    engine = gptjax.Engine.from_preset("gpt2-tiny")
    prompts = np.random.default_rng().integers(0, engine.config.vocab_size, (3, 7), dtype=np.int32)
    want = engine.generate(prompts.tolist(), max_new_tokens=5, greedy=True, stop_token_ids=[])
    got = gptjax_runner(engine, prompts, 5)()
    assert isinstance(got, np.ndarray) and got.tolist() == [r.output_ids for r in want]


def test_bench_several_shapes_in_one_process():
    out = run_cli("bench", "--shapes", "1,4,2", "2,4,1", "-n", "1", "--json").stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["batch"], r["input_len"], r["output_len"]) for r in rows] == [(1, 4, 2), (2, 4, 1)]
    assert rows[1]["decode_ms_per_token"] is None  # one new token: no decode step to time


def test_bench_bad_shapes_exit_2():
    """Exit 2 and one line; the first case as a process of its own (nothing else on its stderr), the others here."""
    for i, args in enumerate((["-b", "0", "-i", "4", "-o", "2"], ["-b", "1", "-i", "4"], ["--shapes", "1,2"],
                              ["-b", "1", "-i", "250", "-o", "10"])):
        proc = run_cli("bench", *args, check=False) if i == 0 else run_cli_here("bench", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip().count("\n") == 0 and "error" in proc.stderr


def test_options_are_checked_where_they_are_made():
    from benchmarks.bench import BenchOptions, parse_shapes

    assert parse_shapes(2, 8, 4, None) == ((2, 8, 4),)
    assert parse_shapes(None, None, None, ["1,4,2", "2,4,1"]) == ((1, 4, 2), (2, 4, 1))
    for bad, field in ((dict(shapes=((1, 0, 2),)), "at least 1"), (dict(shapes=((1, 2, 2),), runs=0), "--runs"),
                       (dict(shapes=((1, 2, 2),), server_api="http"), "--server-api"),
                       (dict(shapes=((1, 2, 2),), peers=("vllm",)), "--peer"),
                       (dict(shapes=((1, 2, 2),), warmup_seconds=-5.0), "--warmup-seconds")):
        with pytest.raises(ValueError, match=field):
            BenchOptions(**bad)
    with pytest.raises(ValueError, match="-o required"):
        parse_shapes(1, 4, None, None)


def test_the_prefill_floor_is_no_more_than_the_work_xla_counts():
    """The floor is a lower bound: its prefill FLOPs are at most those XLA counts in the engine's own prefill
    program (the LM head runs on each row's last token only: counting it on every token, as an earlier floor
    did, overstated a small model's prefill sevenfold)."""
    import numpy as np

    from benchmarks.bench import floor_seconds
    from gptjax.engine import Engine
    from gptjax.engine_api import SamplingArrays, pack_prompts
    from gptjax.sampling import SamplingParams

    engine = Engine.from_preset("gpt2-tiny")
    batch, length = 4, 64
    tokens, lengths = np.ones((batch, length), np.int32), np.full((batch,), length, np.int32)
    packed = pack_prompts(tokens, lengths, SamplingArrays.from_params([SamplingParams()] * batch))
    compiled = engine._prefill_jit.lower(engine.params, packed, sampled=False).compile()
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    unit = {"matmul_flops": 1.0, "memory_bytes_per_s": 1.0}
    floor_flops = floor_seconds(engine.config, batch, length, 1, unit)
    assert 0.5 * xla_flops < floor_flops <= xla_flops
    # spread over two devices, the same work takes half the time at best
    assert floor_seconds(engine.config, batch, length, 8, unit, devices=2) == \
        floor_seconds(engine.config, batch, length, 8, unit) / 2
