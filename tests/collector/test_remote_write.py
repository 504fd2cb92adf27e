"""Reports through the collector into Prometheus and VictoriaMetrics by remote write, read back with PromQL."""

from __future__ import annotations

import dataclasses
import time

import pytest
from collector_helpers import AGENT_TOKEN, JSON, auth, batch, body, device, make_config, report

from capmon.collector.app import create_app
from capmon.collector.config import StorageConfig, parse
from capmon.collector.storage import StorageUnavailable, make_writer

pytestmark = pytest.mark.integration


def window_end() -> int:
    # Recent: Prometheus refuses samples older than its head block allows (about an hour).
    now = int(time.time())
    return now - now % 60


def rw_config(url: str) -> StorageConfig:
    return StorageConfig(kind="prometheus_remote_write", url=url, flush_interval_s=0.0, retry_after_s=4)


def fleet_batch(end: int, seq: int = 1, devices: list[dict] | None = None) -> dict:
    devices = devices or [
        device("GPU-0", idle_since=end - 900, state_since=end - 900, extra={"sm_active_pct": 0.5}),
        device("GPU-1", state="busy", util_mean_pct=90.0, util_max_pct=99.0, processes=2),
        device("MIG-1", state="allocated_idle", parent_id="GPU-2", fraction=1 / 7, processes=1),
    ]
    return batch([report(seq=seq, end=end, devices=devices)], labels={"site": "ams1", "pool": "train"})


async def post(client, payload):
    return await client.post("/api/v1/reports", data=body(payload), headers={**JSON, **auth(AGENT_TOKEN)})


async def test_prometheus_stores_one_sample_per_series_per_window_at_its_end(aiohttp_client, prometheus):
    client = await aiohttp_client(create_app(make_config(rw_config(prometheus.remote_write_url))))
    end = window_end()
    resp = await post(client, fleet_batch(end))
    assert resp.status == 200, await resp.text()

    q = prometheus.values
    # One-hot state with the state label; the window's seconds per state as a per-window gauge.
    assert q('capmon_device_state{state="free"}', at=end) == {"GPU-0": 1.0, "GPU-1": 0.0, "MIG-1": 0.0}
    assert q("sum by (device) (capmon_device_state)", at=end) == {"GPU-0": 1.0, "GPU-1": 1.0, "MIG-1": 1.0}
    assert q('capmon_device_window_state_seconds{state="free"}', at=end)["GPU-0"] == 60.0
    assert q('capmon_device_window_state_seconds{state="busy"}', at=end)["GPU-1"] == 60.0
    # GPU-equivalents: the MIG instance idles as its seventh of a GPU.
    idle_gpu = q("capmon_device_window_idle_gpu_seconds", at=end)
    assert idle_gpu["GPU-0"] == 60.0 and idle_gpu["MIG-1"] == pytest.approx(60 / 7)
    assert q("capmon_device_utilization_ratio", at=end)["GPU-1"] == pytest.approx(0.9)
    assert q("capmon_device_idle_since_seconds", at=end) == {"GPU-0": float(end - 900)}
    assert q("capmon_device_idle_for_seconds", at=end) == {"GPU-0": 900.0}
    assert q("capmon_device_extra_sm_active_pct", at=end) == {"GPU-0": 0.5}
    # Labels: the identities and the configured label keys; the sample sits at the window's end.
    (row,) = prometheus.query('capmon_device_state{device="GPU-1",state="busy"}', at=end)
    assert row["metric"] == {
        "__name__": "capmon_device_state",
        "agent": "node-1",
        "device": "GPU-1",
        "host": "gpu-node-1",
        "model": "NVIDIA H100 80GB HBM3",
        "pool": "train",
        "site": "ams1",
        "state": "busy",
        "vendor": "nvidia",
    }
    assert prometheus.query("timestamp(capmon_device_state)", at=end + 30)[0]["value"][1] == str(end)
    assert prometheus.query('capmon_agent_probe_samples_total{probe="nvml"}', at=end)[0]["value"][1] == "60"
    assert prometheus.query("capmon_host_cpu_mean_ratio", at=end)[0]["value"][1] == "0.125"


async def test_a_resent_window_is_acknowledged_and_a_new_one_beside_it_is_stored(aiohttp_client, prometheus):
    # Prometheus answers 400 "out of order sample" for a whole request when one point is older than
    # its series' newest, and stores none of it. A resent window must be acknowledged (not
    # dead-lettered), and a new window written in the same request must still land.
    writer_cfg = rw_config(prometheus.remote_write_url)
    client = await aiohttp_client(create_app(make_config(writer_cfg)))
    end = window_end() - 600
    first = fleet_batch(end, seq=1, devices=[device("RS-0")])
    assert (await post(client, first)).status == 200
    second = fleet_batch(end + 60, seq=2, devices=[device("RS-0", state="busy", util_mean_pct=95.0)])
    assert (await post(client, second)).status == 200

    # The same window again (the agent lost the acknowledgement): a duplicate, then out of order.
    assert (await post(client, second)).status == 200
    resp = await post(client, first)
    assert resp.status == 200, await resp.text()
    # An old window of RS-0 together with a first window of RS-1, in one request.
    mixed = batch(
        [
            report(seq=1, end=end, devices=[device("RS-0")]),
            report(seq=3, end=end + 120, devices=[device("RS-0"), device("RS-1", state="allocated_idle")]),
        ],
        labels={"site": "ams1", "pool": "train"},
    )
    resp = await post(client, mixed)
    assert resp.status == 200, await resp.text()

    free = prometheus.values('capmon_device_state{state="free",device=~"RS-.*"}', at=end + 120)
    assert free == {"RS-0": 1.0, "RS-1": 0.0}
    assert prometheus.values('capmon_device_state{state="busy"}', at=end + 60)["RS-0"] == 1.0
    # Nothing was rewritten: the first window's point is the one first sent.
    assert prometheus.values('capmon_device_state{state="free"}', at=end)["RS-0"] == 1.0


async def test_victoria_metrics_receives_remote_writes(aiohttp_client, victoria_metrics):
    client = await aiohttp_client(create_app(make_config(rw_config(victoria_metrics.remote_write_url))))
    end = window_end()
    resp = await post(client, fleet_batch(end))
    assert resp.status == 200, await resp.text()
    assert (await post(client, fleet_batch(end))).status == 200  # resent: VictoriaMetrics deduplicates

    def values(promql: str) -> dict[str, float]:
        return {
            r["metric"].get("device", ""): float(r["value"][1]) for r in victoria_metrics.query(promql, end)
        }

    assert values('capmon_device_state{state="allocated_idle"}') == {"GPU-0": 0.0, "GPU-1": 0.0, "MIG-1": 1.0}
    assert values('capmon_device_window_state_seconds{state="free"}')["GPU-0"] == 60.0
    assert values("capmon_device_window_idle_gpu_seconds")["MIG-1"] == pytest.approx(60 / 7)
    rows = victoria_metrics.export('{__name__="capmon_device_state",device="GPU-0",state="free"}')
    # Both sends are kept raw until VictoriaMetrics deduplicates; each at the window's end.
    assert [set(r["timestamps"]) for r in rows] == [{end * 1000}]
    assert rows[0]["metric"]["site"] == "ams1"


async def test_a_receiver_that_is_not_enabled_is_a_storage_error_not_a_refusal(aiohttp_client, prometheus):
    # Prometheus without --web.enable-remote-write-receiver answers 404: the agent keeps its windows.
    client = await aiohttp_client(create_app(make_config(rw_config(prometheus.url + "/api/v1/nowhere"))))
    resp = await post(client, fleet_batch(window_end()))
    assert resp.status in (503, 429), await resp.text()
    assert "Retry-After" in resp.headers


# The README's "With Prometheus" section shows this text (the url there is a real Prometheus's).
COLLECTOR_TOML = """
[storage]
kind = "prometheus_remote_write"
url = "{url}"
"""


async def test_the_documented_remote_write_config_writes_to_prometheus(aiohttp_client, prometheus):
    storage = parse(COLLECTOR_TOML.format(url=prometheus.remote_write_url), "collector.toml", env={}).storage
    client = await aiohttp_client(create_app(dataclasses.replace(make_config(), storage=storage)))
    end = window_end() - 60
    assert (await post(client, fleet_batch(end, devices=[device("DOC-0")]))).status == 200
    assert prometheus.values('capmon_device_state{state="free",device="DOC-0"}', at=end) == {"DOC-0": 1.0}


@pytest.mark.parametrize("server", ["prometheus", "victoria_metrics"])
async def test_readiness_is_an_empty_write(request, server):
    url = request.getfixturevalue(server).remote_write_url
    for target, ok in ((url, True), (url.replace("/api/v1/write", "/api/v1/nowhere"), False)):
        writer = make_writer(StorageConfig(kind="prometheus_remote_write", url=target))
        await writer.start()
        try:
            if ok:
                await writer.ready()
            else:
                # Prometheus: 404; VictoriaMetrics: 400 "unsupported path". Either is the URL's fault.
                with pytest.raises(StorageUnavailable, match=r"answered 40[04]"):
                    await writer.ready()
        finally:
            await writer.close()


def holder(**kw) -> dict:
    return {"source": "process", "held_s": 60.0, **kw}


async def test_holder_names_reach_prometheus_as_capmon_holder_info(aiohttp_client, prometheus):
    """Who holds a device is text in InfluxDB; in Prometheus it is an info series per holder per window
    carrying the names as labels (never the pid), joined to the holder's numbers by its identities."""
    client = await aiohttp_client(create_app(make_config(rw_config(prometheus.remote_write_url))))
    end = window_end() - 120
    holders = [
        holder(
            pid=777, user="bob", command="python", runtime="slurm", slurm_job_id="81234", memory_bytes=2**33
        ),
        # Two processes of one pod's container: same identity tags, told apart by their slot.
        holder(
            pid=100,
            user="carol",
            command="vllm",
            runtime="containerd",
            namespace="inference",
            pod="llm-serve-7f9",
            container="engine",
            pod_uid="7f9a0000-0000-4000-8000-000000000001",
        ),
        holder(
            pid=101,
            user="carol",
            command="vllm-worker",
            runtime="containerd",
            namespace="inference",
            pod="llm-serve-7f9",
            container="engine",
        ),
        # A scheduler's allocation with no process on the device.
        holder(source="kubernetes", namespace="research", pod="nb-alice-0", container="notebook"),
    ]
    devices = [device("HOLD-0", state="allocated_idle", processes=3, holders=holders)]
    resp = await post(client, fleet_batch(end, devices=devices))
    assert resp.status == 200, await resp.text()

    rows = prometheus.query('capmon_holder_info{device="HOLD-0"}', at=end)
    got = {(r["metric"].get("user", ""), r["metric"]["slot"]): r["metric"] for r in rows}
    assert {float(r["value"][1]) for r in rows} == {1.0} and len(rows) == 4
    bob = got[("bob", "0")]
    assert bob == {
        "__name__": "capmon_holder_info",
        "agent": "node-1",
        "host": "gpu-node-1",
        "site": "ams1",
        "pool": "train",
        "vendor": "nvidia",
        "model": "NVIDIA H100 80GB HBM3",
        "device": "HOLD-0",
        "user": "bob",
        "runtime": "slurm",
        "slot": "0",
        "source": "process",
        "slurm_job_id": "81234",
        "command": "python",
    }
    assert (got[("carol", "0")]["command"], got[("carol", "1")]["command"]) == ("vllm", "vllm-worker")
    assert {got[("carol", s)]["pod"] for s in "01"} == {"llm-serve-7f9"}
    alice = got[("", "0")]
    assert (alice["source"], alice["namespace"], alice["pod"], alice["container"]) == (
        "kubernetes",
        "research",
        "nb-alice-0",
        "notebook",
    )
    # Never a pid, a pod UID or a container id: a series per process would grow without bound.
    assert not {"pid", "pod_uid", "container_id", "uid"} & {k for r in rows for k in r["metric"]}

    # The join a dashboard makes: allocated-idle seconds by job and by pod, split over the holders.
    ids = "host, device, user, namespace, runtime, slot"
    by_job = prometheus.values(
        f"sum by (slurm_job_id) (capmon_holder_allocated_idle_seconds * on({ids}) group_left(slurm_job_id) "
        "capmon_holder_info)",
        at=end,
        by="slurm_job_id",
    )
    assert by_job == {"81234": 15.0, "": 45.0}
    by_pod = prometheus.values(
        f"sum by (pod) (capmon_holder_allocated_idle_seconds * on({ids}) group_left(pod) capmon_holder_info)",
        at=end,
        by="pod",
    )
    assert by_pod == {"llm-serve-7f9": 30.0, "nb-alice-0": 15.0, "": 15.0}
