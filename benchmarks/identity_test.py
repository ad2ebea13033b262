"""The FasterTransformer backend's request, sent with tritonclient to `gptjax serve`; prints the latency.

As FasterTransformer_backend's tools/identity_test.py: a batch of random prompts of one length, a fixed
output length, greedy (top_k 1), timed over several runs after a warm-up. Needs only numpy and
`tritonclient[grpc]`, so it runs from any machine that can reach the server (without tritonclient it falls
back to the same KServe v2 messages from gptjax's own stubs, `serving/proto/inference`):

    python benchmarks/identity_test.py -b 8 -i 512 -o 16 -n 10 -u 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


class _Error(Exception):
    def status(self):
        return str(self.args[0])

    def message(self):
        return str(self.args[1])


class KServeInput:
    def __init__(self, name, shape, datatype):
        self.name, self.shape, self.datatype, self.raw = name, shape, datatype, b""

    def set_data_from_numpy(self, array):
        self.raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


class KServeResult:
    DTYPES = {"UINT32": "<u4", "FP32": "<f4", "INT32": "<i4", "UINT64": "<u8"}

    def __init__(self, response):
        self.arrays = {o.name: np.frombuffer(raw, self.DTYPES[o.datatype]).reshape(list(o.shape))
                       for o, raw in zip(response.outputs, response.raw_output_contents)}

    def as_numpy(self, name):
        return self.arrays[name]


class KServeClient:
    """The few calls of tritonclient.grpc.InferenceServerClient used here, over gptjax's own KServe stubs."""

    def __init__(self, url):
        import grpc

        from serving.proto.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc

        self.grpc, self.pb = grpc, pb
        self.channel = grpc.insecure_channel(url, options=[("grpc.max_receive_message_length", 2**30),
                                                           ("grpc.max_send_message_length", 2**30)])
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


def _triton(use_tritonclient: bool = True):
    """(InferInput, InferenceServerClient, InferenceServerException): tritonclient's, or the fallback."""
    try:
        if not use_tritonclient:
            raise ImportError("not asked for")
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        return grpcclient.InferInput, grpcclient.InferenceServerClient, InferenceServerException
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        return KServeInput, KServeClient, _Error


def build_inputs(InferInput, ids: np.ndarray, output_len: int, top_k: int, top_p: float, seed: int, end_id: int):
    batch = ids.shape[0]

    def tensor(name, array, dtype):
        t = InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    column = lambda value, dtype: np.full((batch, 1), value, dtype)  # noqa: E731
    inputs = [tensor("input_ids", ids.astype(np.uint32), "UINT32"),
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
    return inputs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("-i", "--input-len", type=int, default=512, help="prompt tokens per row (start_len)")
    p.add_argument("-o", "--output-len", type=int, default=16)
    p.add_argument("-n", "--num-runs", type=int, default=10)
    p.add_argument("-w", "--warmup", type=int, default=1)
    p.add_argument("-u", "--url", default="127.0.0.1:8001", help="the server's gRPC HOST:PORT")
    p.add_argument("-m", "--model", default="fastertransformer")
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--topp", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--end-id", type=int, default=-1,
                   help="stop token; -1 (the default) never stops early, so every row makes output-len tokens")
    p.add_argument("--json", action="store_true", help="one JSON line instead of text")
    p.add_argument("--no-tritonclient", action="store_true",
                   help="use gptjax's own KServe v2 stubs even when tritonclient is installed")
    p.add_argument("-v", "--verbose", action="store_true", help="print the output ids")
    args = p.parse_args(argv)
    for name in ("batch_size", "input_len", "output_len", "num_runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")

    InferInput, InferenceServerClient, InferenceServerException = _triton(not args.no_tritonclient)
    client = InferenceServerClient(args.url)
    try:
        vocab = int(client.get_model_config(args.model).config.parameters["vocab_size"].string_value or 50257)
        rng = np.random.default_rng(args.seed)
        ids = rng.integers(0, min(vocab, 50256), size=(args.batch_size, args.input_len), dtype=np.uint32)
        end_id = 2**32 - 1 if args.end_id == -1 else args.end_id  # an id no model has: never produced
        inputs = build_inputs(InferInput, ids, args.output_len, args.topk, args.topp, args.seed, end_id)
        for _ in range(args.warmup):
            client.infer(args.model, inputs)
        times = []
        for _ in range(args.num_runs):
            start = time.perf_counter()
            result = client.infer(args.model, inputs)
            times.append((time.perf_counter() - start) * 1000)
    except InferenceServerException as e:
        print(f"identity_test: error: {e.status()}: {e.message()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    out = result.as_numpy("output_ids")
    lengths = result.as_numpy("sequence_length")
    assert out.shape[:2] == (args.batch_size, 1)
    assert (out[:, 0, : args.input_len] == ids).all(), "the server did not echo the prompt"
    new_tokens = int((lengths[:, 0] - args.input_len).sum())
    row = {"batch": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
           "runs": args.num_runs, "latency_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
           "tokens_per_s": new_tokens / (statistics.median(times) / 1000)}
    if args.verbose:
        print(out[:, 0].tolist())
    if args.json:
        print(json.dumps(row))
    else:
        print(f"[INFO] batch size: {args.batch_size}, input len: {args.input_len}, output len: {args.output_len}, "
              f"runs: {args.num_runs}")
        print(f"[INFO] latency: {row['latency_ms']:.2f} ms (median), {row['mean_ms']:.2f} ms (mean), "
              f"{row['tokens_per_s']:.1f} new tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
