"""Prometheus text-format metrics, kept in process (no client library needed for a handful).

Counters only go up; gauges are set; histograms count observations into fixed buckets.
`Registry.render()` produces the text exposition format served at `/metrics`.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar


@dataclass
class Counter:
    name: str
    help: str
    value: float = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def render(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} counter",
            f"{self.name} {_number(self.value)}",
        ]


@dataclass
class Gauge:
    """A value read when scraped: either set directly or computed by `source`."""

    name: str
    help: str
    value: float = 0.0
    source: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        self.value = value

    def render(self) -> list[str]:
        value = self.source() if self.source is not None else self.value
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {_number(value)}",
        ]


@dataclass
class Histogram:
    name: str
    help: str
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.buckets = sorted(self.buckets)
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {_number(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


Metric = Counter | Gauge | Histogram
M = TypeVar("M", Counter, Gauge, Histogram)


class Registry:
    """The metrics of one service instance, in the order they were made."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def counter(self, name: str, help: str) -> Counter:
        return self._add(Counter(name, help))

    def gauge(self, name: str, help: str, source: Callable[[], float] | None = None) -> Gauge:
        return self._add(Gauge(name, help, source=source))

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> Histogram:
        return self._add(Histogram(name, help, buckets))

    def _add(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
