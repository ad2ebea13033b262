"""A small Python client for `gptjax serve`, and the `gptjax client` command.

    from serving.client import Client
    with Client("127.0.0.1:8001") as client:
        client.wait_ready()
        done = client.generate("Once upon a time", max_new_tokens=16, temperature=0)   # greedy
        for piece in client.stream([464, 2068, 7586], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=1):
            print(piece.text, end="", flush=True)
"""

from __future__ import annotations

import contextlib
import json
import operator
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.proto.gptjax.v1 import generator_pb2 as pb
from serving.proto.gptjax.v1 import generator_pb2_grpc as pb_grpc

REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_UNSPECIFIED: ""}


@dataclass
class Completion:
    """A response (or, from `stream`, one piece of it: finish_reason is "" until the last piece)."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None

    @classmethod
    def from_proto(cls, r: pb.GenerateResponse, logprobs: bool) -> "Completion":
        return cls(list(r.token_ids), r.text, REASONS[r.finish_reason], list(r.prompt_token_ids),
                   list(r.logprobs) if logprobs else None)


def make_request(prompt: str | Sequence[int], max_new_tokens: int | None = None, *, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                 return_logprobs: bool = False) -> pb.GenerateRequest:
    """A GenerateRequest; None leaves a field to the server's default (temperature 0 is greedy)."""
    if seed is not None and not -2**63 <= int(seed) < 2**64:  # modulo 2**64 it would be another seed
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    with _named("stop_token_ids"):
        req = pb.GenerateRequest(stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos,
                                 return_logprobs=return_logprobs)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.SetInParent()  # an empty list is still a token_ids prompt (the server refuses it)
        ids = _token_ids(prompt)
        with _named("prompt token ids"):
            req.token_ids.ids.extend(ids)
    if max_new_tokens is not None:
        with _named("max_new_tokens"):
            req.max_new_tokens = max_new_tokens
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            with _named(name):
                setattr(req.sampling, name, int(value) % 2**64 if name == "seed" else value)  # seeds are unsigned
    return req


@contextlib.contextmanager
def _named(field: str):
    """A value the request's field can't hold (protobuf's "Value out of range: N") -> a ValueError naming it."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None


def _token_ids(prompt) -> list[int]:
    """The prompt's ids as ints; a float (464.9) is refused, not cut to an id."""
    try:
        return [operator.index(t) for t in prompt]
    except TypeError:
        bad = next(t for t in prompt if not hasattr(t, "__index__"))
        raise ValueError(f"prompt token ids must be integers, got {bad!r}") from None


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: tuple | None
    credentials: object
    wait_for_ready: bool | None
    compression: object


def key_metadata(api_key: str | None) -> tuple:
    """The call metadata that carries `api_key` to a server started with `--api-key` (none without a key)."""
    return (("authorization", "Bearer " + api_key),) if api_key else ()


def keyed_channel(channel: grpc.Channel, api_key: str | None) -> grpc.Channel:
    """`channel`, sending `api_key` with every call when there is one."""
    return grpc.intercept_channel(channel, _BearerKey(api_key)) if api_key else channel


class _BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer KEY` to every call's metadata (all four kinds of call, KServe's
    ModelStreamInfer too), for a server started with `--api-key`."""

    def __init__(self, key: str):
        (self.header,) = key_metadata(key)

    def _with_key(self, details):
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), self.header),
                            details.credentials, details.wait_for_ready, getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)


class Client:
    def __init__(self, target: str = "127.0.0.1:8001", *, api_key: str | None = None,
                 max_message_bytes: int = 16 * 1024 * 1024):
        """`api_key`: the key of a server started with `--api-key` (sent with every call)."""
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", max_message_bytes),
                                                              ("grpc.max_send_message_length", max_message_bytes)])
        self.channel = keyed_channel(self.channel, api_key)
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until health says SERVING; TimeoutError after `timeout` seconds."""
        end = time.monotonic() + timeout
        while True:
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"the server was not SERVING within {timeout} s")
            time.sleep(0.2)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int | None = None, *,
                 timeout: float | None = None, **kwargs) -> Completion:
        """The whole completion. Keyword arguments as `make_request`; raises grpc.RpcError."""
        req = make_request(prompt, max_new_tokens, **kwargs)
        return Completion.from_proto(self.stub.Generate(req, timeout=timeout), req.return_logprobs)

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int | None = None, *,
               timeout: float | None = None, **kwargs) -> Iterator[Completion]:
        """The completion piece by piece; closing the iterator early cancels the call (and frees its slot)."""
        req = make_request(prompt, max_new_tokens, **kwargs)
        call = self.stub.GenerateStream(req, timeout=timeout)
        try:
            for r in call:
                yield Completion.from_proto(r, req.return_logprobs)
        finally:
            call.cancel()

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)


def serving_model_info(target: str, api_key: str | None = None, timeout: float = 60.0) -> pb.ModelInfo:
    """The model of the server at `target` once it is SERVING, for the tools that measure a server; a ValueError
    that says what is wrong when there is none, or it wants a key that was not given or refuses the one given."""
    with Client(target, api_key=api_key) as client:
        try:
            client.wait_ready(timeout=timeout)
        except TimeoutError:
            raise ValueError(f"--server {target}: no server SERVING there within {timeout:.0f} s") from None
        try:
            return client.model_info(timeout=timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            what = "refuses the key given" if api_key else "needs a key"
            raise ValueError(f"--server {target} {what}: pass its --api-key (or set $GPTJAX_API_KEY)") from None


def main(args) -> int:
    """`gptjax client`: one request; prints the text (or JSON); exit 2 on a refused request, 1 on other errors."""
    if (args.prompt is None) == (args.prompt_ids is None):
        print("gptjax client: error: give exactly one of --prompt and --prompt-ids", file=sys.stderr)
        return 2
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  ignore_eos=getattr(args, "no_stop", False))
    try:
        with Client(args.server, api_key=args.api_key) as client:
            if args.stream:
                ids, prompt_ids, reason = [], [], ""
                if not args.json and isinstance(prompt, str):
                    print(prompt, end="", flush=True)
                for piece in client.stream(prompt, args.max_new_tokens, **kwargs):
                    ids += piece.token_ids
                    prompt_ids = prompt_ids or piece.prompt_ids
                    reason = piece.finish_reason or reason
                    if args.json:
                        print(json.dumps({"output_ids": piece.token_ids, "text": piece.text,
                                          "finish_reason": piece.finish_reason}), flush=True)
                    else:
                        print(piece.text, end="", flush=True)
                if not args.json:
                    print()
            else:
                done = client.generate(prompt, args.max_new_tokens, **kwargs)
                if args.json:
                    print(json.dumps({"prompt_ids": done.prompt_ids, "output_ids": done.token_ids, "text": done.text,
                                      "finish_reason": done.finish_reason}))
                else:
                    print((prompt if isinstance(prompt, str) else "") + done.text)
    except grpc.RpcError as e:
        print(f"gptjax client: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2 if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED) else 1
    return 0
