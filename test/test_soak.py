"""Soak (opt-in, S4FUSION_SOAK=1): minutes of 30 Hz input; the node's memory must not grow.

S4FUSION_SOAK_SECONDS sets the length (default 180 s). The node runs as its own process, driven
by s4fusion_ros/ros/flood.py at 640x480 with the model slower than the input.
"""

import os

import numpy as np
import pytest

pytest.importorskip('rclpy', reason='rclpy (ROS 2) is not installed')

from s4fusion_ros.ros.flood import run_flood  # noqa: E402
from support import check_counters, check_latency, FLOOD_PARAMS  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.soak, pytest.mark.skipif(
    os.environ.get('S4FUSION_SOAK') != '1',
    reason='opt-in: S4FUSION_SOAK=1 runs minutes of load (S4FUSION_SOAK_SECONDS, default 180)')]

SECONDS = float(os.environ.get('S4FUSION_SOAK_SECONDS', '180'))
WARM_UP_FRACTION = 0.2  # buffers, caches and allocator arenas fill during the first part
GROWTH_MB = 16  # median RSS of the second half over the first


def test_memory_does_not_grow_over_minutes():
    report = run_flood(FLOOD_PARAMS, [(30.0, SECONDS)])
    figures = report.figures()
    print('\n'.join(f'{key}: {value:.4g}' for key, value in figures.items()))
    check_counters(report)
    check_latency(report)
    phase = report.phases[0]
    start = phase.start + WARM_UP_FRACTION * SECONDS
    middle = (start + phase.end) / 2
    first = [kb for t, kb in report.rss_kb if start <= t < middle]
    second = [kb for t, kb in report.rss_kb if middle <= t < phase.end]
    growth_mb = (np.median(second) - np.median(first)) / 1024
    print(f'RSS median {np.median(first) / 1024:.0f} MB -> {np.median(second) / 1024:.0f} MB, '
          f'max {max(first) / 1024:.0f} MB -> {max(second) / 1024:.0f} MB')
    assert growth_mb < GROWTH_MB, f'RSS grew {growth_mb:.1f} MB from the first half to the second'
