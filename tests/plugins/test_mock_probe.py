"""The mock probe's holders: simulated processes, stable from the seed, with a simulated /proc tree
that the agent's owner resolver reads as it reads the real one."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

from capmon.plugins.mock import MockConfig, MockProbe, mock_fleet, profile_at
from capmon.plugins.mock.probe import USERS

T0 = 1_700_000_000.0


@pytest.fixture
def probes():
    made: list[MockProbe] = []

    def make(clock=lambda: T0, **options) -> MockProbe:
        probe = MockProbe(MockConfig(**options), clock=clock)
        probe.setup()
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


def test_held_profiles_have_one_to_four_holders_and_idle_none(probes):
    probe = probes()  # the default 8 devices: training ×2, inference, notebook, idle ×3, flaky
    samples = probe.sample()
    assert [1 <= len(s.holders) <= 4 for s in samples[:4]] == [True] * 4
    assert [s.holders for s in samples[4:7]] == [()] * 3
    for s in samples:
        assert s.processes == len(s.holders)
        assert len({h.pid for h in s.holders}) == len(s.holders)
        # The job's processes hold its memory, the driver's idle share aside.
        assert sum(h.memory_bytes for h in s.holders) <= s.memory_used_bytes


def test_holders_are_stable_from_the_seed_and_differ_with_it(probes):
    clock = [T0]
    held = ("training", "inference", "notebook", "idle")
    a = probes(clock=lambda: clock[0], seed=7, profiles=held)
    b = probes(clock=lambda: clock[0], seed=7, profiles=held)
    other = probes(clock=lambda: clock[0], seed=8, profiles=held)
    first = [s.holders for s in a.sample()]
    for _ in range(30):
        clock[0] += 1
        assert [s.holders for s in a.sample()] == first  # the same job holds the device tick after tick
        assert [s.holders for s in b.sample()] == first
    assert [s.holders for s in other.sample()] != first


def test_unreadable_devices_and_count_processes_off_know_no_holders(probes):
    lost = probes(devices=1, profiles=("lost",)).sample()[0]
    assert (lost.holders, lost.processes) == (None, None)
    unknown = probes(devices=4, profiles=("training", "notebook"), count_processes=False)
    assert {(s.holders, s.processes) for s in unknown.sample()} == {(None, None)}
    assert unknown.proc_root is None  # nothing to resolve


def test_every_holder_has_a_proc_entry_that_no_real_process_has(probes):
    probe = probes()
    root = Path(probe.proc_root)
    holders = [h for s in probe.sample() for h in s.holders]
    assert holders
    for h in holders:
        entry = root / str(h.pid)
        assert h.pid > 2**22 and not os.path.exists(f"/proc/{h.pid}")  # above Linux's PID_MAX_LIMIT
        assert (entry / "comm").read_text() == h.name + "\n"
        status = (entry / "status").read_text()
        assert re.search(rf"^Pid:\t{h.pid}$", status, re.M)
        uid = int(re.search(r"^Uid:\t(\d+)\t", status, re.M).group(1))
        assert uid in USERS and probe.users[uid] == USERS[uid]
        assert (entry / "cgroup").read_text().startswith("0::/")
        assert not (entry / "cmdline").exists() and not (entry / "environ").exists()


def test_start_times_in_stat_are_before_setup_and_after_boot(probes):
    probe = probes()
    root = Path(probe.proc_root)
    btime = int(re.search(r"^btime (\d+)$", (root / "stat").read_text(), re.M).group(1))
    for h in (h for s in probe.sample() for h in s.holders):
        stat = (root / str(h.pid) / "stat").read_text()
        after_comm = stat.rsplit(")", 1)[1].split()
        assert len(after_comm) == 50  # fields 3..52, as the kernel prints them
        start = btime + int(after_comm[22 - 3]) / 100
        assert btime < start < T0


def test_a_fleet_shows_several_users_pods_and_slurm_jobs():
    cgroups: Counter[str] = Counter()
    users = set()
    for host in mock_fleet(4, 8, seed=0):
        probe = MockProbe(host.config, clock=lambda: T0)
        probe.setup()
        try:
            for s in probe.sample():
                for h in s.holders or ():
                    entry = Path(probe.proc_root) / str(h.pid)
                    cgroup = (entry / "cgroup").read_text()
                    kind = next(k for k in ("kubepods", "slurmstepd", "docker-", "user.slice") if k in cgroup)
                    cgroups[kind] += 1
                    users.add(re.search(r"^Uid:\t(\d+)", (entry / "status").read_text(), re.M).group(1))
        finally:
            probe.close()
    assert len(users) >= 3
    assert cgroups["kubepods"] and cgroups["slurmstepd"] and cgroups["user.slice"], cgroups


def test_pod_cgroups_spell_the_pod_uid_as_kubelet_does(probes):
    # Found by seed: enough devices that every owner kind occurs.
    probe = probes(devices=24, profiles=("training", "inference", "notebook"))
    pods = [
        (Path(probe.proc_root) / str(h.pid) / "cgroup").read_text()
        for s in probe.sample()
        for h in s.holders
        if "kubepods" in (Path(probe.proc_root) / str(h.pid) / "cgroup").read_text()
    ]
    assert pods
    pattern = re.compile(
        r"^0::/kubepods\.slice/(kubepods-(burstable|besteffort)\.slice/)?"
        r"kubepods-((burstable|besteffort)-)?pod[0-9a-f]{8}(_[0-9a-f]{4}){3}_[0-9a-f]{12}\.slice/"
        r"cri-containerd-[0-9a-f]{64}\.scope\n$"
    )
    assert all(pattern.match(c) for c in pods), pods


def test_phase_lists_have_proc_entries_for_every_phase(probes):
    clock = [T0]
    spec = "idle:10,training:10,notebook:10"
    probe = probes(clock=lambda: clock[0], devices=1, profiles=(spec,))
    seen: dict[str, set] = {"idle": set(), "training": set(), "notebook": set()}
    for t in range(30):
        clock[0] = T0 + t
        [s] = probe.sample()
        seen[profile_at(spec, clock[0])].add(s.holders)
        for h in s.holders:
            assert (Path(probe.proc_root) / str(h.pid) / "comm").exists()
    # One job per phase, the same every tick of it; the idle phase has none.
    assert seen["idle"] == {()}
    assert len(seen["training"]) == len(seen["notebook"]) == 1 and seen["training"] != seen["notebook"]
    assert () not in seen["training"] | seen["notebook"]


def test_close_removes_the_simulated_proc_tree(probes):
    probe = probes()
    root = probe.proc_root
    assert os.path.isdir(root)
    probe.close()
    assert probe.proc_root is None and not os.path.exists(root)
    probe.close()  # twice is harmless
