"""The remote-write writer's classes of failure, its auth and encoding, and its configuration."""

from __future__ import annotations

import cramjam
import pytest
from aiohttp import web

from capmon.collector.config import ConfigError, StorageConfig, parse
from capmon.collector.remote_write import RemoteWriteWriter, WriteRequest, series_of_lines
from capmon.collector.storage import StorageRejected, StorageUnavailable, make_writer

LINE = (
    'capmon_device,agent=a\\ 1,host=h,site=x\\,y\\=z,vendor=nvidia,device=GPU-0,model=H100 state="free",'
    "state_code=2.0,busy_s=0.0,allocated_idle_s=0.0,free_s=60.0,unavailable_s=0.0,util_mean_pct=12.5,"
    'error="a, b=c \\"d\\"" 1760000000'
)


def test_a_point_becomes_one_sample_per_series_at_its_end_in_ms():
    series = {
        dict(labels)["__name__"] + dict(labels).get("state", ""): (dict(labels), v, ms)
        for labels, v, ms in series_of_lines([LINE])
    }
    labels, value, ms = series["capmon_device_statefree"]
    assert value == 1.0 and ms == 1_760_000_000_000
    assert labels["agent"] == "a 1" and labels["site"] == "x,y=z" and labels["model"] == "H100"
    assert series["capmon_device_statebusy"][1] == 0.0
    assert series["capmon_device_window_state_secondsfree"][1] == 60.0
    assert series["capmon_device_utilization_ratio"][1] == 0.125
    # Text (error) and the state code have no series; nothing else sneaks in.
    assert len(series) == 4 + 4 + 1


def test_a_windows_energy_is_named_in_base_units_as_the_other_window_sums():
    line = (
        "capmon_device,agent=a,device=GPU-0,host=h,vendor=nvidia energy_j=18000.0,idle_energy_j=9000.0,"
        "idle_energy_cost=0.00105 1760000000"
    )
    names = {dict(labels)["__name__"]: v for labels, v, _ in series_of_lines([line])}
    assert names == {
        "capmon_device_window_energy_joules": 18000.0,
        "capmon_device_window_idle_energy_joules": 9000.0,
        "capmon_device_window_idle_energy_cost": 0.00105,
    }


class Receiver:
    """A remote-write endpoint that answers what the test sets and keeps what it was sent."""

    def __init__(self) -> None:
        self.status, self.text, self.headers = 204, "", {}
        self.requests: list[tuple[dict, WriteRequest]] = []

    async def handle(self, request: web.Request) -> web.Response:
        req = WriteRequest()
        req.ParseFromString(bytes(cramjam.snappy.decompress_raw(await request.read())))
        self.requests.append((dict(request.headers), req))
        return web.Response(status=self.status, text=self.text, headers=self.headers)


@pytest.fixture
async def receiver(aiohttp_server):
    r = Receiver()
    app = web.Application()
    app.router.add_post("/api/v1/write", r.handle)
    server = await aiohttp_server(app)
    r.url = str(server.make_url("/api/v1/write"))
    return r


async def writer_for(receiver, **kw) -> RemoteWriteWriter:
    w = make_writer(StorageConfig(kind="prometheus_remote_write", url=receiver.url, retry_after_s=4, **kw))
    assert isinstance(w, RemoteWriteWriter)
    await w.start()
    return w


async def test_bearer_token_headers_and_body(receiver):
    w = await writer_for(receiver, token="s3cret", headers={"X-Scope-OrgID": "capmon"})
    try:
        await w.write([LINE])
    finally:
        await w.close()
    headers, req = receiver.requests[0]
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["Content-Encoding"] == "snappy" and headers["X-Scope-OrgID"] == "capmon"
    assert headers["X-Prometheus-Remote-Write-Version"] == "0.1.0"
    names = [lab.value for ts in req.timeseries for lab in ts.labels if lab.name == "__name__"]
    assert names.count("capmon_device_state") == 4
    # Remote write wants labels sorted by name.
    for ts in req.timeseries:
        assert [lab.name for lab in ts.labels] == sorted(lab.name for lab in ts.labels)


async def test_basic_auth(receiver):
    w = await writer_for(receiver, user="capmon", password="pw")
    try:
        await w.write([LINE])
    finally:
        await w.close()
    assert receiver.requests[0][0]["Authorization"] == "Basic Y2FwbW9uOnB3"


@pytest.mark.parametrize(
    ("status", "text", "error", "retry_after"),
    [
        (503, "TSDB not ready", StorageUnavailable, 7),
        (429, "ingestion rate limit", StorageUnavailable, 7),
        (500, "boom", StorageUnavailable, 7),
        (401, "unauthorized", StorageUnavailable, 7),
        (400, 'invalid metric name "1x"', StorageRejected, None),
        # VictoriaMetrics at a wrong path: the URL is wrong, the windows are fine (kept, retried).
        (400, 'unsupported path requested: "/api/v1/wrte"', StorageUnavailable, 4),
        # Older than Prometheus's head: it can never take it; the agent dead-letters it, with why.
        (400, "out of bounds", StorageRejected, None),
    ],
)
async def test_failures_are_classed_like_influxdb_ones(receiver, status, text, error, retry_after):
    receiver.status, receiver.text, receiver.headers = status, text, {"Retry-After": "7"}
    w = await writer_for(receiver)
    try:
        with pytest.raises(error) as info:
            await w.write([LINE])
    finally:
        await w.close()
    assert text in info.value.detail
    if retry_after is not None:
        assert info.value.retry_after == retry_after


async def test_a_duplicate_refused_alone_counts_as_stored(receiver):
    receiver.status, receiver.text = 400, "duplicate sample for timestamp"
    w = await writer_for(receiver)
    try:
        await w.write([LINE, LINE.replace("GPU-0", "GPU-1")])
    finally:
        await w.close()
    # The pair, then each alone: both already stored, none refused.
    assert len(receiver.requests) == 3 and w.already_stored == 2


def rw(extra: str = "", env: dict | None = None):
    return parse(f'[storage]\nkind = "prometheus_remote_write"\n{extra}', "c.toml", env=env or {})


def test_config_needs_the_receivers_url():
    with pytest.raises(ConfigError, match=r"c.toml: \[storage\] url: .*needs the receiver's URL"):
        rw()
    with pytest.raises(ConfigError, match=r"url: must be an http:// or https:// URL"):
        rw('url = "prometheus:9090"')


def test_config_secrets_from_the_environment_and_never_in_repr():
    cfg = rw('url = "http://p:9090/api/v1/write"', env={"CAPMON_REMOTE_WRITE_TOKEN": "tok-123"})
    assert cfg.storage.token == "tok-123" and "tok-123" not in repr(cfg)
    cfg = rw('url = "http://p:9090/api/v1/write"\nuser = "u"', env={"CAPMON_REMOTE_WRITE_PASSWORD": "pw-9"})
    assert cfg.storage.password == "pw-9" and "pw-9" not in repr(cfg)


def test_config_refuses_what_cannot_work(tmp_path):
    url = 'url = "https://p/api/v1/write"\n'
    with pytest.raises(ConfigError, match=r"\[storage\] token: give either user/password"):
        rw(url + 'user = "u"\ntoken = "t"')
    with pytest.raises(ConfigError, match=r"\[storage\] ca_file: cannot read .*nope.pem"):
        rw(url + f'ca_file = "{tmp_path}/nope.pem"')
    with pytest.raises(ConfigError, match=r"\[storage\] headers.Authorization: not a header"):
        rw(url + 'headers = { Authorization = "Bearer x" }')
    with pytest.raises(
        ConfigError, match=r"\[storage\] headers.X-A: a header value cannot hold a line break"
    ):
        rw(url + 'headers = { X-A = "a\\nb" }')


def test_a_holder_point_names_its_holder_in_one_info_series_without_the_pid():
    line = (
        "capmon_holder,agent=a,host=h,pod=from-the-agent-labels,vendor=nvidia,device=GPU-0,user=bob,runtime=slurm,"
        'slot=0 state="allocated_idle",state_code=1.0,allocated_idle_s=60.0,source="process",'
        'command="py \\"x\\"",pod="p-1",slurm_job_id="81234",pid="777",held_s=60.0 1760000000'
    )
    series = {dict(labels)["__name__"]: (dict(labels), v, ms) for labels, v, ms in series_of_lines([line])}
    labels, value, ms = series["capmon_holder_info"]
    assert value == 1.0 and ms == 1_760_000_000_000
    assert {k: labels[k] for k in ("user", "slot", "source", "command", "slurm_job_id")} == {
        "user": "bob",
        "slot": "0",
        "source": "process",
        "command": 'py "x"',
        "slurm_job_id": "81234",
    }
    # A collector label key named like a holder field keeps its tag: no duplicate label name.
    assert labels["pod"] == "from-the-agent-labels"
    assert "pid" not in labels and "state" not in labels
    assert set(series) == {
        "capmon_holder_info",
        "capmon_holder_allocated_idle_seconds",
        "capmon_holder_held_seconds",
        "capmon_holder_state_code",
    }
    (info,) = [s for s in series_of_lines([line]) if dict(s[0])["__name__"] == "capmon_holder_info"]
    assert len({k for k, _ in info[0]}) == len(info[0])
