"""The HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``, ``/score`` and a landing page.

It runs in its own threads on purpose: ``/healthz`` must still answer, with a failure,
when the event loop is stuck, which a server on that same loop could not do; and
``/score`` (``consumer/scoring.py``) does its work there, never on the loop.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)

# The loop beats every 100 ms; a loop that has not beaten for this long is stuck.
LIVENESS_TIMEOUT_SECONDS = 10.0
# A client that stops sending mid-request gives its thread back after this long.
_SOCKET_TIMEOUT_SECONDS = 30.0
_GET_PATHS = frozenset({"/metrics", "/healthz", "/readyz", "/"})


@dataclass
class Health:
    """What the probes report; written by the service, read by the HTTP thread.

    Two facts about Kafka are kept apart, each set and cleared by its own source:
    ``broker_unreachable`` by the broker probe alone (``broker_lost``/``broker_back``),
    ``publish_error`` by delivery alone (``publish_failed`` after a failed send or
    transaction, ``published`` after a later successful delivery). The probe reaching
    the broker says nothing about publishing: a deleted dead-letter topic fails every
    send while metadata requests succeed, and readiness must not flap then.
    """

    loop_heartbeat: float = field(default_factory=time.monotonic)
    assigned_partitions: int = 0
    model_version: int = 0
    broker_unreachable: str | None = None
    publish_error: str | None = None
    # Set after repeated failed model fits (the fitting process keeps dying, say).
    fit_error: str | None = None
    # Input partitions paused while their per-source state is restored.
    restoring_partitions: int = 0

    def beat(self) -> None:
        self.loop_heartbeat = time.monotonic()

    def broker_lost(self, reason: str) -> None:
        self.broker_unreachable = reason

    def broker_back(self) -> None:
        self.broker_unreachable = None

    def publish_failed(self, reason: str) -> None:
        self.publish_error = reason

    def published(self) -> None:
        self.publish_error = None

    def live(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self.loop_heartbeat
        return age < LIVENESS_TIMEOUT_SECONDS, {"loop_heartbeat_age_seconds": round(age, 3)}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        checks = {
            "assigned_partitions": self.assigned_partitions,
            "model_version": self.model_version,
            "broker_unreachable": self.broker_unreachable,
            "publish_error": self.publish_error,
            "fit_error": self.fit_error,
            "restoring_partitions": self.restoring_partitions,
        }
        ok = (
            self.assigned_partitions > 0
            and self.model_version > 0
            and self.broker_unreachable is None
            and self.publish_error is None
            and self.fit_error is None
            and self.restoring_partitions == 0
        )
        return ok, checks


@dataclass(frozen=True)
class ScoreRequest:
    """What ``/score`` needs of a request; ``read(n)`` reads n bytes of the body."""

    method: str
    query: str
    content_length: str | None
    authorization: str | None
    read: Callable[[int], bytes]


@dataclass(frozen=True)
class Reply:
    """A JSON answer: status, body (anything orjson serialises) and extra headers."""

    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()


class ScoreEndpoint(Protocol):
    """Answers ``/score`` requests (``consumer.scoring.Scorer``); must never raise."""

    def handle(self, request: ScoreRequest) -> Reply: ...


_LANDING = b"""<!doctype html><html><head><title>anomaly-detector</title></head><body>
<h1>anomaly-detector</h1><ul>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
<li><a href="/healthz">/healthz</a>: liveness (the event loop runs)</li>
<li><a href="/readyz">/readyz</a>: readiness
(partitions assigned, a model fitted, broker reachable, publishing works)</li>
<li>POST /score: score a JSON array of events with the live model</li>
</ul></body></html>
"""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Room for a burst of connections: the default of 5 makes clients wait a second.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that fails the TLS handshake (plain HTTP on the HTTPS port, a
        # certificate it does not trust) is the client's problem, not a traceback.
        error = sys.exc_info()[1]
        if isinstance(error, ssl.SSLError | ConnectionError | TimeoutError):
            logger.debug("http: connection from %s failed: %s", client_address, error)
            return
        super().handle_error(request, client_address)


class HttpServer:
    """Serves the endpoints from a daemon thread; ``start``/``stop`` are idempotent.

    Without a ``scorer``, ``/score`` does not exist (404). With an ``ssl_context``
    (a TLS server context), it serves HTTPS only.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Health,
        scorer: ScoreEndpoint | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.registry = registry
        self.health = health
        self.scorer = scorer
        self.ssl_context = ssl_context
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the HTTP server is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        if self._server is not None:
            return
        handler = _make_handler(self.registry, self.health, self.scorer)
        self._server = _Server((self.host, self.requested_port), handler)
        if self.ssl_context is not None:
            # The handshake happens at the connection's first read, in its own thread and
            # under the handler's timeout: a client that stalls it holds up no one else.
            self._server.socket = self.ssl_context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()
        scheme = "https" if self.ssl_context is not None else "http"
        logger.info("HTTP endpoint on %s://%s:%d/", scheme, self.host, self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None


def _make_handler(
    registry: CollectorRegistry, health: Health, scorer: ScoreEndpoint | None
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "anomaly-detector"
        timeout = _SOCKET_TIMEOUT_SECONDS

        def do_GET(self) -> None:
            self._route()

        do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        def _route(self) -> None:
            path, _, query = self.path.partition("?")
            try:
                if path == "/score" and scorer is not None:
                    request = ScoreRequest(
                        self.command,
                        query,
                        self.headers.get("Content-Length"),
                        self.headers.get("Authorization"),
                        self.rfile.read,
                    )
                    reply = scorer.handle(request)
                    self._json(reply.status, reply.body, reply.headers)
                elif path not in _GET_PATHS:
                    self._json(404, {"error": f"no such path: {path}"})
                elif self.command not in ("GET", "HEAD"):
                    error = f"{self.command} is not allowed on {path}"
                    self._json(405, {"error": error}, (("Allow", "GET, HEAD"),))
                else:
                    self._get(path)
            except OSError as exc:
                # The client went away or stalled: there is no one left to answer.
                logger.debug("http: %s %s: %s", self.command, path, exc)
            except Exception:
                # Should not happen; one request must still not take the server down.
                logger.exception("http: %s %s failed", self.command, path)
                with contextlib.suppress(Exception):
                    self._json(500, {"error": "internal error; see the service log"})

        def _get(self, path: str) -> None:
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._probe(*health.live())
            elif path == "/readyz":
                self._probe(*health.ready())
            else:
                self._send(200, _LANDING, "text/html; charset=utf-8")

        def _probe(self, ok: bool, checks: dict[str, Any]) -> None:
            self._json(200 if ok else 503, {"status": "ok" if ok else "fail", **checks})

        def _json(self, status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()) -> None:
            self._send(status, orjson.dumps(body), "application/json", headers)

        def _send(
            self,
            status: int,
            body: bytes,
            content_type: str,
            headers: tuple[tuple[str, str], ...] = (),
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Scrapes every few seconds would drown the service's own log lines.
            logger.debug("http: " + format, *args)

    return Handler
