"""`capmon_holder`: who holds a device, one point per device per holder per window (issue 12 item 5).

Line shape and the split of allocated-idle value over holders from the lines themselves; the schema
(tags, field types, points kept apart) read back from a real influxd through the collector.
"""

from __future__ import annotations

import dataclasses
import re
import time

import msgspec
import pytest
from collector_helpers import (
    AGENT_TOKEN,
    JSON,
    NOW,
    Clock,
    RecordingWriter,
    auth,
    batch,
    body,
    device,
    make_config,
    report,
)

from capmon.agent.wire import Batch, DeviceWindow, HolderWindow, Report
from capmon.collector.app import INGEST, create_app
from capmon.collector.config import StorageConfig
from capmon.collector.fleet import Pricing
from capmon.collector.lineproto import batch_lines, report_lines, string_field

LABEL_KEYS = ("site", "cluster", "pool")
PRICES = make_config().pricing
HOLDER_STRINGS = {
    "state",
    "source",
    "pid",
    "command",
    "container_id",
    "pod_uid",
    "pod",
    "container",
    "slurm_job_id",
    "partition",
}


def holder(pid: int, user: str | None = "alice", **kw) -> dict:
    h = {"pid": pid, "command": "python3", "memory_bytes": 8 * 2**30, "held_s": 60.0, "since": NOW - 7200}
    if user is not None:
        h["user"] = user
        h["uid"] = 1000
    h.update(kw)
    return h


def held_device(device_id: str = "GPU-0", holders: list[dict] | None = None, **kw) -> dict:
    kw.setdefault("idle_since", NOW - 3600)
    kw.setdefault("state_since", NOW - 600)
    return device(device_id, state="allocated_idle", holders=holders, **kw)


def lines_of(data: dict) -> list[str]:
    return batch_lines(msgspec.convert(data, Batch), LABEL_KEYS, Pricing(PRICES).for_device)


def holder_lines(data: dict) -> list[str]:
    return [line for line in lines_of(data) if line.startswith("capmon_holder")]


def split_line(line: str) -> tuple[dict[str, str], dict[str, str], str]:
    """(tags, fields, timestamp) of one line; string fields keep their quotes."""
    m = re.match(r"^((?:[^ \\]|\\.)+) ((?:[^ \"\\]|\\.|\"(?:[^\"\\]|\\.)*\")+) (\d+)$", line)
    assert m, line
    tags = dict(kv.split("=", 1) for kv in re.split(r"(?<!\\),", m.group(1))[1:])
    fields = dict(kv.split("=", 1) for kv in re.findall(r'(?:[^,"\\]|\\.|"(?:[^"\\]|\\.)*")+', m.group(2)))
    return tags, fields, m.group(3)


def test_one_point_per_holder_with_identity_tags_and_everything_else_as_fields():
    pod = holder(
        4242,
        user="bob",
        runtime="containerd",
        container_id="c0ffee",
        pod_uid="7d3b6c1e-0000-4000-8000-000000000001",
        namespace="team-a",
        pod="train-0",
        container="trainer",
    )
    job = holder(5151, user="carol", runtime="slurm", slurm_job_id="889", partition="gpu", source="process")
    lines = holder_lines(batch([report(devices=[held_device(holders=[pod, job])])]))
    assert len(lines) == 2
    tags, fields, ts = split_line(lines[0])
    assert ts == str(NOW)
    assert tags == {
        "agent": "node-1",
        "host": "gpu-node-1",
        "site": "fra1",
        "cluster": "c1",
        "pool": "train",
        "vendor": "nvidia",
        "device": "GPU-0",
        "model": "NVIDIA\\ H100\\ 80GB\\ HBM3",
        "user": "bob",
        "namespace": "team-a",
        "runtime": "containerd",
        "slot": "0",
    }
    assert fields["pid"] == '"4242"' and fields["command"] == '"python3"'
    assert fields["pod"] == '"train-0"' and fields["container"] == '"trainer"'
    assert fields["pod_uid"] == '"7d3b6c1e-0000-4000-8000-000000000001"'
    assert fields["source"] == '"process"' and fields["container_id"] == '"c0ffee"'
    assert fields["memory_bytes"] == "8589934592.0" and fields["held_s"] == "60.0"
    assert fields["since"] == f"{float(NOW - 7200)!r}" and fields["uid"] == "1000.0"
    # The device's state and how long it has been idle, so reclaim candidates rank from this alone.
    assert fields["state"] == '"allocated_idle"' and fields["state_code"] == "1.0"
    assert fields["idle_for_s"] == "3600.0" and fields["in_state_s"] == "600.0"
    tags, fields, _ = split_line(lines[1])
    assert tags["user"] == "carol" and tags["runtime"] == "slurm" and "namespace" not in tags
    assert fields["slurm_job_id"] == '"889"' and fields["partition"] == '"gpu"'


def test_every_number_is_a_float_and_every_key_safe():
    holders = [holder(1), holder(2, user=None), holder(3, memory_bytes=None, since=None)]
    for line in holder_lines(batch([report(devices=[held_device(holders=holders)])])):
        tags, fields, _ = split_line(line)
        for key in (*tags, *fields):
            assert re.fullmatch(r"[a-z][a-z0-9_]*", key), key
        for key, value in fields.items():
            if value.startswith('"'):
                assert key in HOLDER_STRINGS, key
            else:
                assert key not in HOLDER_STRINGS and "." in value and not value.endswith("i"), (key, value)


def test_allocated_idle_value_and_seconds_split_evenly_over_the_holders():
    """An H100 (2.5/h) allocated-idle 60 s, held by alice twice and bob once: the holders' shares sum to
    the device's, and alice's two processes stay two points (slots 0 and 1), not one overwriting the other."""
    d = held_device(holders=[holder(1), holder(2), holder(3, user="bob")])
    lines = holder_lines(batch([report(devices=[d])]))
    parsed = [split_line(x) for x in lines]
    assert [(t["user"], t["slot"]) for t, _, _ in parsed] == [("alice", "0"), ("alice", "1"), ("bob", "0")]
    value = [float(f["idle_value"]) for _, f, _ in parsed]
    assert value == pytest.approx([60 / 3600 * 2.5 / 3] * 3)
    assert sum(value) == pytest.approx(60 / 3600 * 2.5)
    assert sum(float(f["allocated_idle_s"]) for _, f, _ in parsed) == pytest.approx(60.0)


def test_the_store_splits_a_device_as_the_live_view_does():
    """A pod's allocation and the process in that pod are one holder (half the device), a process of
    another user alone the other half: the store's shares are the live view's (`holder_shares`)."""
    from capmon.collector.shares import holder_shares

    pod = {"namespace": "ml", "pod": "nb-0", "pod_uid": "0b5e4c2a-0000-4000-8000-000000000001"}
    allocation = {"source": "kubernetes", "held_s": 60.0, **pod}
    records = [
        allocation,
        holder(2, **pod),
        holder(3, user="bob"),
    ]
    d = held_device(holders=records)
    parsed = [split_line(x) for x in holder_lines(batch([report(devices=[d])]))]
    stored = [float(f["allocated_idle_s"]) / 60.0 for _, f, _ in parsed]
    assert stored == pytest.approx([0.25, 0.25, 0.5])
    assert stored == pytest.approx(holder_shares([msgspec.convert(h, HolderWindow) for h in records]))


def test_a_mig_instance_counts_as_its_fraction():
    d = held_device("MIG-1", holders=[holder(1)], parent_id="GPU-p", fraction=1 / 7)
    [(_, fields, _)] = [split_line(x) for x in holder_lines(batch([report(devices=[d])]))]
    assert float(fields["gpu_fraction"]) == pytest.approx(1 / 7)
    assert float(fields["allocated_idle_gpu_s"]) == pytest.approx(60 / 7)
    assert float(fields["idle_value"]) == pytest.approx(60 / 3600 * 2.5 / 7)


def test_free_seconds_are_nobodys_and_unpriced_devices_have_no_value():
    """A holder that arrived late in a window holds only the allocated-idle part of it."""
    d = held_device(holders=[holder(1, held_s=15.0)], allocated_idle_s=15.0, free_s=45.0)
    [(_, fields, _)] = [split_line(x) for x in holder_lines(batch([report(devices=[d])]))]
    assert float(fields["idle_value"]) == pytest.approx(15 / 3600 * 2.5)
    out: list[str] = []
    report_lines(msgspec.convert(report(devices=[d]), Report), ",agent=a,host=h", out)  # no pricing
    [line] = [x for x in out if x.startswith("capmon_holder")]
    assert "idle_value" not in split_line(line)[1]


def test_no_holders_known_or_none_held_writes_no_holder_point():
    lines = lines_of(batch([report(devices=[device("GPU-0"), device("GPU-1", holders=[])])]))
    assert not [x for x in lines if x.startswith("capmon_holder")]


def test_hostile_holder_text_keeps_one_line_per_point():
    h = HolderWindow(
        pid=7,
        user='ev il,user=x\nroot "',
        namespace="ns\\1",
        command='a"b\nc',
        pod="p,o=d 1",
        runtime="",
    )
    d = DeviceWindow(device_id="GPU-0", vendor="nvidia", state="allocated_idle", holders=[h])
    out: list[str] = []
    report_lines(Report(seq=1, start=NOW - 60, end=NOW, devices=[d]), ",agent=a,host=h", out)
    [line] = [x for x in out if x.startswith("capmon_holder")]
    assert "\n" not in line
    tags, fields, _ = split_line(line)
    assert tags["user"] == 'ev\\ il\\,user\\=x\\ root\\ "' and tags["namespace"] == "ns/1"
    assert "runtime" not in tags  # an empty value is no tag (it would break the line)
    assert fields["command"] == string_field('a"b\nc') and fields["pod"] == '"p,o=d 1"'


async def test_holder_users_and_namespaces_count_against_the_agents_tag_values(aiohttp_client):
    """They become tags: an agent sending a new user name every window cannot grow the store's series."""
    writer = RecordingWriter()
    app = create_app(make_config(), writer=writer, clock=Clock())
    service = app[INGEST]
    # host, site, cluster, pool, vendor, model, probe: 7 values; room for 3 holder identities.
    service.bounds.limits = service.limits = dataclasses.replace(service.limits, max_values_per_agent=10)
    client = await aiohttp_client(app)

    async def post(seq: int, holders: list[dict]) -> int:
        payload = batch([report(seq=seq, end=NOW + 60 * seq, devices=[held_device(holders=holders)])])
        resp = await client.post("/api/v1/reports", data=body(payload), headers={**JSON, **auth(AGENT_TOKEN)})
        return resp.status

    assert await post(1, [holder(1, namespace="team-a", runtime="containerd")]) == 200
    assert await post(2, [holder(2, user="bob")]) == 400
    assert await post(3, [holder(3, namespace="team-a")]) == 200  # known values go through
    assert not [x for x in writer.report_lines if ",user=bob" in x]


# -- the real store ---------------------------------------------------------------------------------


def window_end() -> int:
    now = int(time.time())
    return now - now % 60


@pytest.mark.integration
async def test_holders_land_in_influxd_with_stable_types(aiohttp_client, influxd):
    influxd.create_database("capmon_holders")
    storage = StorageConfig(kind="influxdb_v1", url=influxd.url, db="capmon_holders", flush_interval_s=0.0)
    client = await aiohttp_client(create_app(make_config(storage)))
    end = window_end()
    pod = holder(
        4242,
        user="bob",
        runtime="containerd",
        namespace="team-a",
        pod="train-0",
        pod_uid="u-1",
        memory_bytes=0,
    )
    devices = [
        held_device(
            "GPU-0", holders=[holder(1), holder(2), pod], idle_since=end - 3600, state_since=end - 600
        ),
        device("GPU-1", state="busy", holders=[holder(3, user="carol", slurm_job_id="889", since=None)]),
        device("GPU-2", holders=None),
    ]
    for _ in range(2):  # a resent window rewrites the same points: nothing doubles
        resp = await client.post(
            "/api/v1/reports",
            data=body(batch([report(end=end, devices=devices)])),
            headers={**JSON, **auth(AGENT_TOKEN)},
        )
        assert resp.status == 200, await resp.text()

    rows = influxd.rows("SELECT * FROM capmon_holder GROUP BY *", "capmon_holders")
    assert len(rows) == 4
    by_pid = {r["pid"]: r for r in rows}
    assert set(by_pid) == {"1", "2", "4242", "3"}
    alice = by_pid["1"]
    assert alice["time"] == end and alice["user"] == "alice" and alice["device"] == "GPU-0"
    assert (
        alice["host"] == "gpu-node-1"
        and alice["site"] == "fra1"
        and alice["model"] == "NVIDIA H100 80GB HBM3"
    )
    assert (
        alice["state"] == "allocated_idle" and alice["idle_for_s"] == 3600.0 and alice["in_state_s"] == 600.0
    )
    assert alice["memory_bytes"] == 8 * 2**30 and alice["uid"] == 1000.0 and alice["since"] == NOW - 7200
    bob = by_pid["4242"]
    assert bob["namespace"] == "team-a" and bob["runtime"] == "containerd" and bob["pod"] == "train-0"
    assert bob["memory_bytes"] == 0.0
    carol = by_pid["3"]
    assert carol["state"] == "busy" and carol["slurm_job_id"] == "889" and carol["since"] is None

    # Pod, job, pid and command are fields; only bounded identities are tags.
    tag_keys = {r["tagKey"] for r in influxd.rows("SHOW TAG KEYS FROM capmon_holder", "capmon_holders")}
    assert tag_keys == {
        "agent", "host", "site", "cluster", "pool", "vendor", "device", "model", "user", "namespace",
        "runtime", "slot",
    }  # fmt: skip
    types = influxd.field_types("capmon_holders", "capmon_holder")
    strings = {k for k, t in types.items() if t == "string"}
    assert strings == {"state", "source", "pid", "command", "pod", "pod_uid", "slurm_job_id"}
    assert {k for k, t in types.items() if t != "string"} == {
        "state_code", "allocated_idle_s", "allocated_idle_gpu_s", "gpu_fraction", "idle_value",
        "idle_for_s", "in_state_s", "held_s", "memory_bytes", "since", "uid",
    }  # fmt: skip
    assert all(t == "float" for k, t in types.items() if k not in strings)

    # What dashboards ask: the value held idle by user, which sums to the device's idle value.
    [total] = influxd.rows(
        f"SELECT SUM(idle_value) FROM capmon_holder WHERE time = {end}s AND state = 'allocated_idle'",
        "capmon_holders",
    )
    [device_total] = influxd.rows(
        f"SELECT SUM(idle_value) FROM capmon_device WHERE time = {end}s AND device = 'GPU-0'",
        "capmon_holders",
    )
    assert total["sum"] == pytest.approx(device_total["sum"]) == pytest.approx(2.5 / 60)
    by_user = influxd.rows(
        f'SELECT SUM(idle_value) FROM capmon_holder WHERE time = {end}s GROUP BY "user"', "capmon_holders"
    )
    assert {r["user"]: round(r["sum"], 9) for r in by_user} == {
        "alice": round(2 * 2.5 / 60 / 3, 9),
        "bob": round(2.5 / 60 / 3, 9),
        "carol": 0.0,
    }


def test_every_holder_tag_and_field_is_documented():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "collector" / "README.md").read_text()
    section = readme.split("### `capmon_holder`", 1)[1].split("\n### ", 1)[0]
    full = holder(
        1,
        namespace="ns",
        runtime="docker",
        container_id="c",
        pod_uid="u",
        pod="p",
        container="k",
        slurm_job_id="9",
        partition="gpu",
    )
    [line] = holder_lines(batch([report(devices=[held_device(holders=[full])])]))
    tags, fields, _ = split_line(line)
    for key in (*tags, *fields):
        assert f"`{key}`" in section or f"`{key}`" in readme.split("### `capmon_holder`", 1)[0], key
