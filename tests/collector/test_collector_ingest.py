"""Ingest: what an agent sees for good, compressed, oversized, malformed and hostile requests."""

from __future__ import annotations

import gzip
import json

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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capmon.collector.app import FLEET, create_app
from capmon.collector.config import StorageConfig
from capmon.collector.storage import CollectorOverloaded, StorageRejected, StorageUnavailable

HEADERS = {**JSON, **auth(AGENT_TOKEN)}


@pytest.fixture
def writer() -> RecordingWriter:
    return RecordingWriter()


@pytest.fixture
async def client(aiohttp_client, writer):
    return await aiohttp_client(create_app(make_config(), writer=writer, clock=Clock()))


async def post(client, payload, headers=HEADERS, compress=False):
    data = payload if isinstance(payload, bytes) else body(payload, compress)
    h = dict(headers)
    if compress:
        h["Content-Encoding"] = "gzip"
    return await client.post("/api/v1/reports", data=data, headers=h)


async def test_accepted_report_is_written_before_the_ack(client, writer):
    resp = await post(client, batch())
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"accepted": 1, "points": 4, "duplicates": 0}
    measurements = sorted(line.split(",", 1)[0] for line in writer.lines)
    assert measurements == ["capmon_agent", "capmon_agent", "capmon_device", "capmon_host"]


async def test_gzip_body_is_accepted(client, writer):
    resp = await post(client, batch(), compress=True)
    assert resp.status == 200, await resp.text()
    assert len(writer.lines) == 4


async def test_validation_error_names_the_field(client, writer):
    bad = batch([report(devices=[device(), device("GPU-1"), device("GPU-2", util_mean_pct=140.0)])])
    resp = await post(client, bad)
    assert resp.status == 400
    err = await resp.json()
    assert err["path"] == "$.reports[0].devices[2].util_mean_pct"
    assert err["error"] == "invalid report" and "<= 100" in err["detail"]
    assert writer.report_lines == []


@pytest.mark.parametrize(
    ("rep", "path", "words"),
    [
        (report(end=NOW + 3600), "$.reports[0].end", "future"),
        (report(end=NOW - 30 * 86400), "$.reports[0].end", "past"),
        (report(window=0), "$.reports[0].end", "after start"),
        (report(devices=[device(), device()]), "$.reports[0].devices[1].device_id", "repeated"),
        (report(devices=[device(free_s=60.0, busy_s=60.0)]), "$.reports[0].devices[0].busy_s", "exceed"),
        (report(devices=[device(idle_since=NOW + 600)]), "$.reports[0].devices[0].idle_since", "after"),
    ],
)
async def test_checks_msgspec_cannot_express(client, writer, rep, path, words):
    resp = await post(client, batch([rep]))
    assert resp.status == 400
    err = await resp.json()
    assert err["path"] == path and words in err["detail"]
    assert writer.report_lines == []


async def test_repeated_seq_in_one_batch_is_refused(client):
    resp = await post(client, batch([report(seq=3), report(seq=3, end=NOW - 60)]))
    assert resp.status == 400 and (await resp.json())["path"] == "$.reports[1].seq"


async def test_label_value_too_long(aiohttp_client, writer):
    client = await aiohttp_client(
        create_app(make_config(max_label_value_len=8), writer=writer, clock=Clock())
    )
    resp = await post(client, batch(labels={"site": "x" * 9}))
    assert resp.status == 400 and (await resp.json())["path"] == "$.agent.labels.site"


async def test_body_too_large_before_and_after_gzip(aiohttp_client, writer):
    client = await aiohttp_client(
        create_app(
            make_config(max_body_bytes=4096, max_decoded_bytes=64 * 1024), writer=writer, clock=Clock()
        )
    )
    big = batch([report(devices=[device(f"GPU-{i}") for i in range(40)])])
    assert (await post(client, big)).status == 413
    # A zip bomb: 64 MiB of spaces is ~64 KiB gzipped... and far less than the decoded cap allows.
    bomb = gzip.compress(b"{" + b" " * (64 * 1024 * 1024) + b"}", compresslevel=9)
    resp = await client.post(
        "/api/v1/reports", data=bomb[:4000], headers={**HEADERS, "Content-Encoding": "gzip"}
    )
    assert resp.status == 413
    assert "after gzip decoding" in (await resp.json())["detail"]
    assert writer.report_lines == []


async def test_bad_gzip_is_400(client, writer):
    resp = await client.post(
        "/api/v1/reports", data=b"not gzip at all", headers={**HEADERS, "Content-Encoding": "gzip"}
    )
    assert resp.status == 400 and (await resp.json())["error"] == "invalid gzip body"
    truncated = gzip.compress(body(batch()))[:-10]
    resp = await client.post(
        "/api/v1/reports", data=truncated, headers={**HEADERS, "Content-Encoding": "gzip"}
    )
    assert resp.status == 400


async def test_wrong_content_type_or_encoding_is_415(client):
    resp = await post(client, body(batch()), headers={**auth(AGENT_TOKEN), "Content-Type": "text/plain"})
    assert resp.status == 415
    resp = await client.post(
        "/api/v1/reports", data=body(batch()), headers={**HEADERS, "Content-Encoding": "br"}
    )
    assert resp.status == 415


async def test_storage_rejection_is_400_with_detail(client, writer):
    writer.fail = StorageRejected("partial write: field type conflict")
    resp = await post(client, batch())
    assert resp.status == 400
    assert (await resp.json())["detail"] == "partial write: field type conflict"
    assert "Retry-After" not in resp.headers


async def test_storage_down_is_503_with_retry_after(client, writer):
    writer.fail = StorageUnavailable("influxdb_v1 unreachable", retry_after=7)
    resp = await post(client, batch())
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "7"
    assert (await resp.json())["error"] == "storage unavailable"


async def test_overload_is_429_with_retry_after(client, writer):
    writer.fail = CollectorOverloaded("too many lines waiting", retry_after=3)
    resp = await post(client, batch())
    assert resp.status == 429 and resp.headers["Retry-After"] == "3"


async def test_metrics_count_rejects_by_reason(client):
    from collector_helpers import READ_TOKEN

    await post(client, batch([report(window=0)]))
    await post(client, b"{", headers=HEADERS)
    text = await (await client.get("/metrics", headers=auth(READ_TOKEN))).text()
    assert 'capmon_collector_rejects_total{reason="invalid"} 2' in text
    assert 'capmon_collector_requests_total{route="/api/v1/reports",status="400"} 2' in text


# -- hostile input, property-based ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def mutate(base: dict, path: list, value) -> dict:
    data = json.loads(json.dumps(base))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


PATHS = [
    ["agent"],
    ["agent", "id"],
    ["agent", "labels"],
    ["agent", "instance"],
    ["protocol"],
    ["reports"],
    ["reports", 0, "seq"],
    ["reports", 0, "start"],
    ["reports", 0, "end"],
    ["reports", 0, "devices"],
    ["reports", 0, "devices", 0, "state"],
    ["reports", 0, "devices", 0, "util_mean_pct"],
    ["reports", 0, "devices", 0, "extra"],
    ["reports", 0, "devices", 0, "device_id"],
    ["reports", 0, "host"],
    ["reports", 0, "agent"],
    ["reports", 0, "agent", "probes"],
]

hostile_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.tuples(st.sampled_from(PATHS), json_values).map(lambda pv: body(mutate(batch(), *pv))),
    st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 2000).map(lambda depth: b'{"agent":' * depth + b"1" + b"}" * depth),
    st.sampled_from(
        [
            b'{"protocol":1,"agent":{"id":"node-1","host":"h"},"reports":[]}',
            b'{"protocol":2,"agent":{"id":"node-1","host":"h"},"reports":[{"seq":1,"start":1,"end":2}]}',
            b'\xef\xbb\xbf{"protocol":1}',
            b'{"protocol":1,"agent":{"id":"node-1","host":"h\xff"}}',
            b'{"protocol":1,"reports":[{"seq":1e400}]}',
            b'{"a":"\\ud800"}',
            b"null",
        ]
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=hostile_bodies, compress=st.booleans())
async def test_hostile_payloads_never_5xx_and_write_nothing(aiohttp_client, payload, compress):
    writer = RecordingWriter()
    client = await aiohttp_client(create_app(make_config(), writer=writer, clock=Clock()))
    data = gzip.compress(payload) if compress else payload
    headers = {**HEADERS, "Content-Encoding": "gzip"} if compress else HEADERS
    resp = await client.post("/api/v1/reports", data=data, headers=headers)
    text = await resp.text()
    assert resp.status < 500, text
    if resp.status != 200:
        assert writer.report_lines == []
        err = json.loads(text)
        assert err["error"]
    await client.close()


# -- per-request size limits -----------------------------------------------------------------------


async def test_too_many_device_windows_is_413_naming_the_limit(aiohttp_client, writer):
    """Devices × reports is capped right after decoding, before any per-window work (agents split on 413)."""
    client = await aiohttp_client(
        create_app(make_config(max_device_windows=10), writer=writer, clock=Clock())
    )
    devs = [device(f"GPU-{i}") for i in range(5)]
    just_over = batch(
        [report(seq=1, end=NOW - 60, devices=devs), report(seq=2, devices=[*devs, device("GPU-5")])]
    )
    resp = await post(client, just_over, compress=True)
    assert resp.status == 413
    err = await resp.json()
    assert err["error"] == "too many device windows" and "max_device_windows" in err["detail"]
    assert "10" in err["detail"] and "11" in err["detail"]
    assert writer.report_lines == []
    assert client.server.app[FLEET].live_agents() == []
    # At the limit it is accepted.
    at_limit = batch([report(seq=1, end=NOW - 60, devices=devs), report(seq=2, devices=devs)])
    assert (await post(client, at_limit)).status == 200


async def test_one_request_with_more_lines_than_max_pending_lines_is_413(aiohttp_client, writer):
    """A single request may not exceed max_pending_lines even when nothing else is pending."""
    cfg = make_config(storage=StorageConfig(flush_interval_s=0.0, max_pending_lines=4))
    client = await aiohttp_client(create_app(cfg, writer=writer, clock=Clock()))
    resp = await post(client, batch([report(devices=[device("GPU-0"), device("GPU-1")])]))  # 5 lines
    assert resp.status == 413
    err = await resp.json()
    assert err["error"] == "too many points" and "max_pending_lines" in err["detail"]
    assert writer.report_lines == []
    assert (await post(client, batch([report(devices=[device("GPU-0")])]))).status == 200  # 4 lines


# Issue 11 item 17: physically impossible values are refused with the field's path (wire.check_report).
@pytest.mark.parametrize(
    ("rep", "path", "words"),
    [
        (
            report(devices=[device(state="busy", ghost_s=86400.0)]),
            "$.reports[0].devices[0].ghost_s",
            "ghost_s",
        ),
        (
            report(
                devices=[device(state="allocated_idle", allocated_idle_s=30.0, busy_s=30.0, ghost_s=45.0)]
            ),
            "$.reports[0].devices[0].ghost_s",
            "cannot exceed",
        ),
        (
            report(devices=[device(state="busy", util_mean_pct=80.0, util_max_pct=50.0)]),
            "$.reports[0].devices[0].util_max_pct",
            "below util_mean_pct",
        ),
        (
            report(devices=[device(memory_used_bytes=2**31, memory_total_bytes=2**30)]),
            "$.reports[0].devices[0].memory_used_bytes",
            "exceeds memory_total_bytes",
        ),
        (
            report(agent={"uptime_s": 1e308}),
            "$.reports[0].agent.uptime_s",
            "<=",
        ),
    ],
)
async def test_physically_impossible_values_are_refused_with_the_path(client, writer, rep, path, words):
    resp = await post(client, batch([rep]))
    assert resp.status == 400, await resp.text()
    err = await resp.json()
    assert err["path"] == path and words in err["detail"], err
    assert writer.report_lines == []
