"""The FasterTransformer GPT backend's tensors over plain numpy arrays, shared by KServe gRPC and KServe HTTP.

Two dialects; the names in a request pick one (mixing them is INVALID_ARGUMENT):

5.x (the later backend)
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

v1 (the 2021 backend)
    inputs   INPUT_ID [B, L], REQUEST_INPUT_LEN [B, 1], REQUEST_OUTPUT_LEN [B, 1], all UINT32 (or INT32).
    outputs  OUTPUT0 [B, L + max(REQUEST_OUTPUT_LEN)] UINT32: each row's prompt, its new tokens, then the
             end-of-text token, laid out time-major under that shape, as that backend returned its decoder's
             [length, batch] buffer: its tools read it with reshape([-1, B]) and transpose the rows out
             (tools/identity_test.py, then FasterTransformer's convert_gpt_token.py). Sampling is the server
             config's (candidate_num / probability_threshold / temperature, read into the engine config's
             top_k / top_p / temperature), as in that backend.

Sampling as in FasterTransformer: top_k 0 and top_p 0 (or top_k 1) is greedy; top_p 0 turns top-p off. A row
stops at end_id (default: the model's end-of-text token; one past the vocabulary, such as 2**32 - 1, never
stops a row: the way to ask for exactly request_output_len tokens) or a stop word. Anything not supported is refused
with INVALID_ARGUMENT naming the tensor, never ignored. Every value then goes through the front end's one
validation path, so its ranges are the native API's.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass

import numpy as np

from serving.frontend import Completion, Frontend, Params, RequestError, invalid
from serving.request import Code, Request

V5, V1 = "5.x", "v1"

DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}
DATATYPE_OF = {np.dtype(v): k for k, v in DTYPES.items()}

UINT = ("UINT32", "INT32")
# values in one input tensor: well above any real request (a batch of prompts), refused before numpy sizes it
MAX_ELEMENTS = 1 << 24
# name -> (accepted datatypes, kind): "ids" [B, L], "row" [B, 1] or [B], "words" [B, 2, S]
INPUTS = {
    V5: {
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
    },
    V1: {"INPUT_ID": (UINT, "ids"), "REQUEST_INPUT_LEN": (UINT, "row"), "REQUEST_OUTPUT_LEN": (UINT, "row")},
}
# the prompt ids, their lengths, the new tokens: the inputs every request of the dialect gives
REQUIRED = {V5: ("input_ids", "input_lengths", "request_output_len"),
            V1: ("INPUT_ID", "REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN")}
OUTPUTS = {V5: {"output_ids": ("UINT32", [-1, 1, -1]), "sequence_length": ("UINT32", [-1, 1]),
                "cum_log_probs": ("FP32", [-1, 1]), "output_log_probs": ("FP32", [-1, 1, -1])},
           V1: {"OUTPUT0": ("UINT32", [-1, -1])}}
SHAPES = {"ids": [-1, -1], "row": [-1, 1], "words": [-1, 2, -1]}
# (name, must equal, why) for knobs that only have FasterTransformer's neutral value here
NEUTRAL = (("repetition_penalty", 1.0, "repetition penalty is not supported"),
           ("presence_penalty", 0.0, "presence penalty is not supported"),
           ("min_length", 0, "min_length is not supported"),
           ("beam_width", 1, "beam search is not supported"))


@dataclass(frozen=True)
class Info:
    """What `outputs` needs of the parsed request."""

    dialect: str
    width: int  # the prompt tensor's L
    outputs: tuple[str, ...]
    end_ids: tuple[int, ...]  # the padding of each row


def _repeated(names) -> list[str]:
    """The names given more than once, sorted; in one pass, as a request may repeat a name a million times."""
    return sorted(n for n, count in collections.Counter(names).items() if count > 1)


def dialect_of(names) -> str:
    """The dialect that a request's input names pick; RequestError for unknown, repeated or mixed names."""
    names = list(names)
    every = {n for d in INPUTS.values() for n in d}
    unknown = [n for n in names if n not in every]
    if unknown:
        raise invalid(f"unknown input(s) {', '.join(map(repr, unknown))}; this model takes {', '.join(INPUTS[V5])} "
                      f"(FasterTransformer 5.x) or {', '.join(INPUTS[V1])} (v1)")
    repeated = _repeated(names)
    if repeated:
        raise invalid(f"input(s) given more than once: {', '.join(repeated)}")
    used = [d for d in (V5, V1) if any(n in INPUTS[d] for n in names)]
    if len(used) > 1:
        raise invalid(f"the inputs mix FasterTransformer 5.x names ({', '.join(n for n in names if n in INPUTS[V5])})"
                      f" and v1 names ({', '.join(n for n in names if n in INPUTS[V1])}); use one dialect")
    dialect = used[0] if used else V5
    missing = [n for n in REQUIRED[dialect] if n not in names]
    if missing:
        raise invalid(f"missing required input(s): {', '.join(missing)}")
    return dialect


def check_input(name: str, datatype: str, shape) -> np.dtype:
    """One declared tensor, before its data is read -> its numpy dtype (little-endian)."""
    spec = INPUTS[V5].get(name) or INPUTS[V1].get(name)
    if spec is None:
        raise invalid(f"unknown input {name!r}")
    if datatype not in spec[0]:
        raise invalid(f"input {name} must be {' or '.join(spec[0])}, got {datatype or '(none)'}")
    if any(int(d) < 0 for d in shape):
        raise invalid(f"input {name} has a negative dimension in its shape {list(shape)}")
    if any(int(d) > MAX_ELEMENTS for d in shape) or math.prod(int(d) for d in shape) > MAX_ELEMENTS:
        raise invalid(f"input {name}: shape {list(shape)} holds more than {MAX_ELEMENTS} values")
    return np.dtype(DTYPES[datatype]).newbyteorder("<")


def _shapes(arrays: dict, dialect: str) -> tuple[int, int]:
    """Check every tensor's shape against the prompt tensor's batch -> (batch, width)."""
    ids_name = REQUIRED[dialect][0]
    ids = arrays[ids_name]
    if ids.ndim != 2:
        raise invalid(f"{ids_name} must be [batch, length], got shape {list(ids.shape)}")
    batch, width = ids.shape
    for name, a in arrays.items():
        accepted, kind = INPUTS[dialect][name]
        if DATATYPE_OF.get(a.dtype.newbyteorder("=")) not in accepted:
            raise invalid(f"input {name} must be {' or '.join(accepted)}, got {a.dtype}")
        if a.shape[:1] != (batch,):
            raise invalid(f"input {name} has batch {a.shape[0] if a.ndim else 'none'} but {ids_name} has {batch}")
        if kind == "row" and a.shape not in ((batch,), (batch, 1)):
            raise invalid(f"input {name} must be [{batch}, 1], got {list(a.shape)}")
        if kind == "words" and (a.ndim != 3 or a.shape[1] != 2):
            raise invalid(f"input {name} must be [{batch}, 2, words_len], got {list(a.shape)}")
    return batch, width


def _words(array: np.ndarray, name: str) -> list[list[int]]:
    """FasterTransformer's word lists: [2, S] = (concatenated tokens, end offsets padded with -1). An offset after
    the padding has begun would be a word dropped unread: refused."""
    tokens, offsets = array[0].tolist(), array[1].tolist()
    padded = next((j for j, end in enumerate(offsets) if end < 0), len(offsets))
    late = next((j for j in range(padded, len(offsets)) if offsets[j] >= 0), None)
    if late is not None:
        raise invalid(f"{name}: offset[{late}] = {offsets[late]} follows the padding offset[{padded}] = "
                      f"{offsets[padded]}; padding (-1) ends the offsets")
    words, start = [], 0
    for j, end in enumerate(offsets[:padded]):
        if end < start:
            raise invalid(f"{name}: offsets must not decrease, but offset[{j}] = {end} follows {start}")
        if end > len(tokens):
            raise invalid(f"{name}: offset[{j}] = {end} is past the row's {len(tokens)} tokens")
        if end > start:
            words.append(tokens[start:end])
        start = end
    return words


def _stop_ids(arrays: dict, i: int) -> list[int]:
    if "bad_words_list" in arrays and _words(arrays["bad_words_list"][i], f"bad_words_list[{i}]"):
        raise invalid(f"bad_words_list[{i}]: bad words are not supported (send an empty list)")
    if "stop_words_list" not in arrays:
        return []
    words = _words(arrays["stop_words_list"][i], f"stop_words_list[{i}]")
    for word in words:
        if len(word) != 1:
            raise invalid(f"stop_words_list[{i}]: only single-token stop words are supported, got {word}")
    return [w[0] for w in words]


def _ft_sampling(row: dict, i: int) -> dict:
    """FasterTransformer's sampling knobs of row i, in its conventions -> Params fields (None: the default)."""
    top_k = int(row["runtime_top_k"][i]) if "runtime_top_k" in row else None
    top_p = float(row["runtime_top_p"][i]) if "runtime_top_p" in row else None
    if top_p is not None and not 0.0 <= top_p <= 1.0:  # NaN too
        raise invalid(f"runtime_top_p[{i}] must be in [0, 1] (0 is off), got {top_p}")
    temperature = float(row["temperature"][i]) if "temperature" in row else None
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise invalid(f"temperature[{i}] must be a finite number >= 0, got {temperature}")
    seed = int(row["random_seed"][i]) if "random_seed" in row else None
    return dict(top_k=top_k, top_p=top_p, temperature=temperature, seed=seed)


def _end(row: dict, i: int, frontend: Frontend) -> tuple[dict, int]:
    """Row i's end_id -> (Params fields, the row's padding). An end_id past the vocabulary (2**32 - 1, the
    usual one) is a token no model makes: as in FasterTransformer, the row never stops at it and is padded
    with it; that is how this dialect asks for exactly request_output_len tokens. A negative one is refused."""
    if "end_id" not in row:
        return {}, frontend.limits.eos_token_id
    end_id = int(row["end_id"][i])
    return end_params(end_id, frontend), end_id


def end_params(end_id, frontend: Frontend) -> dict:
    """The Params fields of a FasterTransformer end_id: one past the vocabulary (below 2**32) never stops; any
    other value is the front end's to check."""
    number = isinstance(end_id, int) and not isinstance(end_id, bool)
    return {"ignore_eos": True} if number and frontend.limits.vocab_size <= end_id < 2**32 else {"end_id": end_id}


def _greedy_as_ft(p: Params, frontend: Frontend) -> Params:
    """FasterTransformer's greedy: top_k 1, or top_k 0 with top-p off (runtime_top_p 0; without one, as the
    server's config says: `Limits.ft_top_p_off`), whatever the temperature. runtime_top_p 1.0 samples from the
    whole distribution; gptjax's top_p 1.0 is FasterTransformer's 0."""
    lim = frontend.limits
    top_k = lim.top_k if p.top_k is None else p.top_k
    top_p_off = lim.ft_top_p_off if p.top_p is None else p.top_p == 0.0
    if p.top_p == 0.0:
        p.top_p = 1.0
    if top_k == 1 or (top_k == 0 and top_p_off):
        p.temperature, p.top_k = 0.0, 0
    return p


def _row_names(dialect: str, i: int) -> dict:
    if dialect == V1:
        return {"prompt": f"INPUT_ID[{i}]", "max_new_tokens": f"REQUEST_OUTPUT_LEN[{i}]"}
    return {"prompt": f"input_ids[{i}]", "max_new_tokens": f"request_output_len[{i}]", "top_k": f"runtime_top_k[{i}]",
            "top_p": f"runtime_top_p[{i}]", "temperature": f"temperature[{i}]", "seed": f"random_seed[{i}]",
            "stop_ids": f"stop_words_list[{i}] tokens", "end_id": f"end_id[{i}]"}


def _outputs_wanted(dialect: str, requested, row: dict) -> tuple[str, ...]:
    bad = [o for o in requested if o not in OUTPUTS[dialect]]
    if bad:
        raise invalid(f"unknown output(s) {', '.join(map(repr, bad))}; this model gives {', '.join(OUTPUTS[dialect])}"
                      f" for the {dialect} inputs")
    repeated = _repeated(requested)
    if repeated:
        raise invalid(f"output(s) {', '.join(map(repr, repeated))} requested more than once")
    if requested:
        return tuple(requested)
    if dialect == V1:
        return ("OUTPUT0",)
    logprobs = "is_return_log_probs" in row and bool(np.any(row["is_return_log_probs"]))
    return ("output_ids", "sequence_length") + (("cum_log_probs", "output_log_probs") if logprobs else ())


def parse(arrays: dict[str, np.ndarray], frontend: Frontend, deadline: float | None,
          requested=()) -> tuple[list[Request], Info]:
    """The request's tensors (and the output names it asks for) -> one Request per row, and what `outputs`
    needs; RequestError naming the tensor for anything wrong."""
    dialect = dialect_of(arrays)
    lengths_name, out_name = REQUIRED[dialect][1:]
    batch, width = _shapes(arrays, dialect)
    frontend.check_batch(batch, REQUIRED[dialect][0])
    if width > frontend.limits.max_seq_len:  # padding columns are echoed back: they would only swell the answer
        raise invalid(f"{REQUIRED[dialect][0]} is {width} tokens wide, more than the model's "
                      f"{frontend.limits.max_seq_len} positions")
    row = {n: a.reshape(batch) for n, a in arrays.items() if INPUTS[dialect][n][1] == "row"}
    for name, want, why in NEUTRAL:
        if name in row and np.any(row[name] != want):
            raise invalid(f"{name} must be {want}: {why}")
    ids = arrays[REQUIRED[dialect][0]]
    requests, end_ids = [], []
    for i in range(batch):
        n = int(row[lengths_name][i])
        if not 1 <= n <= width:
            raise invalid(f"{lengths_name}[{i}] = {n} must be in [1, {width}] (the width of {REQUIRED[dialect][0]})")
        knobs, end_id = _end(row, i, frontend)
        knobs.update(_ft_sampling(row, i) if dialect == V5 else {})
        p = _greedy_as_ft(Params(prompt=ids[i, :n], max_new_tokens=int(row[out_name][i]), stop_ids=_stop_ids(arrays, i),
                                 deadline=deadline, **knobs), frontend)
        requests.append(frontend.validate(p, _row_names(dialect, i)))
        end_ids.append(end_id)
    return requests, Info(dialect, width, _outputs_wanted(dialect, requested, row), tuple(end_ids))


def outputs(requests: list[Request], completions: list[Completion], info: Info) -> dict[str, np.ndarray]:
    """The output tensors the request asked for, each row its prompt, its new tokens, then its end_id."""
    batch, width = len(requests), info.width
    out_len = max(r.max_new_tokens for r in requests)
    ids = np.zeros((batch, width + out_len), np.uint32)
    lengths = np.zeros((batch, 1), np.uint32)
    log_probs = np.zeros((batch, 1, out_len), np.float32)
    for i, (r, done, end_id) in enumerate(zip(requests, completions, info.end_ids)):
        tokens = r.prompt + done.token_ids
        ids[i, :] = end_id
        ids[i, : len(tokens)] = tokens
        lengths[i, 0] = len(tokens)
        log_probs[i, 0, : len(done.logprobs)] = done.logprobs
    time_major = np.ascontiguousarray(ids.T).reshape(ids.shape)  # v1: see the module's docstring
    arrays = {"OUTPUT0": time_major, "output_ids": ids[:, None, :], "sequence_length": lengths,
              "cum_log_probs": log_probs.sum(-1).astype(np.float32), "output_log_probs": log_probs}
    return {name: arrays[name] for name in info.outputs}


# the KServe request parameters this model takes on both transports (HTTP adds binary_data_output, a gRPC stream
# Triton's triton_enable_empty_final_response); any other is refused, as an unknown input is
REQUEST_PARAMETERS = ("timeout", "priority")


def request_deadline(params, also: tuple[str, ...] = ()) -> float | None:
    """A request's KServe `parameters` checked -> the deadline its `timeout` sets (microseconds, as Triton
    takes it), or None. `also` are the transport's own flags, true or false: read as bool(), a string such as
    "false" would turn them on."""
    if not isinstance(params, dict):
        raise invalid("parameters must be an object")
    taken = (*also, *REQUEST_PARAMETERS)
    unknown = sorted(set(params) - set(taken))
    if unknown:
        raise invalid(f"unsupported request parameter(s) {', '.join(unknown)}; this model takes {', '.join(taken)}")
    for flag in also:
        if params.get(flag) is not None and not isinstance(params[flag], bool):
            raise invalid(f"parameters.{flag} must be true or false, got {params[flag]!r}")
    if params.get("priority") not in (None, 0):
        raise invalid(f"parameters.priority must be 0 (one priority level), got {params['priority']!r}")
    timeout = params.get("timeout")
    if not isinstance(timeout, (int, type(None))) or isinstance(timeout, bool) or not 0 <= (timeout or 0) < 2**63:
        raise invalid(f"parameters.timeout must be a whole number of microseconds in [0, 2**63), 0 for none, "
                      f"got {timeout!r}")
    if not timeout:  # Triton's clients send 0 for "no timeout"
        return None
    return time.monotonic() + timeout / 1e6


MODEL_NAME, MODEL_VERSION = "fastertransformer", "1"
CONFIG_DIMS = {"ids": [-1], "row": [1], "words": [2, -1]}  # a config's dims leave out the batch


def check_model(name: str, version: str) -> None:
    """The model and version a KServe call names (gRPC or HTTP): this server's, or NOT_FOUND."""
    if name != MODEL_NAME:
        raise RequestError(Code.NOT_FOUND, f"unknown model {name!r}; this server serves {MODEL_NAME!r}")
    if version not in ("", MODEL_VERSION):
        raise RequestError(Code.NOT_FOUND, f"model {name!r} has no version {version!r} (only {MODEL_VERSION})")


def model_metadata(dialect: str) -> dict:
    """KServe v2 model metadata of the dialect, as JSON (the gRPC adapter parses it into its message)."""
    return {"name": MODEL_NAME, "versions": [MODEL_VERSION], "platform": "fastertransformer",
            "inputs": [{"name": n, "datatype": types[0], "shape": SHAPES[kind]}
                       for n, (types, kind) in INPUTS[dialect].items()],
            "outputs": [{"name": n, "datatype": dtype, "shape": shape}
                        for n, (dtype, shape) in OUTPUTS[dialect].items()]}


def model_config(dialect: str, frontend: Frontend) -> dict:
    """The model's Triton config as JSON (the fields of model_config.proto): the dialect's tensors and the
    FasterTransformer knobs of the loaded model (none before it loads)."""
    lim = frontend.limits
    config = {"name": MODEL_NAME, "backend": "fastertransformer", "max_batch_size": lim.max_batch_size if lim else 0,
              "input": [{"name": n, "data_type": "TYPE_" + types[0], "dims": CONFIG_DIMS[kind],
                         "optional": n not in REQUIRED[dialect]} for n, (types, kind) in INPUTS[dialect].items()],
              "output": [{"name": n, "data_type": "TYPE_" + dtype, "dims": shape[1:]}
                         for n, (dtype, shape) in OUTPUTS[dialect].items()]}
    if frontend.engine is not None:
        c, ec = frontend.engine.config, frontend.engine.engine_config
        top_p = 0.0 if lim.ft_top_p_off and ec.top_p == 1.0 else ec.top_p  # FasterTransformer's "off" is 0
        sampling = {"candidate_num": ec.top_k, "probability_threshold": top_p} if dialect == V1 else \
            {"top_k": ec.top_k, "top_p": top_p}
        params = {**sampling, "temperature": ec.temperature, "tensor_para_size": ec.mesh.tensor,
                  "layer_para_size": ec.mesh.stage, "max_seq_len": lim.max_seq_len,
                  "is_half": int(c.dtype != "float32"), "head_num": c.n_heads, "size_per_head": c.head_dim,
                  "vocab_size": c.vocab_size, "decoder_layers": c.n_layers, "batch_size": ec.max_slots,
                  "is_fuse_QKV": 1}
        config["parameters"] = {k: {"string_value": str(v)} for k, v in params.items()}
    return config


def byte_size(dtype: np.dtype, shape) -> int:
    """Bytes of a tensor of that shape (no overflow: Python ints)."""
    return math.prod(int(d) for d in shape) * dtype.itemsize


