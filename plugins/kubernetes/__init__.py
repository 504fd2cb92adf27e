"""The `kubernetes` allocation source: pods holding devices, from the kubelet's PodResources API v1.

grpcio and protobuf (the `kubernetes` extra) are imported only in `setup()`, so this plugin loads,
and reports itself skipped with the reason, on hosts without them.
"""

from __future__ import annotations

from capmon.agent import hookimpl
from capmon.plugins.kubernetes.source import KubernetesConfig, KubernetesSource, PodResourcesError

__all__ = ["KubernetesConfig", "KubernetesSource", "PodResourcesError", "capmon_allocation_sources"]


@hookimpl
def capmon_allocation_sources() -> list[type]:
    return [KubernetesSource]
