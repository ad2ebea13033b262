"""The HTTP port's app and its listener: serving/http.py's helpers, the KServe v2 routes (serving/kserve_http.py)
and the OpenAI routes (serving/openai.py) mounted in one FastAPI app, run by uvicorn on a thread of its own,
with `/metrics` on it and on the metrics port. The routes import the helpers; only this module imports the
routes, so no import runs in a circle.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import gptjax
from serving import kserve_http, openai
from serving.config import ServerConfig
from serving.frontend import Frontend, RequestError
from serving.http import ApiKey, BodyTimeout, BodyTooLarge, ClientGone, Context, RequestLimit, error
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.request import Code

log = logging.getLogger("gptjax.serving")


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(http: HttpRequest, e: RequestError):
        return error(http.url.path, e.http_status, e.message, e.http_headers)

    @app.exception_handler(BodyTooLarge)
    async def too_large(http: HttpRequest, e: BodyTooLarge):
        return error(http.url.path, 413, str(e))

    @app.exception_handler(BodyTimeout)
    async def too_slow(http: HttpRequest, e: BodyTimeout):
        return error(http.url.path, 408, str(e), {"connection": "close"})

    @app.exception_handler(ClientGone)
    async def gone(_, e: ClientGone):
        return Response(status_code=Code.CANCELLED.http_status)  # nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(http: HttpRequest, e: StarletteHTTPException):
        return error(http.url.path, e.status_code, str(e.detail), e.headers)  # a 405's Allow

    @app.exception_handler(Exception)
    async def internal(http: HttpRequest, e: Exception):  # a bug: still a JSON answer (the traceback is logged)
        return error(http.url.path, 500, f"internal error: {type(e).__name__}: {e}")


def _metrics_route(app: FastAPI, ctx: Context) -> None:
    @app.get("/metrics")
    async def metrics():
        if ctx.metrics is None:
            raise RequestError(Code.NOT_FOUND, "this server keeps no metrics")
        return Response(ctx.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)


def create_app(ctx: Context, api_key: str | None = None, *, max_requests: int) -> FastAPI:
    """The HTTP port's app: KServe v2, the generate extension, OpenAI, /metrics; at most `max_requests` in
    progress."""

    app = FastAPI(title="gptjax", version=gptjax.__version__, docs_url=None, redoc_url=None, openapi_url=None)
    _handlers(app)
    kserve_http.add_routes(app, ctx)
    openai.add_routes(app, ctx)
    _metrics_route(app, ctx)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    app.add_middleware(RequestLimit, limit=max_requests)  # outermost: counts every request, keyed or not
    return app


def create_metrics_app(ctx: Context, api_key: str | None = None) -> FastAPI:
    """The metrics port's app: /metrics only."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    _handlers(app)
    _metrics_route(app, ctx)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    return app


# ---- running it -------------------------------------------------------------------------------------------
def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a port in use is an error of the caller's thread. Made with
    proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets' connections, and without it a response
    written in two parts (headers, body) waits ~40 ms for the client's delayed ACK."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             proto=socket.IPPROTO_TCP)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as e:
        raise OSError(f"can't listen on {host}:{port}: {e.strerror or e}") from None


def header_deadline_protocol(timeout_s: float):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers are not whole `timeout_s` after it
    opened (or after the first byte of a request that follows a response). uvicorn times a connection out only
    while it idles between requests, so one that sends nothing, or a few bytes now and then, was held for good,
    and enough of them took every connection the port allows."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _late: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def connection_lost(self, exc) -> None:
            self._unwatch()
            super().connection_lost(exc)

        def _watch(self) -> None:
            """Arm the deadline while headers are awaited (h11 is IDLE); disarm once a request is under way."""
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                self._unwatch()
            elif self._late is None:
                self._late = asyncio.get_running_loop().call_later(timeout_s, self.transport.close)

        def _unwatch(self) -> None:
            if self._late is not None:
                self._late.cancel()
                self._late = None

    return HeaderDeadline


class HttpServer:
    """uvicorn serving the HTTP app (and the metrics app) on a thread of its own, with one event loop. Past
    `max_connections` open connections on a port uvicorn answers its own plain-text 503 (the app's RequestLimit
    answers requests before that); a connection whose request headers are not whole within `header_timeout_s`
    is closed, so that idle or trickling clients can't hold them all."""

    def __init__(self, apps: list[tuple[FastAPI, socket.socket]], grace_s: float = 5.0,
                 max_connections: int | None = None, header_timeout_s: float = 60.0):
        import uvicorn

        self.sockets = [sock for _, sock in apps]
        self.servers = [uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                      http=header_deadline_protocol(header_timeout_s),
                                                      timeout_graceful_shutdown=grace_s,
                                                      limit_concurrency=max_connections))
                        for app, _ in apps]
        self.addresses = ["%s:%d" % sock.getsockname()[:2] for sock in self.sockets]
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        async def serve_all():
            await asyncio.gather(*(s.serve(sockets=[sock]) for s, sock in zip(self.servers, self.sockets)))

        asyncio.run(serve_all())

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop listening, let the answers under way finish (up to the grace time), then return."""
        for s in self.servers:
            s.should_exit = True
        self._thread.join(timeout_s)
        for sock in self.sockets:
            sock.close()


def start_http(frontend: Frontend, options: ServerConfig) -> HttpServer | None:
    """Listen on the HTTP port (the app; 0: none) and the metrics port (/metrics; 0: none) -> the running server
    (`.stop()`), or None when both are 0. Raises OSError naming a port that can't be bound."""
    ctx = Context(frontend, max_body_bytes=options.max_message_bytes, dialect=options.dialect,
                  body_timeout_s=options.http_body_timeout_s)
    apps = []
    if options.http_port:
        apps.append((create_app(ctx, options.api_key, max_requests=options.max_http_requests),
                     listen(options.host, options.http_port)))
    if options.metrics_port:
        apps.append((create_metrics_app(ctx, options.api_key), listen(options.host, options.metrics_port)))
    # connections are counted apart from requests: several per request in progress before uvicorn refuses
    return HttpServer(apps, max_connections=4 * options.max_http_requests,
                      header_timeout_s=options.http_body_timeout_s) if apps else None
