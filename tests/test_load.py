"""Load: a server of four slots hit at once through every door (native gRPC, KServe gRPC and HTTP, OpenAI), with
what real clients do besides asking: cancel a stream half-way, reset an SSE connection mid-stream, pass a deadline,
ask for the last position of the context, stop strings, n > 1, one-token requests, one id twice in a stream.

Every call ends complete and right, or with the error its case expects (no queue is ever full: a refusal would mean
requests outlived their clients); greedy tokens are those the idle server gives each prompt alone (continuous
batching changes no result). Afterwards every slot is free, a fresh request gets the same tokens, the log holds no
traceback and no exception line, and SIGTERM drains to exit 0.
"""

from __future__ import annotations

import json
import queue
import random
import signal
import socket
import struct
import threading
import time

import grpc
import httpx
import numpy as np
import pytest

from serving.client import Client, make_request
from test_serving import free_port, start_server, tritonclient_grpc, wait_serving

SLOTS, MAX_SEQ_LEN = 4, 64
MODEL = "fastertransformer"
EOS = 50256
NEVER = 2**32 - 1  # an end_id past the vocabulary: the row never stops early
CLIENTS, CALLS = 12, 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """gpt2-tiny with four slots of 64 positions, two decode steps a call, a queue far larger than the clients can
    fill, every port. test_fuzz's and test_serving_bench's servers have this engine too: the first of the three to
    start compiles its programs, the others load them from the session's compilation cache."""
    config = tmp_path_factory.mktemp("load") / "server.toml"
    config.write_text(f"[engine]\nmax_slots = {SLOTS}\nmax_seq_len = {MAX_SEQ_LEN}\n\n"
                      "[scheduler]\ndecode_steps_per_call = 2\nmax_queued_requests = 64\n")
    http_port, metrics_port = free_port(), free_port()
    proc, target, log = start_server("--config", str(config), "--http-port", str(http_port),
                                     "--metrics-port", str(metrics_port))
    try:
        wait_serving(proc, target, log)
        yield proc, target, f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}", log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def gauges(metrics_url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metrics_url + "/metrics", timeout=10).raise_for_status().text
    names = ("gptjax_requests_running", "gptjax_requests_queued", "gptjax_slots_in_use",
             "gptjax_kv_cache_positions_in_use")
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in names}


def wait_idle(metrics_url: str, timeout_s: float = 60) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if not any((now := gauges(metrics_url)).values()):
            return now
        time.sleep(0.05)
    return now


def greedy(client: Client, prompt, n: int, timeout: float = 120) -> list[int]:
    return client.generate(prompt, n, temperature=0.0, ignore_eos=True, timeout=timeout).token_ids


def kserve_inputs(module, prompt, n: int, dtype=np.uint32):
    def tensor(name, array):
        t = module.InferInput(name, list(array.shape), "UINT32")
        t.set_data_from_numpy(array.astype(dtype))
        return t

    return [tensor("input_ids", np.array([prompt])), tensor("input_lengths", np.array([[len(prompt)]])),
            tensor("request_output_len", np.array([[n]])), tensor("end_id", np.array([[NEVER]])),
            tensor("runtime_top_k", np.array([[1]]))]


def kserve_json(prompt, n: int) -> dict:
    rows = {"input_ids": [prompt], "input_lengths": [[len(prompt)]], "request_output_len": [[n]], "end_id": [[NEVER]],
            "runtime_top_k": [[1]]}
    return {"inputs": [{"name": name, "datatype": "UINT32", "shape": list(np.shape(v)), "data": v}
                       for name, v in rows.items()]}


def first_sse_then_reset(http_url: str, path: str, body: dict) -> None:
    """Send a streamed request, read up to its first `data:` chunk, then reset the connection."""
    host, port = http_url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    payload = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    sock.settimeout(60)
    got = b""
    while b"data: " not in got:
        chunk = sock.recv(65536)
        assert chunk and not got.startswith(b"HTTP/1.1 4"), got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_every_door_under_concurrent_load_with_cancels_disconnects_and_deadlines(server):
    from gptjax.tokenizer import default_tokenizer

    proc, target, http_url, metrics_url, log = server
    tok = default_tokenizer()
    rng = random.Random(0)
    prompts = [[rng.randrange(50000) for _ in range(length)] for length in (1, 3, 4, 15, 16, 17, 31, 40)]
    with Client(target) as alone:  # each prompt alone on the idle server, to the last position of the context
        refs = [greedy(alone, p, MAX_SEQ_LEN - len(p)) for p in prompts]

    def text(ids):  # what OpenAI answers for greedy tokens: they stop at end-of-text
        return tok.decode(ids[: ids.index(EOS)] if EOS in ids else ids)

    def call(kind: str, i: int, n: int, native: Client, kserve, h: httpx.Client) -> str | None:
        """One call of the mix -> None when it ended as its case says, else what went wrong."""
        p, ref = prompts[i], refs[i]
        if kind == "native":
            return None if greedy(native, p, n) == ref[:n] else "tokens differ"
        if kind == "full context":  # prompt + new tokens fill every position
            got = [t for piece in native.stream(p, MAX_SEQ_LEN - len(p), temperature=0.0, ignore_eos=True)
                   for t in piece.token_ids]
            return None if got == ref else "tokens differ"
        if kind == "tiny":
            return None if greedy(native, p, 1) == ref[:1] else "tokens differ"
        if kind == "stream cancelled":
            stream = native.stub.GenerateStream(make_request(p, n, temperature=0.0, ignore_eos=True))
            got = list(next(stream).token_ids)
            stream.cancel()
            return None if got == ref[: len(got)] else "tokens differ"
        if kind == "deadline":
            try:
                got = greedy(native, p, n, timeout=0.05)
            except grpc.RpcError as e:
                return None if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else f"{e.code()}: {e.details()}"
            return None if got == ref[:n] else "tokens differ"
        if kind == "kserve grpc":
            r = kserve.infer(MODEL, kserve_inputs(tritonclient_grpc, p, n), client_timeout=120)
            return None if r.as_numpy("output_ids")[0, 0, len(p):].tolist() == ref[:n] else "tokens differ"
        if kind == "kserve http":
            r = h.post(f"/v2/models/{MODEL}/infer", json=kserve_json(p, n)).raise_for_status().json()
            ids = next(o for o in r["outputs"] if o["name"] == "output_ids")["data"]
            return None if ids[len(p):] == ref[:n] else "tokens differ"
        if kind == "kserve stream, one id twice":
            results = queue.Queue()
            kserve.start_stream(callback=lambda result, error: results.put((result, error)))
            try:
                for _ in range(2):
                    kserve.async_stream_infer(MODEL, kserve_inputs(tritonclient_grpc, p, n), request_id="twice")
                answers = [results.get(timeout=120) for _ in range(2)]
            finally:
                kserve.stop_stream()
            for result, error in answers:
                if error is not None or result.get_response().id != "twice":
                    return f"stream answer {error}"
                if result.as_numpy("output_ids")[0, 0, len(p):].tolist() != ref[:n]:
                    return "tokens differ"
            return None
        if kind in ("openai n=2", "openai n=2 streamed"):
            body = {"prompt": p, "max_tokens": n, "temperature": 0, "n": 2, "best_of": 2}
            if kind.endswith("streamed"):
                texts = ["", ""]
                with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            for c in json.loads(line[6:])["choices"]:
                                texts[c["index"]] += c["text"]
            else:
                texts = [c["text"] for c in h.post("/v1/completions", json=body).raise_for_status().json()["choices"]]
            return None if texts == [text(ref[:n])] * 2 else f"texts {texts}"
        if kind == "openai stop string":
            whole = text(ref[:n])
            stop = whole[len(whole) // 2:][:3]
            if len(whole) < 8 or not stop.strip():
                return None
            body = {"prompt": p, "max_tokens": n, "temperature": 0, "stop": [stop]}
            (choice,) = h.post("/v1/completions", json=body).raise_for_status().json()["choices"]
            return None if (choice["text"], choice["finish_reason"]) == (whole[: whole.find(stop)], "stop") else \
                f"stop {stop!r}: {choice}"
        if kind == "openai reset mid-stream":
            first_sse_then_reset(http_url, "/v1/completions",
                                 {"prompt": p, "max_tokens": MAX_SEQ_LEN - len(p), "temperature": 0, "stream": True})
            return None
        if kind == "generate_stream reset mid-stream":
            first_sse_then_reset(http_url, f"/v2/models/{MODEL}/generate_stream",
                                 {"text_input": "Once upon a time", "max_tokens": 40, "temperature": 0})
            return None
        raise AssertionError(kind)

    kinds = ["native", "full context", "tiny", "stream cancelled", "deadline", "kserve grpc", "kserve http",
             "kserve stream, one id twice", "openai n=2", "openai n=2 streamed", "openai stop string",
             "openai reset mid-stream", "generate_stream reset mid-stream"]
    outcomes, lock = [], threading.Lock()

    def client(k: int):
        rng = random.Random(k)
        native, kserve = Client(target), tritonclient_grpc.InferenceServerClient(target)
        try:
            with httpx.Client(base_url=http_url, timeout=120) as h:
                for j in range(CALLS):
                    kind, i = kinds[(k + j * CLIENTS) % len(kinds)], rng.randrange(len(prompts))
                    n = rng.randint(1, MAX_SEQ_LEN - len(prompts[i]))
                    try:
                        wrong = call(kind, i, n, native, kserve, h)
                    except Exception as e:  # noqa: BLE001 - every failure is reported below
                        wrong = f"{type(e).__name__}: {e}"
                    with lock:
                        outcomes.append((kind, i, n, wrong))
        finally:
            native.close()
            kserve.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(outcomes) == CLIENTS * CALLS
    assert {kind for kind, *_ in outcomes} == set(kinds)
    assert not [o for o in outcomes if o[3] is not None], [o for o in outcomes if o[3] is not None][:5]

    assert wait_idle(metrics_url) == dict.fromkeys(gauges(metrics_url), 0.0)  # every slot and queue place free
    with Client(target) as fresh:
        assert greedy(fresh, prompts[-1], MAX_SEQ_LEN - len(prompts[-1])) == refs[-1]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    log.seek(0)
    lines = log.read().splitlines()
    assert not [line for line in lines if "traceback" in line.lower() or "exception" in line.lower()], lines[-30:]
