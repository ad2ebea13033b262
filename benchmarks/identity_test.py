"""The FasterTransformer backend's request, sent with tritonclient to `gptjax serve`; prints the latency.

As FasterTransformer_backend's tools/identity_test.py of 2021: a batch of random prompts of one length, a fixed
output length, timed over several runs after a warm-up, over HTTP by default (`-i grpc` for gRPC), with that
backend's v1 tensors: INPUT_ID, REQUEST_INPUT_LEN, REQUEST_OUTPUT_LEN -> OUTPUT0 (the prompt, then the new
tokens; sampling comes from the server's config, e.g. candidate_num 1 for greedy). `--dialect 5.x` sends the
later names instead (input_ids, input_lengths, request_output_len and the runtime knobs, greedy with top_k 1
and an end_id no model has, so every row makes output-len tokens -> output_ids, sequence_length).

Needs only numpy and `tritonclient[http]` (or `[grpc]`), so it runs from any machine that can reach the
server; without tritonclient it sends the same KServe v2 requests itself (binary tensors over HTTP with the
standard library, or gRPC through gptjax's own stubs in `serving/proto/inference`):

    python benchmarks/identity_test.py -b 8 -s 512 -o 16 -n 10                  # HTTP, localhost:8000
    python benchmarks/identity_test.py -i grpc -b 8 -s 512 -o 16 -n 10 -u 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_URLS = {"http": "localhost:8000", "grpc": "localhost:8001"}
NEVER = 2**32 - 1  # the 5.x end id by default: no model has it, so every row makes output-len tokens


class _Error(Exception):
    def status(self):
        return str(self.args[0])

    def message(self):
        return str(self.args[1])


class KServeInput:
    def __init__(self, name, shape, datatype):
        self.name, self.shape, self.datatype, self.raw = name, list(shape), datatype, b""

    def set_data_from_numpy(self, array, binary_data=True):
        self.raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


class KServeResult:
    DTYPES = {"UINT32": "<u4", "FP32": "<f4", "INT32": "<i4", "UINT64": "<u8", "INT64": "<i8", "BOOL": "?"}

    def __init__(self, response=None, arrays=None):
        self.arrays = arrays if arrays is not None else {
            o.name: np.frombuffer(raw, self.DTYPES[o.datatype]).reshape(list(o.shape))
            for o, raw in zip(response.outputs, response.raw_output_contents)}

    def as_numpy(self, name):
        return self.arrays.get(name)


class KServeClient:
    """The few calls of tritonclient.grpc.InferenceServerClient used here, over gptjax's own KServe stubs."""

    def __init__(self, url, api_key=None):
        import grpc

        from serving.client import keyed_channel
        from serving.proto.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc

        self.grpc, self.pb = grpc, pb
        self.channel = keyed_channel(grpc.insecure_channel(url, options=[("grpc.max_receive_message_length", 2**30),
                                                                         ("grpc.max_send_message_length", 2**30)]),
                                     api_key)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def _call(self, method, request):
        try:
            return method(request)
        except self.grpc.RpcError as e:
            raise _Error(e.code(), e.details()) from None

    def get_model_config(self, name):
        return self._call(self.stub.ModelConfig, self.pb.ModelConfigRequest(name=name))

    def request(self, model, inputs):
        req = self.pb.ModelInferRequest(model_name=model)
        for t in inputs:
            req.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            req.raw_input_contents.append(t.raw)
        return req

    def infer(self, model, inputs):
        return KServeResult(self._call(self.stub.ModelInfer, self.request(model, inputs)))

    def close(self):
        self.channel.close()


class KServeHttpClient:
    """The few calls of tritonclient.http.InferenceServerClient used here: KServe v2 REST with binary tensors,
    over one kept-alive connection of the standard library."""

    def __init__(self, url, network_timeout=600.0):
        host, _, port = url.rpartition(":")
        self.conn = http.client.HTTPConnection(host or url, int(port or 8000), timeout=network_timeout)

    def _call(self, method, path, body=None, headers=None):
        self.conn.request(method, path, body=body, headers={**(headers or {}), **self.headers})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise _Error(response.status, json.loads(data).get("error", data.decode(errors="replace")))
        return response, data

    headers: dict = {}

    def get_model_config(self, name, headers=None):
        return json.loads(self._call("GET", f"/v2/models/{name}/config", headers=headers)[1])

    def infer(self, model, inputs, headers=None):
        header = {"inputs": [{"name": t.name, "shape": t.shape, "datatype": t.datatype,
                              "parameters": {"binary_data_size": len(t.raw)}} for t in inputs],
                  "parameters": {"binary_data_output": True}}
        head = json.dumps(header).encode()
        response, data = self._call("POST", f"/v2/models/{model}/infer", head + b"".join(t.raw for t in inputs),
                                    {"Inference-Header-Content-Length": str(len(head)),
                                     "Content-Type": "application/octet-stream", **(headers or {})})
        n = int(response.getheader("Inference-Header-Content-Length") or len(data))
        arrays, offset = {}, n
        for o in json.loads(data[:n])["outputs"]:
            size = o["parameters"]["binary_data_size"]
            dtype = KServeResult.DTYPES[o["datatype"]]
            arrays[o["name"]] = np.frombuffer(data[offset:offset + size], dtype).reshape(o["shape"])
            offset += size
        return KServeResult(arrays=arrays)

    def close(self):
        self.conn.close()


def _triton(protocol: str = "grpc", use_tritonclient: bool = True):
    """(InferInput, InferenceServerClient, InferenceServerException) for the protocol: tritonclient's, or the
    fallback."""
    try:
        if not use_tritonclient:
            raise ImportError("not asked for")
        if protocol == "http":
            import tritonclient.http as client
        else:
            import tritonclient.grpc as client
        from tritonclient.utils import InferenceServerException

        return client.InferInput, client.InferenceServerClient, InferenceServerException
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        return KServeInput, (KServeHttpClient if protocol == "http" else KServeClient), _Error


def _vocab_size(config) -> int:
    """The served model's vocabulary from its KServe model config (a protobuf over gRPC, a dict over HTTP)."""
    if isinstance(config, dict):
        value = config.get("config", config).get("parameters", {}).get("vocab_size", {}).get("string_value")
    else:
        value = config.config.parameters["vocab_size"].string_value
    return int(value or 50257)


def build_inputs(InferInput, ids: np.ndarray, output_len: int, top_k: int, top_p: float, seed: int, end_id: int,
                 dialect: str = "5.x", binary: bool | None = None):
    """The request's tensors. v1 has only the three that the 2021 backend took; 5.x adds the runtime knobs.
    `binary` (HTTP only): binary tensors (tritonclient.http's default) or JSON ones."""
    batch = ids.shape[0]

    def tensor(name, array, dtype):
        t = InferInput(name, list(array.shape), dtype)
        if binary is None:
            t.set_data_from_numpy(array)
        else:
            t.set_data_from_numpy(array, binary_data=binary)
        return t

    def column(value, dtype):
        return np.full((batch, 1), value, dtype)

    if dialect == "v1":
        return [tensor("INPUT_ID", ids.astype(np.uint32), "UINT32"),
                tensor("REQUEST_INPUT_LEN", column(ids.shape[1], np.uint32), "UINT32"),
                tensor("REQUEST_OUTPUT_LEN", column(output_len, np.uint32), "UINT32")]
    return [tensor("input_ids", ids.astype(np.uint32), "UINT32"),
            tensor("input_lengths", column(ids.shape[1], np.uint32), "UINT32"),
            tensor("request_output_len", column(output_len, np.uint32), "UINT32"),
            tensor("runtime_top_k", column(top_k, np.uint32), "UINT32"),
            tensor("runtime_top_p", column(top_p, np.float32), "FP32"),
            tensor("temperature", column(1.0, np.float32), "FP32"),
            tensor("repetition_penalty", column(1.0, np.float32), "FP32"),
            tensor("len_penalty", column(1.0, np.float32), "FP32"),
            tensor("beam_width", column(1, np.uint32), "UINT32"),
            tensor("random_seed", column(seed, np.uint64), "UINT64"),
            tensor("is_return_log_probs", column(True, bool), "BOOL"),
            tensor("end_id", column(end_id, np.uint32), "UINT32")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-i", "--protocol", choices=["http", "grpc"], default="http",
                   help="KServe v2 over HTTP (the default, as the 2021 tool) or gRPC")
    p.add_argument("-u", "--url", help="the server's HOST:PORT (default localhost:8000 for HTTP, :8001 for gRPC)")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("-s", "--start-len", "--input-len", dest="input_len", type=int, default=512,
                   help="prompt tokens per row")
    p.add_argument("-o", "--output-len", type=int, default=16)
    p.add_argument("-n", "--num-runs", type=int, default=10)
    p.add_argument("-w", "--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("-m", "--model", default="fastertransformer")
    p.add_argument("--dialect", choices=["v1", "5.x"], default="v1",
                   help="the tensor names: v1 (INPUT_ID ... -> OUTPUT0, as the 2021 tool) or 5.x (input_ids ...)")
    p.add_argument("--topk", type=int, default=1, help="5.x: runtime_top_k (v1 samples as the server's config says)")
    p.add_argument("--topp", type=float, default=0.0, help="5.x: runtime_top_p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--end-id", type=int, default=-1,
                   help="5.x: stop token; -1 (the default) never stops early, so every row makes output-len tokens")
    p.add_argument("--json-tensors", action="store_true", help="HTTP: JSON tensors instead of binary ones")
    p.add_argument("--api-key", default=os.environ.get("GPTJAX_API_KEY"),
                   help="the server's key, sent as 'authorization: Bearer KEY' (an HTTP header or gRPC "
                        "metadata; default: $GPTJAX_API_KEY)")
    p.add_argument("--json", action="store_true", help="one JSON line instead of text")
    p.add_argument("--no-tritonclient", action="store_true",
                   help="send the requests without tritonclient even when it is installed")
    p.add_argument("-v", "--verbose", action="store_true", help="print the output ids")
    args = p.parse_args(argv)
    for name in ("batch_size", "input_len", "output_len", "num_runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    args.url = args.url or DEFAULT_URLS[args.protocol]
    return args


def run(args) -> tuple[np.ndarray, object, list[float]]:
    """Send the warm-up and timed requests -> (the prompts, the last result, each run's milliseconds)."""
    InferInput, InferenceServerClient, _ = _triton(args.protocol, not args.no_tritonclient)
    # a long request must not time out over HTTP (tritonclient.http's default is 60 s)
    client = (InferenceServerClient(args.url, network_timeout=600.0) if args.protocol == "http"
              else InferenceServerClient(args.url))
    # the key as an HTTP header, or as gRPC metadata (whose keys are lower case)
    extra = {"headers": {"authorization": f"Bearer {args.api_key}"}} if args.api_key else {}
    try:
        vocab = _vocab_size(client.get_model_config(args.model, **extra))
        rng = np.random.default_rng(args.seed)
        ids = rng.integers(0, min(vocab, 50256), size=(args.batch_size, args.input_len), dtype=np.uint32)
        end_id = NEVER if args.end_id == -1 else args.end_id
        inputs = build_inputs(InferInput, ids, args.output_len, args.topk, args.topp, args.seed, end_id,
                              args.dialect, binary=not args.json_tensors if args.protocol == "http" else None)
        for _ in range(args.warmup):
            client.infer(args.model, inputs, **extra)
        times = []
        for _ in range(args.num_runs):
            start = time.perf_counter()
            result = client.infer(args.model, inputs, **extra)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        client.close()
    return ids, result, times


def main(argv=None) -> int:
    args = parse_args(argv)
    _, _, InferenceServerException = _triton(args.protocol, not args.no_tritonclient)
    try:
        ids, result, times = run(args)
    except InferenceServerException as e:
        print(f"identity_test: error: {e.status()}: {e.message()}", file=sys.stderr)
        return 1
    if args.dialect == "v1":  # [B, input + output] time-major: the prompt, then the new tokens (no lengths in v1)
        out = result.as_numpy("OUTPUT0")
        assert out.shape == (args.batch_size, args.input_len + args.output_len), f"OUTPUT0 has shape {out.shape}"
        rows, new_tokens = out.reshape([-1, args.batch_size]).T, args.batch_size * args.output_len
    else:
        out, lengths = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
        assert out.shape[:2] == (args.batch_size, 1), f"output_ids has shape {out.shape}"
        rows, new_tokens = out[:, 0], int((lengths[:, 0] - args.input_len).sum())
    assert (rows[:, : args.input_len] == ids).all(), "the server did not echo the prompt"
    latency = statistics.median(times)
    row = {"batch": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
           "runs": args.num_runs, "protocol": args.protocol, "dialect": args.dialect, "latency_ms": latency,
           "mean_ms": statistics.fmean(times), "tokens_per_s": new_tokens / (latency / 1000)}
    if args.verbose:
        print(rows.tolist())
    if args.json:
        print(json.dumps(row))
    else:
        print(f"[INFO] batch size: {args.batch_size}, input len: {args.input_len}, output len: {args.output_len}, "
              f"runs: {args.num_runs}, {args.protocol}, {args.dialect} tensors")
        print(f"[INFO] latency: {latency:.2f} ms (median), {row['mean_ms']:.2f} ms (mean), "
              f"{row['tokens_per_s']:.1f} new tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
