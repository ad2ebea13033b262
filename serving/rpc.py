"""What the gRPC adapters share: decoding that never raises, status mapping, stream limits, idle streams.

- Services are registered with `add_service`, whose request deserializers never raise: bytes that do not
  parse (invalid UTF-8 in a string field, a truncated message) reach the handler as `Undecodable`, and
  `decoded()` turns them into INVALID_ARGUMENT (grpc's own deserializer failure is INTERNAL).
- `StreamPermits` bounds the calls that hold a handler thread at the client's pace (a bidirectional stream
  waiting for the client's next message, a health watch), so they can never take the threads that health
  checks, model info and generation need. Generation calls need no permit: the scheduler's bounded queue
  refuses them (RESOURCE_EXHAUSTED) before they can pile up.
- `IdleStreams` closes a stream whose client sent nothing for the idle time while none of its requests ran, with
  UNAVAILABLE.
- `ApiKey` answers every call but health UNAUTHENTICATED unless its metadata carries the server's key, as the
  HTTP routes ask for it (`serving.http.ApiKey`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import NoReturn

import grpc
from google.protobuf import message_factory

from serving.frontend import RequestError, bearer_key_matches, grpc_status, invalid
from serving.request import Code


class Undecodable:
    """A request message whose bytes did not parse."""

    def __init__(self, type_name: str, error: Exception):
        self.type_name = type_name
        self.error = error


def decoded(request):
    """The request, or RequestError INVALID_ARGUMENT when its bytes did not parse."""
    if isinstance(request, Undecodable):
        raise invalid(f"the request's bytes do not parse as {request.type_name} (a string field that is not "
                      f"valid UTF-8, or a malformed message): {request.error}")
    return request


def _tolerant(cls):
    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's bad bytes
            return Undecodable(cls.DESCRIPTOR.full_name, e)

    return deserialize


_HANDLERS = {  # (request streaming, response streaming) -> the handler maker
    (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def add_service(server: grpc.Server, service_descriptor, servicer) -> None:
    """Register every method of the service (a protobuf ServiceDescriptor) on `servicer`'s methods of the
    same names, with deserializers that never raise."""
    handlers = {}
    for method in service_descriptor.methods:
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=_tolerant(request_cls),
                                     response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers),))


# gRPC carries a status's details in the trailing metadata, percent-encoded (a byte past ASCII takes 3); clients
# refuse metadata past 8 KiB at random and past 16 KiB always, so a longer message (one that quotes a long name or
# value of the request) would reach the client as RESOURCE_EXHAUSTED "Stream removed" instead of its own code
MAX_DETAILS_BYTES = 2000  # of UTF-8: at most 6,000 on the wire


def status_details(message: str) -> str:
    """`message` cut to MAX_DETAILS_BYTES (at a character's edge), saying how much was cut."""
    data = message.encode()
    if len(data) <= MAX_DETAILS_BYTES:
        return message
    kept = data[:MAX_DETAILS_BYTES].decode(errors="ignore")
    return f"{kept}... ({len(message) - len(kept)} more characters cut)"


def abort(context, error: RequestError) -> NoReturn:
    context.abort(grpc_status(error.code), status_details(error.message))


def deadline_of(context) -> float | None:
    """The call's deadline in time.monotonic() seconds (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class StreamPermits:
    """At most `limit` client-paced streams at once; one more is RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int):
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def hold(self, what: str):
        if not self._free.acquire(blocking=False):
            raise RequestError(Code.RESOURCE_EXHAUSTED,
                               f"the server holds at most {self.limit} open {what} streams; retry later")
        try:
            yield
        finally:
            self._free.release()


def _close_call(context, code: grpc.StatusCode, message: str) -> None:
    """End a call from another thread than its handler's, with a status the client can read."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        # grpc's public cancel() shows the client CANCELLED; the core call's cancel takes a status
        from grpc._cython import cygrpc

        call.cancel(getattr(cygrpc.StatusCode, code.name.lower()), message)
    except Exception:  # noqa: BLE001 - another grpc build: close it the public way
        context.cancel()


class IdleStreams:
    """Close streams whose client has sent nothing for `timeout_s` seconds while none of its requests ran (one
    watcher thread for all)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._waiting: dict[int, tuple[float, object]] = {}  # id -> (idle since, context)
        self._busy: dict[int, int] = {}  # id -> the stream's requests running: while any runs, it is not idle
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="idle-streams", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def waiting(self, context):
        """Around a handler's wait for the client's next message."""
        key = id(context)
        with self._lock:
            self._waiting[key] = (time.monotonic(), context)
        try:
            yield
        finally:
            with self._lock:
                self._waiting.pop(key, None)

    def request_started(self, context) -> None:
        """One of the stream's requests runs (each start is ended by `request_ended`)."""
        with self._lock:
            self._busy[id(context)] = self._busy.get(id(context), 0) + 1

    def request_ended(self, context) -> None:
        """The idle time of a stream waiting for its client starts again when its last running request ends."""
        key = id(context)
        with self._lock:
            running = self._busy.pop(key) - 1
            if running:
                self._busy[key] = running
            elif key in self._waiting:
                self._waiting[key] = (time.monotonic(), context)

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            now = time.monotonic()
            with self._lock:
                idle = [(k, c) for k, (since, c) in self._waiting.items()
                        if now - since > self.timeout_s and k not in self._busy]
                for k, _ in idle:
                    del self._waiting[k]
            for _, context in idle:
                _close_call(context, grpc.StatusCode.UNAVAILABLE,
                            f"the stream sent no request for {self.timeout_s:g} s; the server closed it")


def client_messages(request_iterator, context, idle: IdleStreams, decode: bool = True):
    """A bidirectional stream's messages from the client, each wait for one watched for idleness; decoded
    (RequestError on bytes that do not parse) unless `decode` is false."""
    while True:
        with idle.waiting(context):
            request = next(request_iterator, None)
        if request is None:
            return
        yield decoded(request) if decode else request


HEALTH_SERVICE = "/grpc.health.v1.Health/"  # answered without a key: a load balancer's probe has none

_HANDLERS = {  # (request streaming, response streaming) -> the handler maker
    (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


class ApiKey(grpc.ServerInterceptor):
    """Every call but health needs `authorization: Bearer KEY` in its metadata (what tritonclient sends for
    `headers={"authorization": ...}`); without it the call ends UNAUTHENTICATED before any handler runs."""

    def __init__(self, key: str):
        self.key = key.encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_SERVICE):
            return handler
        given = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        given = given.encode() if isinstance(given, str) else given
        if bearer_key_matches(given, self.key):
            return handler
        message = "missing API key: send metadata 'authorization: Bearer KEY'" if not given else "wrong API key"

        def refuse(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return _HANDLERS[handler.request_streaming, handler.response_streaming](
            refuse, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
