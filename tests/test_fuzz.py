"""The request surface, fuzzed against the real server (gpt2-tiny on CPU) with hypothesis.

KServe requests start from a good one and get mutated: tensors dropped or given twice, names of the other
dialect or unknown ones, any datatype, random shapes, values at the bounds of their types, data of the wrong
size. Native requests draw every field from its type's bounds (or leave it out). Raw bytes go to every method.
The property: each answer is OK, or INVALID_ARGUMENT / RESOURCE_EXHAUSTED / NOT_FOUND / OUT_OF_RANGE with a
message; a good request succeeds afterwards. A fixed, derandomized budget of examples (over 500 requests);
the server's default is 2 new tokens, so the valid ones are quick.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from serving import ft  # noqa: E402
from serving.client import make_request  # noqa: E402
from test_serving import running_server  # noqa: E402
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
def target(tmp_path_factory):
    config = tmp_path_factory.mktemp("fuzz") / "server.toml"
    # the engine of test_serving_bench's server (4 slots of 64 positions, 2 decode steps a call): its programs are
    # in the session's compilation cache, loaded whole instead of compiled again
    config.write_text("[engine]\nmax_new_tokens = 2\nmax_slots = 4\nmax_seq_len = 64\n\n"
                      "[scheduler]\ndecode_steps_per_call = 2\n")
    with running_server("--config", str(config)) as (proc, target):
        yield target
        assert proc.poll() is None, "the server died"


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


def test_a_good_request_succeeds_afterwards(client, kserve):
    still_serving(client)
    req = kpb.ModelInferRequest(model_name="fastertransformer")
    for name, a in (("input_ids", np.array([PROMPT], np.uint32)), ("input_lengths", np.array([[3]], np.uint32)),
                    ("request_output_len", np.array([[2]], np.uint32))):
        req.inputs.add(name=name, datatype="UINT32", shape=list(a.shape))
        req.raw_input_contents.append(a.tobytes())
    out = kserve.ModelInfer(req, timeout=60)
    assert np.frombuffer(out.raw_output_contents[1], np.uint32).tolist() == [5]
