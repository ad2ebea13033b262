"""serving/metrics.py read back through prometheus_client's own text parser: Triton's counters under Triton's
names, the serving histograms from the requests' timestamps, and the gauges read at scrape time."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gptjax.sampling import SamplingParams
from serving.metrics import Metrics
from serving.request import Request


def parse(metrics: Metrics) -> dict:
    """{(sample name, frozen labels): value} of the whole exposition."""
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples[name, frozenset({"model": "m", **labels}.items())]


def finished_request(rng, created: float) -> Request:
    """A request that waited, got its first token, then more, with timestamps drawn at random."""
    r = Request(prompt=[rng.randrange(50257) for _ in range(rng.randint(1, 20))], max_new_tokens=16,
                sampling=SamplingParams(), stop_ids=frozenset())
    r.created = created
    r.admitted = created + rng.uniform(0.001, 0.05)
    r.first_token_at = r.admitted + rng.uniform(0.001, 0.05)
    r.generated = rng.randint(1, 16)
    r.last_token_at = r.first_token_at + (r.generated - 1) * rng.uniform(0.001, 0.01)
    r.ended_at = r.last_token_at + 0.0001
    return r


def test_triton_counters_and_token_counters_count_each_call():
    rng = random.Random(7)
    metrics = Metrics("m")
    calls = [[finished_request(rng, 100.0 + i) for _ in range(rng.randint(1, 4))] for i in range(5)]
    for call in calls:
        metrics.call_finished(call, ok=True, duration_s=call[0].ended_at - call[0].created + 0.001)
    refused = Request(prompt=[1, 2], max_new_tokens=4, sampling=SamplingParams(), stop_ids=frozenset())
    metrics.call_finished([refused], ok=False, duration_s=0.002)  # never admitted: no tokens of it count
    metrics.call_finished([], ok=False, duration_s=0.001)  # refused before any request was made

    s = parse(metrics)
    rows = [r for call in calls for r in call]
    triton = {"model": "fastertransformer", "version": "1"}
    assert value(s, "nv_inference_request_success_total", **triton) == 5  # the parser's name for the counter
    assert value(s, "nv_inference_request_failure_total", **triton) == 2
    assert value(s, "nv_inference_count_total", **triton) == len(rows)
    assert value(s, "nv_inference_exec_count_total", **triton) == 5
    queue_us = sum(round((min(r.admitted for r in c) - min(r.created for r in c)) * 1e6) for c in calls)
    assert value(s, "nv_inference_queue_duration_us_total", **triton) == pytest.approx(queue_us, abs=5)
    assert value(s, "gptjax_prompt_tokens_total") == sum(len(r.prompt) for r in rows)
    assert value(s, "gptjax_generation_tokens_total") == sum(r.generated for r in rows)
    assert value(s, "gptjax_time_to_first_token_seconds_count") == len(rows)
    assert value(s, "gptjax_time_to_first_token_seconds_sum") == pytest.approx(
        sum(r.first_token_at - r.created for r in rows))
    several = [r for r in rows if r.generated > 1]
    assert value(s, "gptjax_inter_token_latency_seconds_count") == len(several)
    assert value(s, "gptjax_inter_token_latency_seconds_sum") == pytest.approx(
        sum((r.last_token_at - r.first_token_at) / (r.generated - 1) for r in several))
    assert value(s, "gptjax_e2e_request_latency_seconds_count") == len(rows)


def test_triton_counters_keep_tritons_names_and_labels_in_the_text():
    """Triton's dashboards select the model clients ask for; the served model's name labels the rest."""
    text = Metrics('a "quoted" model').exposition().decode()
    assert "# TYPE nv_inference_request_success counter\n" in text
    assert 'nv_inference_request_success{model="fastertransformer",version="1"} 0\n' in text
    assert 'gptjax_slots{model="a \\"quoted\\" model"} 0.0\n' in text


def test_gauges_read_the_scheduler_at_scrape_time():
    rng = random.Random(3)
    live = [finished_request(rng, 1.0) for _ in range(3)]
    scheduler = SimpleNamespace(active=lambda: len(live), queued=lambda: 5, live_requests=lambda: list(live))
    engine = SimpleNamespace(engine_config=SimpleNamespace(max_slots=8), max_seq_len=256)
    metrics = Metrics("m")
    metrics.watch(scheduler, engine)
    s = parse(metrics)
    assert value(s, "gptjax_requests_running") == 3 and value(s, "gptjax_requests_queued") == 5
    assert value(s, "gptjax_slots_in_use") == 3 and value(s, "gptjax_slots") == 8
    assert value(s, "gptjax_kv_cache_positions") == 8 * 256
    assert value(s, "gptjax_kv_cache_positions_in_use") == sum(len(r.prompt) + r.generated for r in live)
    live.pop()
    assert value(parse(metrics), "gptjax_requests_running") == 2
