"""Hardening, against the real server (gpt2-tiny on CPU): values at the bounds of their wire types, idle
streams, a large text, expired queued requests, bytes that do not parse, a port in use, a second signal.

One server for the module: the default 8 slots (the programs test_serving's server compiled) and a queue of
16 (so that 16 expired requests would fill it), a 2 s idle time for streams, the FasterTransformer v1 dialect
declared (model metadata describes it). The last test stops it with two signals.
"""

from __future__ import annotations

import queue
import signal
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import run_cli
from serving.client import Client, make_request
from serving.proto.gptjax.v1 import generator_pb2_grpc as pb_grpc
from serving.rpc import IdleStreams
from test_serving import MODEL, _wait_idle, ft_inputs, padded, rpc_error, running_server, tritonclient_grpc
# tritonclient's copy of the KServe messages (ours and its share the descriptor pool's names: one per process)
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
IDLE_S = 2.0
SLOTS = 8
PROMPT = [464, 2068, 7586, 21831]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = tmp_path_factory.mktemp("hardening") / "server.toml"
    config.write_text(f'[scheduler]\nmax_queued_requests = 16\n\n[server]\ndialect = "v1"\n'
                      f'stream_idle_timeout_s = {IDLE_S}\nmax_client_streams = 320\n')
    with running_server("--config", str(config)) as served:
        yield served


@pytest.fixture(scope="module")
def target(server):
    return server[1]


def still_serving(client) -> None:
    done = client.generate(PROMPT, 2, temperature=0, ignore_eos=True, timeout=30)
    assert len(done.token_ids) == 2


def tensor(name, array, datatype):
    t = tritonclient_grpc.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


# ---- values at the bounds of their wire types --------------------------------------------------------------
U32, I32, U64, I64, F32 = np.uint32, np.int32, np.uint64, np.int64, np.float32
KSERVE_BOUNDS = {  # name: (value, numpy type, datatype, expected code or None for an answer)
    "runtime_top_k 2^31": ("runtime_top_k", 2**31, U32, "UINT32", INVALID),
    "runtime_top_k uint32 max": ("runtime_top_k", 2**32 - 1, U32, "UINT32", INVALID),
    "runtime_top_k int32 min": ("runtime_top_k", -(2**31), I32, "INT32", INVALID),
    "runtime_top_k int32 max": ("runtime_top_k", 2**31 - 1, I32, "INT32", None),
    "random_seed uint64 max": ("random_seed", 2**64 - 1, U64, "UINT64", None),
    "random_seed int64 min": ("random_seed", -(2**63), I64, "INT64", None),
    "end_id uint32 max": ("end_id", 2**32 - 1, U32, "UINT32", None),  # no model makes it: never stops
    "end_id int32 min": ("end_id", -(2**31), I32, "INT32", INVALID),
    "input_lengths uint32 max": ("input_lengths", 2**32 - 1, U32, "UINT32", INVALID),
    "request_output_len uint32 max": ("request_output_len", 2**32 - 1, U32, "UINT32", EXHAUSTED),
    "request_output_len int32 min": ("request_output_len", -(2**31), I32, "INT32", INVALID),
    "runtime_top_p float32 max": ("runtime_top_p", np.finfo(F32).max, F32, "FP32", INVALID),
    "runtime_top_p smallest subnormal": ("runtime_top_p", np.finfo(F32).smallest_subnormal, F32, "FP32", None),
    "temperature float32 max": ("temperature", np.finfo(F32).max, F32, "FP32", None),
    "temperature -inf": ("temperature", -np.inf, F32, "FP32", INVALID),
    "min_length uint32 max": ("min_length", 2**32 - 1, U32, "UINT32", INVALID),
    "beam_width 0": ("beam_width", 0, U32, "UINT32", INVALID),
    "start_id uint32 max": ("start_id", 2**32 - 1, U32, "UINT32", None),  # no effect without beam search
}


@pytest.mark.parametrize("case", list(KSERVE_BOUNDS))
def test_kserve_values_at_their_type_bounds(triton, client, case):
    name, value, np_type, datatype, code = KSERVE_BOUNDS[case]
    base = {t.name(): t for t in ft_inputs([PROMPT], [len(PROMPT)], 2)}
    base[name] = tensor(name, np.array([[value]], np_type), datatype)
    if code is None:
        out = triton.infer(MODEL, list(base.values()), client_timeout=60)
        assert out.as_numpy("sequence_length")[0, 0] == len(PROMPT) + 2
    else:
        with pytest.raises(tritonclient_grpc.InferenceServerException) as info:
            triton.infer(MODEL, list(base.values()), client_timeout=60)
        assert info.value.status() == f"StatusCode.{code.name}", info.value.message()
        assert name in info.value.message()
    still_serving(client)


def test_kserve_token_and_stop_word_bounds(triton, client):
    cases = [ft_inputs(np.array([[2**32 - 1]], np.uint32), [1], 2),
             ft_inputs([PROMPT], [4], 2, stop_words_list=(np.array([[[-(2**31)], [1]]], np.int32), "INT32")),
             ft_inputs([PROMPT], [4], 2, stop_words_list=(np.array([[[2**31 - 1], [1]]], np.int32), "INT32")),
             ft_inputs([PROMPT], [4], 2, stop_words_list=(np.array([[[5, 6], [2, 1]]], np.int32), "INT32"))]
    words = ["vocabulary", "stop_words_list[0] tokens[0] = -2147483648", "vocabulary", "offsets must not decrease"]
    for inputs, word in zip(cases, words):
        with pytest.raises(tritonclient_grpc.InferenceServerException) as info:
            triton.infer(MODEL, inputs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and word in info.value.message()
    still_serving(client)


def test_native_values_at_their_type_bounds(client):
    assert len(client.generate(PROMPT, 2, top_k=2**31 - 1, seed=2**64 - 1, temperature=3.4e38,
                               ignore_eos=True).token_ids) == 2
    for kwargs, code, word in [(dict(max_new_tokens=2**31 - 1), EXHAUSTED, "max_new_tokens"),
                               (dict(max_new_tokens=-(2**31)), INVALID, "max_new_tokens"),
                               (dict(top_k=-(2**31)), INVALID, "top_k"),
                               (dict(stop_token_ids=[-(2**31)]), INVALID, "stop_token_ids"),
                               (dict(stop_token_ids=[2**31 - 1]), INVALID, "stop_token_ids"),
                               (dict(temperature=float("inf")), INVALID, "temperature")]:
        kwargs.setdefault("max_new_tokens", 2)
        err = rpc_error(client.generate, PROMPT, **kwargs)
        assert err.code() == code and word in err.details(), (kwargs, err.details())
    still_serving(client)


def test_float32s_largest_temperature_keeps_top_p_on_both_grpc_apis(triton, client):
    """At 3.4e38 logits / temperature underflowed to ties at 0, and top-p (top-k too) kept every token: a nucleus
    of 1e-9 of the mass drew from the whole vocabulary. It is its most likely token: the greedy tokens."""
    greedy = client.generate(PROMPT, 4, temperature=0, ignore_eos=True).token_ids
    hot = client.generate(PROMPT, 4, temperature=3.4e38, top_p=1e-9, seed=5, ignore_eos=True).token_ids
    assert hot == greedy
    inputs = ft_inputs([PROMPT], [len(PROMPT)], 4, temperature=(np.array([[3.4e38]], F32), "FP32"),
                       runtime_top_p=(np.array([[1e-9]], F32), "FP32"), end_id=(np.array([[2**32 - 1]], U32), "UINT32"))
    out = triton.infer(MODEL, inputs, client_timeout=60)
    assert out.as_numpy("output_ids")[0, 0, len(PROMPT):].tolist() == greedy


# ---- bytes that do not parse ------------------------------------------------------------------------------
def test_undecodable_bytes_are_invalid_argument(target, client):
    bad_utf8 = b"\x0a\x02\xff\xfe"  # GenerateRequest.text (field 1) = two bytes that are not UTF-8
    with grpc.insecure_channel(target) as channel:
        for method, payload in [("/gptjax.v1.Generator/Generate", bad_utf8),
                                ("/gptjax.v1.Generator/Generate", b"\xff\xff\xff\xff"),
                                ("/gptjax.v1.Generator/GetModelInfo", b"\x0a"),
                                ("/inference.GRPCInferenceService/ModelInfer", bad_utf8),
                                ("/grpc.health.v1.Health/Check", bad_utf8)]:
            err = rpc_error(channel.unary_unary(method), payload, timeout=30)
            assert err.code() == INVALID and "do not parse" in err.details(), (method, err.code(), err.details())
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        replies = stream(iter([bad_utf8]), timeout=30)
        (reply,) = [kpb.ModelStreamInferResponse.FromString(r) for r in replies]
        assert reply.error_message.startswith("INVALID_ARGUMENT") and "do not parse" in reply.error_message
    still_serving(client)


# ---- idle streams -----------------------------------------------------------------------------------------
def test_idle_streams_lock_no_one_out_and_are_closed(target, client):
    """300 ModelStreamInfer streams that send nothing, over 20 connections: health and Generate answer within
    5 s, and the server closes every idle stream after its idle time."""
    # channels of one process share a connection unless told not to: 20 connections of 15 streams each
    channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(20)]
    never = threading.Event()
    ended = queue.Queue()

    def hold(stub):
        start = time.monotonic()
        try:
            list(stub.ModelStreamInfer(iter(never.wait, True), timeout=60))
            ended.put((None, time.monotonic() - start))
        except grpc.RpcError as e:
            ended.put((e.code(), time.monotonic() - start))

    threads = [threading.Thread(target=hold, args=(kpb_grpc.GRPCInferenceServiceStub(channels[i % 20]),), daemon=True)
               for i in range(300)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        start = time.monotonic()
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert len(client.generate(PROMPT, 2, temperature=0, ignore_eos=True, timeout=5).token_ids) == 2
        assert client.model_info(timeout=5).max_slots == SLOTS
        assert time.monotonic() - start < 5
        for t in threads:
            t.join(timeout=IDLE_S + 20)
        results = [ended.get_nowait() for _ in range(300)]
    finally:
        never.set()
        for c in channels:
            c.close()
    assert {code for code, _ in results} == {grpc.StatusCode.UNAVAILABLE}
    assert all(IDLE_S - 0.5 < took < IDLE_S + 10 for _, took in results), sorted(took for _, took in results)[::50]


def test_idle_time_counts_only_while_none_of_the_streams_requests_runs():
    """A stream waiting for its client with a request running is not idle; its idle time starts when the last
    request ends."""
    closed = threading.Event()

    class Context:  # without grpc's internals the stream is closed by context.cancel()
        def cancel(self):
            closed.set()

    idle, context = IdleStreams(0.3), Context()
    idle.request_started(context)
    with idle.waiting(context):
        assert not closed.wait(1.2)
        idle.request_ended(context)
        start = time.monotonic()
        assert closed.wait(3.0) and time.monotonic() - start > 0.25


def test_a_busy_stream_is_not_idle(triton, client):
    """A ModelStreamInfer stream that sends a request more often than the idle time stays open."""
    results = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put(error))
    try:
        for _ in range(3):
            triton.async_stream_infer(MODEL, ft_inputs([PROMPT], [4], 2))
            assert results.get(timeout=30) is None
            time.sleep(IDLE_S * 0.6)
    finally:
        triton.stop_stream()


def stream_request(out_len: int, request_id: str = "") -> kpb.ModelInferRequest:
    """An FT request for exactly `out_len` new tokens (no token ends it early)."""
    req = kpb.ModelInferRequest(model_name=MODEL, id=request_id)
    for name, a in (("input_ids", np.array([PROMPT], np.uint32)), ("input_lengths", np.array([[4]], np.uint32)),
                    ("request_output_len", np.array([[out_len]], np.uint32)),
                    ("end_id", np.array([[2**32 - 1]], np.uint32))):
        req.inputs.add(name=name, datatype="UINT32", shape=list(a.shape))
        req.raw_input_contents.append(a.tobytes())
    return req


def _active_reaches(client, n: int, within_s: float = 30) -> bool:
    deadline = time.monotonic() + within_s
    while client.model_info().active_requests < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return client.model_info().active_requests >= n


def test_a_model_stream_answers_request_after_request_and_a_cancel_leaves_no_slot_taken(target, client):
    """A ModelStreamInfer stream answers one request after another on the same call; cancelled while its
    latest runs, the slot that request held is free again and the server keeps serving."""
    sends = queue.Queue()
    with grpc.insecure_channel(target) as channel:
        stream = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(sends.get, None))
        for _ in range(5):
            sends.put(stream_request(2))
            reply = next(stream)
            assert not reply.error_message and len(reply.infer_response.raw_output_contents) > 0
        sends.put(stream_request(240))
        assert _active_reaches(client, 1)
        stream.cancel()
        _wait_idle(client)  # the long request gave its slot back
    still_serving(client)


def test_a_model_streams_requests_run_side_by_side_and_are_answered_in_order(target, client):
    """Requests sent on one ModelStreamInfer stream run at once, and their responses come back in the order they
    were sent: the long one's first, each with its own id and length; the stream then ends cleanly."""
    _wait_idle(client)
    with grpc.insecure_channel(target) as channel:
        requests = [stream_request(240, "long"), stream_request(120, "shorter"), stream_request(3, "short")]
        sends = queue.Queue()
        replies = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(sends.get, None), timeout=60)
        for r in requests:
            sends.put(r)
        assert _active_reaches(client, 2)  # the second runs beside the first
        sends.put(None)
        got = list(replies)
    assert [r.infer_response.id for r in got] == ["long", "shorter", "short"]
    for reply, want in zip(got, (240, 120, 3)):
        assert not reply.error_message
        outputs = dict(zip((o.name for o in reply.infer_response.outputs), reply.infer_response.raw_output_contents))
        assert np.frombuffer(outputs["sequence_length"], np.uint32).tolist() == [4 + want]
    still_serving(client)


# ---- a large text ----------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_large_text_is_refused_at_once_and_stalls_no_one(server, client):
    proc, target = server
    still_serving(client)
    before = rss_bytes(proc.pid)
    errors = queue.Queue()

    text = make_request("The quick brown fox. " * 400_000, 1)  # 8.4 MB

    def big():
        with Client(target) as c:
            c.wait_ready(timeout=10)
            start = time.monotonic()
            err = rpc_error(c.stub.Generate, text, timeout=30)
            errors.put((err, time.monotonic() - start))

    threads = [threading.Thread(target=big) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    start = time.monotonic()
    still_serving(client)
    good_s = time.monotonic() - start
    for t in threads:
        t.join(timeout=30)
    refusals = [errors.get_nowait() for _ in threads]
    assert good_s < 5
    for err, took in refusals:
        assert err.code() == INVALID and "bytes of text" in err.details() and took < 5
    assert rss_bytes(proc.pid) - before < 200 * 1024 * 1024


# ---- expired queued requests --------------------------------------------------------------------------------
def test_expired_queued_requests_free_their_places(client):
    """Every slot busy, 16 requests with a 0.3 s deadline queued behind them: once they pass it, the queue is
    empty while the slots are still busy and takes a whole queue's worth (16) of new requests again."""
    long = [client.stream(PROMPT, 240, temperature=0, ignore_eos=True, timeout=120) for _ in range(SLOTS)]
    for s in long:
        next(s)
    try:
        expiring = [client.stub.Generate.future(_request(), timeout=0.3) for _ in range(16)]
        # none refused (RESOURCE_EXHAUSTED): the queue had room for all 16, and they passed their deadline
        assert [c.exception(timeout=10).code() for c in expiring] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 16
        assert _queued_becomes(client, 0, within_s=10)
        assert client.model_info().active_requests == SLOTS  # they left the queue, not through a slot
        accepted = [client.stub.Generate.future(_request(), timeout=120) for _ in range(16)]
        assert _queued_becomes(client, 16, within_s=10)
        assert rpc_error(client.generate, PROMPT, 2, timeout=10).code() == EXHAUSTED  # and now it is full
    finally:
        for s in long:
            s.close()
    assert [len(a.result(timeout=120).token_ids) for a in accepted] == [2] * 16


def test_calls_past_a_connections_stream_limit_wait_for_a_stream_rather_than_being_reset(target, client):
    """More calls at once on one connection than its streams (the queue, the slots and the reserved workers): the
    extra ones wait in the client for a stream and then get their answer, a full queue's RESOURCE_EXHAUSTED
    included. gRPC's overload protection reset them instead (UNAVAILABLE: RST_STREAM), health checks too."""
    with grpc.insecure_channel(target) as channel:
        stub, health = pb_grpc.GeneratorStub(channel), health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=30)  # the connection's settings are known
        calls = [stub.Generate.future(_request(), timeout=120) for _ in range(100)]
        calls += [health.Check.future(health_pb2.HealthCheckRequest(), timeout=120) for _ in range(20)]
        codes = [c.exception(timeout=150) for c in calls]
    codes = [grpc.StatusCode.OK if e is None else e.code() for e in codes]
    assert set(codes[:100]) <= {grpc.StatusCode.OK, EXHAUSTED} and grpc.StatusCode.OK in codes[:100], codes
    assert codes[100:] == [grpc.StatusCode.OK] * 20, codes[100:]
    still_serving(client)


def _queued_becomes(client, n: int, within_s: float) -> bool:
    end = time.monotonic() + within_s
    while client.model_info().queued_requests != n:
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _request():
    return make_request(PROMPT, 2, temperature=0, ignore_eos=True)


# ---- the dialect the config declares ------------------------------------------------------------------------
def test_metadata_describes_the_declared_dialect(triton):
    meta = triton.get_model_metadata(MODEL)
    assert [t.name for t in meta.inputs] == ["INPUT_ID", "REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN"]
    assert [t.name for t in meta.outputs] == ["OUTPUT0"]
    config = triton.get_model_config(MODEL).config
    assert [i.name for i in config.input] == ["INPUT_ID", "REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN"]
    # a batch is queued whole: this server's queue of 16 caps the config's 64 rows
    assert config.parameters["candidate_num"].string_value == "0" and config.max_batch_size == 16
    # the 5.x names are served all the same
    ids, lengths = padded([PROMPT])
    assert triton.infer(MODEL, ft_inputs(ids, lengths, 2)).as_numpy("sequence_length")[0, 0] == 6


def test_kserve_request_parameters_mean_on_grpc_what_they_mean_over_http(triton, client):
    """A `timeout` parameter (microseconds) ends the request; a priority other than 0 and unknown parameters are
    refused; a stream request's final-response flag marks its one response final."""
    inputs = ft_inputs([PROMPT], [len(PROMPT)], 200)
    with pytest.raises(tritonclient_grpc.InferenceServerException) as info:
        triton.infer(MODEL, inputs, timeout=1000, client_timeout=60)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED", info.value.message()
    for kwargs, word in [(dict(priority=5), "parameters.priority must be 0"),
                         (dict(sequence_id=3), "unsupported request parameter(s) sequence_end, sequence_id")]:
        with pytest.raises(tritonclient_grpc.InferenceServerException) as info:
            triton.infer(MODEL, ft_inputs([PROMPT], [len(PROMPT)], 2), client_timeout=60, **kwargs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and word in info.value.message()
    answers = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        triton.async_stream_infer(MODEL, ft_inputs([PROMPT], [len(PROMPT)], 2), enable_empty_final_response=True)
        result, error = answers.get(timeout=60)
        # the flag is a bool: the string "false" is refused, not read as true
        triton.async_stream_infer(MODEL, ft_inputs([PROMPT], [len(PROMPT)], 2),
                                  parameters={"triton_enable_empty_final_response": "false"})
        refused, flag_error = answers.get(timeout=60)
    finally:
        triton.stop_stream()
    assert error is None and result.get_response().parameters["triton_final_response"].bool_param
    assert result.as_numpy("sequence_length")[0, 0] == len(PROMPT) + 2
    assert refused is None and "INVALID_ARGUMENT" in flag_error.message(), flag_error
    assert "parameters.triton_enable_empty_final_response must be true or false" in flag_error.message()
    still_serving(client)


def _raw_request(out_len: int, **parameters) -> kpb.ModelInferRequest:
    """A 5.x request of PROMPT with its tensors in raw_input_contents, as tritonclient sends them."""
    req = kpb.ModelInferRequest(model_name=MODEL)
    for name, array in [("input_ids", np.asarray([PROMPT], np.uint32)),
                        ("input_lengths", np.asarray([[len(PROMPT)]], np.uint32)),
                        ("request_output_len", np.asarray([[out_len]], np.uint32))]:
        req.inputs.add(name=name, datatype="UINT32", shape=array.shape)
        req.raw_input_contents.append(array.tobytes())
    for key, value in parameters.items():
        setattr(req.parameters[key], "bool_param" if isinstance(value, bool) else "int64_param", value)
    return req


def test_kserve_edges_that_triton_clients_reach(target, client):
    """A `timeout` of 0 is Triton's "none"; a stream's errored request still carries the final-response mark it
    asked for; values in both raw and typed contents, an output asked for twice, or one asked to be classified
    are refused; an error that quotes a long name comes back with its own code, its details cut (gRPC clients
    drop a status whose details pass 16 KiB, which reads as RESOURCE_EXHAUSTED)."""
    with grpc.insecure_channel(target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelInfer(_raw_request(2, timeout=0), timeout=60)
        assert [o.name for o in reply.outputs] == ["output_ids", "sequence_length"]
        replies = list(stub.ModelStreamInfer(iter([_raw_request(0, triton_enable_empty_final_response=True)]),
                                             timeout=60))
        (answer,) = replies
        assert answer.error_message.startswith("INVALID_ARGUMENT") and "request_output_len" in answer.error_message
        assert answer.infer_response.parameters["triton_final_response"].bool_param
        both = _raw_request(2)
        both.inputs[2].contents.uint_contents.append(1)
        twice = _raw_request(2)
        twice.outputs.add(name="output_ids")
        twice.outputs.add(name="output_ids")
        classified = _raw_request(2)
        classified.outputs.add(name="output_ids").parameters["classification"].int64_param = 2
        for req, words in [(both, "raw_input_contents or in contents, not both"),
                           (twice, "'output_ids' requested more than once"),
                           (classified, "output output_ids: parameters classification are not taken")]:
            err = rpc_error(stub.ModelInfer, req, timeout=60)
            assert err.code() == INVALID and words in err.details(), err.details()
        for name in ("x" * 100_000, "\u00e9" * 20_000):  # a byte past ASCII takes 3 on the wire
            err = rpc_error(stub.ModelInfer, kpb.ModelInferRequest(model_name=name), timeout=60)
            assert err.code() != EXHAUSTED and err.details().endswith("more characters cut)"), err.code()
    still_serving(client)


# ---- a port in use ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--port", "--http-port"])
def test_a_port_in_use_exits_2_with_one_line(flag):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        ports = {"--port": "0", "--http-port": "0", flag: str(port)}
        start = time.monotonic()
        proc = run_cli("serve", "--metrics-port", "0", *[x for kv in ports.items() for x in kv], check=False,
                       env={"JAX_PLATFORMS": "cpu"}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"can't listen on 127.0.0.1:{port}" in lines[0] and "in use" in lines[0], lines
    assert time.monotonic() - start < 60


def test_sigterm_during_the_warm_up_stops_before_serving(tmp_path):
    """A shutdown asked for while the programs compile ends the start there: exit 0 in seconds, never
    announcing SERVING (it used to compile every shape first, then serve for a moment, then drain)."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "gptjax", "serve", "--port", "0", "--http-port", "0",
                             "--metrics-port", "0", "--no-compile-cache"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = []
    for line in proc.stderr:  # the first progress line: the warm-up is under way
        lines.append(line)
        if "prepared " in line:
            break
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    _, rest = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    assert "stopped before serving" in log and "serving gpt2-tiny" not in log, log
    assert time.monotonic() - start < 30, log  # at most the compiles in flight (every shape: a minute or more)


# ---- last: a second signal during the drain stops at once --------------------------------------------------
def test_a_second_signal_stops_the_drain_at_once(server):
    proc, target = server
    with Client(target) as client:
        stream = client.stream(PROMPT, 240, temperature=0, ignore_eos=True, timeout=120)
        next(stream)
        proc.send_signal(signal.SIGTERM)
        assert next(stream).token_ids and proc.poll() is None  # draining: the stream goes on
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert proc.wait(timeout=30) == 128 + signal.SIGINT
    assert time.monotonic() - start < 30

