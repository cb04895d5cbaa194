"""Which virtual services a Pod namespace gets: the one home of that rule.

Everything but NodePorts: ClusterIPs, externalIPs and LoadBalancer IPs are what a Pod
dials, while a NodePort is addressed to a node and reaches it through the Pod's own
network interface like any other traffic leaving the Pod.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from svcproxy.model import ServiceKey, Table


def visible_in_pods(node_addresses: Iterable[str]) -> Callable[[ServiceKey], bool]:
    """A test of one key: False for the virtual services on the node's addresses."""
    nodes = frozenset(node_addresses)
    return lambda key: key.address not in nodes


def pod_visible(table: Table, node_addresses: Iterable[str]) -> Table:
    """The part of the node's table a Pod namespace gets."""
    visible = visible_in_pods(node_addresses)
    return Table({k: v for k, v in table.services.items() if visible(k)})
