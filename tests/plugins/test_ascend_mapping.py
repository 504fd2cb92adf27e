"""`npu-smi info -m` (each chip's logic and physical id): the pure parser over every recorded output,
and what the ascend probe does with it — ids for schedulers, stable device ids, failures that change
nothing (simulated time)."""

from __future__ import annotations

import itertools
import logging
import subprocess
from pathlib import Path

import pytest
from test_ascend_probe import FakeRunner, by_id, fixture

from capmon.plugins.ascend import AscendConfig, AscendProbe
from capmon.plugins.ascend.parser import NpuChipMapping, parse_npu_smi_mapping

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ascend"
A5 = "info_a5_atlas350_doc_npu_id_header_no_processes.txt"
A5_M = "info_m_a5_atlas350_slot_phyid_doc.txt"
TABLE_910B = "info_910b3_8npu_v25.2.0_with_process_empty_name.txt"
M_910B = "info_m_910b_8npu_with_mcu_doc.txt"


def eight(name: str) -> list[tuple[int, int, int | None, int | None, int | None, str]]:
    return [(n, 0, n, None, None, name) for n in range(8)]


# Hand-checked: (NPU id, chip id, logic id, phy id, slot id, chip name) of each compute chip, and
# how many MCU rows the output has besides.
EXPECTED = {
    "info_m_310_atlas300i_model3000_mcu_v21.0.4.txt": (
        [(6, c, c, None, None, "MiniD") for c in range(4)],
        1,
    ),
    "info_m_310_atlas300i_model3000_v20.2.0.txt": ([(215, c, c, None, None, "MiniD") for c in range(4)], 0),
    "info_m_310p_duo_2chip_per_npu_with_mcu_doc.txt": (
        [
            (1, 0, 0, None, None, "Ascend xxx"),
            (1, 1, 1, None, None, "Ascend xxx"),
            (2, 0, 2, None, None, "Ascend xxx"),
            (2, 1, 3, None, None, "Ascend xxx"),
            (4, 0, 4, None, None, "Ascend xxx"),
            (4, 1, 5, None, None, "Ascend xxx"),
            (5, 0, 6, None, None, "Ascend xxx"),
            (5, 1, 7, None, None, "Ascend xxx"),
        ],
        4,
    ),
    "info_m_910a_8npu_v23.0.5_raw_tabs_mindcluster_fixture.txt": (eight("Ascend 910A"), 0),
    "info_m_910a_atlas800_9010_v22.0.3.1.txt": (eight("Ascend 910A"), 0),
    "info_m_910a_atlas800_9010_v24.1.RC2.txt": (eight("Ascend 910A"), 0),
    "info_m_910b3_v25.5.1_tabs_trailing_spaces_excerpt.txt": (
        [(0, 0, 0, None, None, "Ascend 910B3"), (1, 0, 1, None, None, "Ascend 910B3")],
        2,
    ),
    "info_m_910b_8npu_with_mcu_doc.txt": (eight("Ascend xxx"), 8),
    "info_m_a5_atlas350_slot_phyid_doc.txt": ([(0, 0, None, 0, 0, "xxx")], 0),
}


def test_every_mapping_fixture_is_listed():
    assert {p.name for p in FIXTURES.glob("info_m_*.txt")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_recorded_mapping_parses_to_its_hand_checked_chips(name):
    chips, mcus = EXPECTED[name]
    mapping = parse_npu_smi_mapping((FIXTURES / name).read_text())
    assert mapping.warnings == ()
    assert [(c.npu_id, c.chip_id, c.logic_id, c.phy_id, c.slot_id, c.name) for c in mapping.chips] == chips
    assert sum(r.is_mcu for r in mapping.rows) == mcus


def test_mcu_rows_are_listed_but_are_not_chips():
    mapping = parse_npu_smi_mapping(fixture("info_m_310p_duo_2chip_per_npu_with_mcu_doc.txt"))
    assert mapping.rows[2] == NpuChipMapping(1, 2, None, None, None, "Mcu")
    assert mapping.chip(1, 2) is None
    assert [c.chip_id for c in mapping.chips_of(2)] == [0, 1]


def test_library_log_lines_before_the_header_are_skipped():
    text = "DrvMngGetConsoleLogLevel failed. (g_conLogLevel=3)\n" + fixture(A5_M)
    mapping = parse_npu_smi_mapping(text)
    assert mapping.warnings == () and mapping.chip(0, 0).phy_id == 0


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        ("", "no npu-smi info -m table"),
        ("\x00\x01garbage\n|||\n", "no npu-smi info -m table"),
        ("NPU ID    Chip ID    Chip Logic ID    Chip Name\n", "lists no chips"),
        ("NPU ID    Chip ID    Chip Logic ID    Chip Name\nx 0 0 Ascend\n", "row not understood"),
        ("NPU ID    Chip ID    Chip Frob ID    Chip Name\n0 0 7 Ascend\n", "unknown column 'Chip Frob ID'"),
        ("NPU ID    Chip ID    Chip Logic ID    Chip Name\n0 0 0 A\n0 0 1 B\n", "chip 0 twice"),
    ],
)
def test_what_is_not_understood_is_named_never_raised(text, warning):
    mapping = parse_npu_smi_mapping(text)
    assert any(warning in w for w in mapping.warnings), mapping.warnings


# --- the probe ---


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(table: str, m_answer, clock: Clock | None = None, **config):
    runner = FakeRunner((0, table), m_answer=m_answer)
    probe = AscendProbe(AscendConfig(**config), run=runner, clock=clock or Clock())
    probe.setup()
    return probe, runner


def mapping_calls(runner) -> int:
    return sum(argv[1:] == ["info", "-m"] for argv, _ in runner.calls)


def test_each_chip_carries_its_logic_id_from_the_mapping():
    probe, runner = make(fixture(TABLE_910B), (0, fixture(M_910B)))
    samples = probe.sample()
    assert [s.info["logic_id"] for s in samples] == [str(n) for n in range(8)]
    assert all("phy_id" not in s.info for s in samples)  # not printed: never guessed
    assert mapping_calls(runner) == 1  # read at setup


def test_the_950_chip_carries_its_physical_and_slot_id():
    probe, _ = make(fixture(A5), (0, fixture(A5_M)))
    (npu,) = probe.sample()
    assert npu.device_id == "npu0-chip0"
    assert (npu.info["phy_id"], npu.info["slot_id"]) == ("0", "0")
    assert "logic_id" not in npu.info


def test_the_mapping_overrides_the_tables_device_column():
    # The 310 table's `Device` column says logic ids 3..6; `-m` is the mapping's own authority.
    table = fixture("info_310_atlas300i_model3000_4chip_v21.0.4.txt")
    probe, _ = make(table, (0, fixture("info_m_310_atlas300i_model3000_mcu_v21.0.4.txt")))
    assert [s.info["logic_id"] for s in probe.sample()] == ["0", "1", "2", "3"]
    probe, _ = make(table, (255, "Unknown option -m\n"))
    assert [s.info["logic_id"] for s in probe.sample()] == ["3", "4", "5", "6"]


def a5_mapping(chip_id: int, phy_id: int) -> str:
    return (
        "NPU ID          Slot ID          Chip ID          Chip Phy-ID          Chip Name\n"
        f"0               0                {chip_id}                {phy_id}                    xxx\n"
    )


def test_a_950_npu_takes_its_chip_id_from_the_mapping_and_keeps_it():
    # The 950 table prints no chip id: the one `-m` lists for the NPU names the device.
    clock = Clock()
    runner = FakeRunner((0, fixture(A5)), m_answer=(0, a5_mapping(1, 9)))
    probe = AscendProbe(AscendConfig(mapping_interval_s=60.0), run=runner, clock=clock)
    probe.setup()
    (npu,) = probe.sample()
    assert (npu.device_id, npu.info["phy_id"], npu.processes) == ("npu0-chip1", "9", 0)
    runner.m_answer = (0, a5_mapping(2, 10))  # a mapping that moves the chip
    for _ in range(10):
        clock.now += 10
        (npu,) = probe.sample()
    assert mapping_calls(runner) >= 2
    # A device never changes its id under the agent; the ids schedulers use follow the mapping.
    assert (npu.device_id, npu.info["phy_id"]) == ("npu0-chip1", "10")
    runner.m_answer = (255, "")
    for _ in range(10):
        clock.now += 10
        (npu,) = probe.sample()
    assert (npu.device_id, npu.info["phy_id"]) == ("npu0-chip1", "10")  # the last good mapping stays


def test_a_950_npu_first_seen_without_a_mapping_keeps_chip0():
    clock = Clock()
    runner = FakeRunner((0, fixture(A5)), m_answer=(255, ""))
    probe = AscendProbe(AscendConfig(mapping_interval_s=60.0), run=runner, clock=clock)
    probe.setup()
    assert probe.sample()[0].device_id == "npu0-chip0"
    runner.m_answer = (0, a5_mapping(1, 9))
    for _ in range(10):
        clock.now += 10
        (npu,) = probe.sample()
    assert (npu.device_id, npu.info["phy_id"]) == ("npu0-chip0", "9")


def state(samples):
    return [(s.device_id, s.healthy, s.error, s.util_pct, s.processes, s.memory_used_bytes) for s in samples]


@pytest.mark.parametrize(
    "m_answer",
    [
        (255, "Unknown option -m\n"),
        (0, "This device does not support querying the mapping.\n"),
        (0, "NPU ID    Chip ID    Frobs\n1 2 3\n"),
        subprocess.TimeoutExpired(["npu-smi", "info", "-m"], 1.0),
        OSError(13, "Permission denied"),
        IndexError("a runner that does not know -m"),
    ],
)
def test_a_failing_or_unknown_mapping_changes_no_state_and_is_logged_once(m_answer, caplog):
    good, _ = make(fixture(TABLE_910B), (0, fixture(M_910B)))
    clock = Clock()
    with caplog.at_level(logging.WARNING, logger="capmon.plugins.ascend"):
        probe, _ = make(fixture(TABLE_910B), m_answer, clock, mapping_interval_s=20.0)
        for _ in range(12):
            samples = probe.sample()
            clock.now += 10
    assert state(samples) == state(good.sample())
    assert all("logic_id" not in s.info for s in samples)
    mapping_logs = [r for r in caplog.records if "info -m" in r.getMessage()]
    assert len(mapping_logs) == 1, [r.getMessage() for r in mapping_logs]


def test_the_mapping_is_reread_on_its_interval_within_the_one_extra_call_per_tick():
    clock = Clock()
    table = fixture("info_910b3_v25.5.1_excerpt_2of8_with_process.txt")  # NPUs 0 and 5
    probe, runner = make(table, (0, fixture(M_910B)), clock, mapping_interval_s=300.0)
    for _ in range(100):  # 1000 s at 10 s ticks
        before = len(runner.calls)
        probe.sample()
        assert len(runner.calls) - before <= 2  # the table and at most one extra call
        clock.now += 10
    assert mapping_calls(runner) == 4  # setup, then every 300 s


def test_a_saturated_round_still_rereads_the_mapping_within_twice_its_interval():
    # 8 NPUs at 7 s against a 60 s usages interval: a usages read is due on every tick.
    clock = Clock()
    probe, runner = make(
        fixture("info_910prob_8npu_v24.1.0_no_processes.txt"),
        (0, fixture(M_910B)),
        clock,
        interval_s=7.0,
        mapping_interval_s=300.0,
    )
    times = [clock.now]
    for _ in range(200):
        before = len(runner.calls)
        probe.sample()
        calls = runner.calls[before:]
        assert len(calls) <= 2
        if any(argv[1:] == ["info", "-m"] for argv, _ in calls):
            times.append(clock.now)
        clock.now += 7.0
    assert len(times) >= 3
    assert max(b - a for a, b in itertools.pairwise(times)) <= 600.0 + 7.0  # to the next tick


def test_a_chip_npu_smi_cannot_read_keeps_its_ids():
    runner = FakeRunner((0, fixture(TABLE_910B)), (255, "dcmi module initialize failed. ret is -8005\n"))
    runner.m_answer = (0, fixture(M_910B))
    probe = AscendProbe(run=runner, clock=Clock())
    probe.setup()
    probe.sample()
    lost = by_id(probe.sample())
    assert not lost["npu3-chip0"].healthy and lost["npu3-chip0"].info["logic_id"] == "3"
