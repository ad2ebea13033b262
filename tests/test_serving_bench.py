"""The serving benchmark (benchmarks/serving_bench.py): its distributions and arrivals, its statistics, and a
small sweep against a real `gptjax serve` (a tiny model with few slots, so its warm-up is short)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.serving_bench import (AUTO_FRACTIONS, LengthDist, ServingBenchOptions, Timing, parse_rates,
                                      poisson_arrivals, run_serving_bench, summarize)
from test_serving import start_server, wait_serving


@pytest.mark.parametrize("text, values", [("fixed:7", {7}), ("uniform:3,5", {3, 4, 5})])
def test_fixed_and_uniform_lengths_take_every_stated_value_and_no_other(text, values):
    drawn = LengthDist.parse(text).sample(np.random.default_rng(0), 3000, limit=100)
    assert set(drawn.tolist()) == values


def test_normal_lengths_are_rounded_and_clipped_to_the_limit():
    drawn = LengthDist.parse("normal:40,30").sample(np.random.default_rng(1), 20000, limit=60)
    assert drawn.dtype.kind == "i" and drawn.min() == 1 and drawn.max() == 60
    inside = drawn[(drawn > 20) & (drawn < 60)]  # a window symmetric about the mean, clear of the clipping
    assert abs(inside.mean() - 40) < 1.0


@pytest.mark.parametrize("text", ["fixed", "fixed:0", "fixed:2.5", "uniform:5,3", "uniform:1", "normal:0,1",
                                  "poisson:3", "uniform:a,b", "fixed:inf", "uniform:1,inf", "fixed:1e400",
                                  "normal:nan,1"])
def test_bad_length_distributions_name_the_flag(text):
    with pytest.raises(ValueError, match="--input-len-dist"):
        LengthDist.parse(text, "--input-len-dist")


def test_rates_parse_numbers_inf_or_auto_alone():
    assert parse_rates(["2", "inf"]) == ((2.0, math.inf), False)
    assert parse_rates(["auto"]) == ((), True)
    with pytest.raises(ValueError, match="--request-rate"):
        parse_rates(["auto", "3"])
    with pytest.raises(ValueError, match="--request-rate"):
        ServingBenchOptions(server="x:1", request_rates=(0.0,))


def test_poisson_arrivals_have_exponential_gaps_at_the_rate():
    arrivals = poisson_arrivals(8.0, 40001, seed=5)
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / 8) < 0.01 * (1 / 8) * 3  # 3 standard errors of the mean of 40000 gaps
    assert abs(np.median(gaps) - math.log(2) / 8) < 0.03 / 8  # an exponential's median, not a fixed spacing
    assert np.array_equal(arrivals, poisson_arrivals(8.0, 40001, seed=5))
    assert not poisson_arrivals(math.inf, 5, seed=5).any()


def test_summary_of_hand_made_timings():
    timings = [Timing(start=10.0, prompt_len=4, asked=3, first=10.5, last=11.5, tokens=3),  # tpot 0.5 s
               Timing(start=11.0, prompt_len=4, asked=1, first=11.2, last=11.2, tokens=1),  # no tpot
               Timing(start=12.0, prompt_len=4, asked=5, first=12.1, last=12.9, tokens=5),  # tpot 0.2 s
               Timing(start=12.5, prompt_len=4, asked=5, error="RESOURCE_EXHAUSTED")]
    s = summarize(timings, duration=4.0)
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, {"RESOURCE_EXHAUSTED": 1})
    assert s["request_throughput"] == pytest.approx(3 / 4.0) and s["output_tokens_per_s"] == pytest.approx(9 / 4.0)
    assert s["ttft_ms"]["mean"] == pytest.approx((500 + 200 + 100) / 3)
    assert s["ttft_ms"]["p50"] == pytest.approx(200)
    assert s["tpot_ms"]["mean"] == pytest.approx(350) and s["tpot_ms"]["p99"] == pytest.approx(200 + 300 * 0.99)
    assert s["e2e_ms"]["p50"] == pytest.approx(900)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    # test_load's and test_fuzz's servers have this engine too: the later ones load the programs the first compiled
    config = tmp_path_factory.mktemp("serving-bench") / "server.toml"
    config.write_text("[engine]\nmax_slots = 4\nmax_seq_len = 64\n\n"
                      "[scheduler]\ndecode_steps_per_call = 2\nmax_queued_requests = 32\n")
    proc, target, log = start_server("--config", str(config))
    try:
        wait_serving(proc, target, log)
        yield target
    finally:
        proc.kill()
        proc.wait()
        log.close()


def test_a_rate_sweep_against_a_server(small_server, capsys):
    options = ServingBenchOptions(server=small_server, request_rates=(50.0, math.inf), num_requests=10,
                                  input_len=LengthDist.parse("uniform:3,30"), output_len=LengthDist.parse("fixed:5"),
                                  seed=7, json=True)
    assert run_serving_bench(options) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["request_rate"] for r in rows] == [50.0, "inf"]
    for r in rows:
        assert (r["num_requests"], r["completed"], r["failed"]) == (10, 10, 0)  # every one got its 5 tokens
        assert r["mean_output_len"] == 5 and 3 <= r["mean_input_len"] <= 30
        assert r["output_tokens_per_s"] == pytest.approx(r["request_throughput"] * 5, rel=1e-3)
        for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
            assert 0 < r[metric]["p50"] <= r[metric]["p90"] <= r[metric]["p99"]
        assert r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"]
        assert r["extra"]["model"] and r["extra"]["max_slots"] == 4


def test_auto_measures_saturation_then_fractions_of_it(small_server, capsys):
    options = ServingBenchOptions(server=small_server, auto=True, num_requests=8,
                                  input_len=LengthDist.parse("fixed:8"), output_len=LengthDist.parse("fixed:3"),
                                  json=True)
    run_serving_bench(options)
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert rows[0]["request_rate"] == "inf" and rows[0]["completed"] == 8
    saturation = rows[0]["request_throughput"]
    assert [r["fraction_of_saturation"] for r in rows[1:]] == list(AUTO_FRACTIONS)
    assert [r["request_rate"] for r in rows[1:]] == pytest.approx([f * saturation for f in AUTO_FRACTIONS],
                                                                  rel=1e-3)
    assert all(r["failed"] == 0 for r in rows)
    assert "saturation" in captured.err and "p99 TTFT at half" in captured.err


def test_lengths_beyond_the_server_are_refused(small_server):
    options = ServingBenchOptions(server=small_server, request_rates=(1.0,), num_requests=2,
                                  input_len=LengthDist.parse("fixed:60"), output_len=LengthDist.parse("fixed:10"))
    with pytest.raises(ValueError, match="64 positions"):
        run_serving_bench(options)
