"""`collector/published.py`: the range totals' blocks, the statements that read them, and the published
views of several collector processes merged back into one fleet answer, against a real influxd."""

from __future__ import annotations

import itertools
import logging
import random
import re
from collections.abc import Iterable
from typing import Any

import msgspec
import pytest
from collector_helpers import NOW, Clock, batch, device, report
from published_helpers import read_published
from servers import free_port

from capmon.agent import wire
from capmon.collector.config import PricingConfig, StorageConfig
from capmon.collector.fleet import NO_LABEL, OTHER, AgentState, FleetView, Pricing
from capmon.collector.lineproto import escape_tag
from capmon.collector.published import (
    CHUNK,
    COARSE_KEEP_S,
    FINE_KEEP_S,
    MAX_TOTALS_MODELS,
    MAX_TOTALS_VALUES,
    TOTALS_FIELDS,
    LivePayload,
    PublishedFleet,
    Publisher,
    Totals,
    decode_live,
    range_start,
    totals_statements,
)
from capmon.collector.storage import InfluxV1Writer

H100 = "NVIDIA H100 80GB HBM3"
# The start of the hour NOW is in: the scenarios below stay inside it where a test needs one hour.
HOUR = NOW // 3600 * 3600
LABEL_KEYS = ("site", "cluster", "pool")
PRICING = PricingConfig(default=0.5, models={"H100": 2.5, "910B": 1.25}, energy_price_per_kwh=0.3, pue=1.4)


def as_report(**kw: Any) -> wire.Report:
    return msgspec.convert(report(**kw), wire.Report)


def as_batch(payload: dict) -> wire.Batch:
    return msgspec.convert(payload, wire.Batch)


def agent(agent_id: str = "node-1", labels: tuple[str | None, ...] = ("fra1", None)) -> AgentState:
    a = AgentState(agent_id)
    a.labels = labels
    return a


def parse_line(line: str) -> tuple[dict[str, str], dict[str, float], int]:
    """A `capmon_totals` line as (tags, numeric fields, timestamp); its `name` string field is
    checked to be the JSON of the `value` tag as sent."""
    series, rest = re.split(r"(?<!\\) ", line, maxsplit=1)
    rest, ts = rest.rsplit(" ", 1)
    fields, sent = rest.split(",name=", 1)
    name, *tags = re.split(r"(?<!\\),", series)
    assert name == "capmon_totals"
    unescape = re.compile(r"\\(.)")
    tag_map = {}
    for tag in tags:
        key, value = re.split(r"(?<!\\)=", tag, maxsplit=1)
        tag_map[key] = unescape.sub(r"\1", value)
    field_map = {k: float(v) for k, v in (f.split("=") for f in fields.split(","))}
    sent_value = msgspec.json.decode(sent[1:-1].replace('\\"', '"').replace("\\\\", "\\"))
    assert escape_tag(sent_value) == re.split(r"(?<!\\),value=", series)[1], (sent_value, series)
    return tag_map, field_map, int(ts)


def by_series(lines: Iterable[str]) -> dict[tuple[str, str, str, str, int], dict[str, float]]:
    """(res, dim, key, value, block start) → fields, of `capmon_totals` lines."""
    out = {}
    for line in lines:
        tags, fields, ts = parse_line(line)
        out[(tags["res"], tags["dim"], tags.get("key", ""), tags["value"], ts)] = fields
    return out


# -- 1. the blocks ---------------------------------------------------------------------------------


def test_a_window_is_summed_into_its_minute_and_hour_block_per_model_and_label():
    clock = Clock(HOUR + 126)
    totals = Totals(("site", "pool"), clock)
    end = HOUR + 125  # minute block HOUR + 120, hour block HOUR
    devices = [
        device("GPU-0", "busy", idle_energy_j=None),
        device("MIG-a", "allocated_idle", parent_id="GPU-1", fraction=0.5, idle_energy_j=1200.0),
        device("NPU-0", "free", model="910B3", vendor="ascend", idle_energy_j=None),
        device("GPU-9", "unavailable", model=None),
    ]
    totals.add(agent(labels=("fra1", None)), as_report(end=end, devices=devices))
    lines = totals.lines("proc-a")
    assert all(parse_line(line)[0]["collector"] == "proc-a" for line in lines)
    got = by_series(lines)
    h100 = {
        "busy_s": 60.0,
        "allocated_idle_s": 60.0,
        "free_s": 0.0,
        "unavailable_s": 0.0,
        "busy_gpu_s": 60.0,
        "allocated_idle_gpu_s": 30.0,  # the MIG instance is half a GPU
        "free_gpu_s": 0.0,
        "unavailable_gpu_s": 0.0,
        "idle_energy_j": 1200.0,
    }
    ascend = dict.fromkeys(TOTALS_FIELDS, 0.0) | {"free_s": 60.0, "free_gpu_s": 60.0}  # no energy field
    unknown = dict.fromkeys(TOTALS_FIELDS, 0.0) | {"unavailable_s": 60.0, "unavailable_gpu_s": 60.0}
    whole = {f: h100.get(f, 0.0) + ascend[f] + unknown[f] for f in TOTALS_FIELDS} | {"idle_energy_j": 1200.0}
    want = {}
    for res, start in (("1m", HOUR + 120), ("10m", HOUR), ("1h", HOUR)):
        want[(res, "model", "", H100, start)] = h100
        want[(res, "model", "", "910B3", start)] = ascend
        want[(res, "model", "", "unknown", start)] = unknown
        want[(res, "label", "site", "fra1", start)] = whole
        want[(res, "label", "pool", NO_LABEL, start)] = whole
    assert got == want


def test_lines_write_only_the_blocks_changed_since_the_last_call():
    clock = Clock(HOUR + 70)
    totals = Totals(("site", "pool"), clock)
    totals.add(agent(), as_report(end=HOUR + 65))
    first = by_series(totals.lines("p"))
    assert {(k[0], k[4]) for k in first} == {("1m", HOUR + 60), ("10m", HOUR), ("1h", HOUR)}
    assert totals.lines("p") == []  # nothing changed
    clock.now = HOUR + 200
    totals.add(agent(), as_report(end=HOUR + 190))
    second = by_series(totals.lines("p"))
    # The new minute block and the ten-minute and hour blocks (with their running sums), not the
    # first minute block.
    assert {(k[0], k[4]) for k in second} == {("1m", HOUR + 180), ("10m", HOUR), ("1h", HOUR)}
    assert second[("10m", "model", "", H100, HOUR)]["free_s"] == 120.0
    assert second[("1h", "model", "", H100, HOUR)]["free_s"] == 120.0
    assert second[("1m", "model", "", H100, HOUR + 180)]["free_s"] == 60.0


def test_blocks_are_forgotten_past_their_keep_horizon():
    clock = Clock(HOUR + 70)
    totals = Totals(("site",), clock)
    totals.add(agent(labels=("fra1",)), as_report(end=HOUR + 65))
    totals.lines("p")
    totals.forget_old()
    minute, ten, hour = (60, HOUR + 60), (600, HOUR), (3600, HOUR)
    clock.now = HOUR + 120 + FINE_KEEP_S  # the minute block ends exactly at the horizon: kept
    totals.lines("p")
    totals.forget_old()
    assert set(totals.blocks) == {minute, ten, hour}
    clock.advance(1)
    totals.lines("p")
    totals.forget_old()
    assert set(totals.blocks) == {ten, hour}
    clock.now = HOUR + 600 + COARSE_KEEP_S
    totals.forget_old()
    assert set(totals.blocks) == {ten, hour}
    clock.advance(1)
    totals.forget_old()
    assert set(totals.blocks) == {hour}
    clock.now = HOUR + 3600 + COARSE_KEEP_S
    totals.lines("p")
    totals.forget_old()
    assert set(totals.blocks) == {hour}
    clock.advance(1)
    totals.lines("p")
    totals.forget_old()
    assert totals.blocks == {}


def test_a_block_is_kept_until_its_last_sums_are_written():
    """A block past its horizon whose last write failed (still dirty) is written before it is forgotten."""
    clock = Clock(HOUR + 70)
    totals = Totals(("site",), clock)
    totals.add(agent(labels=("fra1",)), as_report(end=HOUR + 65))
    failed = totals.lines("p")
    totals.mark_dirty({(60, HOUR + 60), (600, HOUR), (3600, HOUR)})  # the write of `failed` was refused
    clock.now = HOUR + 121 + FINE_KEEP_S
    totals.forget_old()
    assert (60, HOUR + 60) in totals.blocks
    assert totals.lines("p") == failed
    totals.forget_old()
    assert set(totals.blocks) == {(600, HOUR), (3600, HOUR)}


def test_model_names_spread_over_many_blocks_still_make_a_bounded_number_of_series():
    """A new model name in every minute: the cap holds over every block kept, not per block, so the
    store's series stay bounded; forgetting blocks frees their names again."""
    clock = Clock(HOUR + 61)
    totals = Totals((), clock)
    series = set()
    for minute in range(600):
        clock.now = HOUR + 61 + minute * 60
        devices = [device("GPU-0", "busy", model=f"model-{minute}")]
        totals.add(agent(f"a{minute}", ()), as_report(end=HOUR + 60 + minute * 60, devices=devices))
        series |= {line.split(" ")[0] for line in totals.lines("p")}
        totals.forget_old()
    models = {s.split("value=")[1] for s in series}
    assert len(models) == MAX_TOTALS_MODELS
    assert OTHER in models


def test_a_late_window_is_left_out_of_the_blocks_too_old_to_be_added_to():
    now = HOUR + 30 * 3600
    clock = Clock(now)
    totals = Totals(("site",), clock)
    a = agent(labels=("fra1",))
    # A minute block ending exactly at the fine horizon is still added to; one a minute older is not.
    edge = now - FINE_KEEP_S - 60
    totals.add(a, as_report(end=edge))
    assert totals.late_windows == 0
    totals.add(a, as_report(end=edge - 1))
    assert totals.late_windows == 1
    got = by_series(totals.lines("p"))
    minute_blocks = {k[4] for k in got if k[0] == "1m"}
    assert minute_blocks == {edge}
    # Both are in the hour block.
    assert got[("1h", "model", "", H100, (edge - 1) // 3600 * 3600)]["free_s"] == 120.0
    # Older than the coarse horizon: in no block at all.
    totals.add(a, as_report(end=now - COARSE_KEEP_S - 3600 - 1))
    assert totals.late_windows == 2
    assert totals.lines("p") == []
    totals.add(a, as_report(end=now))  # a window on time is not late
    assert totals.late_windows == 2


def test_a_hostile_agents_model_names_and_label_values_fold_into_other():
    """10,000 model names and 1,000 values of one label in one block make at most MAX_TOTALS_*
    series per block, and no second is lost."""
    clock = Clock(HOUR + 61)
    totals = Totals(("site", "pool"), clock)
    names = (f"model-{i}" for i in itertools.count())
    for n in range(1000):
        devices = [device(f"GPU-{i}", "busy", model=next(names)) for i in range(10)]
        totals.add(agent(f"a{n}", (f"site-{n}", "train")), as_report(end=HOUR + 60, devices=devices))
    got = by_series(totals.lines("p"))
    for res, start in (("1m", HOUR + 60), ("10m", HOUR), ("1h", HOUR)):
        models = {k[3]: v for k, v in got.items() if k[:2] == (res, "model") and k[4] == start}
        sites = {k[3]: v for k, v in got.items() if k[:3] == (res, "label", "site")}
        pools = {k[3]: v for k, v in got.items() if k[:3] == (res, "label", "pool")}
        assert len(models) == MAX_TOTALS_MODELS and OTHER in models
        assert len(sites) == MAX_TOTALS_VALUES and OTHER in sites
        assert set(pools) == {"train"}
        for per in (models, sites, pools):
            assert sum(v["busy_s"] for v in per.values()) == 10_000 * 60.0
    assert len(got) == 3 * (MAX_TOTALS_MODELS + MAX_TOTALS_VALUES + 1)


# -- against a real influxd ------------------------------------------------------------------------


async def read(influxd, db: str, clock: Clock, since_s: float = 86400.0, **collector: Any) -> PublishedFleet:
    return await read_published(influxd, db, clock, PRICING, since_s, **collector)


def fleet_view(clock: Clock, **kw: Any) -> FleetView:
    return FleetView(LABEL_KEYS, Pricing(PRICING), clock=clock, **kw)


def live_row(influxd, db: str, collector: str) -> dict[str, Any]:
    rows = influxd.rows(
        f"SELECT * FROM capmon_live WHERE collector = '{collector}' ORDER BY time DESC LIMIT 1", db
    )
    assert len(rows) == 1
    return rows[0]


def roundtrip(payload: dict[str, Any]) -> Any:
    """A payload as the reader decodes it (`LivePayload`)."""
    return msgspec.json.decode(msgspec.json.encode(payload), type=LivePayload)


def without_since(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "since"}


# -- 2. the statements over a range ---------------------------------------------------------------


def sum_rows(influxd, db: str, statements: list[str]) -> dict[tuple[str, str, str], list[float]]:
    out: dict[tuple[str, str, str], list[float]] = {}
    for statement in statements:
        for row in influxd.rows(statement, db):
            acc = out.setdefault((row["dim"], row.get("key") or "", row["value"]), [0.0] * 9)
            for i, name in enumerate((*TOTALS_FIELDS, "idle_energy_j")):
                # The blocks' points, or their sum() (columns sum, sum_1, …): the statements' choice.
                column = name if name in row else ("sum" if i == 0 else f"sum_{i}")
                acc[i] += row[column] or 0.0
    return out


@pytest.mark.integration
def test_range_totals_read_every_block_once(influxd, db):
    """Windows at random minutes over five hours (and on the boundaries): for any `since`, the
    statements' sums are those of the windows ending at or after range_start(since)."""
    rng = random.Random(20251201)
    first = HOUR - 5 * 3600
    ends = sorted(
        [first + rng.randrange(5 * 3600 + 1000) for _ in range(200)]
        + [HOUR - 3600, HOUR - 3601, HOUR - 3599, HOUR - 1, HOUR, HOUR + 59, HOUR + 60, first]
    )
    agents = [
        agent("a", ("fra1", "c1", "train")),
        agent("b", ("ams1", None, "infer")),
        agent("c", (None,) * 3),
    ]
    models = (H100, "910B3", "L40S")
    windows = []  # (end, agent, model, [busy, allocated_idle, free, unavailable], fraction, energy)
    clock = Clock(first)
    totals = Totals(LABEL_KEYS, clock)
    for n, end in enumerate(ends):
        a = rng.choice(agents)
        seconds = [float(rng.randrange(61)) for _ in range(4)]
        model = rng.choice(models)
        fraction = rng.choice((None, 0.5, 0.25))
        energy = rng.choice((None, float(rng.randrange(1000))))
        windows.append((end, a, model, seconds, fraction, energy))
        d = device(
            "GPU-0",
            "busy",
            model=model,
            busy_s=seconds[0],
            allocated_idle_s=seconds[1],
            free_s=seconds[2],
            unavailable_s=seconds[3],
            fraction=fraction,
            idle_energy_j=energy,
        )
        clock.now = end + 1  # each window applied as it arrives
        totals.add(a, as_report(seq=n + 1, end=end, devices=[d]))
        if n % 7 == 0:  # published now and then: blocks still filling are rewritten
            status, answer = influxd.write(db, "\n".join(totals.lines("proc-a")))
            assert status == 204, answer
    status, answer = influxd.write(db, "\n".join(totals.lines("proc-a")))
    assert status == 204, answer
    now = clock.now
    assert totals.late_windows == 0

    sinces = [first - 7200, first, now - 59, now - 3600, HOUR - 3600, HOUR - 3601, HOUR - 3599, HOUR]
    sinces += [rng.uniform(first - 600, now) for _ in range(12)]
    shapes = set()
    for since in sinces:
        start = range_start(since)
        assert start % 60 == 0 and since <= start < since + 60
        want: dict[tuple[str, str, str], list[float]] = {}
        for end, a, model, seconds, fraction, energy in windows:
            if not start <= end <= now:
                continue
            share = fraction or 1.0
            values = [*seconds, *(s * share for s in seconds), energy or 0.0]
            for key in [("model", "", model)] + [
                ("label", k, v or NO_LABEL) for k, v in zip(LABEL_KEYS, a.labels, strict=True)
            ]:
                acc = want.setdefault(key, [0.0] * 9)
                for i in range(9):
                    acc[i] += values[i]
        statements = totals_statements(since, now)
        resolutions = [s.split("res = ")[1].split()[0] for s in statements]
        if start // 600 == int(now) // 600:  # inside ten minutes: the minute blocks only
            assert resolutions == ["'1m'"]
        assert len(resolutions) <= 5
        shapes.add(tuple(resolutions))
        got = sum_rows(influxd, db, statements)
        assert got.keys() == want.keys(), since
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-9), (since, key)
    # The sinces tried cover a range in one hour, one over whole hours with both partial ends, and
    # one starting on an hour.
    assert ("'1m'",) in shapes
    assert any(r[0] == "'1m'" and "'1h'" in r and r[-1] == "'1m'" and "'10m'" in r for r in shapes)
    assert any(r[0] == "'1h'" for r in shapes)


# -- 3. two processes' views, merged ---------------------------------------------------------------

FORGET_S = 3600.0


def devices_of(agent_id: str, k: int) -> list[dict]:
    if agent_id == "mover":
        return [
            device("GPU-0", "busy", power_mean_w=400.0),
            device(
                "NPU-0", "free", model="910B3", vendor="ascend", power_mean_w=90.0, idle_energy_j=50.0 * k
            ),
        ]
    if agent_id == "big":
        return [device(f"GPU-{i}", "free") for i in range(5)]
    return [device("GPU-0", "allocated_idle" if agent_id == "a1" else "busy", power_mean_w=None)]


LABELS = {"a1": {"site": "ams1", "cluster": "c2"}, "b1": {"site": "fra1", "cluster": "c1", "pool": "infer"}}


class TwoProcesses:
    """Collector processes A and B publishing to one store, and a memory view fed everything both
    were fed, in the same order (what one process would answer): "mover" reports to A, then to B;
    "a1" only to A and falls silent first; "b1" and "big" (kept out by B's bound) only to B; "ghost"
    is refused by both, and so is one report of "mover"."""

    def __init__(self, writer: InfluxV1Writer, clock: Clock) -> None:
        self.clock = clock
        kw = {"forget_after_s": FORGET_S, "max_devices": 4}
        self.a, self.b, self.memory = (
            fleet_view(clock, **kw),
            fleet_view(clock, **kw),
            fleet_view(clock, **kw),
        )
        self.pub_a = Publisher(self.a, writer.write, 2.0, "proc-a", clock)
        self.pub_b = Publisher(self.b, writer.write, 2.0, "proc-b", clock)

    def send(self, view: FleetView, agent_id: str, k: int, instance: str) -> None:
        end = HOUR + 60 + 60 * k
        self.clock.now = end + 1
        payload = batch(
            [report(seq=k, end=end, devices=devices_of(agent_id, k))],
            agent_id=agent_id,
            host=f"{agent_id}-host",
            labels=LABELS.get(agent_id, {"site": "fra1"}),
            instance=instance,
        )
        view.apply(as_batch(payload))
        self.memory.apply(as_batch(payload))

    def refuse(self, view: FleetView, agent_id: str, reason: str, detail: str) -> None:
        for v in (view, self.memory):
            v.record_refusal(agent_id, reason, detail, self.clock.now, host=f"{agent_id}-host")

    async def run(self) -> None:
        for k in (1, 2, 3):
            self.send(self.a, "a1", k, "spool-a1")
            self.send(self.a, "mover", k, "spool-a")
        self.refuse(self.a, "mover", "bad_report", "window 4: no devices")
        for _ in range(2):
            self.refuse(self.a, "ghost", "clock_skew", "clock 2 h ahead")
        for k in (4, 5, 6):
            self.send(self.b, "b1", k, "spool-b1")
            self.send(self.b, "mover", k, "spool-b")
            if k == 5:
                self.send(self.b, "big", k, "spool-big")
        self.refuse(self.b, "mover", "bad_report", "window 7: no devices")
        for _ in range(3):
            self.refuse(self.b, "ghost", "clock_skew", "clock 3 h ahead")
        assert await self.pub_a.publish() and await self.pub_b.publish()


@pytest.fixture
async def two(writer):
    procs = TwoProcesses(writer, Clock(HOUR + 60))
    await procs.run()
    return procs


def rows_by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in rows}


@pytest.mark.integration
async def test_two_processes_answer_as_one_memory_view(influxd, db, two):
    fleet = await read(influxd, db, two.clock, forget_after_s=FORGET_S)
    assert fleet.publishers == 2
    assert without_since(fleet.summary()) == without_since(two.memory.summary())
    assert fleet.agent_rows() == two.memory.agents()


@pytest.mark.integration
async def test_a_moved_agent_is_its_newer_record_and_its_windows_count_once(influxd, db, two):
    fleet = await read(influxd, db, two.clock, forget_after_s=FORGET_S)
    rows = rows_by_id(fleet.agent_rows())
    assert (rows["mover"]["instance"], rows["mover"]["last_report_end"]) == ("spool-b", HOUR + 420)
    summary = fleet.summary()
    assert summary["agents"] == {"total": 3, "stale": 0}
    assert summary["totals"]["devices"] == 4  # a1, b1, and mover's two once
    by_model = summary["by_model"]
    # mover's NPU: six windows free, three with A and three with B, each counted once.
    assert by_model["910B3"]["device_hours"]["free"] == round(6 * 60 / 3600, 6)
    assert by_model["910B3"]["idle_energy_kwh"] == round(50.0 * sum(range(1, 7)) / 3.6e6, 6)
    # H100: mover's GPU busy six windows, b1's three; a1's allocated idle three.
    assert by_model[H100]["device_hours"]["busy"] == round(9 * 60 / 3600, 6)
    assert by_model[H100]["device_hours"]["allocated_idle"] == round(3 * 60 / 3600, 6)
    assert summary["by_label"]["pool"][NO_LABEL]["device_hours"]["allocated_idle"] == round(180 / 3600, 6)


@pytest.mark.integration
async def test_refusals_recorded_by_both_processes_are_summed(influxd, db, two):
    rows = rows_by_id((await read(influxd, db, two.clock, forget_after_s=FORGET_S)).agent_rows())
    ghost = rows["ghost"]["refusals"]["clock_skew"]
    assert (ghost["count"], ghost["last_detail"]) == (5, "clock 3 h ahead")
    assert rows["ghost"]["host"] == "ghost-host" and rows["ghost"]["devices"] == 0
    mover = rows["mover"]["refusals"]["bad_report"]
    assert (mover["count"], mover["last_detail"]) == (2, "window 7: no devices")


@pytest.mark.integration
async def test_a_silent_agent_is_stale_then_gone_by_the_clock_at_read_time(influxd, db, two):
    clock = two.clock
    a1_seen = HOUR + 241
    for now, stale, listed in (
        (a1_seen + 180, False, True),  # three 60 s windows: not yet stale
        (a1_seen + 181, True, True),
        (a1_seen + FORGET_S, True, True),
        (a1_seen + FORGET_S + 1, True, False),
    ):
        clock.now = now
        fleet = await read(influxd, db, clock, forget_after_s=FORGET_S)
        rows = rows_by_id(fleet.agent_rows())
        assert ("a1" in rows) is listed, now
        if listed:
            assert rows["a1"]["stale"] is stale, now
        assert fleet.agent_rows() == two.memory.agents(), now
        summary, memory = fleet.summary(), two.memory.summary()
        assert summary["agents"] == memory["agents"], now
        assert summary["totals"]["states"] == memory["totals"]["states"], now
        if listed:  # (the memory view's since-start seconds leave with a forgotten agent)
            assert without_since(summary) == without_since(memory), now
    assert fleet.summary()["agents"] == {"total": 2, "stale": 2}


@pytest.mark.integration
async def test_a_kept_out_agent_is_listed_as_kept_out(influxd, db, two):
    fleet = await read(influxd, db, two.clock, forget_after_s=FORGET_S)
    big = rows_by_id(fleet.agent_rows())["big"]
    assert big["live_view"] == "not in the live view: fleet bound (4 devices)"
    assert (big["devices"], big["kept_out_reports"], big["host"]) == (5, 1, "big-host")
    assert fleet.summary()["totals"]["devices"] == 4  # none of its five


@pytest.mark.integration
async def test_an_agent_refused_by_another_process_stays_listed(influxd, db, writer):
    """Its reports went to A, and now are refused by B: still sending, so listed (as one view lists
    it), not forgotten by its last good report."""
    clock = Clock(HOUR + 60)
    kw = {"forget_after_s": FORGET_S}
    a, b, memory = fleet_view(clock, **kw), fleet_view(clock, **kw), fleet_view(clock, **kw)
    pub_a, pub_b = (
        Publisher(a, writer.write, 2.0, "proc-a", clock),
        Publisher(b, writer.write, 2.0, "proc-b", clock),
    )
    clock.now = HOUR + 121
    for view in (a, memory):
        view.apply(as_batch(batch([report(end=HOUR + 120)], agent_id="skewed")))
    # Its clock drifts: every later report goes to B and is refused there.
    clock.now = HOUR + 2000
    for view in (b, memory):
        view.record_refusal("skewed", "clock_skew", "clock 2 h ahead", clock.now, host="gpu-node-1")
    clock.now = HOUR + 3000  # A publishes again (another agent), "skewed" still in its view
    a.apply(as_batch(batch([report(end=HOUR + 2990)], agent_id="other")))
    memory.apply(as_batch(batch([report(end=HOUR + 2990)], agent_id="other")))
    assert await pub_a.publish() and await pub_b.publish()
    clock.now = HOUR + 121 + FORGET_S + 1  # an hour after its last good report, 20 min after a refusal
    assert "skewed" in rows_by_id(memory.agents())
    fleet = await read(influxd, db, clock, forget_after_s=FORGET_S)
    assert "skewed" in rows_by_id(fleet.agent_rows())
    assert fleet.agent_rows() == memory.agents()


class Tee:
    """A publishing process's view and a memory view (the oracle) fed the same: a publishing view
    keeps no since-start totals of its own (its range totals are the publisher's blocks)."""

    def __init__(self, view: FleetView, oracle: FleetView) -> None:
        self.view, self.oracle = view, oracle

    def apply(self, b: wire.Batch) -> None:
        self.view.apply(b)
        self.oracle.apply(b)

    def record_refusal(self, *args: Any, **kw: Any) -> None:
        self.view.record_refusal(*args, **kw)
        self.oracle.record_refusal(*args, **kw)


async def publish_many(
    writer: InfluxV1Writer, clock: Clock, n: int
) -> tuple[FleetView, Publisher, FleetView]:
    """A process's view of `n` agents, published; with a memory view fed the same (the oracle)."""
    rng = random.Random(n)
    clock.now = HOUR + 55  # started before the windows: it counts them since its start
    view = fleet_view(clock, forget_after_s=600.0)
    publisher = Publisher(view, writer.write, 2.0, "proc-big", clock)
    both = Tee(view, fleet_view(clock, forget_after_s=600.0))
    clock.now = HOUR + 61
    for i in range(n):
        agent_id, host = f"node-{rng.getrandbits(64):016x}-{i}", f"h{rng.getrandbits(48):012x}"
        devices = [device(f"GPU-{j}", rng.choice(("busy", "free", "allocated_idle"))) for j in range(8)]
        both.apply(as_batch(batch([report(end=HOUR + 60, devices=devices)], agent_id=agent_id, host=host)))
    assert await publisher.publish()
    return view, publisher, both.oracle


@pytest.mark.integration
async def test_a_payload_of_several_chunks_reads_back_identical(influxd, db, writer):
    """3,000 agents: several string fields of at most CHUNK characters (influxd 1.x refuses a string
    over 64 KiB, so the write itself proves the split)."""
    clock = Clock(HOUR + 61)
    view, publisher, oracle = await publish_many(writer, clock, 3000)
    row = live_row(influxd, db, "proc-big")
    chunks = int(row["chunks"])
    assert chunks >= 2
    assert all(0 < len(row[f"p{i}"]) <= CHUNK for i in range(chunks))
    assert sum(len(row[f"p{i}"]) for i in range(chunks)) == publisher.last_bytes
    assert decode_live(row) == roundtrip(publisher.payload(clock.now))
    fleet = await read(influxd, db, clock, forget_after_s=600.0)
    assert fleet.agent_count == 3000 and fleet.device_count == 24_000
    assert fleet.agent_rows() == view.agents() == oracle.agents()
    assert without_since(fleet.summary()) == without_since(oracle.summary())


@pytest.mark.integration
async def test_a_smaller_publish_in_the_same_hour_reads_its_own_chunks(influxd, db, writer):
    """The live point of one hour is overwritten field by field: a later publish with fewer chunks
    leaves the earlier one's extra fields behind, and the reader must not read them."""
    clock = Clock(HOUR + 61)
    view, publisher, _ = await publish_many(writer, clock, 3000)
    big = int(live_row(influxd, db, "proc-big")["chunks"])
    clock.now = HOUR + 60 + 601 + 60  # every agent forgotten but one, which reports again
    view.apply(as_batch(batch([report(end=HOUR + 720)], agent_id="last", host="last-host")))
    assert await publisher.publish()
    assert clock.now // 3600 * 3600 == HOUR  # the same point as the big publish
    row = live_row(influxd, db, "proc-big")
    assert int(row["chunks"]) == 1 < big
    assert row[f"p{big - 1}"]  # the leftover of the big one is still there
    assert decode_live(row) == roundtrip(publisher.payload(clock.now))
    fleet = await read(influxd, db, clock, forget_after_s=600.0)
    assert [r["id"] for r in fleet.agent_rows()] == ["last"]
    assert fleet.agent_rows() == view.agents()


@pytest.mark.integration
async def test_the_newer_of_kept_out_and_live_records_wins(influxd, db, two):
    """The bound is each process's: an agent kept out by one and in the view of another is what its
    newer record says."""
    clock = two.clock
    clock.now = HOUR + 500
    two.a.apply(as_batch(batch([report(end=HOUR + 499)], agent_id="big", host="big-host")))  # fits in A
    two.b.apply(as_batch(batch([report(end=HOUR + 499, devices=devices_of("big", 0))], agent_id="a1")))
    assert await two.pub_a.publish() and await two.pub_b.publish()
    fleet = await read(influxd, db, clock, forget_after_s=FORGET_S)
    ids = [r["id"] for r in fleet.agent_rows()]
    assert ids == sorted(set(ids)) == ["a1", "b1", "big", "ghost", "mover"]  # one row each
    assert fleet.summary()["agents"]["total"] == 3  # b1, big, mover in the view; a1 kept out
    rows = rows_by_id(fleet.agent_rows())
    assert rows["big"]["live_view"] is None and rows["big"]["devices"] == 1  # live in A, later
    assert "kept_out_reports" not in rows["big"]
    # a1, in A's view, now reports five devices to B, which keeps it out: A's older record is dropped.
    assert rows["a1"]["live_view"] == "not in the live view: fleet bound (4 devices)"
    assert rows["a1"]["devices"] == 5 and rows["a1"]["last_report_end"] is None


# -- 4. the answer is the memory view's ------------------------------------------------------------


def mig(device_id: str, state: str, **kw: Any) -> dict:
    return device(device_id, state, parent_id="GPU-2", fraction=0.5, info={"mig_profile": "3g.40gb"}, **kw)


@pytest.mark.integration
async def test_the_published_answer_is_the_memory_views(influxd, db, writer):
    clock = Clock(HOUR - 1200)
    view = fleet_view(clock)
    publisher = Publisher(view, writer.write, 2.0, "proc-one", clock)
    oracle = fleet_view(clock)
    both = Tee(view, oracle)
    for k, end in enumerate((HOUR - 120, HOUR - 60, HOUR, HOUR + 60)):
        devices = [
            device("GPU-0", "allocated_idle", idle_energy_j=8000.0 + k, power_mean_w=70.5),
            mig("MIG-a", "busy", power_mean_w=None),
            mig("MIG-b", "free", idle_energy_j=1000.0),
        ]
        if k < 2:  # then no longer listed: unavailable
            devices.append(device("GPU-1", "free", power_mean_w=60.0))
        clock.now = end + 1
        both.apply(
            as_batch(batch([report(seq=k + 1, end=end, devices=devices)], agent_id="rack-a", host="a"))
        )
        npu = [
            device("NPU-0", "busy", model="910B3", vendor="ascend"),
            device("GPU-9", "unavailable", model=None),
        ]
        labels = {"site": "ams1", "pool": "infer"}  # no cluster: "(none)"
        both.apply(
            as_batch(batch([report(seq=k + 1, end=end, devices=npu)], agent_id="rack-b", labels=labels))
        )
        if k == 1:
            await publisher.publish()  # publishes in between are overwritten by the later ones
    silent = [device("GPU-0", "free", power_mean_w=50.0)]
    clock.now = HOUR - 599
    both.apply(as_batch(batch([report(end=HOUR - 600, devices=silent)], agent_id="quiet", host="q")))
    clock.now = HOUR + 62
    both.record_refusal("rack-a", "clock_skew", "clock 1 h ahead", clock.now)
    assert await publisher.publish()
    clock.now = HOUR + 90
    fleet = await read(influxd, db, clock)
    summary = oracle.summary()
    assert summary["agents"] == {"total": 3, "stale": 1}  # what the comparison covers
    assert summary["totals"]["states"]["unavailable"] == 3 and summary["totals"]["idle_energy_kwh"]
    assert without_since(fleet.summary()) == without_since(summary)
    assert fleet.agent_rows() == oracle.agents() == view.agents()


# -- 5. a store that does not take the publish ----------------------------------------------------


@pytest.mark.integration
async def test_a_publish_the_store_refuses_is_counted_logged_once_and_its_blocks_written_later(
    influxd, db, writer, caplog
):
    down = InfluxV1Writer(StorageConfig(kind="influxdb_v1", url=f"http://127.0.0.1:{free_port()}", db=db))
    await down.start()
    target = [down]

    async def submit(lines: list[str]) -> None:
        await target[0].write(lines)

    clock = Clock(HOUR + 61)
    view = fleet_view(clock)
    publisher = Publisher(view, submit, 2.0, "proc-down", clock)
    caplog.set_level(logging.INFO, logger="capmon.collector.published")
    try:
        for k, end in enumerate((HOUR + 60, HOUR + 120)):
            clock.now = end + 1
            view.apply(as_batch(batch([report(seq=k + 1, end=end)])))
            assert await publisher.publish() is False
        assert (publisher.failures, publisher.publishes) == (2, 0)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "could not publish" in warnings[0].getMessage()
        assert publisher.changed()
        target[0] = writer  # the store is back; no window arrived since
        assert await publisher.publish() is True
    finally:
        await down.close()
    assert (publisher.failures, publisher.publishes) == (2, 1)
    assert any("published this collector's live view again" in r.getMessage() for r in caplog.records)
    assert not publisher.changed()
    # Both windows' minute blocks (a range inside the hour reads only those) and the live view.
    fleet = await read(influxd, db, clock, since_s=clock.now - HOUR)
    assert fleet.summary()["totals"]["device_hours"]["free"] == round(120 / 3600, 6)
    assert [r["id"] for r in fleet.agent_rows()] == ["node-1"]


async def _never(lines: list[str]) -> None:
    raise AssertionError("not written in this test")


def test_refusal_details_are_cut_when_published_so_refusals_cannot_swell_every_publish():
    """1,000 agents refused for 12 reasons with 1 KiB details each would be 12 MB in every publish:
    each detail is published cut to MAX_PUBLISHED_DETAIL characters (the memory view keeps them whole)."""
    from capmon.collector.published import MAX_PUBLISHED_DETAIL, Publisher

    clock = Clock(HOUR + 61)
    view = fleet_view(clock)
    view.apply(as_batch(batch([report(end=HOUR + 60)], agent_id="in-view")))
    for n in range(1000):
        for r in range(12):
            detail = (f"agent {n} reason {r}: " * 60)[:1024]
            view.record_refusal(f"refused-{n}", f"reason_{r}", detail, clock.now, host="h")
    view.record_refusal("in-view", "clock", "x" * 1024, clock.now)
    pub = Publisher(view, _never, 2.0, "p", clock)
    payload = pub.payload(clock.now)
    details = [d for _, _, _, refusals in payload["refused"] for _, d, _ in refusals.values()]
    details += [d for refusals in payload["agents"]["refusals"].values() for _, d, _ in refusals.values()]
    assert len(details) == 12_001 and max(map(len, details)) == MAX_PUBLISHED_DETAIL
    assert len(msgspec.json.encode(payload)) < 12_001 * (MAX_PUBLISHED_DETAIL + 100)
    assert len(view.by_id["in-view"].refusals["clock"][1]) == 1024  # the view itself is untouched
