"""Line protocol built from the wire structs: one line per point, floats only, hostile text contained."""

from __future__ import annotations

import re

import msgspec
from collector_helpers import batch, device, report
from hypothesis import given, settings
from hypothesis import strategies as st

from capmon.agent.wire import Batch
from capmon.collector.lineproto import batch_lines, escape_tag, string_field

LABEL_KEYS = ("site", "cluster", "pool")


def lines_of(data: dict) -> list[str]:
    return batch_lines(msgspec.convert(data, Batch), LABEL_KEYS)


def fields_of(line: str) -> dict[str, str]:
    """Split the field set of a line (no string field in these tests contains `,` or `=`)."""
    fields = re.match(r"^(?:[^ \\]|\\.)+ (.+) \d+$", line).group(1)
    return dict(kv.split("=", 1) for kv in fields.split(","))


def test_every_numeric_field_is_a_float():
    for line in lines_of(batch()):
        for key, value in fields_of(line).items():
            if value.startswith('"'):
                assert key in {"state", "status", "version"}
            else:
                assert not value.endswith("i") and ("." in value or "e" in value), (key, value)
                float(value)


def test_device_line_shape():
    [line] = [
        x
        for x in lines_of(batch([report(end=1_760_000_000, devices=[device(idle_since=1_759_999_000)])]))
        if x.startswith("capmon_device")
    ]
    assert line.startswith(
        "capmon_device,agent=node-1,host=gpu-node-1,site=fra1,cluster=c1,pool=train,vendor=nvidia"
    )
    assert ",device=GPU-0,model=NVIDIA\\ H100\\ 80GB\\ HBM3 " in line
    f = fields_of(line)
    assert f["state"] == '"free"' and f["state_code"] == "2.0" and f["idle_for_s"] == "1000.0"
    assert f["memory_total_bytes"] == "85899345920.0" and f["processes"] == "0.0"
    assert line.endswith(" 1760000000")


def test_resent_report_gives_identical_lines():
    assert lines_of(batch()) == lines_of(batch())


def test_unconfigured_labels_and_empty_values_are_not_tags():
    [line, *_] = lines_of(batch(labels={"site": "", "rack": "r7", "pool": "p"}))
    assert "rack" not in line and "site=" not in line and ",pool=p" in line


hostile_text = st.text(
    alphabet=st.sampled_from(list(' ,="\\\n\r\t\x00\x7fabcü✓\u2028')) | st.characters(),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(site=hostile_text, device_id=hostile_text, error=hostile_text)
def test_hostile_text_never_breaks_a_line(site, device_id, error):
    data = batch([report(devices=[device(device_id, error=error)])], labels={"site": site})
    lines = lines_of(data)
    body = "\n".join(lines)
    assert body.count("\n") == len(lines) - 1
    assert all("\r" not in line for line in lines)
    [dev] = [x for x in lines if x.startswith("capmon_device")]
    # The tag set ends at the first unescaped space; the device tag survives intact.
    assert f",device={escape_tag(device_id)}" in dev
    assert f"error={string_field(error)}" in dev


def test_escapes():
    assert escape_tag('a b,c=d"e\\f\ng') == 'a\\ b\\,c\\=d"e/f\\ g'
    assert string_field('say "hi"\\\nbye') == '"say \\"hi\\"\\\\ bye"'


# Issue 11 item 11: keys the validator should have refused still cannot break a line.
HOSTILE_KEYS = ["zz\n", "a b", "a,b", "a=b", 'a"b', "A\\", "\r", "", "ü", "x\x00y"]


def hostile_report():
    from capmon.agent.wire import DeviceWindow, Report

    # Built directly, so no validation runs: this is what a validator bug would let through.
    d = DeviceWindow(
        device_id="GPU-0",
        vendor="nvidia",
        state="free",
        free_s=60.0,
        extra={k: 1.0 for k in HOSTILE_KEYS},
        info={k: "x" for k in HOSTILE_KEYS},
    )
    return Report(seq=1, start=1_760_000_000 - 60, end=1_760_000_000, devices=[d])


def test_hostile_field_keys_straight_into_report_lines_keep_one_line_per_point():
    from capmon.collector.lineproto import report_lines

    out: list[str] = []
    report_lines(hostile_report(), ",agent=a,host=h", out)
    device_line = next(line for line in out if line.startswith("capmon_device"))
    assert all("\n" not in line and "\r" not in line for line in out)
    fields = re.match(r"^(?:[^ \\]|\\.)+ (.+) \d+$", device_line).group(1)
    keys = [kv.split("=", 1)[0] for kv in re.findall(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+', fields)]
    assert all(re.fullmatch(r"[a-z0-9_]+", k) for k in keys), keys
    assert sum(k.startswith("extra_") for k in keys) == len(HOSTILE_KEYS)


@given(st.text(max_size=20))
@settings(max_examples=200, deadline=None)
def test_any_key_becomes_a_safe_field_key(key):
    from capmon.collector.lineproto import field_key

    assert re.fullmatch(r"[a-z0-9_]+", field_key(key))


def test_influxd_accepts_every_point_with_hostile_keys(influxd):
    from capmon.collector.lineproto import report_lines

    influxd.create_database("capmon_keys")
    out: list[str] = []
    report_lines(hostile_report(), ",agent=a,host=h", out)
    status, text = influxd.write("capmon_keys", "\n".join(out))
    assert status == 204, text
    rows = influxd.rows("SELECT * FROM capmon_device", "capmon_keys")
    assert len(rows) == 1 and rows[0]["free_s"] == 60.0
