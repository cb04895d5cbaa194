"""Health and metrics over HTTP, with kube-proxy's semantics.

- ``/healthz``: 503 when an update was queued more than ``timeout`` (2 x sync period)
  ago and no sync has succeeded since, or when this Node is being deleted; JSON body
  ``{"lastUpdated", "currentTime", "nodeEligible"}``, as kube-proxy writes it, so
  cloud load balancers and probes written for kube-proxy keep working.
- ``/livez``: the same without node eligibility (a node being drained is still alive).
- ``/readyz``: 200 once the first full sync succeeded; kube-proxy has no such
  endpoint, the DaemonSet's readiness probe uses it.
- ``/metrics``: Prometheus text format.

healthCheckNodePort servers (externalTrafficPolicy Local) answer as kube-proxy's
``hcHandler`` does: 200 only when the Service has local endpoints and the proxy is
healthy, the ``X-Load-Balancing-Endpoint-Weight`` header, and the JSON body.

Every server is reachable by anything on the node's network, so none of them may be
tied up by clients: an idle connection is closed after ``IDLE_TIMEOUT`` seconds, and at
most ``MAX_CONNECTIONS`` are served at once per server. A new connection beyond that
closes the oldest one instead of waiting: probes open a fresh connection and are answered
within milliseconds, so clients that trickle bytes to hold every slot cannot shut them out.
An IPv6 address binds IPv6 (``::`` both families); ``0.0.0.0`` binds IPv4.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping

from svcproxy.flags import parse_bind
from svcproxy.logformat import about
from svcproxy.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("svcproxy.health")

Clock = Callable[[], float]


def go_time(ts: float) -> str:
    """A timestamp as Go's time.Time.String() prints it in UTC (kube-proxy's body)."""
    if ts <= 0:
        return "0001-01-01 00:00:00 +0000 UTC"
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    frac = f"{dt.microsecond:06d}".rstrip("0")
    return dt.strftime("%Y-%m-%d %H:%M:%S") + (f".{frac}" if frac else "") + " +0000 UTC"


class HealthState:
    """What /healthz, /livez and /readyz report; updated by the reconcile loop."""

    def __init__(self, timeout: float, clock: Clock = time.time) -> None:
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._last_updated = 0.0
        self._oldest_queued: float | None = None
        self._node_eligible = True
        self._ready = False

    def queued(self) -> None:
        """An update is waiting for a sync (kube-proxy's QueuedUpdate)."""
        with self._lock:
            if self._oldest_queued is None:
                self._oldest_queued = self._clock()

    def updated(self) -> None:
        """A sync succeeded: nothing is pending any more (kube-proxy's Updated)."""
        with self._lock:
            self._last_updated = self._clock()
            self._oldest_queued = None

    def set_ready(self) -> None:
        with self._lock:
            self._ready = True

    def set_node_eligible(self, eligible: bool) -> None:
        with self._lock:
            self._node_eligible = eligible

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._ready

    @property
    def node_eligible(self) -> bool:
        with self._lock:
            return self._node_eligible

    def proxy_healthy(self) -> tuple[bool, float]:
        """Healthy unless an update has waited longer than the timeout."""
        with self._lock:
            now = self._clock()
            if self._oldest_queued is not None and now - self._oldest_queued >= self._timeout:
                return False, self._last_updated
            return True, self._last_updated

    def now(self) -> float:
        return self._clock()


def node_eligible(node: Mapping[str, Any] | None) -> bool:
    """A Node being deleted (or marked for deletion by the cluster autoscaler) is not
    eligible, so load balancers drain it before kube-proxy's replacement goes away."""
    if not node:
        return True
    meta = node.get("metadata") or {}
    if isinstance(meta, Mapping) and meta.get("deletionTimestamp"):
        return False
    spec = node.get("spec") or {}
    taints = spec.get("taints") if isinstance(spec, Mapping) else None
    if isinstance(taints, list):
        for taint in taints:
            if isinstance(taint, Mapping) and taint.get("key") == "ToBeDeletedByClusterAutoscaler":
                return False
    return True


#: Seconds a connection may stay silent (before or between requests).
IDLE_TIMEOUT = 10.0
#: Connections one server handles at once; each costs a thread.
MAX_CONNECTIONS = 64


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT

    def log_message(self, fmt: str, *args: Any) -> None:  # noqa: D401 - quiet access log
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, code: int, body: bytes, content_type: str, headers: Mapping[str, str] = {}) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self.server.dispatch(self)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], dispatch: Callable[[_Handler], None]) -> None:
        self.dispatch = dispatch
        self._live: dict[Any, None] = {}  # connections being served, oldest first
        self._live_lock = threading.Lock()
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._live_lock:
            while len(self._live) >= MAX_CONNECTIONS:
                oldest = next(iter(self._live))
                del self._live[oldest]
                try:  # its thread sees the end of the stream and finishes
                    oldest.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._live[request] = None
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._live_lock:
                self._live.pop(request, None)


class HealthServer:
    """The agent's one HTTP server: /healthz /livez /readyz /metrics."""

    def __init__(self, bind: str, state: HealthState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics
        try:
            self._httpd = _Server(parse_bind(bind), self._dispatch)
        except OSError as exc:
            # The bare "[Errno 98] Address already in use" names neither the address nor
            # the flag; on a node moving off kube-proxy, its healthz holds 10256.
            hint = " (kube-proxy, or another svcproxy, still running on this node?)" \
                if exc.errno == errno.EADDRINUSE else ""
            raise OSError(f"--health-bind {bind}: cannot listen for /healthz and /metrics: "
                          f"{exc.strerror or exc}{hint}") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _dispatch(self, h: _Handler) -> None:
        path = h.path.split("?", 1)[0]
        if path == "/metrics":
            h._send(200, self.metrics.render(), CONTENT_TYPE)
        elif path in ("/healthz", "/livez"):
            healthy, last = self.state.proxy_healthy()
            now = self.state.now()
            if path == "/healthz":
                eligible = self.state.node_eligible
                healthy = healthy and eligible
            if healthy:
                last = now  # kube-proxy reports "recent" lastUpdated when healthy
            code = 200 if healthy else 503
            (self.metrics.healthz if path == "/healthz" else self.metrics.livez).labels(str(code)).inc()
            if path == "/healthz":
                body = '{"lastUpdated": %s,"currentTime": %s, "nodeEligible": %s}' % (
                    json.dumps(go_time(last)), json.dumps(go_time(now)), "true" if eligible else "false")
            else:
                body = '{"lastUpdated": %s,"currentTime": %s}' % (json.dumps(go_time(last)), json.dumps(go_time(now)))
            h._send(code, body.encode(), "application/json")
        elif path == "/readyz":
            ready = self.state.ready
            h._send(200 if ready else 503, b"ok\n" if ready else b"not ready: no full sync yet\n",
                    "text/plain; charset=utf-8")
        else:
            h._send(404, b"404 page not found\n", "text/plain; charset=utf-8")


@dataclass(frozen=True)
class HealthCheckTarget:
    namespace: str
    name: str
    port: int


class _ServiceHealthServer:
    def __init__(self, bind_host: str, target: HealthCheckTarget, owner: "HealthCheckServers") -> None:
        self.target = target
        self._owner = owner
        self._httpd = _Server((bind_host, target.port), self._dispatch)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name=f"hc-{target.namespace}/{target.name}", daemon=True)
        self._thread.start()

    def _dispatch(self, h: _Handler) -> None:
        count = self._owner.local_endpoints(self.target)
        healthy = self._owner.proxy_healthy()
        body = (
            "{\n"
            "\t\"service\": {\n"
            f"\t\t\"namespace\": {json.dumps(self.target.namespace)},\n"
            f"\t\t\"name\": {json.dumps(self.target.name)}\n"
            "\t},\n"
            f"\t\"localEndpoints\": {count},\n"
            f"\t\"serviceProxyHealthy\": {'true' if healthy else 'false'}\n"
            "}"
        )
        code = 200 if count != 0 and healthy else 503
        h._send(code, body.encode(), "application/json", {"X-Load-Balancing-Endpoint-Weight": str(count)})

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class HealthCheckServers:
    """One HTTP server per healthCheckNodePort, started and stopped as Services change."""

    def __init__(self, state: HealthState, bind_host: str = "0.0.0.0") -> None:
        self._state = state
        self._bind_host = bind_host
        self._lock = threading.Lock()
        self._servers: dict[HealthCheckTarget, _ServiceHealthServer] = {}
        self._endpoints: dict[tuple[str, str], int] = {}

    def local_endpoints(self, target: HealthCheckTarget) -> int:
        with self._lock:
            return self._endpoints.get((target.namespace, target.name), 0)

    def proxy_healthy(self) -> bool:
        return self._state.proxy_healthy()[0]

    @property
    def ports(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return {(t.namespace, t.name): t.port for t in self._servers}

    def sync(self, targets: Mapping[HealthCheckTarget, int]) -> list[str]:
        """Run exactly the given servers (target -> local endpoint count); returns errors
        (a port already in use is reported, not fatal: other Services keep theirs)."""
        errors: list[str] = []
        with self._lock:
            self._endpoints = {(t.namespace, t.name): n for t, n in targets.items()}
            for target in [t for t in self._servers if t not in targets]:
                self._servers.pop(target).stop()
                log.info("stopped healthCheckNodePort %d for %s/%s", target.port, target.namespace, target.name,
                         extra=about("Service", target.namespace, target.name))
            for target in targets:
                if target in self._servers:
                    continue
                try:
                    self._servers[target] = _ServiceHealthServer(self._bind_host, target, self)
                    log.info("serving healthCheckNodePort %d for %s/%s", target.port, target.namespace,
                             target.name, extra=about("Service", target.namespace, target.name))
                except OSError as exc:
                    errors.append(f"healthCheckNodePort {target.port} for {target.namespace}/{target.name}: {exc}")
        return errors

    def stop(self) -> None:
        self.sync({})
