"""Prometheus metrics, counted by the front end for every API: Triton's `nv_inference_*` counters and the
serving histograms and gauges (time to first token, inter-token latency, running and queued requests, slots
and KV cache positions in use).

The front end calls `call_finished` once per API call, whatever the API (native gRPC, KServe gRPC, KServe HTTP,
OpenAI); `watch` hands the gauges the scheduler and engine they read at scrape time. `exposition()` is the
text that `/metrics` answers, on the HTTP port and on the metrics port alike.

Triton's counters keep Triton's exact names (no `_total` suffix, which prometheus_client's own counters would
add) and labels (the model Triton clients ask for, `fastertransformer`, and its version), so dashboards written
for Triton read them unchanged; they are written here in Prometheus' text format. Everything else is an
ordinary prometheus_client metric named `gptjax_*`, labelled with the served model's own name.
"""

from __future__ import annotations

import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving.ft import MODEL_NAME as TRITON_MODEL, MODEL_VERSION as TRITON_VERSION
from serving.request import Request

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Triton's counters and its help texts; durations are cumulative microseconds of the successful calls
TRITON_COUNTERS = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (one per row of a batch)",
    "nv_inference_exec_count": "Number of model executions performed",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds",
    "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in microseconds",
}
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1e6))


class Metrics:
    """Every metric of one served model. Thread-safe: API calls end on gRPC threads and the event loop."""

    def __init__(self, model: str, registry: CollectorRegistry | None = None):
        self.model = model
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._triton = dict.fromkeys(TRITON_COUNTERS, 0)
        labels, r = ["model"], self.registry
        self.ttft = Histogram("gptjax_time_to_first_token_seconds", "Time from a request's arrival to its first "
                              "new token", labels, registry=r, buckets=TTFT_BUCKETS).labels(model)
        self.itl = Histogram("gptjax_inter_token_latency_seconds", "A request's mean time between new tokens after "
                             "the first", labels, registry=r, buckets=ITL_BUCKETS).labels(model)
        self.e2e = Histogram("gptjax_e2e_request_latency_seconds", "Time from a request's arrival to its last "
                             "token, for requests that finished", labels, registry=r, buckets=E2E_BUCKETS).labels(model)
        self.prompt_tokens = Counter("gptjax_prompt_tokens", "Prompt tokens prefilled", labels,
                                     registry=r).labels(model)
        self.generation_tokens = Counter("gptjax_generation_tokens", "New tokens the model generated (an OpenAI "
                                         "stop string's text may cut some of them from the answer)", labels,
                                         registry=r).labels(model)
        self.gauges = {name: Gauge(name, doc, labels, registry=r).labels(model) for name, doc in (
            ("gptjax_requests_running", "Requests holding a slot"),
            ("gptjax_requests_queued", "Requests waiting for a slot"),
            ("gptjax_slots_in_use", "Engine slots held by a request"),
            ("gptjax_slots", "Engine slots (sequences decoded together)"),
            ("gptjax_kv_cache_positions_in_use", "KV cache positions holding a live request's prompt or new tokens"),
            ("gptjax_kv_cache_positions", "KV cache positions of every slot together"))}

    # ---- counting ------------------------------------------------------------------------------------------
    def call_finished(self, requests: list[Request], ok: bool, duration_s: float) -> None:
        """One API call has ended: `requests` are its rows (none if it was refused before any was made)."""
        with self._lock:
            t = self._triton
            if ok:
                t["nv_inference_request_success"] += 1
                t["nv_inference_count"] += len(requests)
                t["nv_inference_exec_count"] += 1
                t["nv_inference_request_duration_us"] += _us(duration_s)
                queue_s, compute_s = self._queue_and_compute(requests)
                t["nv_inference_queue_duration_us"] += _us(queue_s)
                t["nv_inference_compute_infer_duration_us"] += _us(compute_s)
            else:
                t["nv_inference_request_failure"] += 1
        for r in requests:
            self._observe(r, ok)

    @staticmethod
    def _queue_and_compute(requests: list[Request]) -> tuple[float, float]:
        """The call waited until its first row got a slot, and computed from then until its last row ended."""
        admitted = [r.admitted for r in requests if r.admitted is not None]
        ended = [r.ended_at for r in requests if r.ended_at is not None]
        if not admitted or not requests:
            return 0.0, 0.0
        start = min(admitted)
        queue = start - min(r.created for r in requests)
        return queue, (max(ended) - start) if ended else 0.0

    def _observe(self, r: Request, ok: bool) -> None:
        if r.admitted is not None:  # its prompt was prefilled
            self.prompt_tokens.inc(len(r.prompt))
        if r.generated:
            self.generation_tokens.inc(r.generated)
        if r.first_token_at is not None:
            self.ttft.observe(r.first_token_at - r.created)
            if r.generated > 1 and r.last_token_at is not None:
                self.itl.observe((r.last_token_at - r.first_token_at) / (r.generated - 1))
        if ok and r.ended_at is not None:
            self.e2e.observe(r.ended_at - r.created)

    # ---- gauges, read at scrape time ---------------------------------------------------------------------------
    def watch(self, scheduler, engine) -> None:
        """Read the scheduler's running and queued requests and the engine's capacity at each scrape."""
        slots = engine.engine_config.max_slots
        g = self.gauges
        g["gptjax_requests_running"].set_function(scheduler.active)
        g["gptjax_requests_queued"].set_function(scheduler.queued)
        g["gptjax_slots_in_use"].set_function(scheduler.active)  # a running request holds exactly one slot
        g["gptjax_slots"].set(slots)
        g["gptjax_kv_cache_positions"].set(slots * engine.max_seq_len)

        def positions_in_use() -> int:
            return sum(len(r.prompt) + r.generated for r in scheduler.live_requests())

        g["gptjax_kv_cache_positions_in_use"].set_function(positions_in_use)

    # ---- exposition ------------------------------------------------------------------------------------------
    def triton_text(self) -> str:
        """Triton's counters in Prometheus' text format, named and labelled as Triton does."""
        with self._lock:
            values = dict(self._triton)
        labels = f'{{model="{TRITON_MODEL}",version="{TRITON_VERSION}"}}'
        lines = []
        for name, doc in TRITON_COUNTERS.items():
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter", f"{name}{labels} {values[name]}"]
        return "\n".join(lines) + "\n"

    def exposition(self) -> bytes:
        """The whole `/metrics` answer (content type `CONTENT_TYPE`)."""
        return self.triton_text().encode() + generate_latest(self.registry)
