"""Kubernetes side: raw API objects, endpoint choice and translation to a Table."""
