"""The npu-smi default-table parser over every recorded real output (tests/fixtures/ascend/SOURCES.md).

Expected values are read off each fixture by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from capmon.plugins.ascend import NpuChip, NpuProcess, parse_npu_smi_info

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ascend"

# File -> (chips, process rows, process table present).
DEFAULT_TABLES = {
    "info_910a_8npu_v24.1.0_name910B.txt": (8, 0, False),
    "info_910a_atlas800_9010_v22.0.3.1_no_process_table.txt": (8, 0, False),
    "info_910a_atlas800_9010_v24.1.RC2_name_xxx_warning_processes.txt": (8, 32, True),
    "info_910b2c_atlas800i_a2_v23.0.2.1_with_process_trailing_spaces.txt": (2, 1, True),
    "info_910b3_8npu_v25.2.0_with_process_empty_name.txt": (8, 1, True),
    "info_910b3_v25.5.1_excerpt_2of8_with_process.txt": (2, 1, True),
    "info_910b4_1npu_v26.0.rc1_wide_container_pid_column.txt": (1, 0, True),
    "info_910prob_8npu_v24.1.0_no_processes.txt": (8, 0, True),
    "info_310_atlas300_v23.0.0_no_processes.txt": (1, 0, True),
    "info_310_atlas300i_model3000_4chip_v20.2.0.txt": (4, 0, False),
    "info_310_atlas300i_model3000_4chip_v21.0.4.txt": (4, 0, False),
    "info_310b1_v23.0.rc3_busid_NA_no_process_table.txt": (1, 0, False),
    "info_310b4_v23.0.0_alarm_busid_NA_no_process_table.txt": (1, 0, False),
    "info_310p3_1chip_v25.5.2_npu_id_32896_anonymized_bus.txt": (1, 0, True),
    "info_310p3_v25.3.rc1_power_NA_no_processes.txt": (1, 0, True),
    "info_a5_atlas350_doc_npu_id_header_no_processes.txt": (1, 0, True),
}

# File -> chips checked field by field (every field of the record).
EXPECTED_CHIPS = {
    # Ascend 950: `NPU ID` first, no chip column, NPU Util instead of AICore, DDR 0 / 0 beside HBM.
    "info_a5_atlas350_doc_npu_id_header_no_processes.txt": [
        NpuChip(
            0,
            0,
            "xxx",
            "OK",
            204.4,
            56,
            None,
            4439,
            86016,
            0,
            0,
            "0000:91:00.0",
            npu_util_pct=0,
            hugepages_used=0,
            hugepages_total=0,
            chip_id_printed=False,  # one row pair per NPU: chip 0 is its position
        ),
    ],
    "info_910a_8npu_v24.1.0_name910B.txt": [
        NpuChip(
            0,
            0,
            "910B",
            "OK",
            70.0,
            34,
            0,
            1365,
            32768,
            1197,
            13553,
            "0000:C1:00.0",
            hugepages_used=0,
            hugepages_total=0,
        ),
        NpuChip(
            7,
            0,
            "910B",
            "OK",
            65.6,
            33,
            0,
            4,
            32768,
            1777,
            15567,
            "0000:02:00.0",
            hugepages_used=0,
            hugepages_total=0,
        ),
    ],
    "info_910a_atlas800_9010_v22.0.3.1_no_process_table.txt": [
        NpuChip(
            3,
            0,
            "910A",
            "OK",
            191.7,
            42,
            0,
            0,
            32768,
            1866,
            15077,
            "0000:3E:00.0",
            hugepages_used=15,
            hugepages_total=15,
        ),
    ],
    "info_910a_atlas800_9010_v24.1.RC2_name_xxx_warning_processes.txt": [
        NpuChip(
            3,
            0,
            "xxx",
            "Warning",
            206.9,
            39,
            0,
            0,
            32768,
            3616,
            15039,
            "0000:01:00.0",
            hugepages_used=1232,
            hugepages_total=1232,
        ),
        NpuChip(
            4,
            0,
            "xxx",
            "OK",
            70.2,
            39,
            0,
            0,
            32768,
            3708,
            15137,
            "0000:C2:00.0",
            hugepages_used=1232,
            hugepages_total=1232,
        ),
    ],
    "info_910b2c_atlas800i_a2_v23.0.2.1_with_process_trailing_spaces.txt": [
        NpuChip(
            0,
            0,
            "910B2C",
            "OK",
            88.6,
            51,
            0,
            20701,
            65536,
            0,
            0,
            "0000:5A:00.0",
            hugepages_used=0,
            hugepages_total=0,
        ),
        NpuChip(
            1,
            0,
            "910B2C",
            "OK",
            99.6,
            50,
            0,
            20687,
            65536,
            0,
            0,
            "0000:19:00.0",
            hugepages_used=0,
            hugepages_total=0,
        ),
    ],
    "info_910b3_8npu_v25.2.0_with_process_empty_name.txt": [
        NpuChip(
            2,
            0,
            "910B3",
            "OK",
            92.3,
            32,
            0,
            41052,
            65536,
            0,
            0,
            "0000:81:00.0",
            hugepages_used=0,
            hugepages_total=0,
        ),
        NpuChip(
            3,
            0,
            "910B3",
            "OK",
            92.4,
            32,
            0,
            3390,
            65536,
            0,
            0,
            "0000:82:00.0",
            hugepages_used=0,
            hugepages_total=0,
        ),
    ],
    "info_910b3_v25.5.1_excerpt_2of8_with_process.txt": [
        NpuChip(
            0,
            0,
            "910B3",
            "OK",
            102.8,
            45,
            0,
            3445,
            65536,
            0,
            0,
            "0000:C1:00.0",
            hugepages_used=0,
            hugepages_total=0,
        ),
        NpuChip(
            5,
            0,
            "910B3",
            "OK",
            100.8,
            44,
            12,
            60156,
            65536,
            0,
            0,
            "0000:02:00.0",
            hugepages_used=0,
            hugepages_total=0,
        ),
    ],
    "info_910b4_1npu_v26.0.rc1_wide_container_pid_column.txt": [
        NpuChip(
            0,
            0,
            "910B4",
            "OK",
            82.6,
            32,
            0,
            2871,
            32768,
            0,
            0,
            "0000:C1:00.0",
            hugepages_used=0,
            hugepages_total=0,
        ),
    ],
    "info_910prob_8npu_v24.1.0_no_processes.txt": [
        NpuChip(
            0,
            0,
            "910ProB",
            "OK",
            78.0,
            38,
            0,
            18,
            32768,
            2387,
            13553,
            "0000:C1:00.0",
            hugepages_used=0,
            hugepages_total=0,
        ),
        NpuChip(
            6,
            0,
            "910ProB",
            "OK",
            83.0,
            40,
            0,
            3,
            32768,
            2143,
            15665,
            "0000:42:00.0",
            hugepages_used=0,
            hugepages_total=0,
        ),
    ],
    "info_310_atlas300_v23.0.0_no_processes.txt": [
        NpuChip(
            0,
            0,
            "310",
            "OK",
            12.8,
            61,
            0,
            None,
            None,
            577,
            7759,
            "0000:01:00.0",
            logic_id=0,
            hugepages_used=0,
            hugepages_total=969,
        ),
    ],
    "info_310_atlas300i_model3000_4chip_v20.2.0.txt": [
        NpuChip(215, 0, "310", "OK", 12.8, 56, 0, None, None, 2703, 8192, "0000:DA:00.0", logic_id=0),
        NpuChip(215, 2, "310", "OK", 12.8, 57, 0, None, None, 2703, 8192, "0000:DD:00.0", logic_id=2),
        NpuChip(215, 3, "310", "OK", 12.8, 55, 0, None, None, 2703, 8192, "0000:DB:00.0", logic_id=3),
    ],
    "info_310_atlas300i_model3000_4chip_v21.0.4.txt": [
        NpuChip(
            6,
            0,
            "310",
            "OK",
            12.8,
            73,
            0,
            None,
            None,
            2703,
            8192,
            "0000:89:00.0",
            logic_id=3,
            hugepages_used=0,
            hugepages_total=970,
        ),
        NpuChip(
            6,
            1,
            "310",
            "OK",
            12.8,
            74,
            0,
            None,
            None,
            2867,
            8192,
            "0000:8A:00.0",
            logic_id=4,
            hugepages_used=0,
            hugepages_total=970,
        ),
        NpuChip(
            6,
            3,
            "310",
            "OK",
            12.8,
            65,
            0,
            None,
            None,
            2867,
            8192,
            "0000:8C:00.0",
            logic_id=6,
            hugepages_used=0,
            hugepages_total=970,
        ),
    ],
    "info_310b1_v23.0.rc3_busid_NA_no_process_table.txt": [
        NpuChip(
            0,
            0,
            "310B1",
            "OK",
            8.9,
            54,
            0,
            None,
            None,
            4974,
            11577,
            None,
            logic_id=0,
            hugepages_used=15,
            hugepages_total=15,
        ),
    ],
    "info_310b4_v23.0.0_alarm_busid_NA_no_process_table.txt": [
        NpuChip(
            0,
            0,
            "310B4",
            "Alarm",
            0.0,
            65,
            0,
            None,
            None,
            3628,
            15609,
            None,
            logic_id=0,
            hugepages_used=15,
            hugepages_total=15,
        ),
    ],
    "info_310p3_1chip_v25.5.2_npu_id_32896_anonymized_bus.txt": [
        NpuChip(
            32896,
            0,
            "310P3",
            "OK",
            None,
            54,
            0,
            None,
            None,
            1904,
            44213,
            "0000:00:00.0",
            logic_id=0,
            hugepages_used=0,
            hugepages_total=0,
        ),
    ],
    "info_310p3_v25.3.rc1_power_NA_no_processes.txt": [
        NpuChip(
            6,
            0,
            "310P3",
            "OK",
            None,
            50,
            0,
            None,
            None,
            1839,
            21525,
            "0000:84:00.0",
            logic_id=0,
            hugepages_used=0,
            hugepages_total=0,
        ),
    ],
}

# File -> {(npu, chip): process count}; None = the output cannot tell.
EXPECTED_PROCESS_COUNTS = {
    "info_910a_8npu_v24.1.0_name910B.txt": {(0, 0): None, (7, 0): None},
    "info_910a_atlas800_9010_v24.1.RC2_name_xxx_warning_processes.txt": {(0, 0): 4, (3, 0): 4, (7, 0): 4},
    # The table names NPU 0 only; NPU 1 is not mentioned, so its count is unknown.
    "info_910b2c_atlas800i_a2_v23.0.2.1_with_process_trailing_spaces.txt": {(0, 0): 1, (1, 0): None},
    "info_910b3_8npu_v25.2.0_with_process_empty_name.txt": {(0, 0): 0, (2, 0): 1, (7, 0): 0},
    "info_910b3_v25.5.1_excerpt_2of8_with_process.txt": {(0, 0): None, (5, 0): 1},
    "info_910b4_1npu_v26.0.rc1_wide_container_pid_column.txt": {(0, 0): 0},
    "info_910prob_8npu_v24.1.0_no_processes.txt": {(0, 0): 0, (6, 0): 0},
    "info_310_atlas300_v23.0.0_no_processes.txt": {(0, 0): 0},
    "info_310_atlas300i_model3000_4chip_v21.0.4.txt": {(6, 0): None, (6, 3): None},
    "info_310p3_1chip_v25.5.2_npu_id_32896_anonymized_bus.txt": {(32896, 0): 0},
    "info_310b4_v23.0.0_alarm_busid_NA_no_process_table.txt": {(0, 0): None},
    "info_a5_atlas350_doc_npu_id_header_no_processes.txt": {(0, 0): 0},
}

EXPECTED_PROCESSES = {
    "info_910a_atlas800_9010_v24.1.RC2_name_xxx_warning_processes.txt": [
        NpuProcess(0, 0, 37656, "hlt_host_devmm_", 686),
        NpuProcess(7, 0, 37663, "hlt_host_devmm_", 686),
    ],
    "info_910b2c_atlas800i_a2_v23.0.2.1_with_process_trailing_spaces.txt": [
        NpuProcess(0, 0, 124528, "python3.8", 17400),
    ],
    # Inside a container npu-smi prints an empty process name.
    "info_910b3_8npu_v25.2.0_with_process_empty_name.txt": [NpuProcess(2, 0, 1333928, None, 37709)],
    "info_910b3_v25.5.1_excerpt_2of8_with_process.txt": [NpuProcess(5, 0, 2290156, "VLLMEngineCore", 56630)],
}

EXPECTED_VERSIONS = {
    "info_a5_atlas350_doc_npu_id_header_no_processes.txt": "x.x.x",
    "info_310_atlas300i_model3000_4chip_v21.0.4.txt": "21.0.4.B030",
    "info_910b4_1npu_v26.0.rc1_wide_container_pid_column.txt": "26.0.rc1",
    "info_910a_atlas800_9010_v24.1.RC2_name_xxx_warning_processes.txt": "24.1.RC2",
}


def _parse(name: str):
    return parse_npu_smi_info((FIXTURES / name).read_text())


def test_every_default_table_fixture_is_listed():
    """A fixture added to the folder must get hand-checked expectations here."""
    on_disk = {
        p.name
        for p in FIXTURES.glob("info_*.txt")
        if not p.name.startswith(("info_t_", "info_m_", "info_l_", "info_watch_"))
    }
    assert on_disk == set(DEFAULT_TABLES)


@pytest.mark.parametrize("name", sorted(DEFAULT_TABLES))
def test_default_table_counts_and_no_warnings(name):
    chips, processes, known = DEFAULT_TABLES[name]
    info = _parse(name)
    assert len(info.chips) == chips
    assert len(info.processes) == processes
    assert info.processes_known is known
    assert info.warnings == ()


@pytest.mark.parametrize("name", sorted(EXPECTED_CHIPS))
def test_hand_checked_chip_values(name):
    chips = {(c.npu_id, c.chip_id): c for c in _parse(name).chips}
    for expected in EXPECTED_CHIPS[name]:
        assert chips[(expected.npu_id, expected.chip_id)] == expected


@pytest.mark.parametrize("name", sorted(EXPECTED_PROCESS_COUNTS))
def test_process_counts_per_chip(name):
    info = _parse(name)
    for (npu, chip), count in EXPECTED_PROCESS_COUNTS[name].items():
        assert info.process_count(npu, chip) == count, (npu, chip)


@pytest.mark.parametrize("name", sorted(EXPECTED_PROCESSES))
def test_hand_checked_process_rows(name):
    processes = _parse(name).processes
    for expected in EXPECTED_PROCESSES[name]:
        assert expected in processes


@pytest.mark.parametrize("name", sorted(EXPECTED_VERSIONS))
def test_version_from_title_row(name):
    assert _parse(name).version == EXPECTED_VERSIONS[name]


def test_chip_ids_of_four_chip_card_in_table_order():
    info = _parse("info_310_atlas300i_model3000_4chip_v21.0.4.txt")
    assert [(c.npu_id, c.chip_id, c.logic_id) for c in info.chips] == [
        (6, 0, 3),
        (6, 1, 4),
        (6, 2, 5),
        (6, 3, 6),
    ]


def test_npu_ids_keep_their_order_and_gaps():
    info = _parse("info_910b3_v25.5.1_excerpt_2of8_with_process.txt")
    assert [c.npu_id for c in info.chips] == [0, 5]


NON_DEFAULT = sorted(
    p.name for p in FIXTURES.glob("*.txt") if p.name not in DEFAULT_TABLES and p.name != "SOURCES.md"
)


@pytest.mark.parametrize("name", NON_DEFAULT)
def test_other_outputs_do_not_crash_and_say_why(name):
    """`-t usages`, `-m`, `-l`, `watch`, errors: no chips, no exception, one warning."""
    info = _parse(name)
    assert info.chips == ()
    assert info.processes_known is False
    assert any("no npu-smi info device table" in w for w in info.warnings)


def test_driver_warning_trailer_and_leading_log_lines_are_messages_not_rows():
    table = (FIXTURES / "info_910b3_8npu_v25.2.0_with_process_empty_name.txt").read_text()
    trailer = (FIXTURES / "warning_driver_incomplete_trailer_line.txt").read_text()
    text = "DrvMngGetConsoleLogLevel failed. (ret=4)\n" + table + trailer
    info = parse_npu_smi_info(text)
    assert len(info.chips) == 8
    assert len(info.processes) == 1
    assert info.warnings == ()
    assert info.messages[0] == "DrvMngGetConsoleLogLevel failed. (ret=4)"
    assert info.messages[-1].startswith("[WARNING]The driver package may not be completely installed")


def test_tab_indented_table_reads_the_same():
    text = (FIXTURES / "info_910prob_8npu_v24.1.0_no_processes.txt").read_text()
    indented = "".join("\t" + line for line in text.splitlines(keepends=True))
    assert parse_npu_smi_info(indented) == parse_npu_smi_info(text)


# Synthetic: the 310P3 layout above with two chips per NPU (a 310P Duo card), sparse large NPU ids,
# a dashed line between the chips of one NPU, and processes on one chip only.
DUO = """\
+--------------------------------------------------------------------------------------------------------+
| npu-smi 23.0.0                                   Version: 23.0.0                                       |
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===============================+=================+======================================================+
| 96      310P3                 | OK              | NA           45                0     / 0             |
| 0       0                     | 0000:01:00.0    | 3            1630 / 21534                            |
+-------------------------------+-----------------+------------------------------------------------------+
| 96      310P3                 | OK              | -            44                0     / 0             |
| 1       1                     | 0000:01:00.0    | 97           11630/ 21534                            |
+===============================+=================+======================================================+
| 32768   310P3                 | Critical        | NA           46                0     / 0             |
| 0       2                     | 0000:02:00.0    | 0            1630 / 21534                            |
+-------------------------------+-----------------+------------------------------------------------------+
| 32768   310P3                 | OK              | NA           47                0     / 0             |
| 1       3                     | 0000:02:00.0    | 0            1631 / 21534                            |
+===============================+=================+======================================================+
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Chip                  | Process id      | Process name             | Process memory(MB)        |
+===============================+=================+======================================================+
| 96      1                     | 4242            | infer                    | 9800                      |
+===============================+=================+======================================================+
| No running processes found in NPU 32768                                                                |
+===============================+=================+======================================================+
"""


def test_two_chips_per_npu_with_sparse_ids():
    info = parse_npu_smi_info(DUO)
    assert info.warnings == ()
    assert [(c.npu_id, c.chip_id, c.logic_id) for c in info.chips] == [
        (96, 0, 0),
        (96, 1, 1),
        (32768, 0, 2),
        (32768, 1, 3),
    ]
    assert info.chips[1].power_w is None
    assert (info.chips[1].aicore_pct, info.chips[1].memory_used_mb) == (97, 11630)
    assert info.chips[2].health == "Critical"
    assert [info.process_count(n, c) for n, c in [(96, 0), (96, 1), (32768, 0), (32768, 1)]] == [0, 1, 0, 0]


def test_chip_processes_are_the_rows_of_that_chip_only():
    info = parse_npu_smi_info(DUO)
    assert info.chip_processes(96, 1) == (NpuProcess(96, 1, 4242, "infer", 9800),)
    assert info.chip_processes(96, 0) == () and info.chip_processes(32768, 1) == ()
    assert parse_npu_smi_info(DUAL_DIE).chip_processes(0, 0) is None  # no process table


# Synthetic: a dual-die NPU whose second die leaves the NPU id out and prints power as `-`.
DUAL_DIE = """\
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip  Phy-ID              | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     Ascend910           | OK            | 171.0       38                0    / 0             |
| 0     0                   | 0000:9D:00.0  | 0           0    / 0          3394 / 65536         |
+---------------------------+---------------+----------------------------------------------------+
|       Ascend910           | OK            | -           37                0    / 0             |
| 1     1                   | 0000:9F:00.0  | 0           0    / 0          3157 / 65536         |
+===========================+===============+====================================================+
"""


def test_second_die_inherits_the_npu_id_across_a_dashed_line():
    info = parse_npu_smi_info(DUAL_DIE)
    assert [(c.npu_id, c.chip_id, c.phy_id, c.power_w) for c in info.chips] == [
        (0, 0, 0, 171.0),
        (0, 1, 1, None),
    ]
    assert info.processes_known is False
    assert info.process_count(0, 1) is None


def test_unknown_column_is_named_and_the_rest_is_read():
    text = DUAL_DIE.replace("HBM-Usage(MB)  ", "Frobs(n)       ")
    info = parse_npu_smi_info(text)
    assert len(info.chips) == 2
    assert info.chips[0].temp_c == 38
    assert info.chips[0].hbm_total_mb is None
    assert info.warnings == ("unknown column 'Frobs(n)' ignored",)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\x00\x01garbage\n|||\n+\n|",
        "| NPU Name | Health |\n| Chip |\n+===+\n| x | y |\n",
        DUO[: len(DUO) // 2],  # cut mid-table
        DUO.replace("|", "¦"),
    ],
)
def test_garbage_never_raises_and_warns(text):
    info = parse_npu_smi_info(text)
    assert info.warnings
    assert all(isinstance(c, NpuChip) for c in info.chips)


def test_second_die_keeps_its_name_without_an_npu_id():
    info = parse_npu_smi_info(DUAL_DIE)
    assert info.warnings == ()
    assert [c.name for c in info.chips] == ["Ascend910", "Ascend910"]


def _a5_table(npus: int, processes: str, process_header: str = "NPU ID") -> str:
    """Synthetic: the Ascend 950 doc layout widened to `npus` cards with a process table."""
    rows = []
    for n in range(npus):
        rows.append(
            f"| {n:<6} | Ascend950PR      | {'OK' if n != 3 else 'Alarm':<13} "
            f"| {200.0 + n:<11.1f} {50 + n:<17} {0:<5} / {0:<13} |"
        )
        rows.append(
            f"|        |                  | 0000:{0x91 + n:02X}:00.0  "
            f"| {10 * n:<11} {0:<4} / {0:<8} {4800 + n:<5} / {98304:<13} |"
        )
        rows.append(
            "+--------+------------------+---------------+-----------------------------------------------------+"
        )
    rows[-1] = rows[-1].replace("-", "=")
    return (
        "+-------------------------------------------------------------------------------------------------+\n"
        "| npu-smi 25.5.0                          Version: 25.5.0                                         |\n"
        "+--------+------------------+---------------+-----------------------------------------------------+\n"
        "| NPU ID | Name             | Health        | Power(W)    Temp(C)           Hugepages-Usage(page) |\n"
        "|        |                  | Bus-Id        | NPU Util(%) Memory-Usage(MB)  HBM-Usage(MB)         |\n"
        "+========+==================+===============+=====================================================+\n"
        + "\n".join(rows)
        + "\n+---------------------------+---------------+-----------------------------------------------------+\n"
        f"| {process_header:<25} | Process id    | Process name             | Process memory(MB)       |\n"
        "+===========================+===============+=====================================================+\n"
        + processes
        + "+===========================+===============+=====================================================+\n"
    )


A5_PROCESSES = (
    "| 0                         | 52110         | python3                  | 61000                    |\n"
    "| 0                         | 52111         | python3                  | 1200                     |\n"
    "+===========================+===============+=====================================================+\n"
    "| 5                         | 7301          | vllm worker              | 80000                    |\n"
    "+===========================+===============+=====================================================+\n"
    + "".join(
        f"| No running processes found in NPU {n:<63}|\n"
        "+===========================+===============+=====================================================+\n"
        for n in (1, 2, 3, 4, 6, 7)
    )
)


def test_a5_eight_cards_with_processes_headed_npu_id():
    info = parse_npu_smi_info(_a5_table(8, A5_PROCESSES))
    assert info.warnings == ()
    assert [(c.npu_id, c.chip_id) for c in info.chips] == [(n, 0) for n in range(8)]
    npu5 = info.chips[5]
    assert (npu5.name, npu5.health, npu5.power_w, npu5.temp_c) == ("Ascend950PR", "OK", 205.0, 55)
    assert (npu5.npu_util_pct, npu5.hbm_used_mb, npu5.hbm_total_mb, npu5.bus_id) == (
        50,
        4805,
        98304,
        "0000:96:00.0",
    )
    assert info.chips[3].health == "Alarm"
    assert [info.process_count(n, 0) for n in range(8)] == [2, 0, 0, 0, 0, 1, 0, 0]
    assert NpuProcess(5, 0, 7301, "vllm worker", 80000) in info.processes


@pytest.mark.parametrize(
    ("header", "cell0", "cell5"),
    [("NPU Chip", "0 0", "5 0"), ("NPU     Chip", "0       0", "5       0"), ("NPU Chip", "0", "5")],
)
def test_a5_process_table_headed_npu_chip(header, cell0, cell5):
    processes = (
        f"| {cell0:<25} | 52110         | python3                  | 61000                    |\n"
        f"| {cell5:<25} | 7301          | worker                   | 80000                    |\n"
    )
    info = parse_npu_smi_info(_a5_table(8, processes, process_header=header))
    assert info.warnings == ()
    assert [(p.npu_id, p.chip_id, p.pid) for p in info.processes] == [(0, 0, 52110), (5, 0, 7301)]
    assert info.process_count(5, 0) == 1


UNKNOWN_LAYOUT = """\
+------------------------------------------------------------------------------+
| npu-smi 27.0.0                   Version: 27.0.0                             |
+------------+-----------------+-----------------------------------------------+
| Card       | Label           | Watts      Celsius                            |
|            | Slot            | Load(%)    Frame-Buffer(MB)                   |
+============+=================+===============================================+
| 0          | Ascend960       | 300.1      61                                 |
|            | 0000:91:00.0    | 35         12000 / 131072                     |
+============+=================+===============================================+
| 1          | Ascend960       | 290.0      60                                 |
|            | 0000:92:00.0    | 0          4000 / 131072                      |
+============+=================+===============================================+
"""


def test_unknown_layout_still_lists_each_npu_by_structure():
    info = parse_npu_smi_info(UNKNOWN_LAYOUT)
    assert [(c.npu_id, c.chip_id, c.understood) for c in info.chips] == [(0, 0, False), (1, 0, False)]
    assert all(c.health is None and c.aicore_pct is None for c in info.chips)
    assert "device table header 'Card' not understood" in info.warnings
    assert any(
        "NPU 0 read by the position of its rows: header 'Card' not understood" in w for w in info.warnings
    )


def test_unknown_first_column_keeps_the_values_it_understood():
    text = FIXTURES.joinpath("info_a5_atlas350_doc_npu_id_header_no_processes.txt").read_text()
    info = parse_npu_smi_info(text.replace("| NPU ID |", "| Dev ID |"))
    (chip,) = info.chips
    assert (chip.npu_id, chip.understood, chip.health, chip.npu_util_pct, chip.hbm_used_mb) == (
        0,
        False,
        "OK",
        0,
        4439,
    )
    assert "unknown column 'Dev ID' ignored" in info.warnings
