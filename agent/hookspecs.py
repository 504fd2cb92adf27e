"""The whole plugin contract of capmon: every hook a probe plugin may implement.

A plugin is a module (or object) with functions marked `@capmon.agent.hookimpl`, found through the
entry-point group `capmon.probes` in its distribution's metadata:

    [project.entry-points."capmon.probes"]
    myprobe = "my_package.capmon_probe"

Hooks *register* things; the agent runs them. Sampling is never fanned out through `pm.hook.*`
(one raising implementation would abort the call for every probe).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("capmon")


@hookspec
def capmon_probe_types() -> list[type]:
    """Return the probe classes this plugin provides (subclasses of `capmon.agent.Probe`).

    Each class needs a unique `name`; the agent constructs, configures, schedules and closes it.

    Example::

        @capmon.agent.hookimpl
        def capmon_probe_types():
            return [MyProbe]
    """


@hookspec
def capmon_allocation_sources() -> list[type]:
    """Return the allocation-source classes this plugin provides (subclasses of
    `capmon.agent.AllocationSource`), found through the entry-point group `capmon.allocations`.

    A source says which scheduler holder (a Kubernetes pod, a Slurm job) was given which device; the
    agent constructs, schedules and closes it like a probe.

    Example::

        @capmon.agent.hookimpl
        def capmon_allocation_sources():
            return [MySchedulerSource]
    """
