"""Prometheus text-format metrics, hand-written: counters, gauges read at scrape time, and a latency histogram."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.n += 1


class Metrics:
    """The service's counters; `render()` gives the /metrics body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.latency: dict[tuple[tuple[str, str], ...], _Histogram] = {}
        self.images: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.rejected: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.batches = _Histogram(BATCH_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], dict[tuple[tuple[str, str], ...], float]]]] = {}

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        with self._lock:
            self.requests[(("route", route), ("method", method), ("status", str(status)))] += 1
            key = (("route", route),)
            if key not in self.latency:
                self.latency[key] = _Histogram(LATENCY_BUCKETS)
            self.latency[key].observe(seconds)

    def cloaked(self, method: str, n: int = 1) -> None:
        """Count photos cloaked by `method`."""
        with self._lock:
            self.images[(("method", method),)] += n

    def reject(self, reason: str) -> None:
        """Count a refusal by reason (queue_full, too_large, ...)."""
        with self._lock:
            self.rejected[(("reason", reason),)] += 1

    def batch(self, size: int) -> None:
        """Record one RID forward pass of `size` photos."""
        with self._lock:
            self.batches.observe(size)

    def gauge(self, name: str, help_text: str, read: Callable[[], dict[tuple[tuple[str, str], ...], float]]) -> None:
        """A gauge whose values are read at scrape time."""
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        lines: list[str] = []
        with self._lock:
            self._counter(lines, "noclone_requests_total", "HTTP requests answered", self.requests)
            lines += ["# HELP noclone_request_duration_seconds Time to answer a request",
                      "# TYPE noclone_request_duration_seconds histogram"]
            for key, hist in sorted(self.latency.items()):
                self._histogram(lines, "noclone_request_duration_seconds", key, hist)
            self._counter(lines, "noclone_images_cloaked_total", "Photos cloaked", self.images)
            self._counter(lines, "noclone_rejected_total", "Requests refused by a limit", self.rejected)
            lines += ["# HELP noclone_rid_batch_size Photos per RID forward pass",
                      "# TYPE noclone_rid_batch_size histogram"]
            self._histogram(lines, "noclone_rid_batch_size", (), self.batches)
        for name, (help_text, read) in sorted(self.gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for key, value in sorted(read().items()):
                lines.append(f"{name}{_labels(key)} {_number(value)}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _counter(lines: list[str], name: str, help_text: str, values: dict) -> None:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        for key, value in sorted(values.items()):
            lines.append(f"{name}{_labels(key)} {value}")

    @staticmethod
    def _histogram(lines: list[str], name: str, key: tuple[tuple[str, str], ...], hist: _Histogram) -> None:
        for edge, count in zip(hist.buckets, hist.counts):
            lines.append(f"{name}_bucket{_labels(key + (('le', _number(edge)),))} {count}")
        lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {hist.n}")
        lines.append(f"{name}_sum{_labels(key)} {_number(hist.total)}")
        lines.append(f"{name}_count{_labels(key)} {hist.n}")


def _number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(float(value))
    return repr(float(value))
