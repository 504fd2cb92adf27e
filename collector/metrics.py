"""The collector's own metrics, rendered in the Prometheus text format at `/metrics`."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), " ")}"'
        for k, v in pairs
    )
    return "{" + inner + "}" if inner else ""


def _num(value: float) -> str:
    return repr(float(value)) if value != int(value) or abs(value) > 2**53 else str(int(value))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(labels[n] for n in self.label_names)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(labels[n] for n in self.label_names), 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, value in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(zip(self.label_names, key, strict=True))} {_num(value)}")
        return out


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            cumulative += n
            out.append(f'{self.name}_bucket{{le="{bound!r}"}} {cumulative}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{self.name}_sum {_num(self.sum)}")
        out.append(f"{self.name}_count {self.count}")
        return out


class Gauge:
    """A value read at scrape time."""

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {_num(self.read())}",
        ]


class Metrics:
    def __init__(self) -> None:
        p = "capmon_collector_"
        self.requests = Counter(
            p + "requests_total", "HTTP requests by route and status.", ("route", "status")
        )
        self.rejects = Counter(p + "rejects_total", "Refused ingest requests by reason.", ("reason",))
        self.reports = Counter(
            p + "reports_total", "Reports accepted (stored, or live-only without storage)."
        )
        self.device_windows = Counter(p + "device_windows_total", "Device windows accepted.")
        self.duplicate_reports = Counter(
            p + "duplicate_reports_total", "Reports whose seq the live view had already seen (stored again)."
        )
        self.labels_dropped = Counter(
            p + "labels_dropped_total",
            "Agent labels ignored because their key is not in collector.label_keys.",
        )
        self.lines_written = Counter(p + "lines_written_total", "Line-protocol lines storage accepted.")
        self.limits_hit = Counter(
            p + "limits_hit_total",
            "Ingest requests refused for a per-agent bound (devices, values), by limit.",
            ("limit",),
        )
        self.malformed_requests = Counter(
            p + "malformed_requests_total", "Requests the HTTP parser refused (bad header, URL, framing)."
        )
        self.forgotten_agents = Counter(
            p + "forgotten_agents_total", "Agents dropped from the live view after forget_after_s of silence."
        )
        self.storage_errors = Counter(p + "storage_errors_total", "Failed storage writes by kind.", ("kind",))
        self.batch_lines = Histogram(
            p + "batch_lines", "Lines per storage write.", (1, 10, 100, 500, 1000, 2000, 5000, 10000)
        )
        self.write_seconds = Histogram(
            p + "write_seconds",
            "Storage write latency.",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge("capmon_collector_" + name, help, read))

    def render(self) -> str:
        lines: list[str] = []
        for m in (
            self.requests,
            self.rejects,
            self.reports,
            self.device_windows,
            self.duplicate_reports,
            self.labels_dropped,
            self.limits_hit,
            self.malformed_requests,
            self.forgotten_agents,
            self.lines_written,
            self.storage_errors,
            self.batch_lines,
            self.write_seconds,
            *self.gauges,
        ):
            lines.extend(m.render())
        return "\n".join(lines) + "\n"
