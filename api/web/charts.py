"""The metrics page: figures from the projections, laid out as bar charts for server-side SVG.

Per-day figures (throughput, gate failures, cost) come from the story-history projection,
read through ``ReadModels.history`` over the most recent ``HISTORY_WINDOW`` events; stage
dwell times come from ``ReadModels.metrics``. Functions here block.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from domain.stages import Stage

HISTORY_WINDOW = 20_000
"""Events read for the per-day charts: bounded, so the page costs the same on a long log."""
DAYS = 14
_BATCH = 10_000

WIDTH = 400
HEIGHT = 200
_TOP = 16
_BOTTOM = 40
_LEFT = 8


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    value: str


@dataclass(frozen=True)
class Chart:
    name: str
    title: str
    unit: str
    bars: list[Bar]
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def baseline(self) -> int:
        return self.height - _BOTTOM

    @property
    def empty(self) -> bool:
        return not self.bars


def bar_chart(name: str, title: str, unit: str, points: list[tuple[str, float, str]]) -> Chart:
    """``points``: (label, value, value as shown). Bars share one scale from zero."""
    if not points:
        return Chart(name, title, unit, [])
    top = max((value for _, value, _ in points), default=0.0) or 1.0
    slot = (WIDTH - _LEFT) / len(points)
    width = max(slot * 0.7, 1.0)
    usable = HEIGHT - _TOP - _BOTTOM
    bars = []
    for index, (label, value, shown) in enumerate(points):
        height = usable * max(value, 0.0) / top
        x = _LEFT + index * slot + (slot - width) / 2
        bars.append(
            Bar(
                round(x, 1),
                round(HEIGHT - _BOTTOM - height, 1),
                round(width, 1),
                round(height, 1),
                label,
                shown,
            )
        )
    return Chart(name, title, unit, bars)


def _recent_history(read_models: Any, head: int) -> list[dict[str, Any]]:
    after = max(head - HISTORY_WINDOW, 0)
    events: list[dict[str, Any]] = []
    while True:
        batch = read_models.history(None, after, _BATCH)
        events.extend(batch)
        if len(batch) < _BATCH:
            return events
        after = batch[-1]["position"]


def metrics_page(read_models: Any) -> dict[str, Any]:
    metrics = read_models.metrics()
    history = _recent_history(read_models, int(metrics.get("events_total") or 0))
    done: dict[str, int] = defaultdict(int)
    passed: dict[str, int] = defaultdict(int)
    failed: dict[str, int] = defaultdict(int)
    cost: dict[str, float] = defaultdict(float)
    for event in history:
        if event.get("aggregate", "story") != "story":
            continue
        day = str(event["timestamp"])[:10]
        kind = event["type"]
        if kind == "MergeSucceeded":
            done[day] += 1
        elif kind == "GatesPassed":
            passed[day] += 1
        elif kind == "GatesFailed":
            failed[day] += 1
        elif kind == "AgentExited":
            cost[day] += float((event.get("data") or {}).get("cost_usd") or 0.0)
    days = sorted(set(done) | set(passed) | set(failed) | set(cost))[-DAYS:]
    throughput = bar_chart(
        "throughput",
        "Stories merged per day",
        "stories",
        [(day[5:], float(done.get(day, 0)), str(done.get(day, 0))) for day in days],
    )
    rates = []
    for day in days:
        runs = passed.get(day, 0) + failed.get(day, 0)
        share = failed.get(day, 0) / runs if runs else 0.0
        rates.append((day[5:], share, f"{share:.0%} of {runs}"))
    gate_failures = bar_chart("gate-failures", "Gate runs that failed, per day", "share", rates)
    spend = bar_chart(
        "cost",
        "Agent cost per day",
        "USD",
        [(day[5:], cost.get(day, 0.0), f"${cost.get(day, 0.0):.2f}") for day in days],
    )
    dwell_points = []
    entries = metrics.get("stage_entries_total", {})
    seconds = metrics.get("stage_seconds_total", {})
    for stage in Stage:
        if stage.value in ("done", "archived"):
            continue  # final stages: a story stays there for good
        count = int(entries.get(stage.value) or 0)
        average = float(seconds.get(stage.value) or 0.0) / count if count else 0.0
        dwell_points.append((stage.value, average, _short_duration(average)))
    dwell = bar_chart("dwell", "Average time in each stage", "seconds", dwell_points)
    return {
        "metrics": metrics,
        "charts": [throughput, dwell, gate_failures, spend, review_scores(metrics)],
        "window": len(history),
        "reviews": review_summary(metrics),
    }


def review_scores(metrics: dict[str, Any]) -> Chart:
    """Concluded reviews per score bucket (from the metrics projection, every review ever,
    not only the per-day window); empty until a review is concluded."""
    buckets = metrics.get("review_score_buckets") or {}
    if not any(buckets.values()):
        return bar_chart("review-scores", "Concluded reviews by score", "reviews", [])
    points = [(f"≤{bound}", float(n), str(n)) for bound, n in buckets.items()]
    return bar_chart("review-scores", "Concluded reviews by score", "reviews", points)


def review_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    results = metrics.get("reviews_total") or {}
    passed, failed = int(results.get("passed", 0)), int(results.get("failed", 0))
    rate = metrics.get("review_pass_rate")
    count = int(metrics.get("review_score_count") or 0)
    mean = float(metrics.get("review_score_sum") or 0.0) / count if count else None
    return {
        "passed": passed,
        "failed": failed,
        "total": passed + failed,
        "pass_rate": f"{rate:.0%}" if rate is not None else None,
        "mean_score": f"{mean:.2f}" if mean is not None else None,
    }


def _short_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds / 60:.1f}m"
    return f"{seconds:.0f}s"


__all__ = ["Bar", "Chart", "bar_chart", "metrics_page", "review_scores", "review_summary"]
