"""`gptjax serve`: the real server in a subprocess on localhost, driven by the native client and tritonclient.

One server (the default model, gpt2-tiny) is started for the whole module and stopped by the last test with
SIGTERM. Greedy tokens are checked against `gptjax generate --greedy --json --no-stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from gptjax.config import preset
from serving.client import Client
from serving.proto.gptjax.v1 import generator_pb2 as pb
from serving.proto.gptjax.v1 import generator_pb2_grpc as pb_grpc
from conftest import run_cli

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[464, 2068, 7586, 21831], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [50]]
N_NEW = 12
MODEL = "fastertransformer"
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args, env=None, port=None):
    """`gptjax serve --port PORT ARGS` in a subprocess."""
    port = port or free_port()
    log = open(os.environ.get("TMPDIR", "/tmp") + f"/gptjax-serve-{port}.log", "w+")
    if "--http-port" not in args:  # the gRPC port alone unless asked: test servers never share a fixed port
        args = (*args, "--http-port", "0", "--metrics-port", "0")
    proc = subprocess.Popen([sys.executable, "-m", "gptjax", "serve", "--port", str(port), *args], cwd=REPO,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=log, stderr=log)
    return proc, f"127.0.0.1:{port}", log


def wait_serving(proc, target, log, timeout=480):
    with Client(target) as client:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"server exited {proc.returncode}:\n{log.read()}")
            try:
                client.wait_ready(timeout=2)
                return
            except TimeoutError:
                pass
        log.seek(0)
        raise AssertionError(f"server not SERVING in {timeout} s:\n{log.read()}")


@contextlib.contextmanager
def running_server(*args):
    """`gptjax serve ARGS` started and SERVING -> (process, HOST:PORT); killed on the way out if still alive."""
    proc, target, log = start_server(*args)
    try:
        wait_serving(proc, target, log)
        yield proc, target
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server():
    with running_server() as served:
        yield served


@pytest.fixture(scope="module")
def target(server):
    return server[1]


@pytest.fixture(scope="module")
def reference():
    """Greedy new tokens of each prompt from `gptjax generate` (no server involved)."""
    args = ["generate", "--greedy", "--json", "--no-stop", "--max-new-tokens", str(N_NEW)]
    for p in PROMPTS:
        args += ["--prompt-ids", ",".join(map(str, p))]
    out = run_cli(*args, env={"JAX_PLATFORMS": "cpu"}).stdout.strip().splitlines()
    return [json.loads(line)["output_ids"] for line in out]


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def ft_inputs(ids, lengths, out_len, **extra):
    """FasterTransformer GPT request tensors, as FasterTransformer_backend's identity_test.py builds them."""
    def tensor(name, array, dtype):
        t = tritonclient_grpc.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    ids = np.asarray(ids)
    batch = ids.shape[0]
    tensors = [tensor("input_ids", ids.astype(np.uint32), "UINT32"),
               tensor("input_lengths", np.asarray(lengths, np.uint32).reshape(batch, 1), "UINT32"),
               tensor("request_output_len", np.full((batch, 1), out_len, np.uint32), "UINT32")]
    for name, (array, dtype) in extra.items():
        tensors.append(tensor(name, np.asarray(array), dtype))
    return tensors


def padded(prompts):
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.uint32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    return ids, [len(p) for p in prompts]


# ---- the generated modules --------------------------------------------------------------------------------
def test_generated_modules_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    from serving.proto import generate

    written = generate.generate(tmp_path)
    assert written
    for path in written:
        committed = generate.ROOT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run python -m serving.proto.generate"
        assert committed.read_text() == path.read_text(), \
            f"{committed} is stale: run python -m serving.proto.generate"


# ---- health, reflection, metadata -------------------------------------------------------------------------
def test_health_is_serving_and_reflection_lists_the_services(target):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gptjax.v1.Generator", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"gptjax.v1.Generator", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


WATCH_LIMIT_SCRIPT = """
import sys, threading
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving.config import ServerConfig
from serving.frontend import Frontend
from serving.server import Server

server = Server(Frontend("gpt2-tiny"), ServerConfig(port=0, http_port=0, metrics_port=0, max_client_streams=1),
                in_flight=2)
assert server.address.startswith("127.0.0.1:") and not server.address.endswith(":0"), server.address  # the port bound
with grpc.insecure_channel(server.address) as channel:
    health = health_pb2_grpc.HealthStub(channel)
    first = health.Watch(health_pb2.HealthCheckRequest())
    print("first", health_pb2.HealthCheckResponse.ServingStatus.Name(next(first).status))
    try:
        next(health.Watch(health_pb2.HealthCheckRequest()))
    except grpc.RpcError as e:
        print("second", e.code().name, e.details())
    # reflection draws on the other pool: the watch holding the only health permit leaves it free
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    print("reflection", len([s for r in replies for s in r.list_services_response.service]))
    first.cancel()
    for attempt in range(50):  # the permit comes back once the server has seen the cancel
        try:
            print("again", health_pb2.HealthCheckResponse.ServingStatus.Name(
                next(health.Watch(health_pb2.HealthCheckRequest(), timeout=5)).status))
            break
        except grpc.RpcError:
            threading.Event().wait(0.1)
server.grpc.stop(0)
"""


def test_health_watches_have_a_stream_limit_of_their_own():
    """Health watches need no API key and stay open as long as the client likes: past max_client_streams they
    are RESOURCE_EXHAUSTED, and they never take the permits of ModelStreamInfer or reflection. The server
    listens on port 0, the one the system picks, and reports it. (A process of its own: serving's KServe protos
    and tritonclient's can't share one descriptor pool.)"""
    proc = subprocess.run([sys.executable, "-c", WATCH_LIMIT_SCRIPT], cwd=REPO, timeout=120,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "first NOT_SERVING"
    assert lines[1] == "second RESOURCE_EXHAUSTED the server holds at most 1 open health Watch streams; retry later"
    assert lines[2] == "reflection 4"
    assert lines[3] == "again NOT_SERVING"


def test_model_info(client):
    info = client.model_info()
    assert (info.name, info.vocab_size, info.max_seq_len, info.n_layers, info.n_heads) == \
        ("gpt2-tiny", 50257, 256, 4, 8)
    assert info.max_slots == 8 and info.num_processes == 1


def test_triton_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    meta = triton.get_model_metadata(MODEL)
    assert {t.name for t in meta.inputs} >= {"input_ids", "input_lengths", "request_output_len"}
    assert {t.name for t in meta.outputs} == {"output_ids", "sequence_length", "cum_log_probs", "output_log_probs"}
    config = triton.get_model_config(MODEL).config
    assert config.name == MODEL and config.parameters["head_num"].string_value == "8"
    with pytest.raises(tritonclient_grpc.InferenceServerException, match="unknown model"):
        triton.get_model_metadata("gpt")


# ---- the same greedy tokens everywhere --------------------------------------------------------------------
def test_generate_matches_cli(client, reference):
    for prompt, want in zip(PROMPTS, reference):
        done = client.generate(prompt, N_NEW, temperature=0, ignore_eos=True, return_logprobs=True)
        assert done.token_ids == want
        assert done.prompt_ids == prompt and done.finish_reason == "length"
        assert len(done.logprobs) == N_NEW and all(lp <= 0 for lp in done.logprobs)


def test_generate_from_text(client):
    done = client.generate("Once upon a time", 5, temperature=0, ignore_eos=True)
    assert done.prompt_ids == [7454, 2402, 257, 640]
    assert len(done.token_ids) == 5 and done.text


def test_stream_matches_cli(client, reference):
    pieces = list(client.stream(PROMPTS[0], N_NEW, temperature=0, ignore_eos=True))
    assert len(pieces) >= 2
    assert [t for p in pieces for t in p.token_ids] == reference[0]
    assert pieces[0].prompt_ids == PROMPTS[0] and all(not p.prompt_ids for p in pieces[1:])
    assert [p.finish_reason for p in pieces] == [""] * (len(pieces) - 1) + ["length"]
    assert "".join(p.text for p in pieces) == client.generate(PROMPTS[0], N_NEW, temperature=0, ignore_eos=True).text


def test_triton_infer_matches_cli(triton, reference):
    """tritonclient with the FasterTransformer tensor names: the prompt, then the same greedy tokens."""
    ids, lengths = padded(PROMPTS)
    width = ids.shape[1]
    batch = len(PROMPTS)
    extra = dict(runtime_top_k=(np.ones((batch, 1), np.uint32), "UINT32"),
                 runtime_top_p=(np.zeros((batch, 1), np.float32), "FP32"),
                 temperature=(np.ones((batch, 1), np.float32), "FP32"),
                 len_penalty=(np.ones((batch, 1), np.float32), "FP32"),
                 repetition_penalty=(np.ones((batch, 1), np.float32), "FP32"),
                 random_seed=(np.zeros((batch, 1), np.uint64), "UINT64"),
                 is_return_log_probs=(np.ones((batch, 1), bool), "BOOL"),
                 beam_width=(np.ones((batch, 1), np.uint32), "UINT32"),
                 end_id=(np.full((batch, 1), 50255, np.uint32), "UINT32"),  # a token these never produce
                 bad_words_list=(np.array([[[0], [-1]]] * batch, np.int32), "INT32"),
                 stop_words_list=(np.array([[[0], [-1]]] * batch, np.int32), "INT32"))
    result = triton.infer(MODEL, ft_inputs(ids, lengths, N_NEW, **extra))
    out = result.as_numpy("output_ids")
    assert out.shape == (batch, 1, width + N_NEW) and out.dtype == np.uint32
    seq = result.as_numpy("sequence_length")
    for i, (prompt, want) in enumerate(zip(PROMPTS, reference)):
        assert seq[i, 0] == len(prompt) + N_NEW
        assert out[i, 0, : seq[i, 0]].tolist() == prompt + want
        assert (out[i, 0, seq[i, 0]:] == 50255).all()  # padded with end_id
    logprobs = result.as_numpy("output_log_probs")
    assert logprobs.shape == (batch, 1, N_NEW)
    np.testing.assert_allclose(result.as_numpy("cum_log_probs")[:, 0], logprobs.sum(-1)[:, 0], rtol=1e-5)


def test_triton_v1_dialect_matches_cli(triton, reference):
    """The 2021 backend's tensors (INPUT_ID, REQUEST_INPUT_LEN, REQUEST_OUTPUT_LEN -> OUTPUT0, time-major): the
    prompt, then the same greedy tokens (the server's default sampling, top_k 0 and top-p off, is FasterTransformer's
    greedy), stopping at end-of-text and padded with it."""
    ids, lengths = padded(PROMPTS)
    inputs = []
    for name, array in (("INPUT_ID", ids), ("REQUEST_INPUT_LEN", np.array(lengths, np.uint32)[:, None]),
                        ("REQUEST_OUTPUT_LEN", np.full((len(PROMPTS), 1), N_NEW, np.uint32))):
        inputs.append(tritonclient_grpc.InferInput(name, list(array.shape), "UINT32"))
        inputs[-1].set_data_from_numpy(array)
    out = triton.infer(MODEL, inputs).as_numpy("OUTPUT0")
    assert out.shape == (len(PROMPTS), ids.shape[1] + N_NEW) and out.dtype == np.uint32
    rows = out.reshape(-1, len(PROMPTS)).T  # time-major, read as the 2021 tools read it
    for row, prompt, want in zip(rows.tolist(), PROMPTS, reference):
        if 50256 in want:
            want = want[: want.index(50256) + 1]
        assert row == prompt + want + [50256] * (len(row) - len(prompt) - len(want))


def test_triton_stream_infer(triton, reference):
    results = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        ids, lengths = padded(PROMPTS[:1])
        triton.async_stream_infer(MODEL, ft_inputs(ids, lengths, N_NEW))
        result, error = results.get(timeout=60)
    finally:
        triton.stop_stream()
    assert error is None
    assert result.as_numpy("output_ids")[0, 0].tolist()[: len(PROMPTS[0]) + N_NEW] == PROMPTS[0] + reference[0]


def test_stop_tokens(client, reference):
    want = reference[0]
    stop = want[3]
    done = client.generate(PROMPTS[0], N_NEW, temperature=0, stop_token_ids=[stop])
    assert done.token_ids == want[: want.index(stop) + 1] and done.finish_reason == "stop"


def test_sampling_is_reproducible(client):
    kwargs = dict(temperature=0.9, top_k=50, top_p=0.95, seed=7, ignore_eos=True)
    first = client.generate(PROMPTS[0], 8, **kwargs).token_ids
    assert client.generate(PROMPTS[0], 8, **kwargs).token_ids == first
    assert [t for p in client.stream(PROMPTS[0], 8, **kwargs) for t in p.token_ids] == first


def test_client_command(target, reference):
    proc = run_cli("client", "--server", target, "--prompt-ids", ",".join(map(str, PROMPTS[0])),
                   "--max-new-tokens", str(N_NEW), "--json")
    out = json.loads(proc.stdout)
    assert out["prompt_ids"] == PROMPTS[0]
    # the default stop at end-of-text: the same tokens unless end-of-text came first
    assert out["output_ids"] == reference[0][: len(out["output_ids"])]
    bad = run_cli("client", "--server", target, "--prompt-ids", "1,2", "--top-p", "2", check=False)
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "top_p" in bad.stderr


def test_the_python_client_sends_what_the_server_takes():
    """A negative seed goes as its unsigned 64-bit form (the server uses seeds modulo 2**32, as the engine does);
    a float token id is refused, not cut to an integer."""
    from serving.client import make_request

    assert make_request([1, np.int64(2)], 2, seed=-1).sampling.seed == 2**64 - 1
    assert list(make_request([1, np.int64(2)], 2).token_ids.ids) == [1, 2]
    with pytest.raises(ValueError, match="prompt token ids must be integers, got 464.9"):
        make_request([464.9, 2068], 2)


def test_the_python_client_names_a_value_its_request_can_not_hold():
    """protobuf's "Value out of range: 99999999999" named no field (`gptjax client --max-new-tokens ...`), and a seed
    past 64 bits went as another seed (modulo 2**64)."""
    from serving.client import make_request

    for kwargs, words in [(dict(max_new_tokens=99999999999), "max_new_tokens: Value out of range"),
                          (dict(top_k=2**40), "top_k: Value out of range"),
                          (dict(stop_token_ids=[2**40]), "stop_token_ids: Value out of range"),
                          (dict(prompt=[1, 2**40]), "prompt token ids: Value out of range"),
                          (dict(seed=2**64), "seed must fit in 64 bits, got 18446744073709551616"),
                          (dict(seed=-2**63 - 1), "seed must fit in 64 bits")]:
        with pytest.raises(ValueError, match=words):
            make_request(**{"prompt": [1, 2], **kwargs})
    assert make_request([1], seed=2**64 - 1).sampling.seed == make_request([1], seed=-1).sampling.seed


SERVER_LIMITS_SCRIPT = """
from serving.config import ServerConfig
from serving.frontend import Frontend
from serving.server import Server

server = Server(Frontend("gpt2-tiny"), ServerConfig(port=0, http_port=0, metrics_port=0), in_flight=2**40)
print("listening", server.address != "127.0.0.1:0")
server.grpc.stop(0)
"""


def test_a_queue_past_grpcs_stream_limit_still_starts():
    """[scheduler] max_queued_requests (with the slots) sets gRPC's streams per connection, a C int: past 2**31 - 1
    the start ended in an OverflowError traceback. (A process of its own, as the health watch test says why.)"""
    proc = subprocess.run([sys.executable, "-c", SERVER_LIMITS_SCRIPT], cwd=REPO, timeout=120, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["listening True"], proc.stderr


@pytest.mark.parametrize("flags", [[], ["--no-tritonclient"]])
def test_identity_test_benchmark(target, flags):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "identity_test.py"), "-i", "grpc", "--dialect",
                           "5.x", "-b", "2", "-s", "8", "-o", "4", "-n", "2", "-u", target, "--json", *flags],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert (row["batch"], row["input_len"], row["output_len"], row["runs"]) == (2, 8, 4, 2)
    assert row["latency_ms"] > 0 and row["tokens_per_s"] > 0


@pytest.mark.parametrize("api", ["triton", "native"])
def test_bench_through_the_server(target, api):
    """`gptjax bench --server` times the server's answers (a KServe batch, or a native call per row); it builds
    no engine of its own (the server's is it)."""
    out = run_cli("bench", "--server", target, "--server-api", api, "--shapes", "2,8,4", "-n", "2", "--json",
                  env={"JAX_PLATFORMS": "cpu"}).stdout.strip().splitlines()
    (row,) = [json.loads(line) for line in out]
    assert row["impl"] == "gptjax-server" and (row["batch"], row["input_len"], row["output_len"]) == (2, 8, 4)
    assert row["latency_ms"] > 0 and row["tokens_per_s"] > 0 and row["floor_ms"] > 0
    assert row["extra"]["server_api"] == api
    assert row["extra"]["model_params"] == preset("gpt2-tiny").num_params()  # the served model's floor


def test_bench_through_the_server_refuses_another_models_floor(target):
    proc = run_cli("bench", "--server", target, "--model", "gpt2-124m", "--shapes", "2,8,4", "-n", "1", check=False,
                   env={"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and "runs gpt2-tiny, not this model: n_layers 12 (the server's: 4)" in proc.stderr


# ---- bad requests: a clear status, never INTERNAL, and the server keeps serving ---------------------------
BAD_NATIVE = {
    "token id >= vocab": (dict(prompt=[1, 50257]), INVALID, "vocabulary"),
    "negative token id": (dict(prompt=[-1]), INVALID, "vocabulary"),
    "empty prompt ids": (dict(prompt=[]), INVALID, "empty"),
    "empty text": (dict(prompt=""), INVALID, "empty"),
    "negative max_new_tokens": (dict(prompt=[1], max_new_tokens=-3), INVALID, "max_new_tokens"),
    "zero max_new_tokens": (dict(prompt=[1], max_new_tokens=0), INVALID, "max_new_tokens"),
    "huge max_new_tokens": (dict(prompt=[1], max_new_tokens=2**31 - 1), EXHAUSTED, "max_new_tokens"),
    "prompt longer than the model": (dict(prompt=[1] * 300, max_new_tokens=1), INVALID, "positions"),
    "prompt + new tokens too long": (dict(prompt=[1] * 250, max_new_tokens=10), INVALID, "positions"),
    "top_p > 1": (dict(prompt=[1], top_p=1.5), INVALID, "top_p"),
    "top_p = 0": (dict(prompt=[1], top_p=0.0), INVALID, "top_p"),
    "NaN temperature": (dict(prompt=[1], temperature=float("nan")), INVALID, "temperature"),
    "negative temperature": (dict(prompt=[1], temperature=-1.0), INVALID, "temperature"),
    "infinite top_p": (dict(prompt=[1], top_p=float("inf")), INVALID, "top_p"),
    "negative top_k": (dict(prompt=[1], top_k=-1), INVALID, "top_k"),
    "stop token outside the vocabulary": (dict(prompt=[1], stop_token_ids=[60000]), INVALID, "stop_token_ids"),
}


@pytest.mark.parametrize("case", list(BAD_NATIVE))
def test_bad_native_request(client, case):
    kwargs, code, word = BAD_NATIVE[case]
    prompt = kwargs.pop("prompt")
    kwargs.setdefault("max_new_tokens", 4)
    for call in (client.generate, lambda *a, **k: list(client.stream(*a, **k))):
        err = rpc_error(call, prompt, **dict(kwargs))
        assert err.code() == code, (case, err.code(), err.details())
        assert word in err.details()
    assert len(client.generate([1, 2], 2, temperature=0, ignore_eos=True).token_ids) == 2


def test_request_without_prompt(target):
    with grpc.insecure_channel(target) as channel:
        err = rpc_error(pb_grpc.GeneratorStub(channel).Generate, pb.GenerateRequest(max_new_tokens=2))
    assert err.code() == INVALID and "prompt" in err.details()


def test_message_over_the_limit(client):
    err = rpc_error(client.generate, "x" * (17 * 1024 * 1024), 1)
    assert err.code() == EXHAUSTED


def _triton_bad(name):
    one = np.array([[1, 2, 3]], np.uint32)
    base = lambda **extra: ft_inputs(one, [3], 2, **extra)
    t = tritonclient_grpc.InferInput
    if name == "missing input":
        return base()[:2], INVALID, "request_output_len"
    if name == "wrong type":
        x = t("input_ids", [1, 3], "FP32")
        x.set_data_from_numpy(np.ones((1, 3), np.float32))
        return [x] + base()[1:], INVALID, "input_ids must be"
    if name == "mismatched batch":
        x = t("input_lengths", [2, 1], "UINT32")
        x.set_data_from_numpy(np.array([[3], [3]], np.uint32))
        return [base()[0], x, base()[2]], INVALID, "batch"
    if name == "length beyond the row":
        return ft_inputs(one, [4], 2), INVALID, "input_lengths"
    if name == "zero length":
        return ft_inputs(one, [0], 2), INVALID, "input_lengths"
    if name == "token id >= vocab":
        return ft_inputs(np.array([[1, 60000]], np.uint32), [2], 2), INVALID, "vocabulary"
    if name == "huge output len":
        return ft_inputs(one, [3], 100000), EXHAUSTED, "request_output_len"
    if name == "output past the model":
        return ft_inputs(one, [3], 255), INVALID, "positions"
    if name == "top_p > 1":
        return base(runtime_top_p=(np.full((1, 1), 1.5, np.float32), "FP32")), INVALID, "runtime_top_p"
    if name == "NaN temperature":
        return base(temperature=(np.full((1, 1), np.nan, np.float32), "FP32")), INVALID, "temperature"
    if name == "repetition penalty":
        return base(repetition_penalty=(np.full((1, 1), 1.2, np.float32), "FP32")), INVALID, "repetition_penalty"
    if name == "bad words":
        return base(bad_words_list=(np.array([[[5], [1]]], np.int32), "INT32")), INVALID, "bad_words_list"
    if name == "multi-token stop word":
        return base(stop_words_list=(np.array([[[5, 6], [2, -1]]], np.int32), "INT32")), INVALID, "stop_words_list"
    if name == "beam search":
        return base(beam_width=(np.full((1, 1), 4, np.uint32), "UINT32")), INVALID, "beam"
    if name == "unknown input":
        return base(prompt_learning_task_name_ids=(np.zeros((1, 1), np.uint32), "UINT32")), INVALID, "unknown input"
    if name == "batch over the limit":
        ids = np.ones((65, 3), np.uint32)
        return ft_inputs(ids, [3] * 65, 2), EXHAUSTED, "batch"
    raise KeyError(name)


BAD_TRITON = ["missing input", "wrong type", "mismatched batch", "length beyond the row", "zero length",
              "token id >= vocab", "huge output len", "output past the model", "top_p > 1", "NaN temperature",
              "repetition penalty", "bad words", "multi-token stop word", "beam search", "unknown input",
              "batch over the limit"]


@pytest.mark.parametrize("case", BAD_TRITON)
def test_bad_triton_request(triton, case):
    inputs, code, word = _triton_bad(case)
    with pytest.raises(tritonclient_grpc.InferenceServerException) as info:
        triton.infer(MODEL, inputs)
    assert info.value.status() == f"StatusCode.{code.name}", (case, info.value.message())
    assert word in info.value.message()
    ids, lengths = padded(PROMPTS[:1])
    assert triton.infer(MODEL, ft_inputs(ids, lengths, 2)).as_numpy("sequence_length")[0, 0] == len(PROMPTS[0]) + 2


def test_triton_unknown_model(triton):
    with pytest.raises(tritonclient_grpc.InferenceServerException) as info:
        triton.infer("gpt", ft_inputs(np.array([[1, 2]]), [2], 2))
    assert info.value.status() == "StatusCode.NOT_FOUND" and "unknown model" in info.value.message()


# ---- load: continuous batching under concurrent clients ---------------------------------------------------
def test_mixed_concurrent_requests(target, reference):
    """256 requests (unary, streaming, KServe) from 32 clients: every one answered in full, greedy ones exact."""
    n_clients, n_requests = 32, 256
    jobs = queue.Queue()
    rng = random.Random(0)
    for i in range(n_requests):
        jobs.put((i, ("unary", "stream", "triton")[i % 3], rng.randrange(len(PROMPTS)), rng.choice([1, 3, 8, 12])))
    failures, done = [], []

    def worker():
        client = Client(target)
        triton = tritonclient_grpc.InferenceServerClient(target)
        try:
            while True:
                try:
                    i, kind, p, n = jobs.get_nowait()
                except queue.Empty:
                    return
                prompt, want = PROMPTS[p], reference[p][:n]
                try:
                    if kind == "unary":
                        got = client.generate(prompt, n, temperature=0, ignore_eos=True, timeout=120).token_ids
                    elif kind == "stream":
                        got = [t for piece in client.stream(prompt, n, temperature=0, ignore_eos=True, timeout=120)
                               for t in piece.token_ids]
                    else:
                        ids, lengths = padded([prompt])
                        r = triton.infer(MODEL, ft_inputs(ids, lengths, n), client_timeout=120)
                        got = r.as_numpy("output_ids")[0, 0, len(prompt): r.as_numpy("sequence_length")[0, 0]].tolist()
                    if got != want:
                        failures.append((i, kind, got, want))
                    done.append(i)
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    failures.append((i, kind, repr(e)))
        finally:
            client.close()
            triton.close()

    threads = [threading.Thread(target=worker) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures[:5]
    assert sorted(done) == list(range(n_requests))


def _wait_idle(client, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = client.model_info()
        if info.active_requests == 0 and info.queued_requests == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"slots still busy: {client.model_info()}")


def test_cancelled_stream_frees_its_slot(client, reference):
    """Fill every slot with long streams, cancel each half-way: the slots free at once, and a request runs."""
    streams = [client.stream(PROMPTS[0], 240, temperature=0, ignore_eos=True) for _ in range(8)]
    for s in streams:
        next(s)
        next(s)
    assert client.model_info().active_requests >= 1
    for s in streams:
        s.close()  # cancels the call
    _wait_idle(client)
    assert client.generate(PROMPTS[0], N_NEW, temperature=0, ignore_eos=True, timeout=30).token_ids == reference[0]


def test_deadline_frees_its_slot(client):
    err = rpc_error(client.generate, PROMPTS[0], 240, temperature=0, ignore_eos=True, timeout=0.3)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(client)


# ---- last: SIGTERM drains in-flight requests, then the server exits 0 -------------------------------------
def test_sigterm_drains_then_exits_zero(server, reference):
    proc, target = server
    with Client(target) as client:
        stream = client.stream(PROMPTS[0], 200, temperature=0, ignore_eos=True)
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        tokens = first.token_ids + [t for p in rest for t in p.token_ids]
        assert len(tokens) == 200 and tokens[:N_NEW] == reference[0]
        assert rest[-1].finish_reason == "length"
    assert proc.wait(timeout=60) == 0
