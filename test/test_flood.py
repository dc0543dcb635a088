"""Load: both inputs flooded at 640x480 while the model is slower than the input.

The node runs as its own process (s4fusion_ros/ros/flood.py starts it and drives it over Fast
DDS). Bounds are about backlog and growth, relative to the node's own measured inference time,
never about absolute speed: this machine is a busy 2-core box.
"""

import contextlib
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip('rclpy', reason='rclpy (ROS 2) is not installed')

from paths import executable  # noqa: E402
from s4fusion_ros.cli import READER_LEFT  # noqa: E402
from s4fusion_ros.diagnostics import Key, per_input, ROLES  # noqa: E402
from s4fusion_ros.ros.flood import (  # noqa: E402
    _flood, _settled, Driver, FloodReport, main as flood_main, Phase, run_flood, shown,
    synthetic_pair)
from support import (check_counters, check_latency, exited, reading,  # noqa: E402
                     wait_while_running, FLOOD_PARAMS)

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


def test_flood_keeps_memory_latency_and_counters_bounded(tmp_path):
    report = run_flood(FLOOD_PARAMS, PHASES, directory=tmp_path)
    figures = report.figures()
    print('\n'.join(f'{key}: {value:.4g}' for key, value in figures.items()))
    # The node's counters include the warm-up pairs, so the published figure does too.
    assert figures['published pairs'] == report.warm_up_pairs + sum(
        phase.published for phase in report.phases)
    assert figures['received thermal'] <= figures['published pairs']
    # Each output counted once: in the phase it arrived in, or after the last one.
    for phase in report.phases:
        assert all(phase.start <= t < phase.end for t, _ in phase.outputs)
    assert all(t >= report.phases[-1].end for t, _ in report.drain_outputs)
    check_counters(report)
    check_memory(report)
    check_latency(report)


def test_counts_are_printed_whole():
    # Printed with 3 significant digits they read 3.48e+03 and 3.14e+03: no sum could be checked.
    printed = shown({'received thermal': 3480.0, 'latency p50 (s)': 0.1234, 'pairs': 7})
    assert printed == {'received thermal': 3480, 'latency p50 (s)': 0.1234, 'pairs': 7}
    assert type(printed['received thermal']) is int


@pytest.mark.soak
@pytest.mark.skipif(os.environ.get('S4FUSION_SOAK') != '1',
                    reason='opt-in (S4FUSION_SOAK=1): shows that the checks catch a backlog')
def test_flood_checks_catch_a_growing_backlog(tmp_path):
    """A long FIFO queue that keeps the oldest pairs is the backlog the checks exist to catch."""
    report = run_flood({**FLOOD_PARAMS, 'inference.queue_size': 100,
                        'inference.queue_policy': 'keep_oldest'}, PHASES, directory=tmp_path)
    check_counters(report)
    with pytest.raises(AssertionError, match='backlog'):
        check_latency(report)


@pytest.mark.parametrize('argv, message', [
    (['--duration', '0'], '--duration must be > 0'), (['--rate', '-1'], '--rate must be >= 0'),
    # The node listened on thermal/image_raw/compressed and the flood waited 120 s for it.
    (['-p', 'thermal.transport:=compressed'], 'thermal.transport must be raw'),
    (['--rate', 'inf'], '--rate must be >= 0 and finite'),
    (['--namespace', 'not a namespace'], '--namespace: '),
    # At their limits the rate and size pass: the namespace, checked last, is what is refused.
    (['--rate', '0', '--size', '8192x4096', '--namespace', '/9'], '--namespace: '),
    # A traceback from PyYAML's error, which argparse does not catch.
    (['-p', 'device:=[cpu'], "argument -p/--param: 'device:=[cpu': the value is not YAML: line "
                             "1, column 5: expected ',' or ']'")])
def test_bad_phase_options_are_refused_before_the_node_starts(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flood_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_parameter_value_in_bytes_that_are_not_utf8_is_named_as_such():
    # A Latin-1 byte was "invalid _parse_param value" (its text would not encode). In a child:
    # pytest's capture cannot hold the argument's surrogate escape that stderr writes as \udce9.
    done = subprocess.run([executable('s4fusion-flood'), '-p', b'device:=\xe9'],
                          capture_output=True, timeout=300)
    assert done.returncode == 2 and done.stderr.endswith(
        b"the value is not YAML: byte 0xe9 on line 1 is not UTF-8, which ROS 2 reads YAML "
        b"files in\n"), done.stderr


def node_processes(marker: str) -> list[int]:
    """Pids of running s4fusion nodes whose command line holds `marker`."""
    pids = []
    for entry in pathlib.Path('/proc').iterdir():
        try:
            command = (entry / 'cmdline').read_bytes().replace(b'\0', b' ').decode()
        except (OSError, ValueError):
            continue
        if 's4fusion_ros.ros.run_node' in command and marker in command:
            pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def flood_with_node(tmp_path: pathlib.Path):
    """A flood of 5 Hz for a minute, its folder in `tmp_path`, once its node runs: the block gets
    the flood and the reader of its stderr. Flood and node are killed however the block ends."""
    process = subprocess.Popen(
        [sys.executable, '-m', 's4fusion_ros.ros.flood', '--rate', '5', '--duration', '60',
         '-p', 'device:=cpu', '-p', 'inference_size:=[160,120]'],
        env={**os.environ, 'TMPDIR': str(tmp_path)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        with reading(process, process.stderr, stop=signal.SIGKILL) as said:
            wait_while_running(process, lambda: node_processes(str(tmp_path)), 60, said.text)
            yield process, said
    finally:
        for pid in node_processes(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize('stops', [(signal.SIGTERM,), (signal.SIGINT,), (signal.SIGKILL,),
                                   (signal.SIGINT, signal.SIGINT)],
                         ids=['SIGTERM', 'SIGINT', 'SIGKILL', 'SIGINT twice'])
def test_a_stopped_flood_stops_its_node_and_leaves_nothing(tmp_path, stops):
    # SIGTERM (kill, a supervisor) used to end the flood at once and leave its node running;
    # SIGKILL runs no clean-up at all and left it running too. A second SIGINT at once (timeout
    # and ros2 launch send one) cut the node's stop short and aborted the flood.
    with flood_with_node(tmp_path) as (process, said):
        time.sleep(3.0)  # the node is up; the flood is waiting for it or flooding it
        for stop in stops:
            process.send_signal(stop)
            time.sleep(0.02)  # the second lands while the first is being handled
        assert exited(process, 60), f'the flood did not stop:\n{said.text()}'
        said.close()
        stderr = said.text()
        deadline = time.monotonic() + 20  # the node's own clean stop
        while node_processes(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left_running = node_processes(str(tmp_path))
    assert not left_running, 'the node outlived its flood'
    if stops != (signal.SIGKILL,):
        assert process.returncode == 130 and 'Traceback' not in stderr, stderr
        assert 's4fusion-flood: interrupted; the node was stopped' in stderr
        assert not list(tmp_path.iterdir())


def test_figures_keep_two_phases_at_one_rate_and_the_pairs_fused_after_the_flood(tmp_path):
    # Keyed by rate alone, the second 5 Hz phase overwrote the first; the outputs fused after
    # the last phase (the queued pairs, the slowest) were left out of the latencies.
    phases = [Phase(5.0, 2.0, published=10, start=0.0, end=2.0, outputs=[(1.0, 0.1)] * 8),
              Phase(5.0, 2.0, published=10, start=2.0, end=4.0, outputs=[(3.0, 0.2)] * 9)]
    drained = [(4.5, 0.9), (5.0, 1.1)]
    report = FloodReport(phases, 1, [], 0, 0, {}, True, drained, 0, tmp_path / 'node.log')
    figures = report.figures()
    assert figures['[1: 5 Hz] fused rate (Hz)'] == 4.0
    assert figures['[2: 5 Hz] fused rate (Hz)'] == 4.5
    assert figures['fused after the flood'] == 2
    assert figures['latency p95 (s)'] > 0.9 and figures['published pairs'] == 21


def test_figures_add_up_the_node_s_counters_and_name_phases_by_rate(tmp_path):
    # A bad message still reached the node, a badly stamped frame never reached a pair; a
    # phase without outputs has no latency (numpy raises on an empty percentile).
    diagnostics = {**{per_input(role, count): '0' for role in ROLES for count in (
                       'unpaired', 'late', 'overflow', 'rejected (bad stamp)')},
                   Key.THERMAL_RECEIVED: '40', Key.THERMAL_BAD_MESSAGE: '2',
                   Key.VISIBLE_RECEIVED: '41', Key.VISIBLE_BAD_MESSAGE: '0',
                   Key.THERMAL_LATE: '1', Key.VISIBLE_UNPAIRED: '2', Key.THERMAL_BAD_STAMP: '3',
                   Key.INFERENCE_LATENCY_MEAN: '0.25'}
    phases = [Phase(0.0, 2.0, published=30, start=0.0, end=2.0, outputs=[(1.0, 0.1)] * 5),
              Phase(60.0, 2.0, published=12, start=2.0, end=4.0)]
    drained = [(4.5, 0.9)] * 3
    report = FloodReport(phases, 1, [], 0, 0, diagnostics, True, drained, 0,
                         tmp_path / 'node.log')
    figures = report.figures()
    assert figures['received thermal'] == 42 and figures['received visible'] == 41
    assert figures['unpaired, late, overflowed or bad stamp'] == 6
    assert figures['model rate (Hz)'] == 4.0 and figures['fused after the flood'] == 3
    assert figures['[max] published pairs/s'] == 15.0 and figures['[max] fused rate (Hz)'] == 2.5
    assert figures['[60 Hz] published pairs/s'] == 6.0
    assert math.isnan(figures['[60 Hz] latency p50 (s)'])


def test_the_warm_up_gives_up_early_only_on_frames_of_both_inputs_and_no_pair_under_way():
    driver = Driver('/s4fusion_flood_counters', os.getpid(), {})
    driver.close()
    nothing_paired = {Key.THERMAL_RECEIVED: '10', Key.THERMAL_BAD_MESSAGE: '0',
                      Key.VISIBLE_RECEIVED: '10', Key.VISIBLE_BAD_MESSAGE: '0',
                      Key.PAIRS_FUSED: '0', Key.PAIRS_QUEUED: '0', Key.PAIRS_IN_INFERENCE: '0'}
    still_hoping = [
        {Key.VISIBLE_RECEIVED: '0'},  # its visible camera not discovered yet
        {Key.PAIRS_QUEUED: '1'}, {Key.PAIRS_IN_INFERENCE: '1'}]  # a first output on its way
    for change in still_hoping:
        driver.diagnostics = {**nothing_paired, **change}
        assert not driver.dropping_everything(), change
    # Frames it could not decode reached it all the same.
    driver.diagnostics = {**nothing_paired, Key.THERMAL_RECEIVED: '0',
                          Key.THERMAL_BAD_MESSAGE: '10'}
    assert driver.dropping_everything()


def test_the_node_settles_on_diagnostics_sent_after_the_flood_only():
    # Those from before it ended may show nothing pending between two pairs.
    driver = Driver('/s4fusion_flood_settle', os.getpid(), {})
    driver.close()
    driver.diagnostics = {Key.THERMAL_PENDING: '0', Key.VISIBLE_PENDING: '0',
                          Key.PAIRS_QUEUED: '0', Key.PAIRS_IN_INFERENCE: '0'}
    driver.diagnostics_at = 10.0
    assert not _settled(driver, since=10.0) and _settled(driver, since=9.9)


def test_a_size_the_node_would_refuse_is_a_usage_error(capsys):
    # It allocated the images (149 GiB at 100000x100000) and ended in a traceback.
    with pytest.raises(SystemExit) as exit_info:
        flood_main(['--size', '100000x100000'])
    assert exit_info.value.code == 2
    assert 'is more than the node takes (max_input_pixels 33554432)' in capsys.readouterr().err


def test_a_best_effort_output_is_read(tmp_path):
    # The flood read the fused output as a reliable subscriber, which hears nothing from a
    # best_effort publisher: it waited 120 s and said the node never fused a pair.
    # Small images: best-effort delivery of large ones between processes loses some (the
    # warm-up, which waits for an output, is what this checks; the phase's may all be lost).
    report = run_flood({**FLOOD_PARAMS, 'qos.output.reliability': 'best_effort'},
                       [(5.0, 2.0)], size=(160, 120), directory=tmp_path)
    assert report.settled and report.returncode == 0
    assert report.phases[0].outputs or report.drain_outputs


def test_a_node_that_pairs_nothing_fails_the_warm_up_with_its_counters(tmp_path):
    # With every thermal frame a second off its partner it waited 120 s, then printed the log.
    with pytest.raises(RuntimeError, match=r'fuses none of the pairs it gets; its counters: '
                       r'.*thermal received \d+, visible received \d+, thermal unpaired'):
        run_flood({**FLOOD_PARAMS, 'sync.thermal_offset': 1.0}, [(5.0, 2.0)],
                  directory=tmp_path)


def test_pairs_rclpy_refuses_are_failures_not_published():
    driver = Driver('/s4fusion_flood_refused', os.getpid(), {})
    messages = driver.messages(*synthetic_pair(64, 48))
    driver.close()  # publishing on a shut-down context raises, as a flooded writer's does
    phase = Phase(50.0, 0.2)
    _flood(driver, phase, *messages)
    assert phase.published == 0 and phase.publish_failures > 0


def test_a_phase_slower_than_one_pair_ends_at_its_duration():
    # At 0.05 Hz for 2 s the flood slept until the second pair was due, 18 s past the phase.
    class Camera:
        def publish_pair(self, *_):
            return True

    phase = Phase(0.5, 0.2)
    started = time.monotonic()
    _flood(Camera(), phase, None, None)
    assert phase.published == 1 and time.monotonic() - started < 1.0


def test_a_phase_that_fell_behind_does_not_catch_up_in_a_burst():
    # A camera that stalls half a second sends its next frames at its rate, not 5 at once.
    class StallingCamera:
        def __init__(self):
            self.calls = 0

        def publish_pair(self, *_):
            self.calls += 1
            time.sleep(0.5 if self.calls == 1 else 0)
            return True

    phase = Phase(10.0, 1.0)
    _flood(StallingCamera(), phase, None, None)
    assert 2 <= phase.published <= 7  # 1 at 0 s, then 5.5 periods left: 10 with a burst


def test_a_flood_whose_reader_left_stops_quietly_and_leaves_nothing(tmp_path):
    # `s4fusion-flood | true`: a traceback and exit 1, then (141) its folder kept and named.
    # Without PYTHONUNBUFFERED, as from a shell: the pipe holds the figures back until the exit.
    env = {name: value for name, value in os.environ.items() if name != 'PYTHONUNBUFFERED'}
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [executable('s4fusion-flood'), '--duration', '1', '--size', '64x48',
             '-p', 'device:=cpu'],
            env={**env, 'TMPDIR': str(tmp_path)}, stdout=write, stderr=subprocess.PIPE,
            text=True, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == READER_LEFT and 'Traceback' not in done.stderr, done.stderr
    assert "the node's parameters and log" not in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())
