"""The `host` probe: CPU, memory and load of the host through psutil (always active)."""

from __future__ import annotations

from capmon.agent import hookimpl
from capmon.plugins.host.probe import HostProbe

__all__ = ["HostProbe"]


@hookimpl
def capmon_probe_types():
    return [HostProbe]
