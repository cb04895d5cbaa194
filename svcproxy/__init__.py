"""svcproxy: a Kubernetes Service proxy for IPVS, including Pods with their own NIC."""

__version__ = "0.1.0"
