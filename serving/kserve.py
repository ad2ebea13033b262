"""Triton/KServe v2 `inference.GRPCInferenceService`: the FasterTransformer tensors (serving/ft.py) over gRPC.

One model, `fastertransformer` (version 1), so `tritonclient.grpc` code written for either FasterTransformer
backend runs unchanged: a request's input names pick the dialect (5.x or v1). Model metadata and config
describe the dialect that the server's config declares (5.x unless a v1 config.pbtxt was loaded).
`ModelStreamInfer` starts each request of a stream as it arrives and answers them in the stream's order; a stream
that sends nothing for the idle time while none of its requests runs is closed with UNAVAILABLE, and the open
streams are bounded (RESOURCE_EXHAUSTED past the bound).
"""

from __future__ import annotations

import math
import queue
import threading
from concurrent.futures import Future

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
# a ModelStreamInfer stream's requests running at once; the stream's next messages wait (the client's sends back up)
STREAM_AHEAD = 16

CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


def _tensor(t, raw: bytes | None) -> np.ndarray:
    """One input tensor as a numpy array, checked against its declared datatype and shape."""
    dtype = ft.check_input(t.name, t.datatype, t.shape)
    shape = [int(d) for d in t.shape]
    count = math.prod(shape)
    if raw is not None:
        if t.HasField("contents") and t.contents.ListFields():
            raise invalid(f"input {t.name}: give its values in raw_input_contents or in contents, not both")
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
    for kind, tensors in (("input", req.inputs), ("output", req.outputs)):
        for t in tensors:  # shared memory or classification, which this server does not do: refused, not ignored
            if t.parameters:
                raise invalid(f"{kind} {t.name}: parameters {', '.join(sorted(t.parameters))} are not taken (no "
                              "shared memory or classification here)")
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs")
    return {t.name: _tensor(t, raw[i] if raw else None) for i, t in enumerate(req.inputs)}


def parameters_of(message) -> dict:
    """A gRPC message's `parameters` map as plain values, as HTTP's JSON carries them."""
    return {k: getattr(v, v.WhichOneof("parameter_choice") or "bool_param") for k, v in message.parameters.items()}


def _asks_final_flag(req) -> bool:
    """Whether a stream's request asked Triton's clients' mark on its last response (checked true or false; a
    message that did not parse asked nothing)."""
    return hasattr(req, "parameters") and parameters_of(req).get(FINAL_FLAG) is True


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


def _room_for_one_more(room, context) -> bool:
    """Wait until the stream has fewer than STREAM_AHEAD requests unanswered; False once the call has ended."""
    while not room.acquire(timeout=1.0):
        if not context.is_active():
            return False
    return True


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

    def _infer(self, request, context, live: set | None = None) -> pb.ModelInferResponse:
        """One inference, in an API call of its own (for the metrics). Its requests are cancelled when the
        call ends early: by a callback of their own, or, in a stream, by the stream's one callback, which
        cancels the requests in `live` while they run (a callback per request would keep every request of a
        long stream)."""
        fe = self.frontend
        with fe.api_call() as call:
            check_model(decoded(request).model_name, request.model_version)
            fe.require_ready()
            arrays = arrays_of(request)
            deadline = deadline_of_request(request, context, in_stream=live is not None)
            call.requests, info = ft.parse(arrays, fe, deadline, [o.name for o in request.outputs])
            if live is None:
                for r in call.requests:
                    context.add_callback(r.cancel)
            else:
                live.update(call.requests)
            try:
                fe.submit(call.requests)
                done = fe.collect(call.requests, context.is_active)
            finally:
                if live is not None:
                    live.difference_update(call.requests)
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
        """Each request of the stream starts as it arrives (up to STREAM_AHEAD at once, in threads of their own),
        and the answers go back in the requests' order, as Triton answers a model that is not decoupled."""
        live: set = set()  # the stream's running requests, cancelled when the call ends early (one callback)
        context.add_callback(lambda: [r.cancel() for r in list(live)])
        answers: queue.Queue = queue.Queue()  # a Future per request in order, then None or what ended the reading
        room = threading.Semaphore(STREAM_AHEAD)
        threading.Thread(target=self._read_stream, args=(request_iterator, context, live, answers, room),
                         name="model-stream", daemon=True).start()
        while (answer := answers.get()) is not None:
            if isinstance(answer, BaseException):
                raise answer
            response = answer.result()
            room.release()
            if response is None:  # cancelled
                return
            yield response

    def _read_stream(self, request_iterator, context, live: set, answers: queue.Queue, room) -> None:
        """The stream's reader: each message read once there is room, and started at once."""
        try:
            messages = client_messages(request_iterator, context, self.idle, decode=False)
            while _room_for_one_more(room, context) and (request := next(messages, None)) is not None:
                self.idle.request_started(context)
                answer: Future = Future()
                answers.put(answer)
                threading.Thread(target=self._answer, args=(request, context, live, answer),
                                 name="model-stream-request", daemon=True).start()
            answers.put(None)
        except BaseException as e:  # noqa: BLE001 - the answering loop raises it in the handler's thread
            answers.put(e)

    def _answer(self, request, context, live: set, answer: Future) -> None:
        """One request of a stream: its ModelStreamInferResponse (an error's too), or None once cancelled."""
        try:
            try:
                response = self._infer(request, context, live)
                error = ""
            except RequestError as e:
                if e.code == Code.CANCELLED:
                    answer.set_result(None)
                    return
                response, error = pb.ModelInferResponse(id=getattr(request, "id", "")), f"{e.code.name}: {e.message}"
            if _asks_final_flag(request):  # one response per request, an error's too: it is the final one
                response.parameters["triton_final_response"].bool_param = True
            answer.set_result(pb.ModelStreamInferResponse(error_message=error, infer_response=response))
        except BaseException as e:  # noqa: BLE001 - raised in the handler's thread, where grpc reports it
            answer.set_exception(e)
        finally:
            self.idle.request_ended(context)
