"""Cost of resolving who holds each device, per tick: 8 devices × 16 processes.

Prints a table: a cold tick (empty cache: status, comm, stat, cgroup read per PID) and a warm tick
(one `stat` read per distinct PID to make sure it still names the same process), over the real
`/proc` of this machine (its own live PIDs, cgroups as they are) and over a fake tree with
Kubernetes cgroup files. Run: `.venv/bin/python benchmarks/holders_cost.py`.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from capmon.agent.holders import HolderResolver, HoldersConfig, HolderWindows
from capmon.agent.probe import Holder

DEVICES, PER_DEVICE, ROUNDS = 8, 16, 200
CGROUP = (
    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8ca306fa_3c03_47fa_97dd_19979c345572"
    ".slice/cri-containerd-{:064x}.scope\n"
)


def fake_proc(root: Path, pids: list[int]) -> None:
    (root / "2").mkdir(parents=True)
    (root / "2" / "comm").write_text("kthreadd\n")
    (root / "stat").write_text("btime 1700000000\n")
    for pid in pids:
        d = root / str(pid)
        d.mkdir()
        (d / "status").write_text("Name:\tpython3\nUid:\t1000\t1000\t1000\t1000\n")
        (d / "comm").write_text("python3\n")
        (d / "stat").write_text(
            f"{pid} (python3) S 1 " + " ".join(["0"] * 17) + " 4242 " + " ".join(["0"] * 30)
        )
        (d / "cgroup").write_text(CGROUP.format(pid))


def layout(pids: list[int]) -> dict[str, tuple[Holder, ...]]:
    return {
        f"GPU-{d}": tuple(Holder(pids[(d * PER_DEVICE + i) % len(pids)], 1 << 30) for i in range(PER_DEVICE))
        for d in range(DEVICES)
    }


def measure(proc_root: str, pids: list[int]) -> tuple[float, float, float]:
    devices = layout(pids)
    colds, warms, windows = [], [], []
    for _ in range(ROUNDS // 10):
        resolver = HolderResolver(HoldersConfig(), proc_root, host_pids=True)
        t = time.perf_counter()
        resolver.resolve_devices(devices)
        colds.append(time.perf_counter() - t)
    resolver = HolderResolver(HoldersConfig(), proc_root, host_pids=True)
    resolver.resolve_devices(devices)
    acc = HolderWindows()
    for i in range(ROUNDS):
        t = time.perf_counter()
        resolved = resolver.resolve_devices(devices)
        warms.append(time.perf_counter() - t)
        t = time.perf_counter()
        for device_id, holders in resolved.items():
            acc.observe(device_id, float(i), holders)
        windows.append(time.perf_counter() - t)
    return statistics.median(colds), statistics.median(warms), statistics.median(windows)


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pids = list(range(1000, 1000 + DEVICES * PER_DEVICE))
        fake_proc(Path(tmp) / "proc", pids)
        rows.append(("fake tree, 128 distinct PIDs", len(pids), *measure(str(Path(tmp) / "proc"), pids)))
        rows.append(("fake tree, 16 PIDs on all 8 devices", 16, *measure(str(Path(tmp) / "proc"), pids[:16])))
    live = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())[: DEVICES * PER_DEVICE]
    rows.append((f"this machine's /proc, {len(live)} live PIDs", len(live), *measure("/proc", live)))
    print(
        f"{DEVICES} devices × {PER_DEVICE} holders per tick, median of {ROUNDS} warm / {ROUNDS // 10} cold ticks"
    )
    print(
        f"| {'case':<40} | {'PIDs':>4} | {'cold tick ms':>12} | {'warm tick ms':>12} | {'warm µs/PID':>11} | {'observe ms':>10} |"
    )
    print(f"|{'-' * 42}|{'-' * 6}|{'-' * 14}|{'-' * 14}|{'-' * 13}|{'-' * 12}|")
    for name, n, cold, warm, obs in rows:
        print(
            f"| {name:<40} | {n:>4} | {cold * 1e3:>12.3f} | {warm * 1e3:>12.3f} | {warm * 1e6 / n:>11.1f} | {obs * 1e3:>10.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
