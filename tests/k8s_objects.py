"""Builders for Services, EndpointSlices and Nodes shaped like the API server's JSON.

Tests describe only what matters to them; everything else (uid, resourceVersion,
managed-by labels, defaulted spec fields, status) is filled in the way a real cluster
would, so translation is always exercised on realistic objects.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

TIMESTAMP = "2025-03-03T11:02:44Z"


def _uid(*parts: str) -> str:
    h = hashlib.sha1("/".join(parts).encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"


def svc_port(
    name: str = "http",
    port: int = 80,
    protocol: str | None = "TCP",
    target_port: int | str | None = None,
    node_port: int | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "port": port}
    if protocol is not None:
        out["protocol"] = protocol
    out["targetPort"] = target_port if target_port is not None else port
    if node_port is not None:
        out["nodePort"] = node_port
    return out


def service(
    name: str,
    namespace: str = "default",
    *,
    cluster_ips: Sequence[str] = ("10.96.0.1",),
    ports: Sequence[dict[str, Any]] = (),
    type: str = "ClusterIP",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    external_ips: Sequence[str] = (),
    ingress: Sequence[dict[str, Any]] = (),
    external_traffic_policy: str | None = None,
    internal_traffic_policy: str = "Cluster",
    session_affinity: str = "None",
    affinity_timeout: int | None = None,
    health_check_node_port: int | None = None,
) -> dict[str, Any]:
    """A Service as ``kubectl get -o json`` shows it (defaults filled in)."""
    if not ports:
        ports = [svc_port(node_port=30080 if type in ("NodePort", "LoadBalancer") else None)]
    families = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips if ip not in ("None", "")]
    meta: dict[str, Any] = {
        "creationTimestamp": TIMESTAMP,
        "labels": {"app.kubernetes.io/name": name, **(labels or {})},
        "name": name,
        "namespace": namespace,
        "resourceVersion": "30418",
        "uid": _uid("svc", namespace, name),
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    spec: dict[str, Any] = {
        "clusterIP": cluster_ips[0] if cluster_ips else "",
        "clusterIPs": list(cluster_ips),
        "internalTrafficPolicy": internal_traffic_policy,
        "ipFamilies": families or ["IPv4"],
        "ipFamilyPolicy": "PreferDualStack" if len(families) > 1 else "SingleStack",
        "ports": [dict(p) if isinstance(p, dict) else p for p in ports],
        "selector": {"app.kubernetes.io/name": name},
        "sessionAffinity": session_affinity,
        "type": type,
    }
    if type in ("NodePort", "LoadBalancer"):
        spec["externalTrafficPolicy"] = external_traffic_policy or "Cluster"
    elif external_traffic_policy is not None:
        spec["externalTrafficPolicy"] = external_traffic_policy
    if type == "LoadBalancer":
        spec["allocateLoadBalancerNodePorts"] = True
    if health_check_node_port is not None:
        spec["healthCheckNodePort"] = health_check_node_port
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if session_affinity == "ClientIP":
        spec["sessionAffinityConfig"] = {
            "clientIP": {"timeoutSeconds": 10800 if affinity_timeout is None else affinity_timeout}
        }
    status: dict[str, Any] = {"loadBalancer": {}}
    if ingress:
        status["loadBalancer"]["ingress"] = [dict(i) for i in ingress]
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec, "status": status}


def external_name_service(name: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "creationTimestamp": TIMESTAMP,
            "name": name,
            "namespace": namespace,
            "resourceVersion": "41530",
            "uid": _uid("svc", namespace, name),
        },
        "spec": {"externalName": f"{name}.example.com", "sessionAffinity": "None",
                 "type": "ExternalName"},
        "status": {"loadBalancer": {}},
    }


def slice_port(name: str = "http", port: int | None = 8080,
               protocol: str | None = "TCP") -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "port": port}
    if protocol is not None:
        out["protocol"] = protocol
    return out


def endpoint(
    ip: str,
    *,
    node: str | None = "node-b",
    ready: bool | None = True,
    serving: bool | None = True,
    terminating: bool | None = False,
    zone: str | None = None,
    for_zones: Iterable[str] | None = None,
    for_nodes: Iterable[str] | None = None,
    pod: str | None = None,
    extra_addresses: Sequence[str] = (),
) -> dict[str, Any]:
    """One ``endpoints[]`` entry; a condition passed as None is left out (means null)."""
    conditions: dict[str, Any] = {}
    for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if value is not None:
            conditions[key] = value
    out: dict[str, Any] = {"addresses": [ip, *extra_addresses], "conditions": conditions}
    if node is not None:
        out["nodeName"] = node
    pod = pod or f"pod-{ip.replace('.', '-').replace(':', '-')}"
    out["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "default",
                        "uid": _uid("pod", pod)}
    if zone is not None:
        out["zone"] = zone
    hints: dict[str, Any] = {}
    if for_zones is not None:
        hints["forZones"] = [{"name": z} for z in for_zones]
    if for_nodes is not None:
        hints["forNodes"] = [{"name": n} for n in for_nodes]
    if hints:
        out["hints"] = hints
    return out


def endpoint_slice(
    service_name: str,
    suffix: str = "abc12",
    namespace: str = "default",
    *,
    address_type: str = "IPv4",
    ports: Sequence[dict[str, Any]] | None = None,
    endpoints: Sequence[dict[str, Any]] = (),
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An EndpointSlice as the endpointslice controller writes it."""
    name = f"{service_name}-{suffix}"
    return {
        "addressType": address_type,
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": [dict(e) for e in endpoints],
        "kind": "EndpointSlice",
        "metadata": {
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": TIMESTAMP},
            "creationTimestamp": TIMESTAMP,
            "generateName": f"{service_name}-",
            "generation": 3,
            "labels": {
                "app.kubernetes.io/name": service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service_name,
                **(labels or {}),
            },
            "name": name,
            "namespace": namespace,
            "ownerReferences": [
                {"apiVersion": "v1", "blockOwnerDeletion": True, "controller": True,
                 "kind": "Service", "name": service_name,
                 "uid": _uid("svc", namespace, service_name)}
            ],
            "resourceVersion": "47702",
            "uid": _uid("slice", namespace, name),
        },
        "ports": [dict(p) for p in (ports if ports is not None else [slice_port()])],
    }


def node(
    name: str,
    *,
    zone: str | None = "zone-a",
    internal_ips: Sequence[str] = ("192.168.49.2",),
    external_ips: Sequence[str] = (),
) -> dict[str, Any]:
    labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
    }
    if zone is not None:
        labels["topology.kubernetes.io/zone"] = zone
    addresses = [{"address": ip, "type": "InternalIP"} for ip in internal_ips]
    addresses += [{"address": ip, "type": "ExternalIP"} for ip in external_ips]
    addresses.append({"address": name, "type": "Hostname"})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "creationTimestamp": TIMESTAMP,
            "labels": labels,
            "name": name,
            "resourceVersion": "48213",
            "uid": _uid("node", name),
        },
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {
            "addresses": addresses,
            "conditions": [{"status": "True", "type": "Ready", "reason": "KubeletReady"}],
        },
    }
