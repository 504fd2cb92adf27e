"""The ascend probe: fixtures through a fake runner, and the real subprocess path with a fake npu-smi."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import pluggy
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# The Ascend 950 layout with a process table, widened to 8 cards (synthetic, from the doc's layout).
from test_ascend_parser import A5_PROCESSES, _a5_table

from capmon.agent import ProbeUnavailable, hookspecs, run_command
from capmon.agent.probe import Holder, config_from_mapping
from capmon.plugins import ascend
from capmon.plugins.ascend import AscendConfig, AscendProbe
from capmon.testing.npu_smi import mapping_for

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ascend"
PLUGIN_DIR = Path(ascend.__file__).parent
MIB = 1024 * 1024


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# Answers of the per-NPU `npu-smi info -t <type> -i N` calls, from recorded outputs.
T_FIXTURES = {
    "board": "info_t_board_910b_v25.5.1_telegraf.txt",
    "usages": "info_t_usages_910b_v25.5.1_telegraf.txt",
    "health": "info_t_health_a5_atlas350_doc.txt",
}


class FakeRunner:
    """Answers each `npu-smi info` with the next (exit code, stdout) or raises what it was given;
    `npu-smi info -t <type> -i N` from `t_answers[type]` (text, or a function of N), else a fixture;
    `npu-smi info -m` with `m_answer`, else the mapping of the first table answer (`mapping_for`)."""

    def __init__(self, *answers, t_answers=None, m_answer=None):
        self.answers = list(answers)
        self.t_answers = {k: fixture(v) for k, v in T_FIXTURES.items()} | (t_answers or {})
        if m_answer is None:
            table = next((a[1] for a in answers if isinstance(a, tuple) and a[0] == 0), None)
            m_answer = (0, mapping_for(table)) if table else (255, "")
        self.m_answer = m_answer
        self.calls: list[tuple[list[str], float]] = []

    def __call__(self, argv, timeout_s):
        self.calls.append((list(argv), timeout_s))
        if argv[1:] == ["info", "-m"]:
            answer = self.m_answer
            if isinstance(answer, BaseException):
                raise answer
            return (answer if isinstance(answer, tuple) else (0, answer)) + ("",)
        if len(argv) > 2:
            answer = self.t_answers[argv[3]]
            answer = answer(int(argv[5])) if callable(answer) else answer
            if isinstance(answer, BaseException):
                raise answer
            return (answer if isinstance(answer, tuple) else (0, answer)) + ("",)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        code, out = answer
        return code, out, ""

    def info_calls(self):
        return [argv for argv, _ in self.calls if argv[1:] == ["info"]]


def probe_with(*answers, t_answers=None, m_answer=None, clock=None, **config):
    runner = FakeRunner(*answers, t_answers=t_answers, m_answer=m_answer)
    probe = AscendProbe(AscendConfig(**config), run=runner, **({"clock": clock} if clock else {}))
    probe.setup()
    return probe, runner


def by_id(samples):
    return {s.device_id: s for s in samples}


def test_one_npu_smi_info_call_per_tick_for_all_npus():
    probe, runner = probe_with((0, fixture("info_910prob_8npu_v24.1.0_no_processes.txt")))
    assert len(probe.sample()) == 8
    assert len(probe.sample()) == 8
    assert runner.info_calls() == [["npu-smi", "info"], ["npu-smi", "info"]]
    # `npu-smi info -m` once at setup, and at most one per-NPU call per tick.
    assert [argv for argv, _ in runner.calls[:1]] == [["npu-smi", "info", "-m"]]
    assert len(runner.calls) <= 5
    # npu-smi is killed before the agent's own timeout, so the probe reports it.
    assert all(0 < timeout < probe.timeout_s for _, timeout in runner.calls)


def test_910b_sample_uses_hbm_and_process_table():
    probe, _ = probe_with((0, fixture("info_910b3_8npu_v25.2.0_with_process_empty_name.txt")))
    devices = by_id(probe.sample())
    npu2 = devices["npu2-chip0"]
    assert (npu2.vendor, npu2.model, npu2.index) == ("ascend", "910B3", 2)
    assert (npu2.memory_used_bytes, npu2.memory_total_bytes) == (41052 * MIB, 65536 * MIB)
    assert (npu2.util_pct, npu2.power_w, npu2.temp_c) == (0, 92.3, 32)
    assert npu2.processes == 1
    assert devices["npu0-chip0"].processes == 0
    assert npu2.healthy is True and npu2.error is None
    assert npu2.info["bus_id"] == "0000:81:00.0"
    assert npu2.info["npu_smi_version"] == "25.2.0"


def test_910a_with_hbm_and_ddr_reports_hbm_and_unknown_processes_without_table():
    probe, _ = probe_with((0, fixture("info_910a_8npu_v24.1.0_name910B.txt")))
    npu0 = by_id(probe.sample())["npu0-chip0"]
    assert (npu0.memory_used_bytes, npu0.memory_total_bytes) == (1365 * MIB, 32768 * MIB)
    assert npu0.processes is None


def test_310_without_hbm_reports_ddr_and_sparse_npu_ids():
    probe, _ = probe_with((0, fixture("info_310p3_1chip_v25.5.2_npu_id_32896_anonymized_bus.txt")))
    (chip,) = probe.sample()
    assert chip.device_id == "npu32896-chip0"
    assert chip.index == 32896
    assert (chip.memory_used_bytes, chip.memory_total_bytes) == (1904 * MIB, 44213 * MIB)
    assert chip.power_w is None
    assert chip.processes == 0


def test_four_chip_card_gives_four_devices():
    probe, _ = probe_with((0, fixture("info_310_atlas300i_model3000_4chip_v21.0.4.txt")))
    samples = probe.sample()
    assert [s.device_id for s in samples] == ["npu6-chip0", "npu6-chip1", "npu6-chip2", "npu6-chip3"]
    assert [s.info["logic_id"] for s in samples] == ["3", "4", "5", "6"]


def test_bus_id_na_is_left_out_and_alarm_is_unhealthy():
    probe, _ = probe_with((0, fixture("info_310b4_v23.0.0_alarm_busid_NA_no_process_table.txt")))
    (chip,) = probe.sample()
    assert "bus_id" not in chip.info
    assert chip.healthy is False
    assert chip.error == "npu-smi health: Alarm"
    assert chip.util_pct == 0  # still measured: the classifier decides what unhealthy means


@pytest.mark.parametrize(("warning_is_unhealthy", "healthy"), [(False, True), (True, False)])
def test_health_warning_maps_by_config(warning_is_unhealthy, healthy):
    text = fixture("info_910a_atlas800_9010_v24.1.RC2_name_xxx_warning_processes.txt")
    probe, _ = probe_with((0, text), warning_is_unhealthy=warning_is_unhealthy)
    devices = by_id(probe.sample())
    assert devices["npu3-chip0"].healthy is healthy
    assert devices["npu3-chip0"].info["health"] == "Warning"
    assert devices["npu4-chip0"].healthy is True
    assert devices["npu3-chip0"].processes == 4


def test_no_access_before_any_good_reading_gives_a_placeholder_with_a_hint():
    probe, _ = probe_with((187, fixture("error_no_dcmi_access_nonroot_8005_exit187.txt")))
    (device,) = probe.sample()
    assert device.device_id == "npu-smi"
    assert device.healthy is False
    assert "exited with 187" in device.error
    assert "dcmi module initialize failed. ret is -8005" in device.error
    assert "HwHiAiUser" in device.error


def test_failure_after_a_good_reading_marks_every_known_chip_unavailable():
    probe, _ = probe_with(
        (0, fixture("info_910b3_8npu_v25.2.0_with_process_empty_name.txt")),
        (2, fixture("error_container_device_used_8020.txt")),
        subprocess.TimeoutExpired(["npu-smi", "info"], 8),
    )
    assert all(s.healthy for s in probe.sample())
    failed = probe.sample()
    assert len(failed) == 8
    assert all(not s.healthy and "ret is -8020" in s.error and "another container" in s.error for s in failed)
    assert failed[0].model == "910B3" and failed[0].util_pct is None
    timed_out = probe.sample()
    assert len(timed_out) == 8
    assert all(not s.healthy and "did not answer" in s.error for s in timed_out)


@pytest.mark.parametrize(
    "name",
    [
        "info_t_usages_910b_v25.5.1_telegraf.txt",
        "info_m_910b_8npu_with_mcu_doc.txt",
        "error_not_supported_spod_info_a5_doc.txt",
    ],
)
def test_output_without_a_table_is_unavailable_and_logged_once(name, caplog):
    probe, _ = probe_with((0, fixture(name)), m_answer=(0, fixture("info_m_910b_8npu_with_mcu_doc.txt")))
    with caplog.at_level(logging.WARNING, logger="capmon.plugins.ascend"):
        first, second = probe.sample(), probe.sample()
    for samples in (first, second):
        assert len(samples) == 1
        assert samples[0].healthy is False
        assert "no device table" in samples[0].error
    assert len(caplog.records) == 1


def test_runner_that_cannot_start_does_not_raise():
    probe, _ = probe_with(FileNotFoundError(2, "No such file or directory", "npu-smi"))
    (device,) = probe.sample()
    assert device.healthy is False and "could not run" in device.error


def test_partly_understood_layout_warns_once_and_reports_the_rest(caplog):
    text = fixture("info_910b4_1npu_v26.0.rc1_wide_container_pid_column.txt").replace(
        "HBM-Usage(MB)", "HBM-Frobs(MB)"
    )
    probe, _ = probe_with((0, text))
    with caplog.at_level(logging.WARNING, logger="capmon.plugins.ascend"):
        probe.sample()
        (chip,) = probe.sample()
    assert chip.healthy is True
    assert chip.memory_total_bytes is None  # DDR is 0 / 0 and HBM was not understood
    assert chip.temp_c == 32
    assert len(caplog.records) == 1
    assert "HBM-Frobs(MB)" in caplog.records[0].getMessage()


def test_defaults_and_hook_registration():
    probe = AscendProbe()
    assert (probe.name, probe.vendor, probe.interval_s, probe.timeout_s) == ("ascend", "ascend", 10.0, 10.0)
    pm = pluggy.PluginManager("capmon")
    pm.add_hookspecs(hookspecs)
    pm.register(ascend)
    pm.check_pending()
    assert pm.hook.capmon_probe_types() == [[AscendProbe]]


def test_sample_toml_lists_every_option_at_its_default():
    text = (PLUGIN_DIR / "sample.toml").read_text()
    assert tomllib.loads(text) == {"probes": {"ascend": {}}}
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") and " = " in line else line for line in text.splitlines()
    )
    table = tomllib.loads(uncommented)["probes"]["ascend"]
    config = config_from_mapping(AscendProbe.Config, table, "sample.toml")
    assert set(table) == {
        "interval_s",
        "timeout_s",
        "npu_smi",
        "warning_is_unhealthy",
        "usages_interval_s",
        "mapping_interval_s",
    }
    probe = AscendProbe(config)
    default = AscendProbe()
    assert (probe.interval_s, probe.timeout_s) == (default.interval_s, default.timeout_s)
    assert (config.npu_smi, config.warning_is_unhealthy, config.usages_interval_s) == (
        default.config.npu_smi,
        default.config.warning_is_unhealthy,
        default.config.usages_interval_s,
    )


def test_readme_names_every_option():
    readme = (PLUGIN_DIR / "README.md").read_text()
    for option in (
        "interval_s",
        "timeout_s",
        "npu_smi",
        "warning_is_unhealthy",
        "usages_interval_s",
        "HwHiAiUser",
    ):
        assert option in readme


# --- the real subprocess path: a fake npu-smi executable first on PATH ---


def fake_npu_smi(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "npu-smi"
    script.write_text(
        f'#!/bin/sh\nif [ "$*" != "info" ]; then echo "unexpected args: $*"; exit 2; fi\n{body}\n'
    )
    script.chmod(0o755)
    return script


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    return tmp_path


def test_missing_npu_smi_skips_the_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ProbeUnavailable, match="npu-smi not on PATH"):
        AscendProbe().setup()
    with pytest.raises(ProbeUnavailable, match="not found"):
        AscendProbe(AscendConfig(npu_smi=str(tmp_path / "nope"))).setup()


def test_real_subprocess_prints_a_table(on_path):
    fake_npu_smi(on_path, f"cat '{FIXTURES / 'info_910prob_8npu_v24.1.0_no_processes.txt'}'")
    probe = AscendProbe()
    probe.setup()
    samples = probe.sample()
    assert len(samples) == 8
    assert all(s.healthy and s.processes == 0 for s in samples)


def test_real_subprocess_exit_187_without_access(on_path):
    fake_npu_smi(on_path, f"cat '{FIXTURES / 'error_no_dcmi_access_nonroot_8005_exit187.txt'}'; exit 187")
    probe = AscendProbe()
    probe.setup()
    (device,) = probe.sample()
    assert not device.healthy
    assert device.error.startswith(
        "npu-smi info exited with 187: dcmi module initialize failed. ret is -8005"
    )
    assert "run the agent as root" in device.error


def test_real_run_command_kills_a_hanging_npu_smi(on_path):
    script = fake_npu_smi(on_path, "sleep 60")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_command([str(script), "info"], 0.5)
    assert time.monotonic() - started < 30  # generous: killed at the timeout, not after the sleep


def test_hanging_npu_smi_makes_devices_unavailable(on_path):
    fake_npu_smi(on_path, "sleep 60")
    probe = AscendProbe(AscendConfig(timeout_s=1.0))
    probe.setup()
    started = time.monotonic()
    (device,) = probe.sample()
    assert time.monotonic() - started < 30
    assert not device.healthy and "did not answer within 0.8 s" in device.error


def test_each_outage_is_logged_once_and_recovery_is_logged(caplog):
    good = (0, fixture("info_310p3_v25.3.rc1_power_NA_no_processes.txt"))
    bad = (187, fixture("error_no_dcmi_access_nonroot_8005_exit187.txt"))
    probe, _ = probe_with(bad, bad, good, bad, bad)
    with caplog.at_level(logging.WARNING, logger="capmon.plugins.ascend"):
        states = [probe.sample()[0].healthy for _ in range(5)]
    assert states == [False, False, True, False, False]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "-8005" in messages[0] and "readable again" in messages[1] and "-8005" in messages[2]


def test_error_message_with_exit_0_still_explains_itself():
    probe, _ = probe_with((0, fixture("error_container_device_used_8020.txt")))
    (device,) = probe.sample()
    assert not device.healthy
    assert device.error == (
        "npu-smi info printed no device table: dcmi model initialized failed, because the device is used."
        " ret is -8020 (the NPUs are held by another container)"
    )


# --- holders: the process table per chip, consistent with `processes` ---

# Every default-table fixture: each chip's holders are None exactly where processes is None, and
# otherwise as many as processes.
HOLDER_FIXTURES = sorted(
    p.name
    for p in FIXTURES.glob("info_*.txt")
    if not p.name.startswith(("info_t_", "info_m_", "info_l_", "info_watch_"))
)


@pytest.mark.parametrize("name", HOLDER_FIXTURES)
def test_holders_agree_with_processes_on_every_recorded_table(name):
    probe, _ = probe_with((0, fixture(name)), usages_interval_s=0)
    for s in probe.sample():
        if s.holders is None:
            assert s.processes is None, s.device_id
        else:
            assert s.processes == len(s.holders) == len({h.pid for h in s.holders}), s.device_id


def test_holders_are_the_process_rows_of_their_chip_memory_in_bytes():
    probe, _ = probe_with((0, fixture("info_910b3_v25.5.1_excerpt_2of8_with_process.txt")))
    devices = by_id(probe.sample())
    assert devices["npu5-chip0"].holders == (Holder(2290156, 56630 * MIB, "VLLMEngineCore"),)
    # NPU 0 is not in this excerpt's process table: who holds it is unknown, as its count is.
    assert (devices["npu0-chip0"].holders, devices["npu0-chip0"].processes) == (None, None)


def test_four_processes_on_each_of_eight_npus():
    text = fixture("info_910a_atlas800_9010_v24.1.RC2_name_xxx_warning_processes.txt")
    probe, _ = probe_with((0, text))
    devices = by_id(probe.sample())
    assert devices["npu0-chip0"].holders == tuple(
        Holder(pid, 686 * MIB, "hlt_host_devmm_") for pid in (37656, 37664, 37640, 37648)
    )
    assert all(len(devices[f"npu{n}-chip0"].holders) == 4 for n in range(8))


def test_an_empty_process_name_inside_a_container_is_unknown_and_no_processes_is_empty():
    probe, _ = probe_with((0, fixture("info_910b3_8npu_v25.2.0_with_process_empty_name.txt")))
    devices = by_id(probe.sample())
    assert devices["npu2-chip0"].holders == (Holder(1333928, 37709 * MIB, None),)
    # "No running processes found in NPU 0": known to be nobody.
    assert devices["npu0-chip0"].holders == ()


def test_without_a_process_table_holders_are_unknown_not_empty():
    probe, _ = probe_with((0, fixture("info_910a_atlas800_9010_v22.0.3.1_no_process_table.txt")))
    assert {(s.holders, s.processes) for s in probe.sample()} == {(None, None)}


@pytest.mark.parametrize("header", ["NPU ID", "NPU Chip"])
def test_ascend_950_process_tables(header):
    probe, _ = probe_with((0, _a5_table(8, A5_PROCESSES, process_header=header)), usages_interval_s=0)
    holders = [s.holders for s in probe.sample()]
    assert holders[0] == (Holder(52110, 61000 * MIB, "python3"), Holder(52111, 1200 * MIB, "python3"))
    assert holders[5] == (Holder(7301, 80000 * MIB, "vllm worker"),)
    assert [len(h) for h in holders] == [2, 0, 0, 0, 0, 1, 0, 0]


def test_a_process_row_without_a_pid_leaves_holders_unknown_but_counts():
    # The row is counted, but a holder list without it would pass for everyone on the chip.
    row = "| 0                         | NA            | python3                  | 61000                    |\n"
    probe, _ = probe_with((0, _a5_table(1, row)), usages_interval_s=0)
    [s] = probe.sample()
    assert (s.holders, s.processes) == (None, 1)


def test_one_pid_on_two_rows_of_a_chip_is_one_holder_with_both_memories():
    rows = (
        "| 0                         | 52110         | python3                  | 1000                     |\n"
        "| 0                         | 52110         | python3                  | 500                      |\n"
    )
    probe, _ = probe_with((0, _a5_table(1, rows)), usages_interval_s=0)
    [s] = probe.sample()
    assert s.holders == (Holder(52110, 1500 * MIB, "python3"),) and s.processes == 1


def test_a_failed_npu_smi_knows_no_holders():
    probe, _ = probe_with(
        (0, fixture("info_910b3_8npu_v25.2.0_with_process_empty_name.txt")),
        (2, fixture("error_container_device_used_8020.txt")),
    )
    probe.sample()
    assert {s.holders for s in probe.sample()} == {None}
