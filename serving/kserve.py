"""Triton/KServe v2 `inference.GRPCInferenceService`, speaking the FasterTransformer GPT backend's tensors.

One model, `fastertransformer` (version 1), so `tritonclient.grpc` code written for that backend runs unchanged:

    inputs   input_ids [B, L] UINT32 (right-padded), input_lengths [B, 1] UINT32, request_output_len [B, 1] UINT32;
             optional, per row [B, 1]: runtime_top_k UINT32, runtime_top_p FP32, temperature FP32,
             random_seed UINT64, end_id UINT32, is_return_log_probs BOOL, repetition_penalty FP32 (only 1),
             presence_penalty FP32 (only 0), min_length UINT32 (only 0), beam_width UINT32 (only 1),
             len_penalty / beam_search_diversity_rate FP32 and start_id UINT32 (no effect without beam search,
             as in FasterTransformer); stop_words_list [B, 2, S] INT32 (single-token words), bad_words_list
             [B, 2, S] INT32 (only empty). INT32 is accepted wherever UINT32 is, INT64 where UINT64 is.
    outputs  output_ids [B, 1, L + max(request_output_len)] UINT32: each row's prompt, its new tokens, then end_id;
             sequence_length [B, 1] UINT32 (prompt + new tokens); cum_log_probs [B, 1] FP32 and
             output_log_probs [B, 1, max(request_output_len)] FP32 (when is_return_log_probs or asked for).

Sampling as in FasterTransformer: runtime_top_k 0 and runtime_top_p 0 (or top_k 1) is greedy; runtime_top_p 0
turns top-p off. Tensors not given take the server config's defaults. A row stops at end_id (default: the
model's end-of-text token) or a stop word, and its output is padded with end_id. Anything not supported is
refused with INVALID_ARGUMENT naming the tensor, never ignored.
"""

from __future__ import annotations

import math

import grpc
import numpy as np

import gptjax
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc as pb_grpc
from serving.proto.inference import model_config_pb2 as mc
from serving.scheduler import Request
from serving.server import RequestError, invalid, deadline_of, wait_all

MODEL_NAME = "fastertransformer"
MODEL_VERSION = "1"

DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}

UINT = ("UINT32", "INT32")
# name -> (accepted datatypes, kind): "ids" [B, L], "row" [B, 1] or [B], "words" [B, 2, S]
INPUTS = {
    "input_ids": (UINT, "ids"),
    "input_lengths": (UINT, "row"),
    "request_output_len": (UINT, "row"),
    "runtime_top_k": (UINT, "row"),
    "runtime_top_p": (("FP32",), "row"),
    "temperature": (("FP32",), "row"),
    "random_seed": (("UINT64", "INT64", "UINT32", "INT32"), "row"),
    "end_id": (UINT, "row"),
    "start_id": (UINT, "row"),
    "is_return_log_probs": (("BOOL",), "row"),
    "repetition_penalty": (("FP32",), "row"),
    "presence_penalty": (("FP32",), "row"),
    "len_penalty": (("FP32",), "row"),
    "beam_search_diversity_rate": (("FP32",), "row"),
    "beam_width": (UINT, "row"),
    "min_length": (UINT, "row"),
    "stop_words_list": (("INT32",), "words"),
    "bad_words_list": (("INT32",), "words"),
}
REQUIRED = ("input_ids", "input_lengths", "request_output_len")
# (name, must equal, why) for knobs that only have FasterTransformer's neutral value here
NEUTRAL = (("repetition_penalty", 1.0, "repetition penalty is not supported"),
           ("presence_penalty", 0.0, "presence penalty is not supported"),
           ("min_length", 0, "min_length is not supported"),
           ("beam_width", 1, "beam search is not supported"))
OUTPUTS = {"output_ids": ("UINT32", [-1, 1, -1]), "sequence_length": ("UINT32", [-1, 1]),
           "cum_log_probs": ("FP32", [-1, 1]), "output_log_probs": ("FP32", [-1, 1, -1])}


def _tensor(t, raw: bytes | None) -> np.ndarray:
    """One input tensor as a numpy array, checked against its declared datatype and shape."""
    accepted, _ = INPUTS[t.name]
    if t.datatype not in accepted:
        raise invalid(f"input {t.name} must be {' or '.join(accepted)}, got {t.datatype or '(none)'}")
    shape = [int(d) for d in t.shape]
    if any(d < 0 for d in shape):
        raise invalid(f"input {t.name} has a negative dimension in its shape {shape}")
    count = math.prod(shape)
    dtype = np.dtype(DTYPES[t.datatype]).newbyteorder("<")
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise invalid(f"input {t.name}: shape {shape} of {t.datatype} needs {count * dtype.itemsize} bytes, "
                          f"got {len(raw)}")
        return np.frombuffer(raw, dtype).reshape(shape)
    values = getattr(t.contents, CONTENTS[t.datatype])
    if len(values) != count:
        raise invalid(f"input {t.name}: shape {shape} needs {count} values, got {len(values)}")
    return np.asarray(values, dtype).reshape(shape)


def _words(array: np.ndarray, name: str, row: int) -> list[list[int]]:
    """FasterTransformer's word lists: [2, S] = (concatenated tokens, end offsets padded with -1)."""
    tokens, offsets = array[0], array[1]
    words, start = [], 0
    for end in offsets:
        end = int(end)
        if end < 0:
            break
        if not start <= end <= len(tokens):
            raise invalid(f"{name}[{row}]: offset {end} is outside the row's {len(tokens)} tokens")
        if end > start:
            words.append([int(t) for t in tokens[start:end]])
        start = end
    return words


def parse_request(req: pb.ModelInferRequest, model, context) -> tuple[list[Request], dict]:
    """The FasterTransformer tensors -> one scheduler Request per row, and what the response needs."""
    names = [t.name for t in req.inputs]
    unknown = [n for n in names if n not in INPUTS]
    if unknown:
        raise invalid(f"unknown input(s) {', '.join(unknown)}; this model takes {', '.join(INPUTS)}")
    if len(set(names)) != len(names):
        raise invalid("an input is given twice")
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise invalid(f"missing required input(s): {', '.join(missing)}")
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs")
    x = {t.name: _tensor(t, raw[i] if raw else None) for i, t in enumerate(req.inputs)}

    ids = x["input_ids"]
    if ids.ndim != 2:
        raise invalid(f"input_ids must be [batch, length], got shape {list(ids.shape)}")
    batch, width = ids.shape
    if batch == 0:
        raise invalid("input_ids has an empty batch")
    if batch > model.ec.max_batch_size:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"batch of {batch} rows is over the server's limit of {model.ec.max_batch_size}")
    for name, a in x.items():
        kind = INPUTS[name][1]
        if a.shape[:1] != (batch,):
            raise invalid(f"input {name} has batch {a.shape[0] if a.ndim else 'none'} but input_ids has {batch}")
        if kind == "row" and a.shape not in ((batch,), (batch, 1)):
            raise invalid(f"input {name} must be [{batch}, 1], got {list(a.shape)}")
        if kind == "words" and (a.ndim != 3 or a.shape[1] != 2):
            raise invalid(f"input {name} must be [{batch}, 2, words_len], got {list(a.shape)}")
    row = {name: a.reshape(batch) for name, a in x.items() if INPUTS[name][1] == "row"}
    for name, want, why in NEUTRAL:
        if name in row and np.any(row[name] != want):
            raise invalid(f"{name} must be {want}: {why}")

    ec = model.ec
    requests, end_ids, want_logprobs = [], [], False
    for i in range(batch):
        n = int(row["input_lengths"][i])
        if not 1 <= n <= width:
            raise invalid(f"input_lengths[{i}] = {n} must be in [1, {width}] (the width of input_ids)")
        prompt = model.check_prompt(ids[i, :n], f"input_ids[{i}]")
        n_new = model.check_new_tokens(int(row["request_output_len"][i]), n, f"request_output_len[{i}]")
        top_k = int(row["runtime_top_k"][i]) if "runtime_top_k" in row else ec.top_k
        top_p = float(row["runtime_top_p"][i]) if "runtime_top_p" in row else ec.top_p
        temperature = float(row["temperature"][i]) if "temperature" in row else ec.temperature
        if not math.isfinite(top_p) or not 0.0 <= top_p <= 1.0:
            raise invalid(f"runtime_top_p[{i}] must be in [0, 1] (0 is off), got {top_p}")
        if top_k < 0:
            raise invalid(f"runtime_top_k[{i}] must be >= 0, got {top_k}")
        if not math.isfinite(temperature) or temperature < 0:
            raise invalid(f"temperature[{i}] must be a finite number >= 0, got {temperature}")
        top_p = 1.0 if top_p == 0.0 else top_p
        if top_k == 1 or (top_k == 0 and top_p == 1.0):  # FasterTransformer's greedy
            temperature, top_k = 0.0, 0
        seed = int(row["random_seed"][i]) % 2**64 if "random_seed" in row else 0
        sampling = model.sampling(temperature, top_k, top_p, seed, prefix=f"row {i}: ")
        end_id = int(row["end_id"][i]) if "end_id" in row else ec.eos_token_id
        stops = {end_id}
        if "stop_words_list" in x:
            for word in _words(x["stop_words_list"][i], "stop_words_list", i):
                if len(word) != 1:
                    raise invalid(f"stop_words_list[{i}]: only single-token stop words are supported, got {word}")
                stops.add(word[0])
        if "bad_words_list" in x and _words(x["bad_words_list"][i], "bad_words_list", i):
            raise invalid(f"bad_words_list[{i}]: bad words are not supported (send an empty list)")
        if "is_return_log_probs" in row and row["is_return_log_probs"][i]:
            want_logprobs = True
        requests.append(Request(prompt, n_new, sampling, frozenset(stops), deadline_of(context)))
        end_ids.append(end_id)
    requested = [o.name for o in req.outputs]
    bad = [o for o in requested if o not in OUTPUTS]
    if bad:
        raise invalid(f"unknown output(s) {', '.join(bad)}; this model gives {', '.join(OUTPUTS)}")
    outputs = requested or ["output_ids", "sequence_length"] + (
        ["cum_log_probs", "output_log_probs"] if want_logprobs else [])
    return requests, {"width": width, "outputs": outputs, "end_ids": end_ids}


def build_response(req, requests: list[Request], done, info) -> pb.ModelInferResponse:
    batch, width = len(requests), info["width"]
    out_len = max(r.max_new_tokens for r in requests)
    output_ids = np.zeros((batch, 1, width + out_len), np.uint32)
    lengths = np.zeros((batch, 1), np.uint32)
    log_probs = np.zeros((batch, 1, out_len), np.float32)
    for i, (r, d, end_id) in enumerate(zip(requests, done, info["end_ids"])):
        row = r.prompt + d.token_ids
        output_ids[i, 0, :] = end_id % 2**32
        output_ids[i, 0, : len(row)] = row
        lengths[i, 0] = len(row)
        log_probs[i, 0, : len(d.logprobs)] = d.logprobs
    arrays = {"output_ids": output_ids, "sequence_length": lengths,
              "cum_log_probs": log_probs.sum(-1).astype(np.float32), "output_log_probs": log_probs}
    resp = pb.ModelInferResponse(model_name=MODEL_NAME, model_version=MODEL_VERSION, id=req.id)
    for name in info["outputs"]:
        a = arrays[name]
        resp.outputs.add(name=name, datatype=OUTPUTS[name][0], shape=list(a.shape))
        resp.raw_output_contents.append(a.astype(a.dtype.newbyteorder("<")).tobytes())
    return resp


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server):
        self.server = server

    def _check_model(self, name: str, version: str, context) -> None:
        if name != MODEL_NAME:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this server serves {MODEL_NAME!r}")
        if version not in ("", MODEL_VERSION):
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version {version!r} (only {MODEL_VERSION})")

    def _ready(self) -> bool:
        m = self.server.model
        return m is not None and m.ready and m.scheduler is not None and m.scheduler.accepting

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._ready())

    def ModelReady(self, request, context):
        self._check_model(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self._ready())

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="gptjax", version=gptjax.__version__, extensions=[])

    def ModelMetadata(self, request, context):
        self._check_model(request.name, request.version, context)
        resp = pb.ModelMetadataResponse(name=MODEL_NAME, versions=[MODEL_VERSION], platform="fastertransformer")
        for name, (types, kind) in INPUTS.items():
            shape = {"ids": [-1, -1], "row": [-1, 1], "words": [-1, 2, -1]}[kind]
            resp.inputs.add(name=name, datatype=types[0], shape=shape)
        for name, (dtype, shape) in OUTPUTS.items():
            resp.outputs.add(name=name, datatype=dtype, shape=shape)
        return resp

    def ModelConfig(self, request, context):
        self._check_model(request.name, request.version, context)
        m = self.server.model
        cfg = mc.ModelConfig(name=MODEL_NAME, backend="fastertransformer",
                             max_batch_size=m.ec.max_batch_size if m else 0)
        for name, (types, kind) in INPUTS.items():
            dims = {"ids": [-1], "row": [1], "words": [2, -1]}[kind]
            cfg.input.add(name=name, data_type=mc.DataType.Value("TYPE_" + types[0]), dims=dims,
                          optional=name not in REQUIRED)
        for name, (dtype, shape) in OUTPUTS.items():
            cfg.output.add(name=name, data_type=mc.DataType.Value("TYPE_" + dtype), dims=shape[1:])
        if m is not None:
            c, ec = m.config, m.ec
            params = {"top_k": ec.top_k, "top_p": ec.top_p, "tensor_para_size": ec.mesh.tensor,
                      "layer_para_size": ec.mesh.stage, "max_seq_len": m.max_seq_len,
                      "is_half": int(c.dtype != "float32"), "head_num": c.n_heads, "size_per_head": c.head_dim,
                      "vocab_size": c.vocab_size, "decoder_layers": c.n_layers, "batch_size": ec.max_batch_size,
                      "is_fuse_QKV": 1}
            for key, value in params.items():
                cfg.parameters[key].string_value = str(value)
        return pb.ModelConfigResponse(config=cfg)

    def _infer(self, request, context) -> pb.ModelInferResponse:
        if request.model_name != MODEL_NAME:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"unknown model {request.model_name!r}; this server serves {MODEL_NAME!r}")
        if request.model_version not in ("", MODEL_VERSION):
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {MODEL_NAME!r} has no version {request.model_version!r}")
        model = self.server.ready_model()
        requests, info = parse_request(request, model, context)
        model.submit(requests)
        return build_response(request, requests, wait_all(requests, context), info)

    def ModelInfer(self, request, context):
        try:
            return self._infer(request, context)
        except RequestError as e:
            context.abort(e.code, e.message)

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=self._infer(request, context))
            except RequestError as e:
                if e.code == grpc.StatusCode.CANCELLED:
                    return
                yield pb.ModelStreamInferResponse(error_message=f"{e.code.name}: {e.message}",
                                                  infer_response=pb.ModelInferResponse(id=request.id))
