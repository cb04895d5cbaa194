"""``svcproxy run``: the DaemonSet's main process.

Wires the adapters around the reconcile loop: a source of objects (the API server's
watchers, or a file), an IPVS backend, and the health/metrics server. On SIGTERM or
SIGINT it stops watching and exits, leaving every rule in place: a restarting agent
must not disturb traffic, and the next one adopts the table as it finds it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from svcproxy import flags
from svcproxy.diff import Exclusions
from svcproxy.gcpause import LongLivedHeap
from svcproxy.health import HealthCheckServers, HealthServer, HealthState
from svcproxy.ipvs.backend import Backend, BackendError
from svcproxy.ipvs.timeouts import Timeouts
from svcproxy.kube.store import Kind
from svcproxy.kube.translate import NodeInfo, TranslateConfig
from svcproxy.metrics import Metrics
from svcproxy.model import Family, Operation, OperationResult, Table
from svcproxy.node.addresses import NodeAddresses
from svcproxy.node.conntrack import KernelConntrack
from svcproxy.node.plumbing import NodePlumbing, PlumbingConfig
from svcproxy.podns.attach import PodNamespaces, factory_like
from svcproxy.podns.mode import IP_VS_MODE_PARAM, decide_loaded
from svcproxy.podns.scan import NetnsScanner
from svcproxy.reconcile import Proxier, ProxierConfig
from svcproxy.signals import StopOnSignal

log = logging.getLogger("svcproxy.agent")


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    node_ips: tuple[str, ...] = ()
    file: str | None = None
    kubeconfig: str | None = None
    proxy_name: str = "svcproxy"
    families: frozenset[Family] = frozenset({Family.IPV4, Family.IPV6})
    scheduler: str = "rr"
    exclude_cidrs: tuple[str, ...] = ()
    min_sync_period: float = 0.1
    sync_period: float = 30.0
    graceful_timeout: float = 900.0
    health_bind: str = "0.0.0.0:10256"
    healthcheck_bind_host: str = "0.0.0.0"
    dry_run: bool = False
    #: Share-NS (docs/share-ns.md): --pod-netns-mode, explicit --pod-netns paths,
    #: and the directory scan (--pod-netns-dir, None: no scan).
    pod_netns_mode: str = "auto"
    pod_netns: tuple[str, ...] = ()
    pod_netns_dir: str | None = None
    pod_netns_scan_period: float = 30.0
    ip_vs_mode_param: str = IP_VS_MODE_PARAM
    #: Unix socket for the svcproxy-cni plugin (None: not served); an explicitly
    #: requested socket that cannot be served stops the agent, the default one only
    #: logs an error (CNI ADDs then fail with "try again later").
    cni_socket: str | None = None
    cni_socket_required: bool = False
    cni_timeout: float = 30.0
    #: Node-namespace plumbing (sysctls, dummy device, nftables masquerade); None: off.
    plumbing: PlumbingConfig | None = None
    #: --nodeport-addresses CIDRs: NodePorts on the node's local addresses within them;
    #: ("primary",): on the node's primary IP of each family only.
    nodeport_addresses: tuple[str, ...] = ()
    watch_idle_timeout: float = 65.0
    #: --ipvs-*-timeout, for the node and each replicated Pod namespace (None: left alone).
    ipvs_timeouts: Timeouts | None = None


class _SourceStats(Collector):
    """Exports the watchers' own counters at scrape time (no copying loop)."""

    def __init__(self, sources: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        self._sources = sources

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        events = CounterMetricFamily("svcproxy_watch_events", "Events received per resource", labels=["resource"])
        lists = CounterMetricFamily("svcproxy_watch_lists", "Full lists (initial and relists)", labels=["resource"])
        errors = CounterMetricFamily("svcproxy_watch_errors", "List/watch failures retried", labels=["resource"])
        malformed = CounterMetricFamily("svcproxy_watch_malformed_objects",
                                        "Objects skipped because they were malformed", labels=["resource"])
        stalls = CounterMetricFamily("svcproxy_watch_stalls",
                                     "Watch streams resumed after staying silent for the idle timeout",
                                     labels=["resource"])
        for resource, stats in self._sources():
            events.add_metric([resource], float(getattr(stats, "events", 0)))
            lists.add_metric([resource], float(getattr(stats, "lists", getattr(stats, "reads", 0))))
            errors.add_metric([resource], float(getattr(stats, "errors", 0)))
            malformed.add_metric([resource], float(getattr(stats, "malformed", 0)))
            stalls.add_metric([resource], float(getattr(stats, "stalls", 0)))
        return [events, lists, errors, malformed, stalls]


class _PlumbingStats(Collector):
    """Node plumbing's counters, read at scrape time."""

    def __init__(self, plumbing: NodePlumbing) -> None:
        self.plumbing = plumbing

    def collect(self) -> Iterable[CounterMetricFamily]:
        errors = CounterMetricFamily("svcproxy_node_plumbing_errors",
                                     "Failures changing node-namespace plumbing (retried at the next sync)",
                                     labels=["part"])
        changes = CounterMetricFamily("svcproxy_node_plumbing_changes",
                                      "Changes made to node-namespace plumbing", labels=["part"])
        for part in ("sysctl", "dummy", "nftables"):
            errors.add_metric([part], self.plumbing.stats.errors.get(part, 0))
            changes.add_metric([part], self.plumbing.stats.changes.get(part, 0))
        yield errors
        yield changes


class PreviewBackend:
    """A dry run's view of the kernel: read only; where the table cannot be read at all
    (no IPVS here: a laptop, a CI runner) it compares with an empty table, saying so
    once, as ``svcproxy plan`` does. It never applies anything."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._noticed = False

    def read(self, counts: bool | None = None) -> Table:
        try:
            return self._backend.read(counts)
        except BackendError as exc:
            if not self._noticed:
                self._noticed = True
                log.warning("dry run: cannot read the kernel's IPVS table (%s); comparing with an empty table", exc)
            return Table()

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        raise BackendError("a dry run applies nothing")

    def read_timeouts(self) -> Timeouts:
        read = getattr(self._backend, "read_timeouts", None)
        if read is None:
            raise BackendError(f"{self._backend!r} cannot read IPVS timeouts")
        found: Timeouts = read()
        return found

    def set_timeouts(self, timeouts: Timeouts) -> None:
        raise BackendError("a dry run changes no IPVS timeouts")


def kernel_backend(backend: Backend) -> bool:
    """A backend that programs this kernel (not a test double): its namespace has a
    conntrack table worth cleaning."""
    from svcproxy.ipvs.ipvsadm import IpvsadmBackend
    from svcproxy.ipvs.netlink import NetlinkBackend

    inner = backend._backend if isinstance(backend, PreviewBackend) else backend
    return isinstance(inner, (IpvsadmBackend, NetlinkBackend))


class Agent:
    def __init__(self, config: AgentConfig, backend: Backend) -> None:
        self.config = config
        pod_backends = factory_like(backend)
        if config.dry_run:
            backend = PreviewBackend(backend)
        self.stop = threading.Event()
        self.metrics = Metrics()
        self.health = HealthState(timeout=2 * config.sync_period)
        self.health_checks = HealthCheckServers(self.health, bind_host=config.healthcheck_bind_host)
        translate = TranslateConfig(
            node=NodeInfo(config.node_name, config.node_ips),
            proxy_name=config.proxy_name,
            families=config.families,
            scheduler=config.scheduler,
        )
        self.heap = LongLivedHeap()
        self.plumbing = (NodePlumbing(replace(config.plumbing, dry_run=config.dry_run))
                         if config.plumbing is not None else None)
        self.proxier = Proxier(
            backend,
            ProxierConfig(
                translate=translate,
                node_ips_override=config.node_ips,
                exclusions=Exclusions.parse(config.exclude_cidrs),
                min_sync_period=config.min_sync_period,
                sync_period=config.sync_period,
                graceful_timeout=config.graceful_timeout,
                dry_run=config.dry_run,
                node_address_source=self._node_addresses(config),
                primary_node_ips=config.nodeport_addresses == (flags.PRIMARY,),
                wait_for_node=True,
                ipvs_timeouts=config.ipvs_timeouts,
            ),
            metrics=self.metrics,
            health=self.health,
            # A dry run serves no healthCheckNodePorts: it may run beside the proxy that
            # does (kube-proxy), and must not take its ports or answer for it.
            health_checks=None if config.dry_run else self.health_checks,
            node_hook=self.plumbing,
            # Stale UDP flows are cleared in the node's conntrack table (a dry run only logs them).
            node_conntrack=KernelConntrack() if kernel_backend(backend) else None,
            # The model of the cluster kept out of the collector's full collections.
            after_full_sync=self.heap.after_full_sync,
        )
        self.server = HealthServer(config.health_bind, self.health, self.metrics)
        if self.plumbing is not None:
            self.metrics.registry.register(_PlumbingStats(self.plumbing))
        # Pod namespaces: decided before anything runs (ModeError for an unavailable
        # `kernel` mode stops the agent with a clear message).
        decision = decide_loaded(config.pod_netns_mode, config.ip_vs_mode_param, backend.read)
        self.pod_namespaces = PodNamespaces(self.proxier, decision, backend_factory=pod_backends)
        self.scanner = (NetnsScanner(config.pod_netns_dir, self.pod_namespaces, config.pod_netns_scan_period)
                        if config.pod_netns_dir and self.pod_namespaces.decision.replicate else None)
        self.sources: list[Any] = []
        self.cni_server: Any = None
        self.metrics.registry.register(_SourceStats(self._source_stats))

    @staticmethod
    def _node_addresses(config: AgentConfig) -> NodeAddresses | None:
        if not config.nodeport_addresses or config.nodeport_addresses == (flags.PRIMARY,):
            return None
        device = (config.plumbing or PlumbingConfig()).device
        return NodeAddresses(config.nodeport_addresses, exclude_devices=(device,))

    def _source_stats(self) -> Iterable[tuple[str, Any]]:
        for source in self.sources:
            kind = getattr(source, "kind", None)
            yield (kind.value if isinstance(kind, Kind) else "file"), source.stats

    def _make_sources(self) -> list[Any]:
        if self.config.file:
            from svcproxy.kube.filesource import FileSource

            return [FileSource(self.config.file, sink=self.proxier.sink, on_synced=self.proxier.on_synced,
                               stop=self.stop, node_name=self.config.node_name)]
        from svcproxy.kube.watch import Watcher, make_api_client

        api = make_api_client(self.config.kubeconfig)
        return [Watcher(api, kind, sink=self.proxier.sink, on_synced=self.proxier.on_synced, stop=self.stop,
                        node_name=self.config.node_name, idle_timeout=self.config.watch_idle_timeout)
                for kind in Kind]

    def run(self) -> int:
        # The sources first: a broken kubeconfig is an error before anything is served.
        self.sources = self._make_sources()
        self.server.start()
        log.info("svcproxy agent for node %s: health and metrics on %s:%d%s", self.config.node_name,
                 self.config.health_bind.rpartition(":")[0] or "0.0.0.0", self.server.port,
                 " (dry run: nothing will be changed)" if self.config.dry_run else "")
        try:
            self._start_cni_server()
            for source in self.sources:
                source.start()
            self._start_pod_netns()
            self.proxier.run(self.stop)
        finally:
            self.stop.set()
            if self.cni_server is not None:
                self.cni_server.stop()
            for source in self.sources:
                source.join(5)
            self.health_checks.stop()
            self.server.stop()
            log.info("svcproxy agent stopped; IPVS rules left in place")
        return 0

    def _start_cni_server(self) -> None:
        """Serve the CNI plugin before the first sync, so it gets answers (ADDs wait).
        Never in a dry run: it may run beside the live agent, whose socket it must not
        take (nor answer real ADDs for, nor remove on exit)."""
        if not self.config.cni_socket:
            return
        if self.config.dry_run:
            log.info("dry run: not serving the CNI plugin on %s", self.config.cni_socket)
            return
        from svcproxy.podns.server import CniServer, NamespacesAttacher, ServerError

        server = CniServer(self.config.cni_socket, NamespacesAttacher(self.pod_namespaces),
                           timeout=self.config.cni_timeout)
        try:
            server.start()
        except ServerError as exc:
            if self.config.cni_socket_required:
                raise
            log.error("not serving the CNI plugin: %s", exc)
            return
        self.cni_server = server

    def _start_pod_netns(self) -> None:
        """Report the mode, attach the --pod-netns namespaces, start the scan."""
        log.info("%s", self.pod_namespaces.decision.describe())
        for path in self.config.pod_netns:
            log.info("--pod-netns %s: %s", path, self.pod_namespaces.attach(path).value)
        if self.config.pod_netns_dir and self.scanner is None:
            log.info("not scanning %s: Pod namespaces get no tables of their own in this mode",
                     self.config.pod_netns_dir)
        if self.scanner is not None:
            self.scanner.start(self.stop)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the agent (rules stay in place)."""
        StopOnSignal(self.stop).install()
