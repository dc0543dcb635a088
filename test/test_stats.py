"""RateMeter and LatencyStats, on a clock the test controls."""

import numpy as np
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


@pytest.mark.parametrize('hz', [30.0, 9.0, 1.0, 0.3])  # 0.3: a slow CPU fusing
def test_rate_is_unbiased_once_the_window_is_full(hz):
    # Read at every phase between two events, as diagnostics are: on average the event rate.
    meter = RateMeter(window=5.0)
    for k in range(int(20 * hz)):
        meter.tick(now=k / hz)
    last = (int(20 * hz) - 1) / hz
    phases = np.linspace(0, 1, 50, endpoint=False)
    readings = [meter.rate(now=last + phase / hz) for phase in phases]
    assert np.mean(readings) == pytest.approx(hz, rel=0.02)


def test_latency_summary():
    stats = LatencyStats(size=3)
    assert all(value != value for value in stats.summary().values())  # NaN before any
    for seconds in (9.0, 1.0, 2.0, 3.0):  # the oldest falls out of the window
        stats.add(seconds)
    summary = stats.summary()
    assert summary == pytest.approx({'mean': 2.0, 'p95': 2.9})  # of 1, 2 and 3
