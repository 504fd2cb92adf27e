"""NVML calls per GPU per tick, and µs per `NvmlProbe.sample()`, before and after the slow cadence.

    .venv/bin/python benchmarks/nvml_cost.py [--before REV] [-n 200]

Counted on the fake pynvml (tests/fakes/fake_pynvml.py), which counts every NVML function called.
"before" is plugins/nvml/probe.py at git revision REV (default 32a5b4e, the probe before issue 19),
loaded from `git show`; "after" is the working tree. The µs column is the fake's cost plus the
probe's own Python, for 8 H100s: it says how much of sample() is capmon, not what NVML costs.
The real-hardware figure comes from benchmarks/nvml_capture.py on a GPU host.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fakes.fake_pynvml import FakeGpu, FakeMig, FakeNvml  # noqa: E402

from capmon.plugins.nvml import probe as after  # noqa: E402


def load_before(rev: str):
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:plugins/nvml/probe.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("capmon.plugins.nvml._probe_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    exec(compile(source, f"{rev}:plugins/nvml/probe.py", "exec"), module.__dict__)
    return module


def h100s(n: int) -> list[FakeGpu]:
    return [
        FakeGpu(uuid=f"GPU-{i:08x}-2286-22f7-d75b-8f72cfce78f9", bus_id=f"00000000:{0x18 + i:02X}:00.0")
        for i in range(n)
    ]


def mig_h100() -> list[FakeGpu]:
    gpu = h100s(1)[0]
    gpu.mig_slots = [
        FakeMig(uuid=f"MIG-{i:08x}-0f3e-5b6e-8a1d-000000000000", gpu_instance_id=7 + i) for i in range(7)
    ]
    return [gpu]


class Clock:
    """Simulated seconds, so a minute of ticks crosses the slow cadence twice in milliseconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(module, gpus: list[FakeGpu]):
    nvml, clock = FakeNvml(gpus), Clock()
    boundary = {"clock": clock} if module is after else {}  # the old probe read everything every tick
    probe = module.NvmlProbe(module.NvmlConfig(xid_events=False), nvml=nvml, **boundary)
    probe.setup()
    for _ in range(3):  # warm-up: first ticks read identity and allocate GPM buffers
        tick(nvml, clock, probe)
    return nvml, clock, probe


def tick(nvml: FakeNvml, clock: Clock, probe) -> None:
    nvml.advance(1)
    clock.now += 1
    probe.sample()


def calls_per_tick(module, gpus: list[FakeGpu], ticks: int = 60):
    """Calls per GPU per tick over `ticks` one-second ticks (a minute: two slow reads at 30 s)."""
    nvml, clock, probe = make(module, gpus)
    nvml.calls.clear()
    for _ in range(ticks):
        tick(nvml, clock, probe)
    counted = dict(nvml.calls)
    probe.close()
    return {name: count / ticks / len(gpus) for name, count in counted.items()}


def us_per_sample(module, n: int) -> float:
    nvml, clock, probe = make(module, h100s(8))
    times = []
    for _ in range(n):
        nvml.advance(1)  # outside the timing: the fake's simulation, not a sample
        clock.now += 1
        start = time.perf_counter()
        probe.sample()
        times.append(time.perf_counter() - start)
    probe.close()
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="32a5b4e", help="git revision of the 'before' probe")
    parser.add_argument("-n", type=int, default=200, help="timed sample() calls per probe")
    args = parser.parse_args()
    before = load_before(args.before)

    for title, gpus in [("8 whole H100s", lambda: h100s(8)), ("1 H100, MIG 7 x 1g.10gb", mig_h100)]:
        old, new = calls_per_tick(before, gpus()), calls_per_tick(after, gpus())
        print(f"NVML calls per GPU per tick, {title} (60 ticks of 1 s; the new probe's slow reads included)")
        print(f"{'call':<44}{'before':>8}{'after':>8}")
        for name in sorted(set(old) | set(new)):
            print(f"{name:<44}{old.get(name, 0):>8.2f}{new.get(name, 0):>8.2f}")
        print(f"{'total':<44}{sum(old.values()):>8.2f}{sum(new.values()):>8.2f}\n")

    print(f"µs per sample(), 8 fake H100s, median of {args.n} (fake + probe Python; not NVML's cost)")
    print(f"{'probe':<44}{'µs':>8}{'µs/GPU':>8}")
    for name, module in [(f"before ({args.before})", before), ("after (working tree)", after)]:
        us = us_per_sample(module, args.n)
        print(f"{name:<44}{us:>8.0f}{us / 8:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
