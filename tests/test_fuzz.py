"""The request surface, fuzzed against the real server (gpt2-tiny on CPU) with hypothesis.

KServe requests start from a good one and get mutated: tensors dropped or given twice, names of the other
dialect or unknown ones, any datatype, random shapes, values at the bounds of their types, data of the wrong
size. Native requests draw every field from its type's bounds (or leave it out). Raw bytes go to every method.
The property: each answer is OK, or INVALID_ARGUMENT / RESOURCE_EXHAUSTED / NOT_FOUND / OUT_OF_RANGE with a
message; a good request succeeds afterwards. Over HTTP, JSON bodies of any shape (OpenAI, the generate
extension, KServe JSON tensors) and binary KServe bodies with any header length: a 2xx, or a 4xx with a
message. A fixed, derandomized budget of examples (over 1000 requests); the server's default is 2 new tokens,
so the valid ones are quick.
"""

from __future__ import annotations

import json

import grpc
import httpx
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from serving import ft  # noqa: E402
from serving.client import make_request  # noqa: E402
from test_serving import free_port, running_server  # noqa: E402
# tritonclient's copy of the KServe messages (ours and its share the descriptor pool's names: one per process)
from tritonclient.grpc import service_pb2 as kpb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as kpb_grpc  # noqa: E402

ANSWERS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.OUT_OF_RANGE}


def fuzz(examples: int) -> settings:
    """A fixed budget: the same examples on every run, no time limit per example."""
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


DATATYPES = [*ft.DTYPES, "BYTES", "", "uint32", "FP8"]
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}
NAMES = [*ft.INPUTS[ft.V5], *ft.INPUTS[ft.V1], "OUTPUT0", "input_id", "x"]
PROMPT = [464, 2068, 7586]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config = tmp_path_factory.mktemp("fuzz") / "server.toml"
    # the engine of test_load's and test_serving_bench's servers (4 slots of 64 positions, 2 decode steps a call):
    # its programs are in the session's compilation cache, loaded whole instead of compiled again
    config.write_text("[engine]\nmax_new_tokens = 2\nmax_slots = 4\nmax_seq_len = 64\n\n"
                      "[scheduler]\ndecode_steps_per_call = 2\n")
    http_port = free_port()
    flags = ("--config", str(config), "--http-port", str(http_port), "--metrics-port", "0")
    with running_server(*flags) as (proc, target):
        yield target, f"http://127.0.0.1:{http_port}"
        assert proc.poll() is None, "the server died"


@pytest.fixture(scope="module")
def target(served):
    return served[0]


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[1], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def kserve(target):
    with grpc.insecure_channel(target) as channel:
        yield kpb_grpc.GRPCInferenceServiceStub(channel)


def answered(call, *args) -> None:
    """The call succeeds, or fails with one of the expected codes and a message."""
    try:
        result = call(*args, timeout=60)
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)
    except grpc.RpcError as e:
        assert e.code() in ANSWERS and e.details(), (e.code(), e.details())


def still_serving(client) -> None:
    assert len(client.generate(PROMPT, 2, temperature=0, ignore_eos=True, timeout=60).token_ids) == 2


# ---- KServe: a good request, mutated ---------------------------------------------------------------------
def bound_values(datatype: str):
    """Values of a datatype, the type's bounds among them (and NaN, infinities for floats)."""
    dtype = np.dtype(ft.DTYPES[datatype])
    if dtype.kind == "b":
        return st.booleans()
    if dtype.kind == "f":
        info = np.finfo(dtype)
        return st.sampled_from([0.0, 1.0, 0.5, -1.0, float(info.max), float(info.min), float(info.tiny),
                                float("nan"), float("inf"), float("-inf")])
    info = np.iinfo(dtype)
    values = [0, 1, 2, 3, 50256, 50257, int(info.max), int(info.min), int(info.max) // 2 + 1]
    return st.sampled_from([v for v in values if info.min <= v <= info.max])


@st.composite
def tensors(draw, name: str, datatype: str, shape: list[int]):
    """(InferInputTensor, raw bytes or None): data that fits the shape, or a wrong size now and then."""
    t = kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    count = int(np.prod(shape)) if all(d >= 0 for d in shape) else -1
    if datatype not in ft.DTYPES or not 0 <= count <= 64:
        return t, draw(st.binary(max_size=32))
    values = draw(st.lists(bound_values(datatype), min_size=count, max_size=count))
    if draw(st.booleans()) or datatype not in CONTENTS:
        with np.errstate(all="ignore"):
            raw = np.array(values, ft.DTYPES[datatype]).astype(np.dtype(ft.DTYPES[datatype]).newbyteorder("<"))
        data = raw.tobytes()
        return t, data[: draw(st.integers(0, len(data)))] if draw(st.integers(0, 9)) == 0 else data
    getattr(t.contents, CONTENTS[datatype]).extend(values)
    return t, None


@st.composite
def good_kserve(draw):
    """A valid 5.x or v1 request: (name -> (datatype, numpy array))."""
    batch, width = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    ids = np.array(draw(st.lists(st.integers(0, 50256), min_size=batch * width, max_size=batch * width)),
                   np.uint32).reshape(batch, width)
    lengths = np.array(draw(st.lists(st.integers(1, width), min_size=batch, max_size=batch)), np.uint32)[:, None]
    out = np.full((batch, 1), draw(st.integers(1, 2)), np.uint32)
    names = ft.REQUIRED[draw(st.sampled_from([ft.V5, ft.V1]))]
    return {names[0]: ("UINT32", ids), names[1]: ("UINT32", lengths), names[2]: ("UINT32", out)}


@st.composite
def kserve_requests(draw):
    good = draw(good_kserve())
    parts = [(name, datatype, list(a.shape), a) for name, (datatype, a) in good.items()]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["drop", "twice", "add", "datatype", "shape", "value"]))
        if kind == "drop" and parts:
            parts.pop(draw(st.integers(0, len(parts) - 1)))
        elif kind == "twice" and parts:
            parts.append(parts[draw(st.integers(0, len(parts) - 1))])
        elif kind == "add":
            shape = draw(st.sampled_from([[len_of(parts), 1], [len_of(parts)], [len_of(parts), 2, 1], [1, 2, 3]]))
            parts.append((draw(st.sampled_from(NAMES)), draw(st.sampled_from(DATATYPES)), shape, None))
        elif kind in ("datatype", "shape", "value") and parts:
            i = draw(st.integers(0, len(parts) - 1))
            name, datatype, shape, array = parts[i]
            if kind == "datatype":
                parts[i] = (name, draw(st.sampled_from(DATATYPES)), shape, None)
            elif kind == "shape":
                shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, -1, 2**40]), max_size=3))
                parts[i] = (name, datatype, shape, None)
            else:
                parts[i] = (name, datatype, shape, None)  # fresh values at the type's bounds
    req = kpb.ModelInferRequest(model_name=draw(st.sampled_from(["fastertransformer"] * 8 + ["gpt", ""])),
                                model_version=draw(st.sampled_from([""] * 8 + ["1", "2"])))
    raws = []
    for name, datatype, shape, array in parts:
        if array is not None:
            t = kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
            raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
        else:
            t, raw = draw(tensors(name, datatype, shape))
        req.inputs.append(t)
        raws.append(raw)
    if all(r is not None for r in raws):
        req.raw_input_contents.extend(raws)
    elif draw(st.booleans()):
        req.raw_input_contents.extend(r for r in raws if r is not None)  # mismatched count
    for name in draw(st.lists(st.sampled_from(["output_ids", "OUTPUT0", "sequence_length", "nope"]), max_size=2)):
        req.outputs.add(name=name)
    return req


def len_of(parts) -> int:
    return next((p[3].shape[0] for p in parts if p[3] is not None and p[3].ndim), 1)


@fuzz(300)
@given(req=kserve_requests())
def test_kserve_requests(kserve, client, req):
    answered(kserve.ModelInfer, req)


@fuzz(40)
@given(reqs=st.lists(kserve_requests(), min_size=1, max_size=3))
def test_kserve_streams(kserve, reqs):
    """Each request of a stream gets its answer (or an error message) and the stream ends cleanly."""
    replies = list(kserve.ModelStreamInfer(iter(reqs), timeout=60))
    assert len(replies) == len(reqs)
    for r in replies:
        assert not r.error_message or r.error_message.split(":")[0] in {c.name for c in ANSWERS}, r.error_message


# ---- native ----------------------------------------------------------------------------------------------
INT32 = st.sampled_from([0, 1, 2, -1, 2**31 - 1, -(2**31), 50256, 50257])
FLOATS = st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 3.4e38, 1e-45, float("nan"), float("inf"), float("-inf")])


@st.composite
def native_requests(draw):
    prompt = draw(st.one_of(st.text(max_size=20), st.lists(INT32 | st.integers(0, 50256), max_size=8)))
    optional = {"temperature": FLOATS, "top_k": INT32, "top_p": FLOATS,
                "seed": st.sampled_from([0, 1, 2**32, 2**64 - 1])}
    kwargs = {k: draw(st.none() | s) for k, s in optional.items()}
    return make_request(prompt, draw(st.none() | st.sampled_from([1, 2]) | INT32), **kwargs,
                        stop_token_ids=draw(st.lists(INT32, max_size=3)), ignore_eos=draw(st.booleans()),
                        return_logprobs=draw(st.booleans()))


@fuzz(150)
@given(req=native_requests())
def test_native_requests(client, req):
    answered(client.stub.Generate, req)
    answered(client.stub.GenerateStream, req)


@fuzz(60)
@given(method=st.sampled_from(["/gptjax.v1.Generator/Generate", "/gptjax.v1.Generator/GenerateStream",
                               "/gptjax.v1.Generator/GetModelInfo", "/inference.GRPCInferenceService/ModelInfer",
                               "/inference.GRPCInferenceService/ModelMetadata", "/grpc.health.v1.Health/Check"]),
       payload=st.binary(max_size=48))
def test_raw_bytes(target, method, payload):
    with grpc.insecure_channel(target) as channel:
        call = (channel.unary_stream if method.endswith("Stream") else channel.unary_unary)(method)
        answered(call, payload)


# ---- HTTP ------------------------------------------------------------------------------------------------
def http_answered(response) -> None:
    """A 2xx, or a 4xx whose JSON body says what was wrong."""
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert (error["message"] if isinstance(error, dict) else error), response.text


SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=8)
OPENAI_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "logprobs",
                 "echo", "stream", "stream_options", "best_of", "suffix", "messages"]
GENERATE_PARAMETERS = ["max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "end_id", "return_full_text"]
TENSOR = st.fixed_dictionaries(
    {"name": st.sampled_from(NAMES), "datatype": st.sampled_from(DATATYPES),
     "shape": st.lists(st.integers(-2, 4), max_size=3), "data": JSON_VALUES},
    optional={"parameters": JSON_VALUES})


@fuzz(200)
@given(openai=st.dictionaries(st.sampled_from(OPENAI_FIELDS), JSON_VALUES, max_size=5), merged=st.booleans(),
       generate=st.dictionaries(st.sampled_from(GENERATE_PARAMETERS), JSON_VALUES, max_size=4),
       text=JSON_VALUES, tensors=st.lists(TENSOR, max_size=3), outputs=st.none() | JSON_VALUES)
def test_http_json_bodies(http, openai, merged, generate, text, tensors, outputs):
    body = {"model": "gpt2-tiny", "prompt": "Hi", "max_tokens": 2, **openai} if merged else openai
    http_answered(http.post("/v1/completions", content=json.dumps(body)))  # json.dumps: NaN and infinities too
    for route in ("generate", "generate_stream"):
        body = {"text_input": text if merged else "Hi", "parameters": generate}
        http_answered(http.post(f"/v2/models/fastertransformer/{route}", content=json.dumps(body)))
    infer = {"inputs": tensors, **({} if outputs is None else {"outputs": outputs})}
    http_answered(http.post("/v2/models/fastertransformer/infer", content=json.dumps(infer)))


@fuzz(150)
@given(tensors=st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(DATATYPES),
                                  st.lists(st.integers(-1, 4), max_size=3),
                                  st.none() | st.integers(-5, 64) | st.text(max_size=3), st.binary(max_size=40)),
                        max_size=4),
       header_length=st.none() | st.integers(-10, 400) | st.text("0123456789-+.xe", min_size=1, max_size=5),
       binary_output=st.booleans())
def test_http_binary_infer(http, tensors, header_length, binary_output):
    """KServe's binary extension: a JSON header of `Inference-Header-Content-Length` bytes, then the tensors."""
    inputs = [{"name": n, "datatype": d, "shape": shape, **({} if size is None else
                                                            {"parameters": {"binary_data_size": size}})}
              for n, d, shape, size, _ in tensors]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": binary_output}}).encode()
    length = str(len(header) if header_length is None else header_length)
    http_answered(http.post("/v2/models/fastertransformer/infer", content=header + b"".join(t[4] for t in tensors),
                            headers={"Inference-Header-Content-Length": length}))


def test_a_good_request_succeeds_afterwards(client, kserve, http):
    answer = http.post("/v1/completions", json={"model": "gpt2-tiny", "prompt": PROMPT, "max_tokens": 2,
                                                "temperature": 0})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
    still_serving(client)
    req = kpb.ModelInferRequest(model_name="fastertransformer")
    for name, a in (("input_ids", np.array([PROMPT], np.uint32)), ("input_lengths", np.array([[3]], np.uint32)),
                    ("request_output_len", np.array([[2]], np.uint32))):
        req.inputs.add(name=name, datatype="UINT32", shape=list(a.shape))
        req.raw_input_contents.append(a.tobytes())
    out = kserve.ModelInfer(req, timeout=60)
    assert np.frombuffer(out.raw_output_contents[1], np.uint32).tolist() == [5]
