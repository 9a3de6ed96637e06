"""The HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz`` and a landing page.

It runs in its own thread on purpose: ``/healthz`` must still answer, with a failure,
when the event loop is stuck, which a server on that same loop could not do.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)

# The loop beats every 100 ms; a loop that has not beaten for this long is stuck.
LIVENESS_TIMEOUT_SECONDS = 10.0


@dataclass
class Health:
    """What the probes report; written by the service, read by the HTTP thread."""

    loop_heartbeat: float = field(default_factory=time.monotonic)
    assigned_partitions: int = 0
    model_version: int = 0
    broker_error: str | None = None

    def beat(self) -> None:
        self.loop_heartbeat = time.monotonic()

    def live(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self.loop_heartbeat
        return age < LIVENESS_TIMEOUT_SECONDS, {"loop_heartbeat_age_seconds": round(age, 3)}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        checks = {
            "assigned_partitions": self.assigned_partitions,
            "model_version": self.model_version,
            "broker_error": self.broker_error,
        }
        ok = self.assigned_partitions > 0 and self.model_version > 0 and not self.broker_error
        return ok, checks


_LANDING = b"""<!doctype html><html><head><title>anomaly-detector</title></head><body>
<h1>anomaly-detector</h1><ul>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
<li><a href="/healthz">/healthz</a>: liveness (the event loop runs)</li>
<li><a href="/readyz">/readyz</a>: readiness
(partitions assigned, a model fitted, broker reachable)</li>
</ul></body></html>
"""


class HttpServer:
    """Serves the endpoints from a daemon thread; ``start``/``stop`` are idempotent."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        self.host = host
        self.requested_port = port
        self.registry = registry
        self.health = health
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
        handler = _make_handler(self.registry, self.health)
        self._server = ThreadingHTTPServer((self.host, self.requested_port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()
        logger.info("HTTP endpoint on http://%s:%d/", self.host, self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None


def _make_handler(registry: CollectorRegistry, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "anomaly-detector"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._probe(*health.live())
            elif path == "/readyz":
                self._probe(*health.ready())
            elif path == "/":
                self._send(200, _LANDING, "text/html; charset=utf-8")
            else:
                self._json(404, {"error": f"no such path: {path}"})

        def _probe(self, ok: bool, checks: dict[str, Any]) -> None:
            self._json(200 if ok else 503, {"status": "ok" if ok else "fail", **checks})

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, orjson.dumps(body), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Scrapes every few seconds would drown the service's own log lines.
            logger.debug("http: " + format, *args)

    return Handler
