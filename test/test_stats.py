"""RateMeter and LatencyStats, on a clock the test controls."""

import pytest

from s4fusion_ros.stats import LatencyStats, RateMeter


def test_rate_is_the_event_rate_and_falls_once_events_stop():
    meter = RateMeter(window=5.0)
    for k in range(60):  # 2 s at 30 Hz
        meter.tick(now=k / 30)
    assert meter.rate(now=59 / 30) == pytest.approx(30.0)
    # A camera that stopped: the rate falls with the silence, not 5 s later all at once.
    assert meter.rate(now=59 / 30 + 1.0) == pytest.approx(59 / (59 / 30 + 1.0))
    assert meter.rate(now=59 / 30 + 4.5) < 4.0
    assert meter.rate(now=59 / 30 + 5.1) == 0.0 and meter.recent(now=59 / 30 + 5.1) == 0
    assert meter.total == 60


def test_latency_summary():
    stats = LatencyStats(size=3)
    assert all(value != value for value in stats.summary().values())  # NaN before any
    for seconds in (9.0, 1.0, 2.0, 3.0):  # the oldest falls out of the window
        stats.add(seconds)
    summary = stats.summary()
    assert summary['mean'] == pytest.approx(2.0) and summary['p50'] == pytest.approx(2.0)
