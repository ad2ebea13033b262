"""The HTTP port of the real `gptjax serve`, started from a FasterTransformer v1 config.pbtxt (candidate_num 1:
greedy) with an API key: KServe v2 through tritonclient.http (binary and JSON tensors, both dialects), Triton's
generate extension, /metrics read by prometheus_client's parser, disconnects, bad input, and a load of four APIs;
and, on apps with no engine behind them, the port's own limits, what a draining server answers, and large JSON
bodies and answers read and written off the event loop, a piece at a time.

Greedy tokens are checked against `gptjax generate --greedy` with the same config (no server involved).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import run_cli

pytest_plugins = ["http_server"]  # the `served` fixture: one server for the session
tritonclient_http = pytest.importorskip("tritonclient.http")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MODEL = "fastertransformer"
PROMPTS = [[464, 2068, 7586, 21831, 18045], [15496, 995], [40, 588, 257, 1310, 286, 9552, 13]]
N_NEW = 8
V1 = ("INPUT_ID", "REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN")
V5 = ("input_ids", "input_lengths", "request_output_len")
EOS = 50256
TEXT = "The quick brown fox"


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.http, headers=served.headers, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def triton(served):
    c = tritonclient_http.InferenceServerClient(served.http.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def greedy(served):
    """`gptjax generate --greedy` with the server's config (no server involved): PROMPTS, then TEXT's tokens."""
    from gptjax.tokenizer import default_tokenizer

    args = ["generate", "--config", str(served.config), "--greedy", "--json", "--no-stop",
            "--max-new-tokens", str(N_NEW)]
    for p in PROMPTS + [default_tokenizer().encode(TEXT)]:
        args += ["--prompt-ids", ",".join(map(str, p))]
    out = [json.loads(line) for line in run_cli(*args, env={"JAX_PLATFORMS": "cpu"}).stdout.splitlines()]
    assert all(EOS not in r["output_ids"] for r in out)  # so the server (which stops at end-of-text) makes them all
    return out


@pytest.fixture(scope="module")
def reference(greedy):
    """Greedy new tokens of each of PROMPTS."""
    return [r["output_ids"] for r in greedy[: len(PROMPTS)]]


def ft_inputs(names, prompts, n_new, binary=True, module=tritonclient_http):
    """The three FasterTransformer tensors of right-padded prompts, in the dialect the names give."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.uint32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    arrays = [ids, np.array([[len(p)] for p in prompts], np.uint32), np.full((len(prompts), 1), n_new, np.uint32)]
    tensors = []
    for name, a in zip(names, arrays):
        t = module.InferInput(name, list(a.shape), "UINT32")
        if module is tritonclient_http:
            t.set_data_from_numpy(a, binary_data=binary)
        else:
            t.set_data_from_numpy(a)
        tensors.append(t)
    return tensors


def metrics(url: str, headers: dict) -> dict:
    """{(name, model label): value} of a /metrics page, read by prometheus_client's parser."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).raise_for_status().text
    return {(s.name, s.labels.get("model")): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def running(served) -> float:
    return metrics(served.metrics, served.headers)[("gptjax_requests_running", "gpt2-tiny")]


def wait_idle(served, timeout_s: float = 30) -> None:
    """Until no request holds a slot or waits for one (a cancelled request frees its slot at the next step)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        m = metrics(served.metrics, served.headers)
        if m[("gptjax_requests_running", "gpt2-tiny")] == 0 and m[("gptjax_requests_queued", "gpt2-tiny")] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"requests still running after {timeout_s} s: {running(served)}")


# ---- KServe v2 through tritonclient.http ----------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("dialect", ["v1", "5.x"])
def test_tritonclient_http_gets_the_prompt_then_the_greedy_tokens(triton, served, reference, binary, dialect):
    names = V1 if dialect == "v1" else V5
    out_name = "OUTPUT0" if dialect == "v1" else "output_ids"
    outputs = [tritonclient_http.InferRequestedOutput(out_name, binary_data=binary)]
    result = triton.infer(MODEL, ft_inputs(names, PROMPTS, N_NEW, binary), outputs=outputs, headers=served.headers)
    (tensor,) = result.get_response()["outputs"]
    assert ("parameters" in tensor and "binary_data_size" in tensor["parameters"]) == binary
    out = result.as_numpy(out_name)
    width = max(map(len, PROMPTS))
    assert out.shape[0] == len(PROMPTS) and out.shape[-1] == width + N_NEW
    rows = out.reshape(-1, len(PROMPTS)).T if dialect == "v1" else out[:, 0]  # v1: time-major, as in 2021
    for row, prompt, new in zip(rows.tolist(), PROMPTS, reference):
        assert row == prompt + new + [EOS] * (width - len(prompt))  # each row padded with end-of-text


def test_tritonclients_defaults_all_outputs_in_binary(triton, served, reference):
    result = triton.infer(MODEL, ft_inputs(V5, PROMPTS[:2], N_NEW), headers=served.headers)
    assert {o["name"] for o in result.get_response()["outputs"]} == {"output_ids", "sequence_length"}
    assert result.as_numpy("sequence_length")[:, 0].tolist() == [len(p) + N_NEW for p in PROMPTS[:2]]
    assert result.as_numpy("output_ids")[0, 0, : len(PROMPTS[0]) + N_NEW].tolist() == PROMPTS[0] + reference[0]


def test_health_metadata_and_config_describe_the_v1_dialect(triton, served, http):
    assert httpx.get(served.http + "/v2/health/live").status_code == 200  # health needs no key
    assert httpx.get(served.http + "/v2/health/ready").status_code == 200
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL, headers=served.headers)
    assert "generate" in triton.get_server_metadata(headers=served.headers)["extensions"]
    meta = triton.get_model_metadata(MODEL, headers=served.headers)
    assert [t["name"] for t in meta["inputs"]] == list(V1) and [t["name"] for t in meta["outputs"]] == ["OUTPUT0"]
    config = triton.get_model_config(MODEL, headers=served.headers)
    assert config["max_batch_size"] == 4 and config["parameters"]["candidate_num"]["string_value"] == "1"
    assert config["input"][0]["dims"] == [-1]
    assert http.get(f"/v2/models/{MODEL}/versions/1").json()["name"] == MODEL
    for path in ("/v2/models/stats", f"/v2/models/{MODEL}/stats"):  # not served: said so, not "unknown model"
        answer = http.get(path)
        assert answer.status_code == 501 and "statistics extension is not served" in answer.json()["error"], path
    assert http.get("/v2/models/other/stats").status_code == 404


# ---- the generate extension ----------------------------------------------------------------------------------
def test_generate_and_generate_stream_give_the_greedy_text(http, greedy):
    text, ref = TEXT, greedy[-1]
    unary = http.post(f"/v2/models/{MODEL}/generate", json={"text_input": text, "max_tokens": N_NEW})
    assert unary.status_code == 200, unary.text
    assert unary.json()["text_output"] == text + ref["text"]
    pieces = []
    with http.stream("POST", f"/v2/models/{MODEL}/versions/1/generate_stream",
                     json={"text_input": text, "parameters": {"max_tokens": N_NEW}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                pieces.append(json.loads(line[6:])["text_output"])
    assert len(pieces) > 1 and "".join(pieces) == text + ref["text"]
    excluded = http.post(f"/v2/models/{MODEL}/generate", json={"text_input": text, "max_tokens": N_NEW,
                                                                "exclude_input_in_output": True})
    assert excluded.json()["text_output"] == ref["text"]
    # end_id as the tensors take it: the first greedy token ends the answer (not shown), 2**32 - 1 never does
    for end_id, want in ((ref["output_ids"][0], text), (2**32 - 1, text + ref["text"])):
        r = http.post(f"/v2/models/{MODEL}/generate", json={"text_input": text, "max_tokens": N_NEW, "end_id": end_id})
        assert (r.status_code, r.json().get("text_output")) == (200, want), r.text


# ---- metrics ----------------------------------------------------------------------------------------------------
def test_metrics_rise_by_exactly_what_was_sent(http, served, triton):
    wait_idle(served)
    before = metrics(served.metrics, served.headers)
    rng = random.Random(5)
    prompts = [[rng.randrange(50000) for _ in range(rng.randint(2, 9))] for _ in range(3)]
    new = [rng.randint(1, 6) for _ in prompts]
    for p, n in zip(prompts, new):
        r = http.post("/v1/completions", json={"prompt": p, "max_tokens": n, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == n
    result = triton.infer(MODEL, ft_inputs(V5, prompts[:2], 3), headers=served.headers)  # one call of two rows
    infer_new = int(result.as_numpy("sequence_length").sum()) - sum(map(len, prompts[:2]))
    after = metrics(served.http, served.headers)  # the HTTP port's /metrics is the same page
    m = "gpt2-tiny"

    def delta(name):  # Triton's counters carry the name Triton clients use, the rest the model's own
        label = MODEL if name.startswith("nv_") else m
        return after[(name, label)] - before[(name, label)]

    assert delta("nv_inference_request_success_total") == 4 and delta("nv_inference_count_total") == 5
    assert delta("nv_inference_exec_count_total") == 4 and delta("nv_inference_request_failure_total") == 0
    assert delta("gptjax_prompt_tokens_total") == sum(map(len, prompts)) + sum(map(len, prompts[:2]))
    assert delta("gptjax_generation_tokens_total") == sum(new) + infer_new
    assert delta("gptjax_time_to_first_token_seconds_count") == 5
    assert delta("gptjax_e2e_request_latency_seconds_count") == 5
    assert delta("nv_inference_request_duration_us_total") > 0
    assert after[("gptjax_slots", m)] == served.slots
    assert after[("gptjax_kv_cache_positions", m)] == served.slots * served.max_seq_len


# ---- disconnects -------------------------------------------------------------------------------------------------
def test_a_disconnected_sse_client_frees_its_slot(served):
    wait_idle(served)
    failures = metrics(served.metrics, served.headers)[("nv_inference_request_failure_total", MODEL)]
    body = {"prompt": [464, 2068], "max_tokens": served.max_seq_len - 2, "temperature": 0, "stream": True}
    with httpx.Client(base_url=served.http, headers=served.headers, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # held: an iterator dropped early would close the connection already
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
            assert running(served) == 1
    # the client has gone mid-stream: its request is cancelled (a failed call), and its slot is free
    wait_idle(served)
    m = metrics(served.metrics, served.headers)
    assert m[("nv_inference_request_failure_total", MODEL)] == failures + 1


def test_a_unary_client_that_disconnects_frees_its_slot(served):
    wait_idle(served)
    failures = metrics(served.metrics, served.headers)[("nv_inference_request_failure_total", MODEL)]
    body = json.dumps({"prompt": [464, 2068], "max_tokens": served.max_seq_len - 2, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", int(served.http.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {served.key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    end = time.monotonic() + 30
    while running(served) == 0 and time.monotonic() < end:
        time.sleep(0.01)
    assert running(served) == 1
    sock.close()  # before its tokens are all made: the request is cancelled, a failed call
    wait_idle(served)
    assert metrics(served.metrics, served.headers)[("nv_inference_request_failure_total", MODEL)] == failures + 1


def test_a_stream_stops_writing_once_its_client_has_reset_the_connection(caplog):
    """Chunks that queued up while the event loop was busy (a large body read, a slow turn) are written in one go:
    to a client that reset its connection meanwhile, each of them after the first failed write logged asyncio's
    "socket.send() raised exception." (dozens of lines per client under load); the stream stops at the first."""
    from fastapi import FastAPI

    from serving.http import EventStream
    from serving.http_app import HttpServer, listen

    reset, ended, written = threading.Event(), threading.Event(), []

    async def chunks():
        try:
            yield b"data: 0\n\n"
            reset.wait(30)  # the loop held up (on purpose) while the client resets: what follows is queued up
            for i in range(1, 50):
                written.append(i)
                yield f"data: {i}\n\n".encode()
        finally:
            ended.set()

    app = FastAPI()
    app.get("/stream")(lambda: EventStream(chunks()))
    server = HttpServer([(app, listen("127.0.0.1", 0))])
    host, port = server.addresses[0].rsplit(":", 1)
    try:
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        first = b""
        while b"data: 0" not in first:
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        sock.close()
        reset.set()
        assert ended.wait(10)
    finally:
        reset.set()
        server.stop()
    assert not [r for r in caplog.records if "socket.send() raised exception" in r.getMessage()]
    assert len(written) < 49  # it stopped before its end


def test_an_inference_call_refused_for_its_body_or_model_counts_as_a_failure(served):
    """As over gRPC: a failed call is counted whatever refused it, the body's JSON or the model's name too."""
    wait_idle(served)
    failures = metrics(served.metrics, served.headers)[("nv_inference_request_failure_total", MODEL)]
    sent = [("POST", f"/v2/models/{MODEL}/infer", b'{"inputs": [', 400),
            ("POST", "/v2/models/no-such-model/infer", json.dumps(v1_json()[1]).encode(), 404),
            ("POST", f"/v2/models/{MODEL}/generate", b"[1]", 400),
            ("POST", f"/v2/models/{MODEL}/generate_stream", b"{", 400),
            ("POST", "/v1/completions", json.dumps({"prompt": [1], "model": "other"}).encode(), 404)]
    with httpx.Client(base_url=served.http, headers=served.headers, timeout=60) as c:
        for method, path, body, status in sent:
            r = c.request(method, path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (path, r.status_code, r.text)
    after = metrics(served.metrics, served.headers)[("nv_inference_request_failure_total", MODEL)]
    assert after >= failures + len(sent)  # (an earlier test's cancelled call may still be counted meanwhile)


def test_a_client_gone_before_its_body_is_whole_is_no_error(served, http):
    """A body cut short by the client's disconnect is nobody's answer: no traceback in the server's log (any
    client could fill it), and the server keeps serving."""
    port, logged = int(served.http.rsplit(":", 1)[1]), len(served.output())
    for path in ("/v1/completions", f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/generate"):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {served.key}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ".encode())
            time.sleep(0.2)
    good = http.post("/v1/completions", json={"prompt": [464, 2068], "max_tokens": 2, "temperature": 0})
    assert good.status_code == 200
    assert "Traceback" not in served.output()[logged:], served.output()[logged:]


# ---- bad input: a 4xx with a message, and the server keeps serving ------------------------------------------------
def raw(served, request: bytes) -> tuple[int, dict]:
    """Send bytes as they are; -> (status, JSON body) of the first response."""
    with socket.create_connection(("127.0.0.1", int(served.http.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body[: _length(data)] or b"{}")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def binary_infer(served, header: dict, blob: bytes, header_length: int | None = None) -> httpx.Response:
    head = json.dumps(header).encode()
    return httpx.post(f"{served.http}/v2/models/{MODEL}/infer", content=head + blob, timeout=60,
                      headers={**served.headers, "Inference-Header-Content-Length": str(header_length or len(head))})


def v1_json(rows=1, input_dtype="UINT32", lengths_rows=None, data=None, model=MODEL, version=None):
    lengths_rows = rows if lengths_rows is None else lengths_rows
    inputs = [{"name": "INPUT_ID", "datatype": input_dtype, "shape": [rows, 2], "data": data or [[5, 6]] * rows},
              {"name": "REQUEST_INPUT_LEN", "datatype": "UINT32", "shape": [lengths_rows, 1],
               "data": [2] * lengths_rows},
              {"name": "REQUEST_OUTPUT_LEN", "datatype": "UINT32", "shape": [rows, 1], "data": [2] * rows}]
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return path, {"inputs": inputs}


def bad_cases(served):
    """(what, send() -> (status, body)) for input that must be refused with a 4xx and a message."""
    key = served.headers
    post = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {served.key}\r\n"

    def call(method, path, **kw):
        def send():
            r = httpx.request(method, served.http + path, timeout=60, **{"headers": key, **kw})
            return r.status_code, r.json()
        return send

    def infer_json(**kw):
        path, body = v1_json(**kw)
        return call("POST", path, json=body)

    ids = np.array([[5, 6]], np.uint32).tobytes()
    header = {"inputs": [{"name": name, "datatype": "UINT32", "shape": shape, "parameters": {"binary_data_size": size}}
                         for name, shape, size in zip(V1, ([1, 2], [1, 1], [1, 1]), (8, 4, 4))]}

    def infer_with_temperature(value):
        inputs = [{"name": name, "datatype": "UINT32", "shape": shape, "data": data} for name, shape, data in
                  (("input_ids", [1, 2], [5, 6]), ("input_lengths", [1, 1], [2]), ("request_output_len", [1, 1], [2]))]
        temperature = {"name": "temperature", "datatype": "FP32", "shape": [1, 1], "data": [value]}
        return call("POST", f"/v2/models/{MODEL}/infer", json={"inputs": [*inputs, temperature]})

    def completion(**body):
        return call("POST", "/v1/completions", json={"prompt": [1, 2, 3], **body})

    return [  # the OpenAI routes answer in OpenAI's error form, the others in Triton's
        ("malformed JSON", 400, "not valid JSON", call("POST", f"/v2/models/{MODEL}/infer", content=b'{"inputs": [')),
        ("malformed OpenAI JSON", 400, "not valid JSON", call("POST", "/v1/completions", content=b"{prompt: 1}")),
        ("JSON nested 4000 deep", 400, "nests its JSON too deeply",
         call("POST", f"/v2/models/{MODEL}/infer", content=b"[" * 4000)),
        ("an integer of 5000 digits", 400, "more than 4300 digits",
         call("POST", "/v1/completions", content=b'{"prompt": [1], "seed": 1' + b"0" * 4999 + b"}",
              headers={**key, "content-type": "application/json"})),
        ("a Content-Length shorter than the body", 400, "not valid JSON",
         lambda: raw(served, (post + "Content-Length: 12\r\n\r\n").encode() + json.dumps(v1_json()[1]).encode())),
        ("a binary header longer than the body", 400, "body has only",
         lambda: _status(binary_infer(served, header, ids, header_length=10_000))),
        ("binary data past the body's end", 400, "run past the end",
         lambda: _status(binary_infer(served, header, b""))),
        ("a tensor as data and as binary", 400, "input INPUT_ID: give its values as data or as binary_data_size bytes",
         lambda: _status(binary_infer(served, {"inputs": [{**header["inputs"][0], "data": [[7, 8]]},
                                                          *header["inputs"][1:]]},
                                      ids + np.array([2, 2], np.uint32).tobytes()))),
        ("a header length that is not a number", 400, "Inference-Header-Content-Length",
         call("POST", f"/v2/models/{MODEL}/infer", content=b"{}",
              headers={**key, "Inference-Header-Content-Length": "x"})),
        ("a header length of non-ASCII digits", 400, "Inference-Header-Content-Length",
         call("POST", f"/v2/models/{MODEL}/infer", content=b"{}",
              headers={**key, "Inference-Header-Content-Length": b"\xb2"})),
        ("a tensor of 2**62 values", 400, "more than",
         call("POST", f"/v2/models/{MODEL}/infer", json={"inputs": [
             {"name": "INPUT_ID", "datatype": "UINT32", "shape": [2**31, 2**31, 0], "data": []},
             *v1_json()[1]["inputs"][1:]]})),
        ("outputs that are no list of objects", 400, "outputs must be a list",
         call("POST", f"/v2/models/{MODEL}/infer", json={**v1_json()[1], "outputs": [{"name": "OUTPUT0",
                                                                                        "parameters": [1]}]})),
        ("a null among a tensor's values", 400, "None is not a UINT32 value", infer_json(data=[[5, None]])),
        *[(f"a gzipped body to {path}", 400, "Content-Encoding 'gzip' is not supported",
           call("POST", path, content=gzip.compress(b'{"prompt": [1]}'), headers={**key, "Content-Encoding": "gzip"}))
          for path in ("/v1/completions", f"/v2/models/{MODEL}/generate", f"/v2/models/{MODEL}/infer")],
        ("binary_data_output as a string", 400, "parameters.binary_data_output must be true or false",
         call("POST", f"/v2/models/{MODEL}/infer",
              json={**v1_json()[1], "parameters": {"binary_data_output": "false"}})),
        ("an output's binary_data as a number", 400, "output OUTPUT0: binary_data must be true or false",
         call("POST", f"/v2/models/{MODEL}/infer",
              json={**v1_json()[1], "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": 0}}]})),
        ("an output asked to be classified", 400, "output OUTPUT0: parameters takes only binary_data, got "
         "classification", call("POST", f"/v2/models/{MODEL}/infer",
                                json={**v1_json()[1], "outputs": [{"name": "OUTPUT0",
                                                                   "parameters": {"classification": 3}}]})),
        ("a timeout past int64", 400, "parameters.timeout must be a whole number of microseconds in [0, 2**63)",
         call("POST", f"/v2/models/{MODEL}/infer", json={**v1_json()[1], "parameters": {"timeout": 10**400}})),
        ("a method a route does not take", 405, "Method Not Allowed", call("DELETE", "/v1/completions")),
        ("an inference id that is no string", 400, "id must be a string, got 5",
         call("POST", f"/v2/models/{MODEL}/infer", json={**v1_json()[1], "id": 5})),
        ("a generate id that is no string", 400, "id must be a string, got [1]",
         call("POST", f"/v2/models/{MODEL}/generate", json={"text_input": "hi", "max_tokens": 2, "id": [1]})),
        ("an unknown model", 404, "unknown model", infer_json(model="gpt-5")),
        ("an unknown version", 404, "no version", infer_json(version="7")),
        ("a wrong datatype", 400, "INPUT_ID must be UINT32", infer_json(input_dtype="FP32", data=[[5.0, 6.0]])),
        ("mismatched shapes", 400, "batch", infer_json(rows=2, lengths_rows=3)),
        ("a batch over max_batch_size", 429, "over the server's limit of 4", infer_json(rows=5)),
        ("a value outside its datatype", 400, "outside UINT32", infer_json(data=[[5, -1]])),
        ("a float tensor's integer past float64", 400, "too large for FP32",
         infer_with_temperature(10**400)),
        ("a float tensor's value past FP32", 400, "too large for FP32",
         infer_with_temperature(1e300)),
        ("OpenAI max_tokens 0", 400, "max_tokens must be at least 1", completion(max_tokens=0)),
        ("OpenAI max_tokens over the limit", 400, "max_tokens = 300 is over", completion(max_tokens=300)),
        ("OpenAI temperature < 0", 400, "temperature must be >= 0", completion(temperature=-0.5)),
        ("OpenAI temperature NaN", 400, "temperature must be a finite number",
         call("POST", "/v1/completions", content=b'{"prompt": [1], "temperature": NaN}',
              headers={**key, "content-type": "application/json"})),
        ("OpenAI temperature past float64", 400, "too large for a float", completion(temperature=10**400)),
        ("OpenAI text with a lone surrogate", 400, "not valid Unicode",
         call("POST", "/v1/completions", content=b'{"prompt": "a\\ud800b", "max_tokens": 2}',
              headers={**key, "content-type": "application/json"})),
        ("a prompt over the context", 400, f"at most {served.max_seq_len - 1}", completion(prompt=[7] * 300)),
        ("an unknown OpenAI field", 400, "unknown field(s) frequency", completion(frequency=1)),
        ("a chat completion", 400, "no chat template", call("POST", "/v1/chat/completions", json={"messages": []})),
        ("generate without text_input", 400, "text_input must be a string",
         call("POST", f"/v2/models/{MODEL}/generate", json={"max_tokens": 2})),
        ("a missing API key", 401, "missing API key", call("GET", "/v1/models", headers={})),
        ("a wrong API key", 401, "wrong API key", call("GET", "/metrics", headers={"Authorization": "Bearer nope"})),
        ("a body over the size limit", 413, "over the server's limit",
         lambda: raw(served, (post + f"Content-Length: {16 * 2**20 + 1}\r\n\r\n").encode())),
        ("an unknown route", 404, "Not Found", call("GET", "/v3/models")),
    ]


def _status(r: httpx.Response):
    return r.status_code, r.json()


def test_bad_http_input_gets_a_4xx_with_a_message_and_the_server_keeps_serving(served, http):
    cases = bad_cases(served)
    assert len(cases) >= 16
    for what, status, words, send in cases:
        got, body = send()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("error", "")
        assert (got, words in message) == (status, True), (what, got, body)
        good = http.post("/v1/completions", json={"prompt": [464, 2068], "max_tokens": 2, "temperature": 0})
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2, (what, good.text)
    wrong_method = http.request("DELETE", "/v1/completions")  # a 405 says what the route takes, as HTTP asks
    assert wrong_method.headers.get("allow") == "POST", wrong_method.headers
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"


# ---- load: four APIs at once ---------------------------------------------------------------------------------------
def test_load_of_four_apis_is_answered_in_full(served):
    import grpc
    import tritonclient.grpc as tritonclient_grpc

    from serving.client import Client, make_request

    wait_idle(served)
    failures, done = [], []
    lock = threading.Lock()

    def client(k: int):
        rng = random.Random(k)
        native = Client(served.grpc, api_key=served.key)
        kserve = tritonclient_grpc.InferenceServerClient(served.grpc)
        kserve_http = tritonclient_http.InferenceServerClient(served.http.removeprefix("http://"))
        try:
            with httpx.Client(base_url=served.http, headers=served.headers, timeout=120) as h:
                for j in range(8):
                    prompt, n = [rng.randrange(50000) for _ in range(rng.randint(1, 12))], rng.randint(1, 4)
                    api = (k + j) % 4
                    if api == 0:
                        out = native.stub.Generate(make_request(prompt, n, temperature=0.0, ignore_eos=True))
                        got, stopped = len(out.token_ids), False
                    elif api in (1, 2):
                        mod = tritonclient_grpc if api == 1 else tritonclient_http
                        extra = {"headers": {k.lower(): v for k, v in served.headers.items()}}
                        result = (kserve if api == 1 else kserve_http).infer(MODEL, ft_inputs(V5, [prompt], n,
                                                                                              module=mod), **extra)
                        length = int(result.as_numpy("sequence_length")[0, 0])
                        got = length - len(prompt)
                        stopped = result.as_numpy("output_ids")[0, 0, length - 1] == EOS
                    else:
                        got, stopped = _streamed_tokens(h, prompt, n)
                    with lock:
                        done.append((api, got == n or (stopped and 1 <= got < n)))  # all, or up to end-of-text
        except (grpc.RpcError, httpx.HTTPError, Exception) as e:  # noqa: B014 - any failure is reported
            with lock:
                failures.append(f"client {k}: {type(e).__name__}: {e}")
        finally:
            native.close()
            kserve.close()
            kserve_http.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures[:5]
    assert len(done) == 256 and all(ok for _, ok in done)
    assert {api for api, _ in done} == {0, 1, 2, 3}
    with Client(served.grpc, api_key=served.key) as native:
        info = native.model_info()
    assert (info.active_requests, info.queued_requests) == (0, 0)
    m = metrics(served.metrics, served.headers)
    assert (m[("gptjax_requests_running", "gpt2-tiny")], m[("gptjax_requests_queued", "gpt2-tiny")]) == (0, 0)


def _streamed_tokens(h: httpx.Client, prompt, n) -> tuple[int, bool]:
    """An OpenAI streaming completion read to its end -> (its completion tokens from the usage chunk, whether it
    stopped at end-of-text)."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    usage, finished, reason = None, False, None
    with h.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                finished = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                usage = chunk.get("usage") or usage
                reason = next((c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]), reason)
    assert finished and usage is not None
    return usage["completion_tokens"], reason == "stop"


def test_grpc_asks_for_the_same_key_but_not_for_health(served):
    import grpc

    from serving.client import Client

    for key, message in ((None, "missing API key"), ("nope", "wrong API key")):
        with Client(served.grpc, api_key=key) as client:
            client.wait_ready(timeout=30)  # health needs no key
            with pytest.raises(grpc.RpcError) as e:
                client.model_info(timeout=30)
            assert (e.value.code(), message in e.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, True)
            with pytest.raises(grpc.RpcError) as e:
                list(client.stream([464, 2068], 2, timeout=30))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(served.grpc, api_key=served.key) as client:
        assert len(client.generate([464, 2068], 2, temperature=0.0, timeout=60).token_ids) >= 1
    # an auth scheme is a word of any case, on both transports
    assert httpx.get(served.http + "/v1/models", headers={"Authorization": f"bearer  {served.key}"}).status_code == 200
    with grpc.insecure_channel(served.grpc) as channel:
        info = channel.unary_unary("/gptjax.v1.Generator/GetModelInfo")(
            b"", metadata=(("authorization", f"BEARER {served.key}"),), timeout=30)
    assert info
    # a keyed channel sends the key on streaming calls too: KServe's ModelStreamInfer answers the request (here
    # with the request's own error) rather than refusing the call
    from serving.client import keyed_channel
    from tritonclient.grpc import service_pb2 as kpb

    with grpc.insecure_channel(served.grpc) as channel:
        stream = keyed_channel(channel, served.key).stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=kpb.ModelInferRequest.SerializeToString,
            response_deserializer=kpb.ModelStreamInferResponse.FromString)
        (reply,) = stream(iter([kpb.ModelInferRequest(model_name=MODEL)]), timeout=60)
    assert reply.error_message.startswith("INVALID_ARGUMENT"), reply.error_message


def test_the_benchmarks_send_the_key(served):
    # `gptjax bench --server` (KServe requests) and its serving benchmark (native streams; the key from
    # $GPTJAX_API_KEY) measure a keyed server when given its key, and say in one line what is missing when not
    wait_idle(served)
    env = {"JAX_PLATFORMS": "cpu", "GPTJAX_API_KEY": ""}
    out = run_cli("bench", "--server", served.grpc, "--api-key", served.key, "--shapes", "1,4,2", "-n", "1",
                  "--warmup-seconds", "0", "--json", env=env).stdout
    (row,) = [json.loads(line) for line in out.strip().splitlines()]
    assert row["impl"] == "gptjax-server" and row["latency_ms"] > 0
    rate = ("bench", "--server", served.grpc, "--request-rate", "inf", "--num-requests", "2", "--input-len-dist",
            "fixed:4", "--output-len-dist", "fixed:2", "--json")
    keyed = run_cli(*rate, env={**env, "GPTJAX_API_KEY": served.key})
    (row,) = [json.loads(line) for line in keyed.stdout.splitlines()]
    assert (row["completed"], row["failed"]) == (2, 0)
    refused = run_cli(*rate, check=False, env=env)
    assert refused.returncode == 2 and "needs a key: pass its --api-key" in refused.stderr, refused.stderr
    for protocol, url in (("grpc", served.grpc), ("http", served.http.removeprefix("http://"))):  # the seed's client
        proc = subprocess.run([sys.executable, "benchmarks/identity_test.py", "-i", protocol, "-u", url,
                               "--api-key", served.key, "-b", "1", "-s", "4", "-o", "2", "-n", "1", "--json"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, **env},
                              cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == 0 and json.loads(proc.stdout)["runs"] == 1, (protocol, proc.stderr)


# ---- the port's own limits, on an app with no model behind it ---------------------------------------------
def _answer(sock) -> bytes:
    """What the server sends until it closes the connection (or 10 s pass)."""
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def test_connections_whose_headers_do_not_come_are_closed_and_free_the_port():
    """Idle connections, or ones that trickle a request's first bytes (after an answered request too), are closed
    after the header time: they held every connection the port allows for good, and each later request got
    uvicorn's 503."""
    from fastapi import FastAPI

    from serving.http_app import HttpServer, listen

    app = FastAPI()
    app.get("/ok")(lambda: {"ok": True})
    server = HttpServer([(app, listen("127.0.0.1", 0))], max_connections=4, header_timeout_s=3.0)
    host, port = server.addresses[0].rsplit(":", 1)
    url = f"http://{host}:{port}/ok"
    held = [socket.create_connection((host, int(port))) for _ in range(3)]
    try:
        idle, trickling, kept = held
        trickling.sendall(b"GET /ok HTTP/1.1\r\nHo")
        kept.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        kept.settimeout(10)
        first = b""
        while not first.endswith(b'{"ok":true}'):  # the whole answer, however the reads split it
            chunk = kept.recv(65536)
            assert chunk, first  # not closed before the answer is whole
            first += chunk
        assert first.startswith(b"HTTP/1.1 200"), first
        kept.sendall(b"GET /ok HTTP/1.1\r\n")  # the next request, never finished
        assert httpx.get(url, timeout=10).status_code == 503  # the port is full
        start = time.monotonic()
        assert [_answer(sock) for sock in held] == [b"", b"", b""]  # each until the server closes it
        assert time.monotonic() - start < 9  # by the header deadline, not by _answer's own 10 s
        assert httpx.get(url, timeout=10).status_code == 200  # the port is free again
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_a_stalled_body_is_a_408_and_requests_past_the_limit_a_503():
    from serving.config import DEFAULT_DIALECT
    from serving.frontend import Frontend
    from serving.http import Context
    from serving.http_app import HttpServer, create_app, listen

    ctx = Context(Frontend("gpt2-tiny"), max_body_bytes=1 << 20, dialect=DEFAULT_DIALECT, body_timeout_s=3)
    server = HttpServer([(create_app(ctx, max_requests=2), listen("127.0.0.1", 0))], max_connections=8)
    host, port = server.addresses[0].rsplit(":", 1)

    def stalled():  # 100 bytes promised, 14 sent: in progress until the body timeout
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v2/models/fastertransformer/generate HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"text_input\":")
        return sock

    def get(path):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return _answer(sock)

    try:
        holders = [stalled(), stalled()]
        deadline, refused = time.monotonic() + 10, b""
        while not refused.startswith(b"HTTP/1.1 503") and time.monotonic() < deadline:
            refused = get("/v2/models/fastertransformer")  # once both holders are in progress
        assert refused.startswith(b"HTTP/1.1 503"), refused
        assert b"retry-after: 1" in refused.lower()
        assert json.loads(refused.split(b"\r\n\r\n", 1)[1]) == {
            "error": "the server is answering 2 HTTP requests already; retry later"}
        assert get("/v2/health/live").startswith(b"HTTP/1.1 200")  # a busy server is not a dead one
        for sock in holders:
            with sock:
                answer = _answer(sock)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"did not arrive within 3 s (14 bytes came)" in answer
        assert get("/v2/models/fastertransformer").startswith(b"HTTP/1.1 200")  # their places are free again
    finally:
        server.stop()


def test_metrics_are_scraped_past_the_request_limit_as_health_is_checked():
    """A server answering all the HTTP requests it takes is busy, not gone: a scrape refused then would read as a
    scrape failure (`up` 0) exactly when the server is busiest, with `--metrics-port 0` leaving only this port."""
    from serving.config import DEFAULT_DIALECT
    from serving.frontend import Frontend
    from serving.http import Context
    from serving.http_app import HttpServer, create_app, listen
    from serving.metrics import Metrics

    frontend = Frontend("gpt2-tiny", Metrics("gpt2-tiny"))
    ctx = Context(frontend, max_body_bytes=1 << 20, dialect=DEFAULT_DIALECT, body_timeout_s=10)
    server = HttpServer([(create_app(ctx, max_requests=1), listen("127.0.0.1", 0))], max_connections=8)
    host, port = server.addresses[0].rsplit(":", 1)

    def get(path):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return _answer(sock)

    holder = socket.create_connection((host, int(port)))  # a body promised and not sent: in progress
    try:
        holder.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{")
        deadline, refused = time.monotonic() + 10, b""
        while not refused.startswith(b"HTTP/1.1 503") and time.monotonic() < deadline:
            refused = get(f"/v2/models/{MODEL}")
        assert refused.startswith(b"HTTP/1.1 503"), refused
        scraped = get("/metrics")
        assert scraped.startswith(b"HTTP/1.1 200"), scraped
        names = {f.name for f in text_string_to_metric_families(scraped.split(b"\r\n\r\n", 1)[1].decode())}
        assert {"nv_inference_request_success", "gptjax_requests_running"} <= names
    finally:
        holder.close()
        server.stop()


def test_a_body_still_coming_when_the_server_stops_is_a_503_not_uvicorns_500():
    """A client still sending its body when the drain's grace time ends is sent elsewhere like any client of a
    draining server (uvicorn's cancel would otherwise answer a plain-text 500)."""
    from serving.config import DEFAULT_DIALECT
    from serving.frontend import Frontend
    from serving.http import Context
    from serving.http_app import HttpServer, create_app, listen

    ctx = Context(Frontend("gpt2-tiny"), max_body_bytes=1 << 20, dialect=DEFAULT_DIALECT, body_timeout_s=60)
    server = HttpServer([(create_app(ctx, max_requests=8), listen("127.0.0.1", 0))], grace_s=0.5)
    host, port = server.addresses[0].rsplit(":", 1)
    answers = []
    for path in ("/v1/completions", f"/v2/models/{MODEL}/infer"):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100\r\n\r\n{{\"prompt\":".encode())
        answers.append(sock)
    time.sleep(1.0)  # both bodies are being read
    server.stop()
    for sock in answers:
        with sock:
            answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 1" in answer.lower() and b"shutting down" in answer, answer


# ---- a server that drains, or cuts its requests off, sends its clients elsewhere -------------------------------
GENERATE = {"text_input": TEXT, "max_tokens": 2}
QUEUEING = [(*v1_json(), False), (f"/v2/models/{MODEL}/generate", GENERATE, False),  # (path, body, streams)
            (f"/v2/models/{MODEL}/generate_stream", GENERATE, True),
            ("/v1/completions", {"prompt": [5, 6], "max_tokens": 2}, False),
            ("/v1/completions", {"prompt": TEXT, "max_tokens": 2, "stream": True}, True)]
READY = ["/v2/health/ready", f"/v2/models/{MODEL}/ready"]


def draining_app(moment: str):
    """The HTTP app over a front end whose scheduler stand-in is draining (refuses every request), began to drain
    between a request's checks and its queueing, or cuts each request off once queued (a drain cut short, a lost
    process of the job)."""
    from test_frontend import _ModelShape, _Scheduler

    from serving.config import DEFAULT_DIALECT
    from serving.frontend import Frontend
    from serving.http import Context
    from serving.http_app import create_app
    from serving.request import Code, Failed
    from serving.scheduler import NotAccepting

    class CuttingOff(_Scheduler):
        def submit(self, requests):
            super().submit(requests)
            for r in requests:
                r.put(Failed(Code.UNAVAILABLE, "the server is shutting down"))

    scheduler = CuttingOff() if moment == "cut off" else _Scheduler()
    scheduler.accepting = moment != "draining"
    scheduler.refuse = NotAccepting() if moment == "at submit" else None
    frontend = Frontend("gpt2-tiny")
    frontend.load(_ModelShape(), scheduler, max_batch_size=4)
    return create_app(Context(frontend, max_body_bytes=1 << 20, dialect=DEFAULT_DIALECT, body_timeout_s=10),
                      max_requests=8)


@pytest.mark.parametrize("moment", ["draining", "at submit", "cut off"])
def test_every_door_of_a_draining_server_answers_503_with_retry_after_and_connection_close(moment):
    """A draining server does not come back: its 503 tells the client to retry soon, on a fresh connection that
    a balancer can send elsewhere. (A stream cut off after it began has answered 200, and ends with an error event.)"""
    from starlette.testclient import TestClient

    calls = [("POST", path, body) for path, body, streams in QUEUEING if not (moment == "cut off" and streams)]
    calls += [("GET", path, None) for path in READY] if moment == "draining" else []
    with TestClient(draining_app(moment)) as client:
        for method, path, body in calls:
            r = client.request(method, path, json=body)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert (r.headers.get("retry-after"), r.headers.get("connection")) == ("1", "close"), (path, r.headers)
            error = r.json()["error"]
            assert "shutting down" in (error["message"] if path.startswith("/v1/") else error), (path, error)


def test_a_draining_server_closes_a_kept_alive_connection_after_its_503():
    from serving.http_app import HttpServer, listen

    server = HttpServer([(draining_app("draining"), listen("127.0.0.1", 0))])
    host, port = server.addresses[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"GET /v2/models/{MODEL}/ready HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # kept alive
            start = time.monotonic()
            answer = _answer(sock)  # returns when the server closes (or after 10 s)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower(), answer
        assert time.monotonic() - start < 5, "the connection was kept open"
    finally:
        server.stop()


def test_a_lone_surrogate_anywhere_in_a_json_body_is_a_400_on_every_route():
    """JSON can escape half of a UTF-16 pair ("\\ud800"), or a body can hold one encoded as UTF-8 bytes: no text
    holds that, and an answer that repeats it (an error naming the unknown field, an echoed id) can't be written
    as UTF-8: it was a 500. Every route refuses it at once; an escaped pair (an emoji, as json.dumps writes it) is
    text, and such a request goes on to the queue (full here)."""
    from starlette.testclient import TestClient
    from test_frontend import _ModelShape, _Scheduler

    from serving.frontend import Frontend
    from serving.http import Context
    from serving.http_app import create_app
    from serving.scheduler import QueueFull

    scheduler = _Scheduler()
    scheduler.refuse = QueueFull.of(1)
    frontend = Frontend("gpt2-tiny")
    frontend.load(_ModelShape(), scheduler, max_batch_size=4)
    app = create_app(Context(frontend, max_body_bytes=1 << 20, dialect="v1", body_timeout_s=10), max_requests=8)
    json_type = {"content-type": "application/json"}
    paths = ["/v1/completions", "/v1/chat/completions", f"/v2/models/{MODEL}/generate",
             f"/v2/models/{MODEL}/generate_stream", f"/v2/models/{MODEL}/infer"]
    bodies = [b'{"prompt": "a", "\\ud800": 1}', b'{"text_input": "a", "id": "a\\uDFFFb"}',
              b'{"inputs": [{"name": "\\udbff"}]}', b'{"prompt": "a", "user": "\xed\xa0\x80"}']
    with TestClient(app, raise_server_exceptions=False) as client:
        for path in paths:
            for body in bodies:
                r = client.post(path, content=body, headers=json_type)
                error = r.json()["error"]
                message = error["message"] if path.startswith("/v1/") else error
                assert (r.status_code, "not valid" in message) == (400, True), (path, body, r.text)
        emoji = b'"\\ud83d\\ude00"'
        for path, body in (("/v1/completions", b'{"prompt": %s, "max_tokens": 1}' % emoji),
                           (f"/v2/models/{MODEL}/generate", b'{"text_input": %s, "id": %s}' % (emoji, emoji))):
            r = client.post(path, content=body, headers=json_type)
            assert (r.status_code, "queue is full" in r.text) == (429, True), (path, r.text)


# ---- a large body is read off the event loop, in pieces, as json.loads reads it -----------------------------------
def _json_text(rng: random.Random, depth: int = 0) -> str:
    """A random JSON text as a client might write it: numbers in every form, strings whose escapes, commas and
    brackets are no structure, long runs of numbers, nesting, and JSON's four whitespace characters anywhere."""
    def ws():
        return "".join(rng.choice(" \t\n\r") for _ in range(rng.choice([0, 0, 1, 3])))

    def scalar():
        text = rng.choice(["a,b", "[x]", '{"y": 1}', 'q"q', "back\\slash", "\ud83d\ude00", "tab\tline\n", ""])
        return rng.choice([str(rng.randrange(-10**6, 10**6)), "-0", "0.5", "-1.25e-3", "3E+2", "1e400", "1" * 30,
                           "true", "false", "null", "NaN", "-Infinity", json.dumps(text), json.dumps(text)[1:-1]])

    kind = rng.random() if depth < 4 else 0
    if kind < 0.3:
        return scalar()
    if kind < 0.5:  # a long run of plain values, as a prompt of token ids or a tensor's data is
        return "[" + ws() + ("," + ws()).join(scalar() if rng.random() < 0.05 else str(rng.randrange(50257))
                                              for _ in range(rng.randrange(1, 400))) + ws() + "]"
    if kind < 0.75:
        items = [ws() + _json_text(rng, depth + 1) + ws() for _ in range(rng.randrange(0, 6))]
        return "[" + ",".join(items) + ws() + "]"
    keys = ["a", "b", "c", "d,e", "]"]  # a key may come twice: the last one counts
    members = [ws() + json.dumps(rng.choice(keys)) + ws() + ":" + ws() + _json_text(rng, depth + 1) + ws()
               for _ in range(rng.randrange(0, 6))]
    return "{" + ",".join(members) + ws() + "}"


def _mutated(rng: random.Random, text: str) -> str:
    """The text with one character taken out, put in or changed: often no JSON any more."""
    i = rng.randrange(len(text) + 1)
    c = rng.choice(',[]{}":  0-.eE\\x')
    return rng.choice([text[:i] + text[i + 1:], text[:i] + c + text[i:], text[:i] + c + text[i + 1:]])


def test_json_read_in_pieces_is_json_loads_and_takes_nothing_json_loads_refuses(monkeypatch):
    """`loads_in_pieces` gives what json.loads gives (types, key order and a key given twice included), and raises
    on every text json.loads refuses (json_object then reads it with json.loads, for the same error); pieces of a
    few characters put a piece's edge everywhere."""
    from serving import http

    monkeypatch.setattr(http, "PIECE_CHARS", 7)
    monkeypatch.setattr(http, "STEP_CHARS", 1)  # walk as many values as any text holds
    rng, taken, refused = random.Random(0), 0, 0
    for _ in range(600):
        valid = _json_text(rng)
        for text in [valid] + [_mutated(rng, valid) for _ in range(4)]:
            try:
                expected = json.dumps(json.loads(text))  # dumps: NaN equals itself, 1 is not 1.0, the order counts
            except (ValueError, RecursionError):
                with pytest.raises(Exception):
                    http.loads_in_pieces(text)
                refused += 1
                continue
            assert json.dumps(http.loads_in_pieces(text)) == expected, text
            taken += 1
    assert taken > 600 and refused > 1000  # both kinds were tried


LARGE = 1 << 20  # over http.THREADED_BYTES


@pytest.mark.parametrize("text, words", [
    ('{"prompt": [' + "1, " * LARGE, "not valid JSON: Expecting value"),  # cut short
    ('{"prompt": [' + "1, " * LARGE + "]}", "not valid JSON: Expecting value"),  # a comma before the ]
    ('{"prompt": [,' + "1, " * LARGE + "1]}", "not valid JSON: Expecting value"),
    ('{"prompt": [' + "1, " * LARGE + '1]} {"more": 1}', "not valid JSON: Extra data"),
    ('{"prompt": [' + "1, " * LARGE + "1 2]}", "not valid JSON: Expecting ',' delimiter"),
    ("[" * 4000 + " " * LARGE, "nests its JSON too deeply"),
    ('{"seed": 1' + "0" * 5000 + ', "prompt": [' + "1, " * LARGE + "1]}", "more than 4300 digits"),
    ('{"prompt": [' + "1, " * LARGE + '"a\\ud800"]}', "not valid Unicode text"),
    ("[" + "1, " * LARGE + "1]", "must be a JSON object, got list")])
def test_a_large_body_that_is_not_a_json_object_gets_the_error_a_small_one_gets(text, words):
    """The pieces give way to json.loads on whatever they do not take, so its error, position included, is the
    one answered."""
    from serving.frontend import RequestError
    from serving.http import json_object

    with pytest.raises(RequestError) as refused:
        json_object(text.encode())
    assert words in refused.value.message
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        assert refused.value.message == f"the request body is not valid JSON: {e}"
    except (RecursionError, ValueError):  # its own words, checked above
        pass


def test_a_large_body_of_small_values_past_the_walks_budget_is_read_whole():
    """Walking a value at a time costs more than json.loads for tiny ones: past its budget, json.loads reads it."""
    from serving import http

    text = json.dumps({"prompt": [[1], {"a": "b"}, "c"] * (LARGE // 8), "n": 1})
    with pytest.raises(ValueError, match="too many values"):
        http.loads_in_pieces(text)
    assert http.json_object(text.encode()) == json.loads(text)


def test_a_large_body_is_read_on_a_worker_thread_while_the_event_loop_runs(monkeypatch):
    """A 7 MB body read by one json.loads held the GIL, and so the event loop and every stream on it, until it
    was read (~0.1 s), on the loop's thread or on another: read in pieces on a worker thread, it lets the loop run
    between them."""
    from serving import http

    body = json.dumps({"prompt": list(range(10**6)), "stop": ["a"]}).encode()
    seen, real = {}, http._loads

    def reading(text):
        seen["thread"], seen["ticks at start"] = threading.current_thread(), seen["ticks"]
        try:
            return real(text)
        finally:
            seen["ticks while read"] = seen["ticks"] - seen["ticks at start"]

    monkeypatch.setattr(http, "_loads", reading)

    async def main():
        seen["ticks"] = 0
        task = asyncio.ensure_future(http.off_loop(len(body), http.json_object, body))
        while not task.done():  # another client's stream: a step each millisecond
            await asyncio.sleep(0.001)
            seen["ticks"] += 1
        return await task

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # the loop's thread gets the GIL at the first chance, between two pieces
    try:
        value = asyncio.run(main())
    finally:
        sys.setswitchinterval(old)
    assert value == json.loads(body)
    assert seen["thread"] is not threading.main_thread()
    assert seen["ticks while read"] >= 10, seen  # one json.loads: none (or one, just before it)


def _answering_app():
    """The HTTP app over a front end whose scheduler stand-in answers each request at once with tokens 7, 8, ..."""
    from test_frontend import _ModelShape, _Scheduler

    from serving.frontend import Frontend
    from serving.http import Context
    from serving.http_app import create_app
    from serving.request import Finished, Tokens

    class Answering(_Scheduler):
        def submit(self, requests):
            for r in requests:
                n = r.max_new_tokens
                r.put(Tokens(list(range(7, 7 + n)), [-0.5] * n))
                r.put(Finished("length"))

    frontend = Frontend("gpt2-tiny")
    frontend.load(_ModelShape(), Answering(), max_batch_size=4)
    return create_app(Context(frontend, max_body_bytes=1 << 20, dialect="v1", body_timeout_s=10), max_requests=8)


def test_every_door_answers_the_same_whether_a_body_is_read_on_the_event_loop_or_off_it(monkeypatch):
    """Read off the loop, in pieces (a threshold of 0 sends every body and answer there), each door gives what it
    gives reading on the loop: answers, streams, JSON and binary tensors, errors."""
    from starlette.testclient import TestClient

    from serving import http

    ids = np.array([[5, 6, 7]], np.uint32)
    binary = {"inputs": [{"name": n, "datatype": "UINT32", "shape": s, "parameters": {"binary_data_size": 4 * b}}
                         for n, s, b in zip(V1, ([1, 3], [1, 1], [1, 1]), (3, 1, 1))],
              "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}
    blob = ids.tobytes() + np.array([3, 4], np.uint32).tobytes()
    head = json.dumps(binary).encode()
    calls = [("/v1/completions", json.dumps({"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 3, "logprobs": 0}), {}),
             ("/v1/completions", json.dumps({"prompt": TEXT, "max_tokens": 2, "stream": True, "echo": True}), {}),
             ("/v1/completions", '{"prompt": [1, 2,, 3]}', {}),
             ("/v1/completions", '{"prompt": [1], "frequency": 1}', {}),
             ("/v1/chat/completions", '{"messages": []}', {}),
             (f"/v2/models/{MODEL}/generate", json.dumps({"text_input": TEXT, "max_tokens": 2, "id": "x"}), {}),
             (f"/v2/models/{MODEL}/generate_stream", json.dumps({"text_input": TEXT, "max_tokens": 2}), {}),
             (f"/v2/models/{MODEL}/generate", '{"text_input": "a", "max_tokens": 2]', {}),
             (*v1_json(rows=2), {}), (v1_json()[0], {**v1_json()[1], "parameters": {"binary_data_output": True}}, {}),
             (v1_json()[0], head + blob, {"Inference-Header-Content-Length": str(len(head))}),
             (v1_json()[0], '{"inputs": [{"name": "INPUT_ID", "datatype": "UINT32", "shape": [1, 2], "data": [5, 6]}]]',
              {})]
    read_on = []
    real = http._loads

    def reading(text):
        try:
            asyncio.get_running_loop()
            read_on.append("the loop")
        except RuntimeError:
            read_on.append("a worker thread")
        return real(text)

    monkeypatch.setattr(http, "_loads", reading)

    def answers(threshold: int):
        monkeypatch.setattr(http, "THREADED_BYTES", threshold)
        read_on.clear()
        out = []
        with TestClient(_answering_app()) as client:
            for path, body, headers in calls:
                content = body if isinstance(body, (str, bytes)) else json.dumps(body)
                r = client.post(path, content=content, headers={"content-type": "application/json", **headers})
                text = re.sub(r'"(id|created)": ?("cmpl-[0-9a-f]+"|\d+)', "", r.content.decode("latin-1"))
                out.append((path, r.status_code, r.headers.get("inference-header-content-length"), text))
        return out, set(read_on)

    on_loop, read_there = answers(1 << 30)
    assert read_there == {"the loop"}
    off_loop, read_there = answers(0)
    assert read_there == {"a worker thread"}
    assert off_loop == on_loop
    statuses = [status for _, status, _, _ in on_loop]
    assert statuses.count(200) == 7 and statuses.count(400) == 5, on_loop


@pytest.mark.parametrize("header", [{}, {"parameters": {"binary_data_output": True}},
                                    {"outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}],
                         ids=["json", "binary", "mixed"])
def test_json_tensors_written_a_piece_at_a_time_are_what_one_json_dumps_writes(monkeypatch, header):
    """One json.dumps of a large tensor holds the GIL until it is written, on any thread: an answer's values are
    written a few at a time (here 5), and the answer is still json.dumps's text, byte for byte."""
    from serving import kserve_http

    monkeypatch.setattr(kserve_http, "PIECE_VALUES", 5)
    logprobs = np.array([-0.5, np.nan, np.inf, -0.0, 1e-30, -3.25, 7.0] * 3, np.float32).reshape(3, 1, 7)
    outputs = {"OUTPUT0": np.arange(36, dtype=np.uint32).reshape(12, 3), "output_log_probs": logprobs,
               "sequence_length": np.zeros((0, 1), np.uint32), "cum_log_probs": np.array([[-1.5]], np.float32)}
    response = kserve_http.encode_outputs(header, outputs, {"model_name": MODEL, "model_version": "1", "id": 'a"é'})
    n = int(response.headers.get("inference-header-content-length", len(response.body)))
    head, blobs = response.body[:n].decode(), response.body[n:]
    answer = json.loads(head)
    assert json.dumps(answer) == head  # json.dumps's form: its separators, escapes and numbers
    assert (answer["model_name"], answer["id"]) == (MODEL, 'a"é')
    for t, (name, a) in zip(answer["outputs"], outputs.items(), strict=True):
        assert (t["name"], t["shape"]) == (name, list(a.shape))
        if "data" in t:
            np.testing.assert_array_equal(np.array(t["data"], a.dtype).reshape(a.shape), a)
        else:
            size = t["parameters"]["binary_data_size"]
            np.testing.assert_array_equal(np.frombuffer(blobs[:size], a.dtype).reshape(a.shape), a)
            blobs = blobs[size:]
    assert blobs == b""


def test_json_tensors_read_a_piece_at_a_time_are_what_one_numpy_call_makes(monkeypatch):
    """A large JSON tensor becomes an array a few values at a time (here 5), with the refusals of one call: a value
    outside an integer datatype, or past a float one's range, anywhere in it."""
    from serving import kserve_http
    from serving.frontend import RequestError

    monkeypatch.setattr(kserve_http, "PIECE_VALUES", 5)
    rows = [[i * 7 + j for j in range(7)] for i in range(3)]
    got = kserve_http._json_array(rows, "UINT32", [3, 7], "input_ids")
    assert got.dtype == np.uint32 and got.tolist() == rows
    floats = [0.5, -1.0, 3, 1e-30, 2.0, 7.25, -0.0, 1e38]
    np.testing.assert_array_equal(kserve_http._json_array(floats, "FP32", [8], "t"), np.array(floats, np.float32))
    assert kserve_http._json_array([], "UINT32", [0, 3], "input_ids").shape == (0, 3)
    for data, datatype, words in (([1] * 11 + [-1], "UINT32", "outside UINT32's range"),
                                  ([1.0] * 11 + [1e300], "FP32", "too large for FP32"),
                                  ([1.0] * 11 + [10**400], "FP32", "too large for FP32")):
        with pytest.raises(RequestError, match=words):
            kserve_http._json_array(data, datatype, [len(data)], "t")
