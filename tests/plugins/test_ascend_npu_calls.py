"""The ascend probe's per-NPU calls (`-t usages`, `-t health`, `-t board`), in simulated time, and the
Ascend 950 / not-understood layouts end to end."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
from pathlib import Path

import pytest
from test_ascend_parser import UNKNOWN_LAYOUT, _a5_table
from test_ascend_probe import FakeRunner, by_id, fixture

from capmon.agent.probe import config_from_mapping
from capmon.plugins.ascend import AscendConfig, AscendProbe

MIB = 1024 * 1024
A5 = "info_a5_atlas350_doc_npu_id_header_no_processes.txt"
USAGES_910B = fixture("info_t_usages_910b_v25.5.1_telegraf.txt")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(table: str, clock: Clock | None = None, t_answers=None, **config):
    runner = FakeRunner((0, table), t_answers=t_answers)
    probe = AscendProbe(AscendConfig(**config), run=runner, clock=clock or Clock())
    probe.setup()
    return probe, runner


def t_calls(runner, since=0):
    """The per-NPU `-t <type> -i N` calls, as (type, N)."""
    return [(argv[3], int(argv[5])) for argv, _ in runner.calls[since:] if "-t" in argv]


def extra_calls(runner, since=0):
    """Every call beside the table: `-t` as (type, N), `-m` as ("mapping", None)."""
    return [
        (argv[3], int(argv[5])) if "-t" in argv else ("mapping", None)
        for argv, _ in runner.calls[since:]
        if len(argv) > 2
    ]


def usages_text(**rates) -> str:
    """The 910B `-t usages` fixture with some rates changed: usages_text(Aivector=85)."""
    text = USAGES_910B
    for name, value in rates.items():
        text = text.replace(
            f"{name} Usage Rate(%)".ljust(31) + ": 0", f"{name} Usage Rate(%)".ljust(31) + f": {value}"
        )
        assert f": {value}" in text, name
    return text


# --- the 950 layout, end to end ---


def test_a5_doc_table_is_one_device_with_the_doc_values():
    probe, _ = make(fixture(A5))
    (npu,) = probe.sample()
    assert (npu.device_id, npu.index, npu.model) == ("npu0-chip0", 0, "xxx")
    assert (npu.power_w, npu.temp_c, npu.util_pct) == (204.4, 56, 0)
    assert (npu.memory_used_bytes, npu.memory_total_bytes) == (4439 * MIB, 86016 * MIB)
    assert npu.info["bus_id"] == "0000:91:00.0"
    assert (npu.healthy, npu.error, npu.processes) == (True, None, 0)


def test_a5_eight_cards_give_eight_devices_with_processes():
    from test_ascend_parser import A5_PROCESSES

    probe, _ = make(_a5_table(8, A5_PROCESSES))
    devices = by_id(probe.sample())
    assert sorted(devices) == [f"npu{n}-chip0" for n in range(8)]
    assert devices["npu0-chip0"].processes == 2 and devices["npu1-chip0"].processes == 0
    assert devices["npu3-chip0"].healthy is False


# --- a layout the parser has not seen ---


def test_unknown_layout_shows_each_npu_unavailable_naming_the_header(caplog):
    probe, _ = make(UNKNOWN_LAYOUT)
    with caplog.at_level(logging.WARNING, logger="capmon.plugins.ascend"):
        samples = probe.sample()
    assert [s.device_id for s in samples] == ["npu0-chip0", "npu1-chip0"]
    assert all(not s.healthy for s in samples)
    assert samples[1].error == (
        "npu-smi info layout not understood: device table header 'Card' not understood; unknown columns"
        " 'Card', 'Label', 'Watts', 'Celsius', 'Slot', 'Load(%)', 'Frame-Buffer(MB)'"
    )
    assert any("'Card'" in r.getMessage() for r in caplog.records)


def test_unknown_first_column_with_understood_values_is_reported_normally():
    probe, _ = make(fixture(A5).replace("| NPU ID |", "| Dev ID |"))
    (npu,) = probe.sample()
    assert (npu.device_id, npu.healthy, npu.util_pct, npu.temp_c) == ("npu0-chip0", True, 0, 56)


# --- usages: round-robin, one call per tick at most ---


@pytest.mark.parametrize(("interval_s", "jitter"), [(5.0, 0.0), (5.0, 0.3), (7.0, 0.2)])
def test_usages_round_robin_visits_every_npu_within_the_interval(interval_s, jitter):
    clock = Clock()
    probe, runner = make(
        fixture("info_910prob_8npu_v24.1.0_no_processes.txt"),
        clock,
        interval_s=interval_s,
        usages_interval_s=60.0,
        # A saturated round has no free tick: the `-m` re-read would take one (tested below).
        mapping_interval_s=0,
    )
    reads: dict[int, list[float]] = {}
    for tick in range(200):
        before = len(runner.calls)
        samples = probe.sample()
        extra_calls = t_calls(runner, before)
        assert len(extra_calls) <= 1, extra_calls
        for kind, npu in extra_calls:
            if kind == "usages":
                reads.setdefault(npu, []).append(clock.now)
        assert len(samples) == 8
        clock.now += interval_s + (jitter if tick % 3 == 0 else -jitter)
    assert sorted(reads) == list(range(8))
    for npu, times in reads.items():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) <= 60.0, (npu, gaps)
    # Identity once per NPU, never again.
    assert sorted(n for kind, n in t_calls(runner) if kind == "board") == list(range(8))


def test_more_npus_than_the_interval_allows_stay_at_one_call_per_tick(caplog):
    clock = Clock()
    table = _a5_table(16, "")
    probe, runner = make(table, clock, interval_s=10.0, usages_interval_s=60.0)
    with caplog.at_level(logging.WARNING, logger="capmon.plugins.ascend"):
        for _ in range(16 + 1 + 16 * 3):  # identities, NPU 3's Alarm health, three rounds
            before = len(runner.calls)
            probe.sample()
            assert len(t_calls(runner, before)) <= 1
            clock.now += 10.0
    usage_reads = [n for kind, n in t_calls(runner) if kind == "usages"]
    assert sorted(set(usage_reads)) == list(range(16))
    assert len(usage_reads) == 16 * 3  # every NPU once per 160 s round
    assert sum("read every 160 s" in r.getMessage() for r in caplog.records) == 1


def test_usages_interval_zero_reads_no_usages():
    clock = Clock()
    probe, runner = make(fixture(A5), clock, usages_interval_s=0.0)
    for _ in range(20):
        probe.sample()
        clock.now += 10
    assert [kind for kind, _ in t_calls(runner)] == ["board"]
    assert probe.sample()[0].extra == {}


def test_usages_travel_as_extra_fields_with_their_age():
    clock = Clock()
    probe, _ = make(fixture(A5), clock, t_answers={"usages": fixture("info_t_usages_a5_atlas350_doc.txt")})
    probe.sample()  # board
    clock.now += 10
    probe.sample()  # usages read now
    clock.now += 10
    (npu,) = probe.sample()
    assert npu.extra == {
        "aicore_pct": 0,
        "aivector_pct": 0,
        "aicpu_pct": 0,
        "ctrlcpu_pct": 40,
        "ddr_bw_pct": 0,
        "hbm_bw_pct": 3,
        "npu_util_pct": 0,
        "aicube_pct": 0,
        "usages_age_s": 10.0,
    }
    assert npu.util_pct == 0  # 3 % HBM bandwidth on an idle chip is not work


def test_bad_usages_interval_is_a_config_error_naming_the_key():
    with pytest.raises(
        ValueError, match=r"\[probes.ascend\]: usages_interval_s must be 0 \(off\) or a number of seconds"
    ):
        config_from_mapping(AscendConfig, {"usages_interval_s": -1.0}, "agent.toml: [probes.ascend]")


# --- AI Core idle but the chip working (vector-only, memory-bound kernels), on traces ---

# (table AI Core %, the NPU's -t usages answer, seconds since that read) -> util_pct reported.
WORK_TRACES = [
    ("vector-only kernel", 0, usages_text(Aivector=85), 10, 85),
    ("memory-bound kernel", 0, usages_text(**{"HBM Bandwidth": 62}), 10, 62),
    ("idle chip, driver HBM traffic", 0, usages_text(**{"HBM Bandwidth": 3}), 10, 0),
    ("idle 310P: DDR bandwidth is not work", 0, usages_text(**{"DDR Bandwidth": 51}), 10, 0),
    ("cube job seen by the read has stopped", 0, usages_text(Aicore=70, Aivector=80), 10, 0),
    ("table already busy", 40, usages_text(Aivector=85), 10, 40),
    ("reading older than a round of reads", 0, usages_text(Aivector=85), 70, 0),
]


@pytest.mark.parametrize(
    ("case", "aicore", "answer", "age", "util"), WORK_TRACES, ids=[t[0] for t in WORK_TRACES]
)
def test_vector_or_hbm_activity_counts_where_ai_core_reads_zero(case, aicore, answer, age, util):
    table = fixture("info_910b4_1npu_v26.0.rc1_wide_container_pid_column.txt")
    clock = Clock()
    probe, runner = make(table, clock, t_answers={"usages": answer}, usages_interval_s=60.0)
    probe.sample()  # board
    clock.now += 10
    probe.sample()  # usages
    assert t_calls(runner)[-1] == ("usages", 0)
    clock.now += age
    if aicore:
        busy = table.replace("| 0                    0    / 0", f"| {aicore:<20} 0    / 0", 1)
        assert busy != table
        runner.answers = [(0, busy)]
    runner.t_answers["usages"] = (2, "npu-smi busy")  # a due re-read fails: the old reading stays
    (npu,) = probe.sample()
    assert npu.util_pct == util, case


# --- health with a reason, identity once ---

ALARM_HEALTH = (
    "NPU ID                         : 0\n"
    "Health                         : Alarm\n"
    "Error Code                     : 0x80E18402\n"
    "Error Information              : HBM ECC error count exceeds the threshold\n"
)


def test_unhealthy_chip_reads_its_health_once_and_carries_the_reason():
    table = fixture("info_310b4_v23.0.0_alarm_busid_NA_no_process_table.txt")
    clock = Clock()
    probe, runner = make(table, clock, t_answers={"health": ALARM_HEALTH})
    for _ in range(5):
        (chip,) = probe.sample()
        clock.now += 10
    assert [k for k, _ in t_calls(runner)].count("health") == 1
    assert t_calls(runner)[0] == ("health", 0)  # before identity and usages
    assert chip.healthy is False
    assert chip.error == "npu-smi health: Alarm (0x80E18402: HBM ECC error count exceeds the threshold)"


def test_healthy_chips_never_read_health():
    clock = Clock()
    probe, runner = make(fixture("info_910prob_8npu_v24.1.0_no_processes.txt"), clock)
    for _ in range(30):
        probe.sample()
        clock.now += 10
    assert "health" not in [k for k, _ in t_calls(runner)]


def test_warning_stays_healthy_and_shows_its_detail():
    text = fixture("info_910a_atlas800_9010_v24.1.RC2_name_xxx_warning_processes.txt")
    warning = ALARM_HEALTH.replace("Alarm", "Warning")
    probe, runner = make(text, t_answers={"health": warning})
    probe.sample()
    probe.sample()
    devices = by_id(probe.sample())
    warned = [n for k, n in t_calls(runner) if k == "health"]
    assert warned == [3, 7]  # the two Warning NPUs, one per tick
    assert devices["npu3-chip0"].healthy is True and devices["npu3-chip0"].error is None
    assert devices["npu3-chip0"].info["health_error"].startswith("0x80E18402")
    assert "health_error" not in devices["npu4-chip0"].info


def test_health_is_read_again_when_it_changes():
    alarm = fixture("info_310b4_v23.0.0_alarm_busid_NA_no_process_table.txt")
    critical = alarm.replace("Alarm   ", "Critical")
    probe, runner = make(alarm, t_answers={"health": ALARM_HEALTH})
    probe.sample()
    probe.sample()
    runner.answers = [(0, critical)]
    probe.sample()
    probe.sample()
    assert [k for k, _ in t_calls(runner)].count("health") == 2


def test_identity_is_read_once_per_npu_and_shown_every_tick():
    clock = Clock()
    probe, runner = make(fixture(A5), clock)
    for _ in range(10):
        (npu,) = probe.sample()
        clock.now += 10
    assert [k for k, _ in t_calls(runner)].count("board") == 1
    assert (npu.info["serial"], npu.info["product"]) == ("1025C9048791", "IT21HMDC_Bin5")
    assert (npu.info["firmware"], npu.info["driver"]) == ("7.8.0.6.201", "25.5.1")


def test_a_hanging_extra_call_pauses_extra_reads_and_keeps_the_devices():
    clock = Clock()
    hang = subprocess.TimeoutExpired(["npu-smi"], 1)
    probe, runner = make(fixture(A5), clock, t_answers={"board": hang}, usages_interval_s=60.0)
    (npu,) = probe.sample()
    assert npu.healthy is True
    for _ in range(5):
        clock.now += 10
        probe.sample()
    assert t_calls(runner) == [("board", 0)]  # paused for usages_interval_s
    clock.now += 20
    probe.sample()
    assert t_calls(runner)[-1] == ("usages", 0)  # identity is not retried: once


def test_failed_extra_calls_never_change_state():
    probe, _ = make(fixture(A5), t_answers={"board": (2, "dcmi get board info failed. ret is -8005")})
    (npu,) = probe.sample()
    assert (npu.healthy, npu.error, npu.util_pct) == (True, None, 0)
    assert "serial" not in npu.info


# --- the real subprocess path: a fake npu-smi on PATH answering every call from fixtures ---

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ascend"


@pytest.fixture
def fake_npu_smi(tmp_path, monkeypatch):
    script = tmp_path / "npu-smi"
    script.write_text(
        "#!/bin/sh\n"
        f"F='{FIXTURES}'\n"
        'case "$*" in\n'
        f'  "info") cat "$F/{A5}" ;;\n'
        '  "info -m") cat "$F/info_m_a5_atlas350_slot_phyid_doc.txt" ;;\n'
        '  "info -t usages -i 0") cat "$F/info_t_usages_a5_atlas350_doc.txt" ;;\n'
        '  "info -t health -i 0") cat "$F/info_t_health_a5_atlas350_doc.txt" ;;\n'
        '  "info -t board -i 0") cat "$F/info_t_board_910b_v25.5.1_telegraf.txt" ;;\n'
        '  *) echo "unexpected args: $*"; exit 2 ;;\n'
        "esac\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    return script


def test_real_subprocesses_answer_info_board_and_usages(fake_npu_smi):
    clock = Clock()
    probe = AscendProbe(AscendConfig(), clock=clock)
    probe.setup()
    probe.sample()
    clock.now += 10
    probe.sample()
    clock.now += 10
    (npu,) = probe.sample()
    assert npu.device_id == "npu0-chip0" and npu.healthy
    assert npu.info["serial"] == "1025C9048791"
    assert npu.info["phy_id"] == "0"  # from `npu-smi info -m`
    assert npu.extra["ctrlcpu_pct"] == 40 and npu.extra["usages_age_s"] == 10


def test_readme_lists_every_field_the_probe_can_send():
    from capmon.plugins.ascend import fields

    readme = (Path(fields.__file__).parent / "README.md").read_text()
    extras = {f"extra_{name}" for name in fields.USAGE_FIELDS.values()} | {"extra_usages_age_s"}
    infos = {f'info["{name}"]' for name in fields.BOARD_FIELDS.values()} | {'info["health_error"]'}
    assert {name for name in extras | infos if name not in readme} == set()
