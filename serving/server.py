"""`gptjax serve`: the gRPC (and HTTP) server on process 0, the engine loop on every process.

Process 0 listens (127.0.0.1:8001 unless told) with the native `gptjax.v1.Generator`, the Triton/KServe v2
`inference.GRPCInferenceService` (model `fastertransformer`, serving/kserve.py), the standard health service
and reflection, all on one port, and starts the HTTP port (serving/http.py) beside it. Every API is a thin
adapter over one front end (serving/frontend.py). Handlers run on gRPC's thread pool; the engine loop runs
on its own thread; the other processes only follow the loop's commands.

Limits that keep the server answering: each connection may hold at most as many concurrent streams as the
scheduler can queue and run, plus a few (`grpc.max_concurrent_streams`; the client holds further calls until a
stream ends); streams that wait on the client (ModelStreamInfer, health watches, reflection) are bounded and
closed after the idle time without a message; generation calls beyond the queue are refused at once, so threads
stay free for health and model info.
Keep-alive pings find dead connections. With `--api-key`, every call but health needs the metadata
`authorization: Bearer KEY` (`serving.rpc.ApiKey`), as every HTTP route but health needs the header.

SIGTERM (or SIGINT) drains: health turns NOT_SERVING, new requests get UNAVAILABLE, queued and running ones
finish, then every process exits 0. A second signal during the drain stops at once: the running requests
get UNAVAILABLE and the process exits 128 + the signal's number.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from serving import kserve
from serving.config import GRPC_INT_MAX, ServerConfig, ServingConfig
from serving.frontend import Frontend, Params, RequestError
from serving.request import Tokens
from serving.proto.gptjax.v1 import generator_pb2 as pb
from serving.rpc import ApiKey, IdleStreams, StreamPermits, abort, add_service, client_messages, deadline_of, decoded

log = logging.getLogger("gptjax.serving")

GENERATOR = pb.DESCRIPTOR.services_by_name["Generator"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
# the native API's names for the front end's fields, in messages
NATIVE_NAMES = {"max_new_tokens": "max_new_tokens", "temperature": "sampling.temperature",
                "top_k": "sampling.top_k", "top_p": "sampling.top_p", "seed": "sampling.seed",
                "stop_ids": "stop_token_ids"}


class ListenError(ValueError):
    """A port that can't be listened on (the CLI exits 2 with this one line)."""


# ---- the native API -------------------------------------------------------------------------------------
def native_params(req: pb.GenerateRequest, context) -> tuple[Params, dict]:
    """A GenerateRequest -> the front end's Params and the native names of its fields."""
    kind = req.WhichOneof("prompt")
    prompt = req.text if kind == "text" else req.token_ids.ids if kind == "token_ids" else None
    s = req.sampling
    knobs = {name: getattr(s, name) if s.HasField(name) else None for name in ("temperature", "top_k", "top_p", "seed")}
    params = Params(prompt=prompt, max_new_tokens=req.max_new_tokens if req.HasField("max_new_tokens") else None,
                    stop_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, deadline=deadline_of(context), **knobs)
    return params, {**NATIVE_NAMES, "prompt": kind or "prompt"}


class GeneratorServicer:
    """gptjax.v1.Generator over the front end (registered with serving.rpc.add_service)."""

    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    def _start(self, req, context, call):
        """Validate and queue one request for this call."""
        r = self.frontend.validate(*native_params(decoded(req), context))
        call.requests = [r]
        context.add_callback(r.cancel)
        self.frontend.submit([r])
        return r

    def Generate(self, req, context):
        fe = self.frontend
        try:
            with fe.api_call() as call:
                r = self._start(req, context, call)
                (done,) = fe.collect([r], context.is_active)
        except RequestError as e:
            abort(context, e)
        return pb.GenerateResponse(token_ids=done.token_ids, text=fe.decode(done.token_ids),
                                   logprobs=done.logprobs if req.return_logprobs else [],
                                   finish_reason=FINISH[done.finish_reason], prompt_token_ids=r.prompt)

    def GenerateStream(self, req, context):
        fe = self.frontend
        try:
            with fe.api_call() as call:
                r = self._start(req, context, call)
                yield from self._pieces(r, req.return_logprobs, context)
        except RequestError as e:
            abort(context, e)

    def _pieces(self, r, logprobs: bool, context):
        """One message per Tokens event; each is held until the next event says whether it is the last."""
        text, pending, first = self.frontend.text_stream(), None, True
        for event in self.frontend.events(r, context.is_active):
            if isinstance(event, Tokens):
                if pending is not None:
                    yield pending
                pending = pb.GenerateResponse(token_ids=event.ids, text=text.add(event.ids),
                                              logprobs=event.logprobs if logprobs else [],
                                              prompt_token_ids=r.prompt if first else [])
                first = False
            else:  # Finished (events() raises on Failed)
                pending = pending or pb.GenerateResponse(prompt_token_ids=r.prompt)
                pending.finish_reason = FINISH[event.reason]
                pending.text += text.add([], final=True)
                yield pending

    def GetModelInfo(self, req, context):
        import jax

        fe = self.frontend
        try:
            decoded(req)
            lim = fe.require_loaded()
        except RequestError as e:
            abort(context, e)
        c, ec = fe.engine.config, fe.engine.engine_config
        active, queued = fe.counts()
        return pb.ModelInfo(name=fe.name, vocab_size=lim.vocab_size, max_seq_len=lim.max_seq_len,
                            n_layers=c.n_layers, hidden=c.hidden, n_heads=c.n_heads, dtype=c.dtype,
                            max_slots=ec.max_slots, max_new_tokens_limit=lim.max_new_tokens,
                            default_max_new_tokens=lim.default_max_new_tokens, eos_token_id=lim.eos_token_id,
                            mesh=str(ec.mesh), num_processes=jax.process_count(),
                            max_queued_requests=lim.max_queued_requests, active_requests=active,
                            queued_requests=queued)


# ---- health and reflection, with the stream bounds --------------------------------------------------------
class HealthServicer:
    """grpc.health.v1.Health: grpc's servicer, its watches bounded like every client-paced stream."""

    def __init__(self, servicer: health.HealthServicer, permits: StreamPermits):
        self.servicer = servicer
        self.permits = permits

    def Check(self, request, context):
        try:
            return self.servicer.Check(decoded(request), context)
        except RequestError as e:
            abort(context, e)

    def List(self, request, context):
        try:
            return self.servicer.List(decoded(request), context)
        except RequestError as e:
            abort(context, e)

    def Watch(self, request, context):
        try:
            request = decoded(request)
            with self.permits.hold("health Watch"):
                yield from self.servicer.Watch(request, context)
        except RequestError as e:
            abort(context, e)


class ReflectionServicer:
    """Server reflection: grpc's servicer, bounded and closed when idle like every client-paced stream."""

    def __init__(self, service_names, permits: StreamPermits, idle: IdleStreams):
        self.servicer = reflection.ReflectionServicer(service_names)
        self.permits = permits
        self.idle = idle

    def ServerReflectionInfo(self, request_iterator, context):
        try:
            with self.permits.hold("reflection"):
                yield from self.servicer.ServerReflectionInfo(client_messages(request_iterator, context, self.idle),
                                                              context)
        except RequestError as e:
            abort(context, e)


# ---- the listener -----------------------------------------------------------------------------------------
def check_host(host: str) -> None:
    """Refuse a --host this machine can't listen on, in one line naming the flag, before gRPC is given it: gRPC
    logs a line of its own about such an address (whatever the port) before refusing it."""
    if not host.strip():
        raise ListenError(f"--host {host!r} is empty: give a name or address to listen on, such as 127.0.0.1")
    try:
        addresses = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError) as e:  # a name not found, one IDNA can't encode, a NUL in it
        reason = (isinstance(e, OSError) and e.strerror) or str(e)
        hint = "; an IPv6 address goes without brackets" if host.startswith("[") else ""
        raise ListenError(f"--host {host!r} is not a name or address to listen on ({reason}){hint}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            try:
                s.bind(address)  # port 0: any free one, so only the address is tried
            except OSError as e:
                raise ListenError(f"--host {host!r} is not an address of this machine to listen on "
                                  f"({e.strerror or e})") from None


def grpc_address(host: str, port: int) -> str:
    """HOST:PORT as gRPC reads it: an IPv6 address in brackets (gRPC takes "::1:8001" for ::1:8001, port 443)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_can_listen(host: str, port: int) -> None:
    """Bind the address once here, so that a port in use is one clear error (grpc would log its own lines)."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, OverflowError, UnicodeError) as e:
        raise ListenError(f"can't listen on {host}:{port}: {e}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds: TIME_WAIT is no conflict
            try:
                s.bind(address)
            except OSError as e:
                raise ListenError(f"can't listen on {host}:{port}: {e.strerror or e}") from None


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class Server:
    """The gRPC server: every service on one port, registered before the model exists (they answer
    UNAVAILABLE, and health NOT_SERVING, until the front end is loaded and accepting)."""

    def __init__(self, frontend: Frontend, options: ServerConfig, in_flight: int):
        """`in_flight`: the generation calls the scheduler holds at most (its queue and its slots)."""
        check_host(options.host)
        check_can_listen(options.host, options.port)
        # client-paced streams: ModelStreamInfer and reflection share one pool of permits, and health watches
        # (open to callers without the API key, held as long as they like) have a pool of their own
        workers = in_flight + 2 * options.max_client_streams + options.reserved_workers
        opts = [("grpc.max_receive_message_length", options.max_message_bytes),
                ("grpc.max_send_message_length", options.max_message_bytes), ("grpc.so_reuseport", 0),
                # per connection: one client may fill the queue and the slots and still ask for health or info
                # (at most gRPC's largest channel argument: a larger one stopped the start with a traceback)
                ("grpc.max_concurrent_streams", min(in_flight + options.reserved_workers, GRPC_INT_MAX)),
                # ...and calls past that wait in the client for a stream to end: with gRPC's overload protection a
                # stream the client has seen end still counts until the server frees it, and the next call, sent at
                # once, was refused with RST_STREAM (UNAVAILABLE), health checks included
                ("grpc.http.overload_protection", 0),
                ("grpc.keepalive_time_ms", _ms(options.keepalive_time_s)),
                ("grpc.keepalive_timeout_ms", _ms(options.keepalive_timeout_s)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients may ping every 10 s
                ("grpc.max_connection_idle_ms", _ms(options.max_connection_idle_s))]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                                options=opts, maximum_concurrent_rpcs=workers,
                                interceptors=[ApiKey(options.api_key)] if options.api_key else None)
        permits, self.idle = StreamPermits(options.max_client_streams), IdleStreams(options.stream_idle_timeout_s)
        self.health = health.HealthServicer()
        add_service(self.grpc, HEALTH, HealthServicer(self.health, StreamPermits(options.max_client_streams)))
        add_service(self.grpc, GENERATOR, GeneratorServicer(frontend))
        add_service(self.grpc, kserve.SERVICE, kserve.InferenceServicer(frontend, options.dialect, permits, self.idle))
        self.services = [GENERATOR.full_name, kserve.SERVICE.full_name]
        names = (*self.services, HEALTH.full_name, reflection.SERVICE_NAME)
        add_service(self.grpc, REFLECTION, ReflectionServicer(names, permits, self.idle))
        self.set_serving(False)
        self.address = grpc_address(options.host, options.port)
        try:
            bound = self.grpc.add_insecure_port(self.address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise ListenError(f"can't listen on {self.address}")
        self.address = grpc_address(options.host, bound)  # port 0: the one the system chose
        self.grpc.start()

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.services):
            self.health.set(name, status)


# ---- gptjax serve -----------------------------------------------------------------------------------------
class Listeners:
    """What process 0 listens with: the gRPC server and, when asked, the HTTP and metrics ports."""

    def __init__(self, frontend: Frontend, config: ServingConfig):
        options = config.server
        self.grpc = Server(frontend, options, config.scheduler.max_queued_requests + config.engine.max_slots)
        self.http = None
        http_port, metrics_port = options.http_port, options.metrics_port
        if http_port or metrics_port:
            from serving.http_app import start_http
            from serving.metrics import Metrics

            frontend.metrics = Metrics(frontend.name)
            try:
                self.http = start_http(frontend, options)
            except OSError as e:
                self.grpc.grpc.stop(0)
                raise ListenError(str(e)) from None
        ports = [f"gRPC {self.grpc.address}"] + [f"{n} {p}" for n, p in (("HTTP", http_port),
                                                                          ("metrics", metrics_port)) if p]
        self.description = ", ".join(ports)

    def set_serving(self, serving: bool) -> None:
        self.grpc.set_serving(serving)

    def stop(self, grace_s: float) -> None:
        if self.http is not None:
            self.http.stop(grace_s + 5)
        self.grpc.grpc.stop(grace=grace_s).wait()


class Signals:
    """SIGTERM / SIGINT: the first asks for a drain, a second one for an immediate stop. While `loading` (before
    any request is taken) the first stops the warm-up, and a second ends the process at once."""

    def __init__(self):
        self.first, self.second = threading.Event(), threading.Event()
        self.second_signum = 0
        self.loading = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.first.is_set():
            if self.loading:  # nothing to drain, and the compiles in flight would be waited for
                os.write(2, b"gptjax serve: a second signal while loading: exiting now\n")
                os._exit(128 + signum)
            self.second_signum = signum
            self.second.set()
        self.first.set()


def _log_to_stderr() -> None:
    if not log.handlers:  # our own lines on stderr, without turning on every library's INFO logging
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s gptjax serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def serve(config: ServingConfig, model_name: str, build_engine: Callable[[], object], rank: int = 0,
          join_job: Callable[[], None] | None = None) -> int:
    """Build the engine (every process), serve on process 0, follow on the others. `rank`: this process's
    index as its launcher tells it, known before jax.distributed starts; `model_name`: what the APIs call the
    model; `join_job`: starts the multi-process job (as `build_engine` does first). -> 0 after a clean drain,
    1 when the engine loop failed, 128 + the signal's number when a second signal cut the drain short. Raises
    ListenError (a ValueError: the CLI exits 2) when a port can't be listened on."""
    from gptjax import distributed
    from serving.scheduler import Scheduler

    _log_to_stderr()
    frontend = Frontend(model_name)
    # Process 0 listens before the model loads, so health says NOT_SERVING (not "connection refused") meanwhile.
    try:
        listeners = Listeners(frontend, config) if rank == 0 else None
    except ListenError:
        # the other processes wait for process 0 to start the job: it does so, then fails, and they end by the
        # heartbeats in seconds rather than at the start's time limit (distributed.INIT_TIMEOUT_S)
        if join_job is not None:
            join_job()
        raise
    if listeners is not None:
        log.info("listening on %s (loading the model)", listeners.description)
    try:
        engine = build_engine()
        config.check_model(engine.config)
    except BaseException:
        if listeners is not None:
            listeners.stop(0)
        raise
    scheduler = Scheduler(engine, config.scheduler)
    if not distributed.is_main_process():
        if listeners is not None:
            listeners.stop(0)
        # the drain is process 0's to run: a follower ends when process 0 says so
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        scheduler.warmup()
        scheduler.follow()
        return 0
    listeners = listeners or Listeners(frontend, config)
    return _serve_main(listeners, frontend, engine, scheduler, config.server)


def _wait_for_weights(engine) -> None:
    """The weights (with one process, a checkpoint is read while the programs compile: `Engine.load`) on the
    devices before the first request: a failed read fails the start here."""
    start = time.monotonic()
    engine.params  # waits for a checkpoint still being read, and raises what the read raised
    if time.monotonic() - start > 1:
        log.info("the weights arrived %.0f s after the programs", time.monotonic() - start)


def _load_tokenizer(engine) -> None:
    """The tokenizer now rather than at the first request with text, whose loading (~2 s, holding the
    interpreter) would stall every other call meanwhile."""
    try:
        engine.tokenizer
    except Exception as e:  # noqa: BLE001 - requests of token ids still work; those with text will say why not
        log.warning("no tokenizer (%s): requests with text will fail", e)


def _serve_main(listeners: Listeners, frontend: Frontend, engine, scheduler, options: ServerConfig) -> int:
    from gptjax import distributed
    from serving.scheduler import PeerLost

    frontend.load(engine, scheduler, options.max_batch_size, options.ft_top_p_off)
    if frontend.metrics is not None:
        frontend.metrics.watch(scheduler, engine)
    signals = Signals()
    if not scheduler.warmup(stop=signals.first):  # the other processes still compile: they end by the heartbeats
        log.info("stopped before serving")
        listeners.stop(0)
        return distributed.leave_job(0)
    _wait_for_weights(engine)
    _load_tokenizer(engine)
    signals.loading = False
    serving = not signals.first.is_set()  # else straight to the drain, which tells the other processes to stop
    if serving:
        scheduler.accept()
    loop = threading.Thread(target=_run_loop, args=(scheduler,), name="engine-loop", daemon=True)
    loop.start()
    if serving:
        listeners.set_serving(True)
        log.info("serving %s on %s", frontend.name, listeners.description)
    while not signals.first.wait(0.5) and loop.is_alive():
        pass
    failed = not loop.is_alive() and not signals.first.is_set()
    code = _drain(listeners, scheduler, signals, options.drain_timeout_s)
    log.info("stopped")
    if isinstance(scheduler.failure, PeerLost):
        # a clean exit would wait at the job's shutdown barrier for the lost process, until the heartbeats
        # abort this one
        return distributed.leave_job(1)
    return 1 if failed else code


def _run_loop(scheduler) -> None:
    """The engine loop's thread. What ends the loop is logged and answered there and kept in
    `scheduler.failure` for the exit code; raised out of the thread, it would print a second traceback."""
    try:
        scheduler.run()
    except BaseException:  # noqa: BLE001 - see above
        pass


def _drain(listeners: Listeners, scheduler, signals: Signals, timeout_s: float) -> int:
    """Answer what is queued and running (until the drain timeout or a second signal), then stop listening."""
    log.info("draining %d request(s)", scheduler.pending())
    listeners.set_serving(False)
    scheduler.stop(drain=True)
    end = time.monotonic() + timeout_s
    while not scheduler.stopped.wait(0.1) and not signals.second.is_set() and time.monotonic() < end:
        pass
    if not scheduler.stopped.is_set():
        log.info("a second signal: stopping now" if signals.second.is_set() else
                 "drain timed out; cutting off what is left")
        scheduler.stop(drain=False)
        scheduler.stopped.wait(10)
    listeners.stop(grace_s=1.0 if signals.second.is_set() else 5.0)
    return 128 + signals.second_signum if signals.second.is_set() else 0
