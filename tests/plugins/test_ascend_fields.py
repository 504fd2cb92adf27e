"""The `npu-smi info -t <type>` key/value parser over every recorded output (tests/fixtures/ascend/SOURCES.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from capmon.plugins.ascend.fields import NpuHealth, board, health, parse_npu_smi_fields, usages

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ascend"


def _fields(name: str):
    return parse_npu_smi_fields((FIXTURES / name).read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.txt")))
def test_every_fixture_parses_without_raising(name):
    fields = _fields(name)
    for chip in (0, 1):
        assert all(0 <= v <= 100 for v in usages(fields, chip).values())
        assert all(isinstance(v, str) for v in board(fields, chip).values())
        assert isinstance(health(fields, chip), NpuHealth)


# File -> chip -> the usage fields, read off the fixture by hand.
EXPECTED_USAGES = {
    "info_t_usages_910b_v25.5.1_telegraf.txt": {
        0: {
            "aicore_pct": 0,
            "aivector_pct": 0,
            "aicpu_pct": 0,
            "ctrlcpu_pct": 6,
            "ddr_bw_pct": 0,
            "hbm_bw_pct": 0,
            "npu_util_pct": 0,
            "aicube_pct": 0,
        }
    },
    # Two chips; `Chip ID` closes each chip's block; the vector unit is called Vectorcore.
    "info_t_usages_310p_duo_2chip_doc.txt": {
        0: {"aicore_pct": 0, "aicpu_pct": 0, "ctrlcpu_pct": 2, "aivector_pct": 0, "ddr_bw_pct": 51},
        1: {"aicore_pct": 0, "aicpu_pct": 0, "ctrlcpu_pct": 3, "aivector_pct": 0, "ddr_bw_pct": 51},
    },
    # Ascend 950: no chip blocks, no Chip ID.
    "info_t_usages_a5_atlas350_doc.txt": {
        0: {
            "aicore_pct": 0,
            "aivector_pct": 0,
            "aicpu_pct": 0,
            "ctrlcpu_pct": 40,
            "ddr_bw_pct": 0,
            "hbm_bw_pct": 3,
            "npu_util_pct": 0,
            "aicube_pct": 0,
        }
    },
    "info_t_usages_910a_v23.0.5_hbm31129_raw_tabs_mindcluster_fixture.txt": {
        0: {"aicore_pct": 0, "aicpu_pct": 0, "ctrlcpu_pct": 0, "ddr_bw_pct": 0, "hbm_bw_pct": 0}
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED_USAGES))
def test_hand_checked_usages(name):
    fields = _fields(name)
    for chip, expected in EXPECTED_USAGES[name].items():
        assert usages(fields, chip) == expected


EXPECTED_BOARD = {
    "info_t_board_910b_v25.5.1_telegraf.txt": {
        "serial": "1025C9048791",
        "product": "IT21HMDC_Bin5",
        "driver": "25.5.1",
        "firmware": "7.8.0.6.201",
        "board_id": "0x60",
    },
    "info_t_board_910a_card_v23.0.5_raw_tabs_mindcluster_fixture.txt": {
        "driver": "23.0.5",
        "firmware": "7.1.0.7.220",
        "board_id": "0x02",
    },
    "info_t_board_310p_doc.txt": {"firmware": "7.1.0.4", "board_id": "0x64", "chip_name": "xxx"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_BOARD))
def test_hand_checked_board_identity(name):
    assert board(_fields(name), 0) == EXPECTED_BOARD[name]


@pytest.mark.parametrize(
    "name",
    [
        "info_t_health_a5_atlas350_doc.txt",
        "info_t_health_c0_910a_raw_mindcluster_fixture.txt",
        "info_t_health_c0_doc_leading_space.txt",
    ],
)
def test_health_ok_names_no_error(name):
    assert health(_fields(name), 0) == NpuHealth("OK", None, None)
    assert health(_fields(name), 0).reason() is None


def test_health_with_error_codes_gives_a_reason():
    text = (FIXTURES / "info_t_health_a5_atlas350_doc.txt").read_text()
    text = text.replace("Health                         : OK", "Health                         : Alarm")
    text = text.replace("Error Code                     : NA", "Error Code                     : 0x80E18402")
    text = text.replace(
        "Error Information              : NA", "Error Information              : HBM ECC error"
    )
    assert health(parse_npu_smi_fields(text), 0).reason() == "0x80E18402: HBM ECC error"


def test_an_unsupported_query_is_a_message_not_a_field():
    fields = _fields("error_not_supported_spod_info_a5_doc.txt")
    assert (fields.npu, fields.chips) == ({}, {})
    assert fields.messages == ("This device does not support querying spod-info.",)


def test_values_with_colons_stay_whole():
    assert board(_fields("info_t_board_910b_v25.5.1_telegraf.txt"), 0)["serial"] == "1025C9048791"
    fields = _fields("info_t_board_910b_v25.5.1_telegraf.txt")
    assert fields.npu["pciebusinfo"] == "0000:C1:00.0"
