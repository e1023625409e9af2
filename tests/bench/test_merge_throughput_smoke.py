"""Row 9 (merge throughput) end to end on a tiny queue: three stories, a short real gate,
k = 2, one failing; no timing is asserted (``python -m bench`` measures)."""

from __future__ import annotations

from pathlib import Path

from bench.common import Settings
from bench.merge_throughput import _busy, _scenario


def test_busy_time_is_the_union_of_the_gate_runs() -> None:
    assert _busy([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == 4.0
    assert _busy([]) == 0.0


def test_a_tiny_queue_lands_and_is_measured(tmp_path: Path) -> None:
    settings = Settings.make(quick=True, pg_admin_url="", sqlite=True, workdir=tmp_path)
    found = _scenario(settings, "sqlite", 2, 1, True, 0.1, stories=5)
    assert found["landed"] == 4
    assert found["gate_runs"] >= 5
    assert found["busy"] > 0 and found["total"] > 0
