"""Triton/KServe v2 `inference.GRPCInferenceService`: the FasterTransformer tensors (serving/ft.py) over gRPC.

One model, `fastertransformer` (version 1), so `tritonclient.grpc` code written for either FasterTransformer
backend runs unchanged: a request's input names pick the dialect (5.x or v1). Model metadata and config
describe the dialect that the server's config declares (5.x unless a v1 config.pbtxt was loaded).
`ModelStreamInfer` answers each request of the stream in order; a stream that sends nothing for the idle
time is closed with UNAVAILABLE, and the open streams are bounded (RESOURCE_EXHAUSTED past the bound).
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf import json_format

import gptjax
from serving import ft
from serving.frontend import Frontend, RequestError, invalid
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import model_config_pb2 as mc
from serving.request import Code
from serving.rpc import IdleStreams, StreamPermits, abort, client_messages, deadline_of, decoded

MODEL_NAME, MODEL_VERSION, check_model = ft.MODEL_NAME, ft.MODEL_VERSION, ft.check_model
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# a stream's request may ask for Triton's final-response flag: its one response then carries triton_final_response
FINAL_FLAG = "triton_enable_empty_final_response"

CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


def _tensor(t, raw: bytes | None) -> np.ndarray:
    """One input tensor as a numpy array, checked against its declared datatype and shape."""
    dtype = ft.check_input(t.name, t.datatype, t.shape)
    shape = [int(d) for d in t.shape]
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise invalid(f"input {t.name}: shape {shape} of {t.datatype} needs {count * dtype.itemsize} bytes, "
                          f"got {len(raw)}")
        return np.frombuffer(raw, dtype).reshape(shape)
    values = getattr(t.contents, CONTENTS[t.datatype])
    if len(values) != count:
        raise invalid(f"input {t.name}: shape {shape} needs {count} values in contents.{CONTENTS[t.datatype]}, "
                      f"got {len(values)}")
    return np.asarray(values, dtype).reshape(shape)


def arrays_of(req: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors by name (names checked first: unknown, repeated or mixed dialects)."""
    ft.dialect_of(t.name for t in req.inputs)
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs")
    return {t.name: _tensor(t, raw[i] if raw else None) for i, t in enumerate(req.inputs)}


def parameters_of(message) -> dict:
    """A gRPC message's `parameters` map as plain values, as HTTP's JSON carries them."""
    return {k: getattr(v, v.WhichOneof("parameter_choice") or "bool_param") for k, v in message.parameters.items()}


def deadline_of_request(req: pb.ModelInferRequest, context, in_stream: bool) -> float | None:
    """The earlier of the call's gRPC deadline and the request's `timeout` parameter."""
    also = (FINAL_FLAG,) if in_stream else ()
    deadlines = [d for d in (deadline_of(context), ft.request_deadline(parameters_of(req), also)) if d is not None]
    return min(deadlines, default=None)


def response_of(req: pb.ModelInferRequest, arrays: dict[str, np.ndarray], dialect: str) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=MODEL_NAME, model_version=MODEL_VERSION, id=req.id)
    for name, a in arrays.items():
        resp.outputs.add(name=name, datatype=ft.OUTPUTS[dialect][name][0], shape=list(a.shape))
        resp.raw_output_contents.append(a.astype(a.dtype.newbyteorder("<")).tobytes())
    return resp


class InferenceServicer:
    """The KServe v2 gRPC methods over the front end (registered with serving.rpc.add_service)."""

    def __init__(self, frontend: Frontend, dialect: str, permits: StreamPermits, idle: IdleStreams):
        self.frontend = frontend
        self.dialect = dialect
        self.permits = permits
        self.idle = idle

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.frontend.ready)

    def ModelReady(self, request, context):
        try:
            check_model(decoded(request).name, request.version)
        except RequestError as e:
            abort(context, e)
        return pb.ModelReadyResponse(ready=self.frontend.ready)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="gptjax", version=gptjax.__version__, extensions=[])

    def ModelMetadata(self, request, context):
        try:
            check_model(decoded(request).name, request.version)
        except RequestError as e:
            abort(context, e)
        return json_format.ParseDict(ft.model_metadata(self.dialect), pb.ModelMetadataResponse())

    def ModelConfig(self, request, context):
        try:
            check_model(decoded(request).name, request.version)
        except RequestError as e:
            abort(context, e)
        config = json_format.ParseDict(ft.model_config(self.dialect, self.frontend), mc.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    def _infer(self, request, context, current: list | None = None) -> pb.ModelInferResponse:
        """One inference, in an API call of its own (for the metrics). Its requests are cancelled when the
        call ends early: by a callback of their own, or, in a stream, by the stream's one callback, which
        cancels the requests in `current` (a callback per request would keep every request of a long stream)."""
        fe = self.frontend
        with fe.api_call() as call:
            check_model(decoded(request).model_name, request.model_version)
            fe.require_ready()
            arrays = arrays_of(request)
            deadline = deadline_of_request(request, context, in_stream=current is not None)
            call.requests, info = ft.parse(arrays, fe, deadline, [o.name for o in request.outputs])
            if current is None:
                for r in call.requests:
                    context.add_callback(r.cancel)
            else:
                current[:] = call.requests
            fe.submit(call.requests)
            done = fe.collect(call.requests, context.is_active)
            return response_of(request, ft.outputs(call.requests, done, info), info.dialect)

    def ModelInfer(self, request, context):
        try:
            return self._infer(request, context)
        except RequestError as e:
            abort(context, e)

    def ModelStreamInfer(self, request_iterator, context):
        try:
            with self.permits.hold("ModelStreamInfer"):
                yield from self._stream(request_iterator, context)
        except RequestError as e:
            abort(context, e)

    def _stream(self, request_iterator, context):
        current: list = []
        context.add_callback(lambda: [r.cancel() for r in list(current)])
        for request in client_messages(request_iterator, context, self.idle, decode=False):
            try:
                response = self._infer(request, context, current)
                if parameters_of(request).get(FINAL_FLAG):  # one response per request: it is the final one
                    response.parameters["triton_final_response"].bool_param = True
                yield pb.ModelStreamInferResponse(infer_response=response)
            except RequestError as e:
                if e.code == Code.CANCELLED:
                    return
                yield pb.ModelStreamInferResponse(error_message=f"{e.code.name}: {e.message}",
                                                  infer_response=pb.ModelInferResponse(id=getattr(request, "id", "")))
