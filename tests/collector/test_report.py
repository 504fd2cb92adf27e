"""`capmon report` against a real influxd that the real agent → collector pipeline filled from the
dashboards' scripted fleet: its numbers equal the dashboards' InfluxQL panels and the collector's
API for the same data, and its HTML works offline in a real headless Chromium."""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dashboards"))

from dashboard_fleet import DURATION_S, H100, PRICES, T0, fill
from test_dashboard_queries import panel_rows
from test_page import PHONE, Recorder, async_playwright, launch, screenshots

from capmon.collector.report import (
    InfluxQL,
    ReportData,
    _num,
    collect,
    main,
    parse_time,
    render_html,
    render_md,
)

DB = "capmon"  # the database test_dashboard_queries' panel_rows reads
SINCE, UNTIL = T0, T0 + DURATION_S
RANGE = ["--since", str(SINCE), "--until", str(UNTIL)]


def close(a: float | None, b: float | None, tol: float = 1e-6) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def column(row: dict, prefix: str) -> float:
    """A dashboard column whose name ends in the expanded `($currency)`."""
    (name,) = [k for k in row if k.startswith(prefix + " (")]
    return row[name]


# -- units -----------------------------------------------------------------------------------------


def test_times_are_durations_unix_seconds_or_iso_and_bad_ones_name_the_option():
    now = 1_760_000_000
    assert parse_time("7d", now, field_name="--since") == now - 7 * 86400
    assert parse_time("90m", now, field_name="--since") == now - 5400
    assert parse_time("1760000123", now, field_name="--until") == 1_760_000_123
    assert parse_time("2025-10-10T00:00Z", now, field_name="--until") == T0
    assert parse_time("2025-10-10T00:00", now, field_name="--until") == T0  # no zone: UTC
    with pytest.raises(ValueError, match=r"^--since: 'last week' is not a duration"):
        parse_time("last week", now, field_name="--since")


# -- figures as people read them -------------------------------------------------------------------


def scripted(currency: str = "", **totals: float | None) -> ReportData:
    """A report's data as `collect` returns it, without a store: the demo's first minute."""
    t: dict[str, float | None] = {
        "idle_gpu_hours": 0.15,
        "allocated_idle_gpu_hours": 0.0912,
        "unavailable_gpu_hours": 0.0,
        "gpu_hours": 0.283,
        "idle_share_pct": 53.1,
        "idle_value": 0.375,
        "idle_energy_kwh": None,
        "idle_energy_cost": None,
    }
    t.update(totals)
    return ReportData(
        since=T0,
        until=T0 + 60,
        filters={},
        group_keys=("site",),
        currency=currency,
        step_s=60,
        totals=t,
        by_model=[],
        by_group=[],
        over_time=[],
        streaks=[],
        holders=[],
        unavailable=[],
    )


def summary_cells(md: str) -> dict[str, str]:
    lines = md.split("## Summary", 1)[1].split("## ", 1)[0].splitlines()
    return {c[0]: c[1] for c in (line.strip("| ").split(" | ") for line in lines if line.startswith("| "))}


def test_the_cards_read_the_same_figures_as_the_summary_table():
    """Reviewed: the cards said 0.1 idle and 0.1 allocated-idle GPU-hours over a table of 0.15 and 0.09."""
    data = scripted("USD")
    page = render_html(data)
    cells = summary_cells(render_md(data))
    for card, row in (
        ("idle GPU-hours", "idle GPU-hours"),
        ("allocated-idle GPU-hours", "allocated-idle GPU-hours"),
        ("idle share of GPU-time", "idle share of GPU-time (%)"),
    ):
        shown = page.split(f'data-figure="{card}">', 1)[1].split("<", 1)[0].removesuffix(" %")
        assert shown == cells[row]
    assert cells["idle GPU-hours"] == "0.15" and cells["allocated-idle GPU-hours"] == "0.0912"


def test_a_few_seconds_of_gpu_time_is_not_shown_as_zero():
    """Right after the demo starts: 15 GPU-seconds idle of 28 is 53.6 % and 0.00417 GPU-hours, not 0.00."""
    cells = summary_cells(
        render_md(scripted(idle_gpu_hours=15 / 3600, gpu_hours=28 / 3600, idle_share_pct=53.57))
    )
    assert cells["idle GPU-hours"] == "0.00417" and cells["reported GPU-hours"] == "0.00778"
    assert cells["idle share of GPU-time (%)"] == "53.6"
    assert [_num(v) for v in (1234.5, 12.345, 0.0, None, 2.5)] == ["1,234", "12.3", "0", "", "2.5"]


def test_without_currency_the_values_say_the_store_does_not_know_it():
    md = render_md(scripted())
    assert "| idle value (¤) | 0.375 |" in md
    assert "currency the store does not hold: pass --currency" in md
    assert "0.375 ¤" in render_html(scripted())
    named = render_md(scripted("EUR"))
    assert "| idle value (EUR) | 0.375 |" in named and "¤" not in named


def test_an_unreachable_store_is_one_line_and_exit_1(capsys, tmp_path):
    from servers import free_port

    out = tmp_path / "r.md"
    rc = main(
        [*RANGE, "--format", "md", "--out", str(out), "--influx-url", f"http://127.0.0.1:{free_port()}"]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("capmon report: http://127.0.0.1:") and "cannot query" in err and err.count("\n") == 1
    )
    assert not out.exists()


def test_since_after_until_is_refused(capsys):
    assert main(["--since", str(UNTIL), "--until", str(SINCE), "--format", "csv"]) == 2
    assert "--since:" in capsys.readouterr().err


# -- against the store -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def filled(influxd):
    influxd.create_database(DB)
    return influxd, fill(influxd.url, DB)


def report_csv(influxd, tmp_path, *more: str) -> dict[tuple[str, str, str], float]:
    out = tmp_path / "report.csv"
    assert main([*RANGE, "--format", "csv", "--out", str(out), "--influx-url", influxd.url, *more]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    return {(r["section"], r["key"], r["metric"]): float(r["value"]) for r in rows}


@pytest.mark.integration
def test_the_report_numbers_equal_the_dashboards_and_the_api(filled, tmp_path):
    influxd, api = filled
    got = report_csv(influxd, tmp_path)

    def dash(title: str, column: str | None = None) -> float:
        (row,) = panel_rows(influxd, "capmon-fleet", title)
        if column is None:
            (column,) = [k for k in row if k not in ("time", "_measurement")]
        return row[column]

    totals = api["totals"]
    assert close(got[("totals", "", "idle_gpu_hours")], dash("Idle GPU-hours"))
    assert close(got[("totals", "", "idle_gpu_hours")], totals["idle_gpu_hours"])
    assert close(got[("totals", "", "allocated_idle_gpu_hours")], dash("Allocated-idle GPU-hours"))
    assert close(got[("totals", "", "allocated_idle_gpu_hours")], totals["gpu_hours"]["allocated_idle"])
    assert close(got[("totals", "", "unavailable_gpu_hours")], dash("Unavailable GPU-hours"))
    assert close(got[("totals", "", "idle_share_pct")], dash("Idle share of GPU-time"))
    assert close(got[("totals", "", "idle_value")], dash("Idle value ($currency)"))
    assert close(got[("totals", "", "gpu_hours")], sum(totals["gpu_hours"].values()))

    # By model and by site / cluster / pool: the dashboards' breakdown tables, row for row.
    by_model = {r["model"]: r for r in panel_rows(influxd, "capmon-fleet", "Idle capacity by model")}
    assert {k[1] for k in got if k[0] == "by_model"} == set(by_model) == set(api["by_model"])
    for model, row in by_model.items():
        assert close(got[("by_model", model, "idle_gpu_hours")], row["idle GPU-hours"])
        assert close(got[("by_model", model, "idle_gpu_hours")], api["by_model"][model]["idle_gpu_hours"])
        assert close(got[("by_model", model, "idle_value")], column(row, "idle value"))
        assert close(got[("by_model", model, "idle_share_pct")], row["idle share"])
    by_group = panel_rows(influxd, "capmon-fleet", "Idle capacity by site / cluster / pool")
    for row in by_group:
        key = "/".join(row[k] or "(none)" for k in ("site", "cluster", "pool"))
        assert close(got[("by_group", key, "idle_gpu_hours")], row["idle GPU-hours"]), key
        assert close(got[("by_group", key, "allocated_idle_gpu_hours")], row["allocated-idle GPU-hours"])
    assert len({k[1] for k in got if k[0] == "by_group"}) == len(by_group)

    # Holders: the dashboard's "Allocated idle by user" and /api/v1/holders?by=user.
    holders = {r["user"]: r for r in panel_rows(influxd, "capmon-fleet", "Allocated idle by user")}
    api_holders = {h["holder"]: h for h in api["_holders"]["user"]["holders"]}
    for user, row in holders.items():
        assert close(got[("holders", user, "allocated_idle_gpu_hours")], row["allocated-idle GPU-hours"])
        assert close(got[("holders", user, "idle_value")], column(row, "allocated-idle value"))
        assert close(
            got[("holders", user, "allocated_idle_gpu_hours")], api_holders[user]["allocated_idle_gpu_hours"]
        )

    # Idle now: the devices /api/v1/devices?state=idle lists at the end of the range, longest first.
    streaks = [k[1] for k in got if k[0] == "streaks"]
    api_idle = [f"{d['host']}/{d['device_id']}" for d in api["_devices"]["devices"]]
    assert sorted(streaks) == sorted(api_idle)
    assert [got[("streaks", s, "idle_for_s")] for s in streaks] == sorted(
        (got[("streaks", s, "idle_for_s")] for s in streaks), reverse=True
    )

    # The stacked shares of each bucket add up to the whole reported time.
    buckets = {k[1] for k in got if k[0] == "over_time"}
    assert len(buckets) > 10
    for b in buckets:
        total = sum(
            got[("over_time", b, f"{s}_pct")] for s in ("busy", "allocated_idle", "free", "unavailable")
        )
        assert close(total, 100.0, 1e-9), b
    # Devices unavailable most: the script's lost H100 is one, unavailable the whole range.
    unavailable = {k[1]: v for k, v in got.items() if k[0] == "unavailable"}
    assert close(sum(unavailable.values()), totals["device_hours"]["unavailable"])


@pytest.mark.integration
def test_filters_narrow_every_figure_to_the_chosen_model(filled, tmp_path):
    influxd, api = filled
    got = report_csv(influxd, tmp_path, "--model", H100)
    assert {k[1] for k in got if k[0] == "by_model"} == {H100}
    assert close(got[("totals", "", "idle_gpu_hours")], api["by_model"][H100]["idle_gpu_hours"])
    (h100_row,) = panel_rows(influxd, "capmon-fleet", "Idle GPU-hours", model=H100)
    assert close(got[("totals", "", "idle_gpu_hours")], h100_row["sum"])
    store = InfluxQL(influxd.url, DB)
    data = collect(store, SINCE, UNTIL, {"model": H100})
    assert all(r.get("model") == H100 for r in data.streaks)
    assert PRICES["H100"]  # priced: the value is not a zero that would match anything
    assert data.totals["idle_value"] > 0


@pytest.mark.integration
def test_energy_figures_appear_only_once_the_store_has_them(filled, tmp_path):
    influxd, _ = filled
    # A store from an older collector, which wrote no energy fields: no energy figures, not zeros.
    influxd.create_database("capmon_no_energy")
    influxd.write(
        "capmon_no_energy",
        f"capmon_device,host=e1,device=E0,model=X idle_gpu_s=60,window_gpu_s=60 {SINCE + 60}",
    )
    md = tmp_path / "r.md"
    argv = [*RANGE, "--format", "md", "--out", str(md), "--influx-url", influxd.url]
    assert main([*argv, "--influx-db", "capmon_no_energy"]) == 0
    assert "kWh" not in md.read_text()
    # The collector writes these fields (issue 16 item 1); one point is enough to show them.
    influxd.create_database("capmon_e")
    influxd.write(
        "capmon_e",
        "capmon_device,host=e1,device=E0,model=X idle_gpu_s=60,window_gpu_s=60,idle_energy_j=3600000,"
        f"idle_energy_cost=0.25 {SINCE + 60}",
    )
    got = report_csv(influxd, tmp_path, "--influx-db", "capmon_e")
    assert got[("totals", "", "idle_energy_kwh")] == 1.0
    assert got[("totals", "", "idle_energy_cost")] == 0.25


@pytest.mark.integration
async def test_the_html_report_works_offline_in_chromium_and_shows_the_store_numbers(filled, tmp_path):
    pytest.importorskip(
        "matplotlib", reason="the html report's charts need matplotlib: pip install 'capmon[report]'"
    )
    influxd, api = filled
    out = tmp_path / "report.html"
    assert (
        main(
            [*RANGE, "--format", "html", "--out", str(out), "--influx-url", influxd.url, "--currency", "USD"]
        )
        == 0
    )
    text = out.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text
    playwright, _ = async_playwright()
    async with playwright as p:
        browser = await launch(p)
        context = await browser.new_context(offline=True)
        page = await context.new_page()
        seen = Recorder()
        seen.attach(page)
        await page.goto(out.as_uri())
        figures = {
            label: await page.inner_text(f'[data-figure="{label}"]')
            for label in ("idle GPU-hours", "idle value", "allocated-idle GPU-hours")
        }
        assert figures["idle GPU-hours"] == _num(api["totals"]["idle_gpu_hours"])
        (idle_value,) = panel_rows(influxd, "capmon-fleet", "Idle value ($currency)")
        assert figures["idle value"] == f"{_num(idle_value['sum'])} USD"
        # Every chart is an inline image that decoded; nothing was fetched but the file itself.
        sizes = await page.eval_on_selector_all("figure img", "imgs => imgs.map(i => i.naturalWidth)")
        assert len(sizes) == 3 and all(w > 100 for w in sizes), sizes
        assert [u for u, _ in seen.requests if not u.startswith(("file:", "data:"))] == []
        rows = await page.locator("#by_model tbody tr").all_inner_texts()
        assert {r.split("\t")[0] for r in rows} == set(api["by_model"])
        await screenshots(page, tmp_path, "report")
        await page.set_viewport_size(PHONE)
        pdf = tmp_path / "report.pdf"
        await page.pdf(path=str(pdf), format="A4")
        assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 20_000
        assert seen.errors == [] and seen.console_errors == []
        await browser.close()
