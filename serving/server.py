"""`gptjax serve`: the gRPC server on process 0, the engine loop on every process.

Process 0 listens (127.0.0.1:8001 unless told) with the native `gptjax.v1.Generator`, the Triton/KServe v2
`inference.GRPCInferenceService` (model `fastertransformer`), the standard health service and reflection,
all on one port. Handlers run on gRPC's thread pool: they validate and tokenize, queue the request with the
scheduler and wait for its events; the engine loop runs on its own thread. The other processes only follow
the loop's commands. SIGTERM (or SIGINT) drains: health turns NOT_SERVING, new requests get UNAVAILABLE,
queued and running ones finish, then every process exits 0.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gptjax.config import DEFAULT_PRESET
from gptjax.sampling import SamplingParams
from serving.proto.gptjax.v1 import generator_pb2 as pb
from serving.proto.gptjax.v1 import generator_pb2_grpc as pb_grpc
from serving.scheduler import NotAccepting, QueueFull, Request, Scheduler

log = logging.getLogger("gptjax.serving")

GENERATOR_SERVICE = pb.DESCRIPTOR.services_by_name["Generator"].full_name
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
POLL_S = 0.25  # how often a waiting handler looks at its call's state


class RequestError(Exception):
    """A request the server refuses: the gRPC status code and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass
class Completion:
    """What the engine produced for one request, gathered from its events."""

    token_ids: list
    logprobs: list
    finish_reason: str


class Model:
    """The served model's limits and the request checks shared by the native API and the KServe adapter."""

    def __init__(self, engine, name: str):
        self.engine = engine
        self.name = name
        self.config = engine.config
        self.ec = engine.engine_config
        self.vocab_size = engine.config.vocab_size
        self.max_seq_len = engine.max_seq_len
        self.new_tokens_limit = self.ec.new_tokens_limit(engine.config)
        self.scheduler: Scheduler | None = None
        self.ready = False

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_prompt(self, ids, field: str = "prompt") -> list[int]:
        ids = [int(t) for t in ids]
        if not ids:
            raise invalid(f"{field} is empty")
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise invalid(f"{field}[{i}] = {t} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_seq_len:
            raise invalid(f"{field} has {len(ids)} tokens; the model holds {self.max_seq_len} positions, "
                          f"so a prompt may have at most {self.max_seq_len - 1}")
        return ids

    def check_new_tokens(self, n: int, prompt_len: int, field: str = "max_new_tokens") -> int:
        if n < 1:
            raise invalid(f"{field} must be at least 1, got {n}")
        if n > self.new_tokens_limit:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{field} = {n} is over the server's limit of {self.new_tokens_limit}")
        if prompt_len + n > self.max_seq_len:
            raise invalid(f"prompt length {prompt_len} + {field} {n} exceeds the model's {self.max_seq_len} positions")
        return n

    def check_stop_ids(self, ids, field: str = "stop_token_ids") -> set[int]:
        for i, t in enumerate(ids):
            if not 0 <= int(t) < self.vocab_size:
                raise invalid(f"{field}[{i}] = {t} is outside the vocabulary [0, {self.vocab_size})")
        return {int(t) for t in ids}

    def sampling(self, temperature, top_k, top_p, seed, prefix: str = "sampling.") -> SamplingParams:
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if not math.isfinite(value):
                raise invalid(f"{prefix}{name} must be a finite number, got {value}")
        try:
            return SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), seed=int(seed))
        except ValueError as e:
            raise invalid(f"{prefix}{e}") from None

    def submit(self, requests: list[Request]) -> None:
        if not self.ready or self.scheduler is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the model is loading; retry when health is SERVING")
        try:
            self.scheduler.submit(requests)
        except QueueFull as e:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except NotAccepting:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down") from None


def deadline_of(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def events(request: Request, context):
    """The request's events as they come; cancels it when the call ends first."""
    context.add_callback(request.cancel)
    while True:
        event = request.next_event(POLL_S)
        if event is None:
            if not context.is_active():
                request.cancel()
                return
            continue
        yield event
        if event[0] != "tokens":
            return


def wait_all(requests: list[Request], context) -> list[Completion]:
    """Gather every request's tokens once it has ended; raise RequestError when one of them fails."""
    for r in requests:
        context.add_callback(r.cancel)

    def fail(code, message):
        for other in requests:
            other.cancel()
        raise RequestError(code, message)

    results = []
    for r in requests:
        while not r.wait_ended(POLL_S):
            if not context.is_active():
                fail(grpc.StatusCode.CANCELLED, "the call was cancelled")
        ids, lps, reason = [], [], None
        while reason is None:  # every event is queued by now
            event = r.next_event(0)
            if event[0] == "tokens":
                ids += event[1]
                lps += event[2]
            elif event[0] == "done":
                reason = event[1]
            else:
                fail(getattr(grpc.StatusCode, event[1]), event[2])
        results.append(Completion(ids, lps, reason))
    return results


class TextStream:
    """Decode a growing token list piece by piece, holding back bytes of an unfinished character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0

    def add(self, ids, final: bool = False) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and not final:
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, server: "Server"):
        self.server = server

    @property
    def model(self) -> Model:
        return self.server.ready_model()

    def _request(self, req: pb.GenerateRequest, context) -> Request:
        m = self.model
        kind = req.WhichOneof("prompt")
        if kind is None:
            raise invalid("prompt: give text or token_ids")
        if kind == "text":
            if not req.text:
                raise invalid("text is empty")
            prompt = m.check_prompt(m.tokenizer.encode(req.text), "text (as tokens)")
        else:
            prompt = m.check_prompt(req.token_ids.ids, "token_ids")
        n_new = req.max_new_tokens if req.HasField("max_new_tokens") else m.ec.max_new_tokens
        m.check_new_tokens(n_new, len(prompt))
        s = req.sampling
        sampling = m.sampling(s.temperature if s.HasField("temperature") else m.ec.temperature,
                              s.top_k if s.HasField("top_k") else m.ec.top_k,
                              s.top_p if s.HasField("top_p") else m.ec.top_p,
                              s.seed if s.HasField("seed") else 0)
        stops = m.check_stop_ids(req.stop_token_ids)
        if not req.ignore_eos:
            stops.add(m.ec.eos_token_id)
        return Request(prompt, n_new, sampling, frozenset(stops), deadline_of(context))

    def Generate(self, req, context):
        try:
            m = self.model
            r = self._request(req, context)
            m.submit([r])
            (done,) = wait_all([r], context)
        except RequestError as e:
            context.abort(e.code, e.message)
        return pb.GenerateResponse(token_ids=done.token_ids, text=m.tokenizer.decode(done.token_ids),
                                   logprobs=done.logprobs if req.return_logprobs else [],
                                   finish_reason=FINISH[done.finish_reason], prompt_token_ids=r.prompt)

    def GenerateStream(self, req, context):
        try:
            m = self.model
            r = self._request(req, context)
            m.submit([r])
        except RequestError as e:
            context.abort(e.code, e.message)
        text = TextStream(m.tokenizer)
        first = True
        pending = None  # the last tokens message, held until we know whether it is the final one
        for event in events(r, context):
            if event[0] == "tokens":
                if pending is not None:
                    yield pending
                pending = pb.GenerateResponse(token_ids=event[1], text=text.add(event[1]),
                                              logprobs=event[2] if req.return_logprobs else [],
                                              prompt_token_ids=r.prompt if first else [])
                first = False
            elif event[0] == "done":
                pending.finish_reason = FINISH[event[1]]
                pending.text += text.add([], final=True)
                yield pending
                return
            else:
                context.abort(getattr(grpc.StatusCode, event[1]), event[2])

    def GetModelInfo(self, req, context):
        import jax

        try:
            m = self.model
        except RequestError as e:
            context.abort(e.code, e.message)

        return pb.ModelInfo(name=m.name, vocab_size=m.vocab_size, max_seq_len=m.max_seq_len,
                            n_layers=m.config.n_layers, hidden=m.config.hidden, n_heads=m.config.n_heads,
                            dtype=m.config.dtype, max_slots=m.ec.max_slots, max_new_tokens_limit=m.new_tokens_limit,
                            default_max_new_tokens=m.ec.max_new_tokens, eos_token_id=m.ec.eos_token_id,
                            mesh=str(m.ec.mesh), num_processes=jax.process_count(),
                            max_queued_requests=m.ec.max_queued_requests,
                            active_requests=m.scheduler.active(), queued_requests=m.scheduler.queued())


def _launcher_rank(args) -> int:
    """This process's rank as the flags or the launcher tell it, known before jax.distributed starts."""
    from gptjax import distributed

    if getattr(args, "process_id", None) is not None:
        return int(args.process_id)
    launched = distributed.launcher_env()
    return launched["process_id"] if launched else 0


class Server:
    """The gRPC server: every service on one port, registered before the model exists (it answers
    UNAVAILABLE, and health NOT_SERVING, until `set_model`)."""

    def __init__(self, host: str, port: int, max_message_bytes: int, max_workers: int):
        from serving import kserve
        from serving.proto.inference import grpc_service_pb2 as kpb
        from serving.proto.inference import grpc_service_pb2_grpc as kpb_grpc

        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0)]
        self.model: Model | None = None
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                                options=opts, maximum_concurrent_rpcs=max_workers)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        pb_grpc.add_GeneratorServicer_to_server(GeneratorServicer(self), self.grpc)
        kpb_grpc.add_GRPCInferenceServiceServicer_to_server(kserve.InferenceServicer(self), self.grpc)
        self.services = [GENERATOR_SERVICE, kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name]
        reflection.enable_server_reflection(
            (*self.services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc)
        self.set_serving(False)
        self.address = f"{host}:{port}"
        if self.grpc.add_insecure_port(self.address) == 0:
            raise OSError(f"can't listen on {self.address}")
        self.grpc.start()

    def ready_model(self) -> Model:
        model = self.model
        if model is None or not model.ready:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the model is loading; retry when health is SERVING")
        return model

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.services):
            self.health.set(name, status)


def serve(args, build_engine) -> int:
    """Build the engine (every process), serve on process 0, follow on the others; 0 after a clean drain."""
    from gptjax import distributed
    from serving.config import ServerConfig, server_config_from_file

    if not log.handlers:  # our own lines on stderr, without turning on every library's INFO logging
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s gptjax serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    server_config = server_config_from_file(args.config) if args.config else ServerConfig()
    if server_config.dtype and not args.dtype:
        args.dtype = server_config.dtype
    ec = server_config.engine
    workers = ec.max_queued_requests + ec.max_slots + 16  # a waiting call holds a thread

    # Process 0 listens before the model loads, so health says NOT_SERVING (not "connection refused") meanwhile.
    server = None
    if _launcher_rank(args) == 0:
        server = Server(args.host, args.port, ec.max_message_bytes, workers)
        log.info("listening on %s (loading the model)", server.address)

    try:
        engine = build_engine(args)
        server_config.check_model(engine.config)
    except BaseException:
        if server is not None:
            server.grpc.stop(0)
        raise
    scheduler = Scheduler(engine)
    if not distributed.is_main_process():
        if server is not None:
            server.grpc.stop(0)
        # the drain is process 0's to run: a follower ends when process 0 says so
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        scheduler.warmup()
        scheduler.follow()
        return 0

    if server is None:
        server = Server(args.host, args.port, ec.max_message_bytes, workers)
    model = Model(engine, args.checkpoint or args.model or DEFAULT_PRESET)
    model.scheduler = scheduler
    server.model = model
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    scheduler.warmup()
    scheduler.accept()
    loop = threading.Thread(target=scheduler.run, name="engine-loop", daemon=True)
    loop.start()
    model.ready = True
    server.set_serving(True)
    log.info("serving %s on %s", model.name, server.address)

    while not stop.wait(0.5) and loop.is_alive():
        pass
    failed = not loop.is_alive() and not stop.is_set()
    log.info("draining %d request(s)", scheduler.pending())
    server.set_serving(False)
    scheduler.stop(drain=True)
    if not scheduler.stopped.wait(server_config.drain_timeout_s):
        log.info("drain timed out; cutting off what is left")
        scheduler.stop(drain=False)
        scheduler.stopped.wait(10)
    server.grpc.stop(grace=5).wait()
    log.info("stopped")
    return 1 if failed else 0
