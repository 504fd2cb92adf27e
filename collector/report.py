"""`capmon report`: idle capacity over a time range, read from the store, as one self-contained file.

The numbers are InfluxQL sums over the schema in collector/README.md, the same expressions the
Grafana dashboards use (dashboards/generate.py): idle GPU-hours `SUM(idle_gpu_s) / 3600`, idle share
`SUM(idle_gpu_s) / SUM(window_gpu_s)`, idle value `SUM(idle_value)`, holders from `capmon_holder`.
InfluxQL runs on InfluxDB 1.x, on 2.x through a DBRP mapping (`--influx-db` is the mapped database)
and on 3.x. HTML charts come from matplotlib (the optional extra `report`), embedded as SVG
data URIs, so the file works offline and prints to PDF; md and csv need nothing beyond capmon.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .config import install_hint

__all__ = [
    "FORMATS",
    "InfluxQL",
    "QueryError",
    "ReportData",
    "collect",
    "parse_time",
    "register_report",
    "render",
]

FORMATS = ("html", "md", "csv")
STATES = ("busy", "allocated_idle", "free", "unavailable")
STATE_TEXT = {
    "busy": "busy",
    "allocated_idle": "allocated idle",
    "free": "free",
    "unavailable": "unavailable",
}
# The dashboards' colours (Grafana's blue, orange, green, red).
STATE_COLORS = {"busy": "#3274d9", "allocated_idle": "#ff9830", "free": "#56a64b", "unavailable": "#e02f44"}
FILTER_TAGS = ("site", "cluster", "pool", "model")
TOP = 15


class QueryError(Exception):
    """The store refused or could not answer a query; the message names the store and why."""


# -- time ------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: float, *, field_name: str) -> int:
    """`7d` / `90m` (that long before `now`), unix seconds, or ISO 8601 (`2025-10-01T00:00Z`) → unix s."""
    text = text.strip()
    m = _DURATION.match(text)
    if m:
        return int(now - float(m.group(1)) * _UNIT_S[m.group(2)])
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return int(float(text))
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{field_name}: {text[:40]!r} is not a duration (7d, 12h, 90m), unix seconds or ISO 8601 time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp())


def _step_s(span_s: int) -> int:
    """A chart bucket: about 100 of them over the range, on a round length."""
    for step in (10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400):
        if span_s / step <= 120:
            return step
    return 7 * 86400


# -- the store -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InfluxQL:
    """An InfluxQL endpoint (`/query`): 1.x, 2.x (DBRP), 3.x. Secrets stay out of URLs and reprs."""

    url: str
    db: str = "capmon"
    rp: str = ""
    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    timeout_s: float = 30.0

    def query(self, q: str) -> list[dict[str, Any]]:
        """Every series of every statement: `{"name", "tags", "columns", "values"}`."""
        params = urllib.parse.urlencode(
            {"db": self.db, "q": q, "epoch": "s", **({"rp": self.rp} if self.rp else {})}
        )
        req = urllib.request.Request(f"{self.url.rstrip('/')}/query", data=params.encode(), method="POST")
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
        if self.token:
            req.add_header("Authorization", f"Token {self.token}")
        elif self.user:
            basic = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            req.add_header("Authorization", f"Basic {basic}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            raise QueryError(f"{self.url}: HTTP {exc.code}: {detail.strip()}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise QueryError(f"{self.url}: cannot query: {reason}") from None
        except ValueError:
            raise QueryError(f"{self.url}: the answer is not InfluxQL JSON") from None
        out: list[dict[str, Any]] = []
        for result in body.get("results", []):
            if "error" in result:
                raise QueryError(f"{self.url}: {result['error']}")
            out.extend(result.get("series", []))
        return out

    def rows(self, q: str) -> list[dict[str, Any]]:
        """Each row as column → value, with its series' tags merged in."""
        out = []
        for series in self.query(q):
            tags = series.get("tags") or {}
            for values in series.get("values", []):
                row = dict(zip(series["columns"], values, strict=True))
                row.update(tags)
                out.append(row)
        return out


def _quote_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _quote_str(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- what the report holds ---------------------------------------------------------------------------


@dataclass
class ReportData:
    since: int
    until: int
    filters: dict[str, str]
    group_keys: tuple[str, ...]
    currency: str
    step_s: int
    totals: dict[str, float | None]
    by_model: list[dict[str, Any]]
    by_group: list[dict[str, Any]]
    over_time: list[dict[str, float]]
    streaks: list[dict[str, Any]]
    holders: list[dict[str, Any]]
    unavailable: list[dict[str, Any]]
    generated_at: float = 0.0

    @property
    def has_energy(self) -> bool:
        return self.totals.get("idle_energy_kwh") is not None


# SUM over capmon_device, named as the report shows them; absent fields come back as None.
_SUMS = (
    'SUM("window_gpu_s") AS "window_gpu_s", SUM("idle_gpu_s") AS "idle_gpu_s", '
    'SUM("allocated_idle_gpu_s") AS "allocated_idle_gpu_s", SUM("idle_value") AS "idle_value", '
    'SUM("idle_energy_j") AS "idle_energy_j", SUM("idle_energy_cost") AS "idle_energy_cost"'
)


def _figures(row: Mapping[str, Any], unavailable_gpu_s: float | None = None) -> dict[str, float | None]:
    window = row.get("window_gpu_s") or 0.0
    idle = row.get("idle_gpu_s") or 0.0
    energy = row.get("idle_energy_j")
    return {
        "idle_gpu_hours": idle / 3600,
        "allocated_idle_gpu_hours": (row.get("allocated_idle_gpu_s") or 0.0) / 3600,
        "gpu_hours": window / 3600,
        "idle_share_pct": 100 * idle / window if window else None,
        "idle_value": row.get("idle_value") or 0.0,
        "idle_energy_kwh": None if energy is None else energy / 3.6e6,
        "idle_energy_cost": row.get("idle_energy_cost"),
        **({} if unavailable_gpu_s is None else {"unavailable_gpu_hours": unavailable_gpu_s / 3600}),
    }


def collect(
    store: InfluxQL,
    since: int,
    until: int,
    filters: Mapping[str, str] | None = None,
    group_keys: Sequence[str] = ("site", "cluster", "pool"),
    now_window_s: int = 180,
    currency: str = "",
) -> ReportData:
    """Run the report's queries for `[since, until]` (unix seconds; the dashboards' `$timeFilter`)."""
    filters = {k: v for k, v in (filters or {}).items() if v}
    where_tags = "".join(f" AND {_quote_ident(k)} = {_quote_str(v)}" for k, v in sorted(filters.items()))
    rng = f"time >= {since}s AND time <= {until}s{where_tags}"
    prefix = f"{_quote_ident(store.db)}.{_quote_ident(store.rp)}." if store.rp else ""
    dev, holder = f'{prefix}"capmon_device"', f'{prefix}"capmon_holder"'
    unavail = (
        f'SELECT SUM("u") AS "u" FROM (SELECT "unavailable_s" * "gpu_fraction" AS "u" FROM {dev} WHERE {rng})'
    )
    step = _step_s(until - since)

    total_rows = store.rows(f"SELECT {_SUMS} FROM {dev} WHERE {rng}")
    unavail_rows = store.rows(unavail)
    totals = _figures(
        total_rows[0] if total_rows else {}, (unavail_rows[0]["u"] or 0.0) if unavail_rows else 0.0
    )

    def breakdown(keys: Sequence[str]) -> list[dict[str, Any]]:
        group = ", ".join(_quote_ident(k) for k in keys)
        out = []
        for row in store.rows(f"SELECT {_SUMS} FROM {dev} WHERE {rng} GROUP BY {group}"):
            out.append({"key": {k: row.get(k) or "" for k in keys}, **_figures(row)})
        out.sort(key=lambda r: (-r["idle_value"], -r["idle_gpu_hours"], tuple(r["key"].values())))
        return out

    over: dict[int, dict[str, float]] = {}
    grouped = f" GROUP BY time({step}s) fill(none)"
    for row in store.rows(f"SELECT {_SUMS} FROM {dev} WHERE {rng}{grouped}"):
        over[row["time"]] = {
            "time": row["time"],
            "window": row.get("window_gpu_s") or 0.0,
            "idle": row.get("idle_gpu_s") or 0.0,
            "allocated_idle": row.get("allocated_idle_gpu_s") or 0.0,
            "unavailable": 0.0,
        }
    for row in store.rows(unavail.replace(f"WHERE {rng})", f"WHERE {rng}) WHERE {rng}{grouped}", 1)):
        if row["time"] in over:
            over[row["time"]]["unavailable"] = row["u"] or 0.0
    series = []
    for point in sorted(over.values(), key=lambda p: p["time"]):
        w = point["window"]
        if not w:
            continue
        free = point["idle"] - point["allocated_idle"]
        busy = max(w - point["idle"] - point["unavailable"], 0.0)
        series.append(
            {
                "time": point["time"],
                "busy": 100 * busy / w,
                "allocated_idle": 100 * point["allocated_idle"] / w,
                "free": 100 * free / w,
                "unavailable": 100 * point["unavailable"] / w,
            }
        )

    # Idle at the end of the range: each device's latest window in the `now_window_s` before it
    # (the dashboards' "Longest-idle devices").
    now = f"time > {until}s - {now_window_s}s AND time <= {until}s{where_tags}"
    streaks = store.rows(
        'SELECT "idle_for_s", "in_state_s", "idle_since", "state", "gpu_fraction", "reason" FROM (SELECT '
        'LAST("state_code") AS "code", "idle_for_s", "in_state_s", "idle_since", "state", "gpu_fraction", '
        f'"reason" FROM {dev} WHERE {now} GROUP BY "host", "device", "model") WHERE "code" = 1 OR "code" = 2 '
        'GROUP BY "host", "device", "model"'
    )
    streaks.sort(key=lambda r: (-(r.get("idle_for_s") or 0.0), r.get("host") or "", r.get("device") or ""))

    holders = [
        {
            "user": r.get("user") or "",
            "idle_value": r.get("idle_value") or 0.0,
            "allocated_idle_gpu_hours": (r.get("gpu_s") or 0.0) / 3600,
        }
        for r in store.rows(
            'SELECT SUM("idle_value") AS "idle_value", SUM("allocated_idle_gpu_s") AS "gpu_s" '
            f'FROM {holder} WHERE {rng} GROUP BY "user"'
        )
    ]
    holders.sort(key=lambda r: (-r["idle_value"], -r["allocated_idle_gpu_hours"], r["user"]))

    unavailable = [
        {
            "host": r.get("host") or "",
            "device": r.get("device") or "",
            "model": r.get("model") or "",
            "unavailable_hours": (r.get("u") or 0.0) / 3600,
            "share_pct": 100 * (r.get("u") or 0.0) / r["w"] if r.get("w") else None,
        }
        for r in store.rows(
            'SELECT SUM("unavailable_s") AS "u", SUM("window_s") AS "w" '
            f'FROM {dev} WHERE {rng} GROUP BY "host", "device", "model"'
        )
        if (r.get("u") or 0.0) > 0
    ]
    unavailable.sort(key=lambda r: (-r["unavailable_hours"], r["host"], r["device"]))

    return ReportData(
        since=since,
        until=until,
        filters=dict(filters),
        group_keys=tuple(group_keys),
        currency=currency,
        step_s=step,
        totals=totals,
        by_model=breakdown(("model",)),
        by_group=breakdown(tuple(group_keys)),
        over_time=series,
        streaks=streaks,
        holders=holders,
        unavailable=unavailable,
        generated_at=time.time(),
    )


# -- rendering -------------------------------------------------------------------------------------


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s}s" if s else f"{m}m"
    return f"{s}s"


def _num(value: float | None) -> str:
    """Every figure of the report, cards and tables alike: three significant digits (whole numbers
    from 100 up), so the same figure reads the same everywhere and a few seconds' worth of GPU-hours
    (0.00412) is not shown as 0.00."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= 2:
        return f"{value:,.0f}"
    text = f"{value:,.{min(MAX_DECIMALS, 2 - magnitude)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# Below 10^-6 a figure reads 0: a millionth of a GPU-hour is 4 ms.
MAX_DECIMALS = 6
# The unit of values when the store does not say (it holds no currency): the generic currency sign.
NO_CURRENCY = "¤"


class Table:
    """One table of the report: a title, a one-line explanation, headers and formatted rows."""

    def __init__(
        self, title: str, note: str, headers: Sequence[str], rows: Sequence[Sequence[str]], slug: str
    ):
        self.title, self.note, self.headers, self.rows, self.slug = title, note, list(headers), rows, slug


def _money(data: ReportData) -> str:
    return f" ({data.currency or NO_CURRENCY})"


def _currency_note(data: ReportData) -> str:
    """Said wherever values are shown without --currency: the store keeps prices, not their currency."""
    if data.currency:
        return ""
    return (
        f" Values ({NO_CURRENCY}) are priced with the collector's [pricing], whose currency the store does "
        "not hold: pass --currency (e.g. --currency USD) to name it."
    )


def tables(data: ReportData) -> list[Table]:
    """The report's tables, in order: what html, md and csv all show."""
    t = data.totals
    cur = _money(data)
    summary_rows = [
        ["idle GPU-hours", _num(t["idle_gpu_hours"])],
        ["allocated-idle GPU-hours", _num(t["allocated_idle_gpu_hours"])],
        ["unavailable GPU-hours", _num(t.get("unavailable_gpu_hours"))],
        ["reported GPU-hours", _num(t["gpu_hours"])],
        ["idle share of GPU-time (%)", _num(t["idle_share_pct"])],
        [f"idle value{cur}", _num(t["idle_value"])],
    ]
    if data.has_energy:
        summary_rows.append(["idle energy (kWh)", _num(t["idle_energy_kwh"])])
    if t.get("idle_energy_cost") is not None:
        summary_rows.append([f"idle energy cost{cur}", _num(t["idle_energy_cost"])])
    out = [
        Table(
            "Summary",
            "Over the whole range, in GPU-equivalents (a MIG instance counts as its share)."
            + _currency_note(data),
            ["figure", "value"],
            summary_rows,
            "summary",
        )
    ]

    def breakdown_headers(first: Sequence[str]) -> list[str]:
        h = [*first, "idle GPU-hours", "idle share (%)", f"idle value{cur}", "allocated-idle GPU-hours"]
        if data.has_energy:
            h.append("idle energy (kWh)")
        if t.get("idle_energy_cost") is not None:
            h.append(f"idle energy cost{cur}")
        return h

    def breakdown_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
        out_rows = []
        for r in rows:
            cells = [
                *(v or "(none)" for v in r["key"].values()),
                _num(r["idle_gpu_hours"]),
                _num(r["idle_share_pct"]),
                _num(r["idle_value"]),
                _num(r["allocated_idle_gpu_hours"]),
            ]
            if data.has_energy:
                cells.append(_num(r["idle_energy_kwh"]))
            if t.get("idle_energy_cost") is not None:
                cells.append(_num(r["idle_energy_cost"]))
            out_rows.append(cells)
        return out_rows

    out.append(
        Table(
            "Idle capacity by model",
            "Most idle value first.",
            breakdown_headers(["model"]),
            breakdown_rows(data.by_model),
            "by_model",
        )
    )
    out.append(
        Table(
            f"Idle capacity by {' / '.join(data.group_keys)}",
            "Most idle value first.",
            breakdown_headers(data.group_keys),
            breakdown_rows(data.by_group),
            "by_group",
        )
    )
    out.append(
        Table(
            "Longest idle now",
            f"Devices idle at {_iso(data.until)} (their latest window), longest idle streak first: what can be rented now.",
            ["host", "device", "model", "state", "idle for", "in this state for", "idle since"],
            [
                [
                    r.get("host") or "",
                    r.get("device") or "",
                    r.get("model") or "",
                    STATE_TEXT.get(r.get("state") or "", r.get("state") or ""),
                    _dur(r.get("idle_for_s")),
                    _dur(r.get("in_state_s")),
                    _iso(r.get("idle_since")),
                ]
                for r in data.streaks[:TOP]
            ],
            "streaks",
        )
    )
    out.append(
        Table(
            "Top holders of allocated-idle capacity",
            "capmon_holder: SUM(idle_value) and SUM(allocated_idle_gpu_s) by user; a device held by several is split evenly.",
            ["user", f"allocated-idle value{cur}", "allocated-idle GPU-hours"],
            [
                [r["user"] or "(unknown)", _num(r["idle_value"]), _num(r["allocated_idle_gpu_hours"])]
                for r in data.holders[:TOP]
            ],
            "holders",
        )
    )
    out.append(
        Table(
            "Devices unavailable most",
            "Hours each device could not be read, was unhealthy or its agent silent, and the share of its reported time.",
            ["host", "device", "model", "unavailable hours", "share (%)"],
            [
                [r["host"], r["device"], r["model"], _num(r["unavailable_hours"]), _num(r["share_pct"])]
                for r in data.unavailable[:TOP]
            ],
            "unavailable",
        )
    )
    return out


def _title(data: ReportData) -> str:
    scope = ", ".join(f"{k}={v}" for k, v in sorted(data.filters.items()))
    return f"capmon idle capacity report: {_iso(data.since)} – {_iso(data.until)}" + (
        f" ({scope})" if scope else ""
    )


def render_md(data: ReportData) -> str:
    lines = [f"# {_title(data)}", "", f"Generated {_iso(data.generated_at)} by `capmon report`.", ""]
    for t in tables(data):
        lines += [f"## {t.title}", "", t.note, ""]
        if not t.rows:
            lines += ["(none)", ""]
            continue
        esc = [[c.replace("|", "\\|") for c in row] for row in [t.headers, *t.rows]]
        lines.append("| " + " | ".join(esc[0]) + " |")
        lines.append("|" + "|".join("---" for _ in esc[0]) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
        lines.append("")
    return "\n".join(lines)


def render_csv(data: ReportData) -> str:
    """Long form, one number per row: `section,key,metric,value` (`key` joins the group's tags with `/`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "key", "metric", "value"])
    for name, value in data.totals.items():
        if value is not None:
            w.writerow(["totals", "", name, repr(float(value))])
    for section, rows in (("by_model", data.by_model), ("by_group", data.by_group)):
        for r in rows:
            key = "/".join(v or "(none)" for v in r["key"].values())
            for name, value in r.items():
                if name != "key" and value is not None:
                    w.writerow([section, key, name, repr(float(value))])
    for p in data.over_time:
        for s in STATES:
            w.writerow(["over_time", _iso(p["time"]), f"{s}_pct", repr(float(p[s]))])
    for r in data.streaks:
        w.writerow(
            [
                "streaks",
                f"{r.get('host')}/{r.get('device')}",
                "idle_for_s",
                repr(float(r.get("idle_for_s") or 0)),
            ]
        )
    for r in data.holders:
        w.writerow(["holders", r["user"], "idle_value", repr(float(r["idle_value"]))])
        w.writerow(
            ["holders", r["user"], "allocated_idle_gpu_hours", repr(float(r["allocated_idle_gpu_hours"]))]
        )
    for r in data.unavailable:
        w.writerow(
            [
                "unavailable",
                f"{r['host']}/{r['device']}",
                "unavailable_hours",
                repr(float(r["unavailable_hours"])),
            ]
        )
    return buf.getvalue()


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(
            f"--format html draws its charts with matplotlib: {install_hint('report')} (or use --format md/csv)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "svg.hashsalt": "capmon"})
    return plt


def _svg(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def charts(data: ReportData) -> list[tuple[str, str]]:
    """(caption, data URI) per chart."""
    plt = _pyplot()
    out = []
    if data.over_time:
        fig, ax = plt.subplots(figsize=(9, 3.2))
        xs = [datetime.fromtimestamp(p["time"], timezone.utc) for p in data.over_time]
        ax.stackplot(
            xs,
            *[[p[s] for p in data.over_time] for s in STATES],
            labels=[STATE_TEXT[s] for s in STATES],
            colors=[STATE_COLORS[s] for s in STATES],
            alpha=0.85,
        )
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of GPU-time")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        ax.grid(axis="y", alpha=0.3)
        fig.autofmt_xdate()
        out.append((f"GPU-time by state, per {_dur(data.step_s)} (UTC)", _svg(fig)))
        plt.close(fig)
    for rows, what in ((data.by_model, "model"), (data.by_group, " / ".join(data.group_keys))):
        rows = rows[:TOP]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.0))
        names = [" / ".join(v or "(none)" for v in r["key"].values()) for r in rows][::-1]
        alloc = [r["allocated_idle_gpu_hours"] for r in rows][::-1]
        free = [r["idle_gpu_hours"] - r["allocated_idle_gpu_hours"] for r in rows][::-1]
        ax.barh(names, alloc, color=STATE_COLORS["allocated_idle"], label="allocated idle")
        ax.barh(names, free, left=alloc, color=STATE_COLORS["free"], label="free")
        ax.set_xlabel("idle GPU-hours")
        ax.legend(loc="lower right", frameon=False)
        ax.grid(axis="x", alpha=0.3)
        out.append((f"Idle GPU-hours by {what}", _svg(fig)))
        plt.close(fig)
    return out


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;margin:0 auto;max-width:1000px;padding:16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 4px;break-after:avoid}
p.note{color:#5b6475;margin:0 0 8px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #d8dde6;border-radius:8px;padding:8px 12px;min-width:140px;flex:1}
.card b{display:block;font-size:20px}.card span{color:#5b6475;font-size:12px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;break-inside:auto}
th,td{border-bottom:1px solid #e4e7ee;padding:4px 6px;text-align:left;vertical-align:top}
td.n,th.n{text-align:right}tr{break-inside:avoid}
.scroll{overflow-x:auto}
figure{margin:12px 0;break-inside:avoid}figure img{width:100%;height:auto}figcaption{color:#5b6475;font-size:12px}
@media print{body{max-width:none;padding:0}a{color:inherit}}
"""


def render_html(data: ReportData) -> str:
    e = html.escape
    t = data.totals
    cur = data.currency or NO_CURRENCY
    cards = [
        (_num(t["idle_gpu_hours"]), "idle GPU-hours"),
        (_num(t["idle_share_pct"]) + " %", "idle share of GPU-time"),
        (f"{_num(t['idle_value'])} {cur}", "idle value"),
        (_num(t["allocated_idle_gpu_hours"]), "allocated-idle GPU-hours"),
    ]
    if data.has_energy:
        cards.append((_num(t["idle_energy_kwh"]), "idle energy kWh"))
    if t.get("idle_energy_cost") is not None:
        cards.append((f"{_num(t['idle_energy_cost'])} {cur}", "idle energy cost"))
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        # The file runs nothing and loads nothing: its charts are data URIs, its style inline.
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        f"<title>{e(_title(data))}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(_title(data))}</h1>",
        f"<p class=note>Generated {e(_iso(data.generated_at))} by <code>capmon report</code> from InfluxDB "
        "(capmon_device, capmon_holder). GPU-equivalents: a MIG instance counts as its share of the GPU."
        f"{e(_currency_note(data))}</p>",
        "<div class=cards id=cards>"
        + "".join(
            f'<div class=card><b data-figure="{e(label)}">{e(v)}</b><span>{e(label)}</span></div>'
            for v, label in cards
        )
        + "</div>",
    ]
    for caption, uri in charts(data):
        parts.append(
            f'<figure><img alt="{e(caption)}" src="{uri}"><figcaption>{e(caption)}</figcaption></figure>'
        )
    for tb in tables(data):
        parts.append(f"<h2>{e(tb.title)}</h2><p class=note>{e(tb.note)}</p>")
        if not tb.rows:
            parts.append("<p>(none)</p>")
            continue
        numeric = [all(_looks_numeric(r[i]) for r in tb.rows) for i in range(len(tb.headers))]
        head = "".join(
            f"<th{' class=n' if n else ''}>{e(h)}</th>" for h, n in zip(tb.headers, numeric, strict=True)
        )
        body = "".join(
            "<tr>"
            + "".join(f"<td{' class=n' if n else ''}>{e(c)}</td>" for c, n in zip(r, numeric, strict=True))
            + "</tr>"
            for r in tb.rows
        )
        parts.append(
            f'<div class=scroll><table id="{tb.slug}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"-?[\d,]*\.?\d*", text)) and text != ""


def render(data: ReportData, fmt: str) -> str:
    if fmt == "html":
        return render_html(data)
    if fmt == "md":
        return render_md(data)
    if fmt == "csv":
        return render_csv(data)
    raise ValueError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")


# -- the command -----------------------------------------------------------------------------------


def register_report(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "report",
        help="idle capacity over a time range, from InfluxDB, as one html, md or csv file",
        description="Reads capmon's points from InfluxDB through InfluxQL (1.x; 2.x through a DBRP mapping; "
        "3.x) and writes a self-contained report: idle share by state over time, idle GPU-hours and value "
        "by model and by site/cluster/pool, the longest idle now, top holders, devices unavailable most. "
        "Secrets from the environment: $CAPMON_INFLUX_TOKEN (2.x/3.x), $CAPMON_INFLUX_USER and "
        "$CAPMON_INFLUX_PASSWORD (1.x).",
    )
    p.add_argument(
        "--since",
        default="7d",
        help="start: 7d, 12h, 90m before --until; unix seconds; ISO 8601 (default 7d)",
    )
    p.add_argument("--until", default="", help="end: like --since (default now)")
    for tag in FILTER_TAGS:
        p.add_argument(f"--{tag}", default="", help=f"only this {tag} (exact)")
    p.add_argument(
        "--group-by",
        default="site,cluster,pool",
        help="tags of the second breakdown (default site,cluster,pool)",
    )
    p.add_argument(
        "--format", choices=FORMATS, default="html", help="html (default; needs the report extra), md, csv"
    )
    p.add_argument("--out", default="-", help="file to write (default -, stdout)")
    p.add_argument(
        "--influx-url",
        default="http://127.0.0.1:8086",
        help="InfluxDB base URL (default http://127.0.0.1:8086)",
    )
    p.add_argument(
        "--influx-db", default="capmon", help="database (2.x/3.x: the bucket's DBRP database; default capmon)"
    )
    p.add_argument("--influx-rp", default="", help="retention policy (default: the database's default)")
    p.add_argument("--influx-user", default="", help="1.x user (or $CAPMON_INFLUX_USER)")
    p.add_argument(
        "--currency",
        default="",
        help="currency of idle_value, as the collector's [pricing] currency says (the store does not hold "
        f"it; without this option values are shown in {NO_CURRENCY}, with a note)",
    )
    p.add_argument(
        "--now-window",
        default="3m",
        help="'now' = each device's latest window this long before --until (default 3m)",
    )
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace, env: Mapping[str, str] | None = None, stdout=None) -> int:
    env = os.environ if env is None else env
    stdout = stdout or sys.stdout
    now = time.time()
    try:
        until = parse_time(args.until, now, field_name="--until") if args.until else int(now)
        since = parse_time(args.since, until, field_name="--since")
        if since >= until:
            raise ValueError(f"--since: {_iso(since)} is not before --until {_iso(until)}")
        m = _DURATION.match(args.now_window.strip())
        if not m:
            raise ValueError(f"--now-window: {args.now_window[:40]!r} is not a duration like 3m")
        now_window = int(float(m.group(1)) * _UNIT_S[m.group(2)])
        group_keys = tuple(k.strip() for k in args.group_by.split(",") if k.strip())
        if not group_keys:
            raise ValueError("--group-by: name at least one tag")
    except ValueError as exc:
        print(f"capmon report: {exc}", file=sys.stderr)
        return 2
    store = InfluxQL(
        url=args.influx_url,
        db=args.influx_db,
        rp=args.influx_rp,
        user=args.influx_user or env.get("CAPMON_INFLUX_USER", ""),
        password=env.get("CAPMON_INFLUX_PASSWORD", ""),
        token=env.get("CAPMON_INFLUX_TOKEN", ""),
    )
    filters = {tag: getattr(args, tag) for tag in FILTER_TAGS}
    try:
        data = collect(store, since, until, filters, group_keys, now_window, args.currency)
        text = render(data, args.format)
    except (QueryError, RuntimeError) as exc:
        print(f"capmon report: {exc}", file=sys.stderr)
        return 1
    if args.out == "-":
        stdout.write(text)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(
            f"capmon report: wrote {args.out} ({_iso(since)} – {_iso(until)}, {args.format})", file=sys.stderr
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m capmon.collector.report …` (the same as `capmon report …`)."""
    parser = argparse.ArgumentParser(prog="capmon")
    register_report(parser.add_subparsers(required=True))
    args = parser.parse_args(["report", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
