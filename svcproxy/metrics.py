"""Prometheus metrics: kube-proxy's names under an ``svcproxy_`` prefix, plus ours.

Every metric lives in a registry owned by one ``Metrics`` object (no module-level
registry), so tests and several agents in one process never share counters.
Dashboards written for kube-proxy work after a prefix rename.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# kube-proxy's buckets for sync_proxy_rules_duration_seconds: exponential from 1 ms.
_SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
_PROGRAMMING_BUCKETS = (0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 30, 45, 60, 120, 180, 240, 300)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "svcproxy_"
        self.sync_duration = Histogram(
            p + "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds",
            buckets=_SYNC_BUCKETS, registry=r)
        self.syncs = Counter(
            p + "syncs_total", "Syncs run, by mode: full (re-reads the kernel) or partial (changed Services only)",
            ["mode"], registry=r)
        self.last_sync = Gauge(
            p + "sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced",
            registry=r)
        self.last_queued = Gauge(
            p + "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", registry=r)
        self.network_programming = Histogram(
            p + "network_programming_duration_seconds",
            "In-cluster network programming latency in seconds (from the object's change to the kernel)",
            buckets=_PROGRAMMING_BUCKETS, registry=r)
        self.service_changes = Counter(
            p + "sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes", registry=r)
        self.endpoint_changes = Counter(
            p + "sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules EndpointSlice changes",
            registry=r)
        self.no_local_endpoints = Gauge(
            p + "sync_proxy_rules_no_local_endpoints_total",
            "Number of Services with a Local traffic policy and no local endpoints while the cluster has some",
            ["traffic_policy", "ip_family"], registry=r)
        self.virtual_servers = Gauge(p + "virtual_servers", "Virtual services in the desired table", registry=r)
        self.real_servers = Gauge(p + "real_servers", "Real servers in the desired table", registry=r)
        self.draining_real_servers = Gauge(
            p + "draining_real_servers", "Removed TCP real servers kept at weight 0 until their connections end",
            registry=r)
        self.operations = Counter(
            p + "ipvs_operations_total", "IPVS operations applied", ["op"], registry=r)
        self.failed_operations = Counter(
            p + "ipvs_failed_operations_total", "IPVS operations the kernel rejected", ["op"], registry=r)
        self.input_problems = Counter(
            p + "input_problems_total", "Problems found in Kubernetes objects (the broken piece is skipped)",
            ["kind"], registry=r)
        self.sync_errors = Counter(
            p + "sync_errors_total", "Syncs that could not run at all (backend unavailable)", registry=r)
        self.pod_netns_refused = Counter(
            p + "pod_netns_refused_total", "Pod namespace attach requests refused", ["reason"], registry=r)
        self.healthz = Counter(
            p + "proxy_healthz_total", "Cumulative proxy healthz HTTP status", ["code"], registry=r)
        self.livez = Counter(
            p + "proxy_livez_total", "Cumulative proxy livez HTTP status", ["code"], registry=r)
        self._datapath_metrics(r, p)
        self.pod_netns_scan_errors = Counter(
            p + "pod_netns_scan_errors_total", "Scans of --pod-netns-dir that could not list it", registry=r)
        for policy in ("internal", "external"):
            for family in ("IPv4", "IPv6"):
                self.no_local_endpoints.labels(policy, family).set(0)
        for mode in ("full", "partial"):
            self.syncs.labels(mode)

    def _datapath_metrics(self, r: CollectorRegistry, p: str) -> None:
        """The data path around the table: IPVS timeouts, conntrack cleanup."""
        self.ipvs_timeout_errors = Counter(
            p + "ipvs_timeout_errors_total", "Failures reading or setting IPVS timeouts (retried at full syncs)",
            registry=r)
        self.conntrack_deleted = Counter(
            p + "conntrack_entries_deleted_total",
            "Stale UDP conntrack entries deleted (flows to a removed endpoint, or from before the first one)",
            registry=r)
        self.conntrack_errors = Counter(
            p + "conntrack_cleanup_errors_total", "UDP conntrack cleanups that failed (retried at full syncs)",
            registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
