"""Load: both inputs flooded at 640x480 while the model is slower than the input.

The node runs as its own process (s4fusion_ros/ros/flood.py starts it and drives it over Fast
DDS). Bounds are about backlog and growth, relative to the node's own measured inference time,
never about absolute speed: this machine is a busy 2-core box.
"""

import os

import pytest

pytest.importorskip('rclpy', reason='rclpy (ROS 2) is not installed')

from s4fusion_ros.ros.flood import FloodReport, main as flood_main, run_flood  # noqa: E402
from support import check_counters, check_latency, FLOOD_PARAMS  # noqa: E402

pytestmark = pytest.mark.ros

PHASES = [(0.0, 6.0), (60.0, 6.0)]  # as fast as possible, then a 60 Hz camera
MEMORY_GROWTH_MB = 160  # observed: about 75 MB of buffers once the flood starts, then flat
LATE_GROWTH_MB = 48  # second half of the flood over the first: a leak, not buffers filling


def check_memory(report: FloodReport) -> None:
    """Check that memory grows only once (buffers filling), not on (a leak or a queue)."""
    flood_start, flood_end = report.phases[0].start, report.phases[-1].end
    middle = (flood_start + flood_end) / 2
    first = [kb for t, kb in report.rss_kb if flood_start <= t < middle]
    second = [kb for t, kb in report.rss_kb if middle <= t < flood_end]
    assert first and second
    assert max(second) - max(first) < LATE_GROWTH_MB * 1024, 'memory grows during the flood'
    growth_mb = (report.peak_rss_kb - report.rss_before_kb) / 1024
    assert growth_mb < MEMORY_GROWTH_MB, f'peak RSS {growth_mb:.0f} MB over the start'


def test_flood_keeps_memory_latency_and_counters_bounded():
    report = run_flood(FLOOD_PARAMS, PHASES)
    figures = report.figures()
    print('\n'.join(f'{key}: {value:.4g}' for key, value in figures.items()))
    check_counters(report)
    check_memory(report)
    check_latency(report)


@pytest.mark.soak
@pytest.mark.skipif(os.environ.get('S4FUSION_SOAK') != '1',
                    reason='opt-in (S4FUSION_SOAK=1): shows that the checks catch a backlog')
def test_flood_checks_catch_a_growing_backlog():
    """A long FIFO queue that keeps the oldest pairs is the backlog the checks exist to catch."""
    report = run_flood({**FLOOD_PARAMS, 'inference.queue_size': 100,
                        'inference.queue_policy': 'keep_oldest'}, PHASES)
    check_counters(report)
    with pytest.raises(AssertionError, match='backlog'):
        check_latency(report)


@pytest.mark.parametrize('argv, message', [(['--duration', '0'], '--duration must be > 0'),
                                           (['--rate', '-1'], '--rate must be >= 0')])
def test_bad_phase_options_are_refused_before_the_node_starts(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flood_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
