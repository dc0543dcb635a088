"""s4fusion-flood: load test of the live node, usable as a benchmark.

Starts s4fusion_node as its own process (in its own namespace, so a flood never reaches a real
graph), waits until it fuses, then publishes 640x480 thermal (mono16) and visible (bgr8) pairs
with equal stamps, as fast as possible or at a fixed rate, for one or more phases. Meanwhile it
records the node's memory (VmRSS sampled from /proc, VmHWM at the end), the end-to-end latency of
every fused output (receive time minus its source stamp, both on this machine's clock) and the
node's /diagnostics. Then it waits until the node has decided every frame and finished its
inference, stops it with SIGINT and prints what came out: messages received, pairs fused and
dropped, peak memory, latency percentiles and the fused rate against the model's own rate.

Example (as fast as possible for 10 s, then 60 Hz for 10 s):
  s4fusion-flood --rate 0 --rate 60 --duration 10 -p device:=cpu -p inference_size:=[160,120]
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import yaml

from .. import settings
from ..cli import (READER_LEFT, interrupt, parse_size, run_command, start_child, stop_on_signals,
                   stop_signals_handled)
from ..diagnostics import (ROLES, Key, node_status, nothing_pending, number, per_input,
                           values_of)
from ..messages import stamp_to_ns
from ..stats import process_memory_kib

PROG = 's4fusion-flood'
# Its own per run: two floods in one domain would otherwise drive and measure each other's node.
DEFAULT_NAMESPACE = f'/s4fusion_flood_{os.getpid()}'
SETTLE_TIMEOUT_S = 60.0
# Frames of each input the node must have received without fusing one to fail the warm-up early.
WARM_UP_RECEIVED = 10


@dataclasses.dataclass
class Phase:
    """One stretch of publishing at a fixed rate, and the fused outputs received during it."""

    rate: float  # pairs per second; 0 = as fast as possible
    duration: float
    published: int = 0  # pairs sent whole (one thermal and one visible message each)
    publish_failures: int = 0  # pairs of which rclpy refused a message (a reliable writer flooded)
    start: float = 0.0  # time.monotonic()
    end: float = 0.0
    outputs: list = dataclasses.field(default_factory=list)  # (receive monotonic s, latency s)
    diagnostics: dict = dataclasses.field(default_factory=dict)  # the node's, at the phase end

    def latencies(self) -> np.ndarray:
        """Return the end-to-end latency (s) of each output received during the phase."""
        return np.array([latency for _, latency in self.outputs], dtype=np.float64)

    def fused_rate(self) -> float:
        """Return the fused outputs received per second during the phase."""
        return len(self.outputs) / max(self.end - self.start, 1e-9)


@dataclasses.dataclass
class FloodReport:
    """Everything measured in one run."""

    phases: list[Phase]
    warm_up_pairs: int  # published before the flood, until the node answered
    rss_kb: list  # (monotonic s, VmRSS kB) sampled about 10 times a second
    rss_before_kb: int  # VmRSS once the node fused its first pair, before the flood
    peak_rss_kb: int  # VmHWM at the end: the largest resident size over the node's life
    diagnostics: dict  # the node's last diagnostics (key -> string value), once it settled
    settled: bool  # every frame decided and no inference running at the end
    drain_outputs: list  # (receive monotonic s, latency s) of the outputs after the last phase
    returncode: int | None  # of the node process after SIGINT
    log_path: pathlib.Path

    def number(self, key: Key) -> float:
        """Return a numeric diagnostics value (NaN when absent)."""
        return number(self.diagnostics, key)

    def log(self) -> str:
        """Return the node's console output."""
        return self.log_path.read_text(errors='replace')

    def figures(self) -> dict:
        """Return the headline numbers, as the command prints them."""
        number = self.number
        # Every fused output of the flood: the queued pairs fused after it are the slowest.
        latencies = np.concatenate([phase.latencies() for phase in self.phases]
                                   + [np.array([latency for _, latency in self.drain_outputs])])
        inference = number(Key.INFERENCE_LATENCY_MEAN)
        figures = {
            # The node's counters cover its whole life: the warm-up pairs are in them too.
            'published pairs': self.warm_up_pairs + sum(phase.published for phase in self.phases),
            'of them warm-up pairs': self.warm_up_pairs,
            'publish failures': sum(phase.publish_failures for phase in self.phases),
            'received thermal': number(Key.THERMAL_RECEIVED) + number(Key.THERMAL_BAD_MESSAGE),
            'received visible': number(Key.VISIBLE_RECEIVED) + number(Key.VISIBLE_BAD_MESSAGE),
            Key.PAIRS: number(Key.PAIRS),
            Key.PAIRS_FUSED: number(Key.PAIRS_FUSED),
            Key.PAIRS_DROPPED: number(Key.PAIRS_DROPPED),
            'unpaired, late, overflowed or bad stamp': sum(
                number(per_input(role, kind)) for role in ROLES
                for kind in ('unpaired', 'late', 'overflow', 'rejected (bad stamp)')),
            Key.INFERENCE_ERRORS: number(Key.INFERENCE_ERRORS),
            'peak RSS (MiB)': self.peak_rss_kb / 1024,
            'RSS before the flood (MiB)': self.rss_before_kb / 1024,
            'fused after the flood': len(self.drain_outputs),
            'latency p50 (s)': _percentile(latencies, 50),
            'latency p95 (s)': _percentile(latencies, 95),
            Key.INFERENCE_LATENCY_MEAN: inference,
            'model rate (Hz)': 1.0 / inference if inference > 0 else math.nan,
        }
        names = ['max' if phase.rate == 0 else f'{phase.rate:g} Hz' for phase in self.phases]
        if len(set(names)) < len(names):  # two phases at one rate: numbered, else one is lost
            names = [f'{index}: {name}' for index, name in enumerate(names, 1)]
        for phase, name in zip(self.phases, names):
            figures[f'[{name}] published pairs/s'] = phase.published / phase.duration
            figures[f'[{name}] fused rate (Hz)'] = phase.fused_rate()
            figures[f'[{name}] latency p50 (s)'] = _percentile(phase.latencies(), 50)
            figures[f'[{name}] latency p95 (s)'] = _percentile(phase.latencies(), 95)
        return figures


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def synthetic_pair(width: int = 640, height: int = 480) -> tuple[np.ndarray, np.ndarray]:
    """Make a thermal frame (uint16 counts: a warm gradient, a hot target) and a BGR frame."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    thermal = 20000.0 + 2000.0 * y / height + 300.0 * np.sin(x / 17.0)
    thermal[height // 3:height // 2, width // 4:width // 3] += 3000.0
    visible = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.cos(x / 23.0)], -1)
    return thermal.astype(np.uint16), np.clip(visible, 0, 255).astype(np.uint8)


class NodeProcess:
    """s4fusion_node run as its own process, with its parameters in a temporary file."""

    def __init__(self, params: dict, namespace: str, directory: pathlib.Path):
        """Start the node (`python -m`, so it works wherever the package is importable)."""
        params_file = directory / 'params.yaml'
        params_file.write_text(yaml.safe_dump({'/**': {'ros__parameters': params}}))
        self.log_path = directory / 'node.log'
        command = [sys.executable, '-m', 's4fusion_ros.ros.run_node', '--ros-args',
                   '--params-file', str(params_file), '-r', f'__ns:={namespace}']
        self.proc = start_child(command, self.log_path)

    @property
    def pid(self) -> int:
        """Return the node's process id (the ROS wheels re-exec Python in place: same pid)."""
        return self.proc.pid

    def running(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT (as ros2 launch does), then SIGKILL after `timeout`; returns the exit code."""
        return interrupt(self.proc, timeout)


class Driver:
    """The flood's own rclpy node, in a context of its own, spun on a background thread."""

    def __init__(self, namespace: str, node_pid: int, params: dict):
        """Create publishers, subscriptions and the memory sampler, with the QoS the node's
        `params` give its inputs and outputs."""
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions
        from sensor_msgs.msg import Image

        from .context import init_rclpy
        from .parameters import direction_qos

        self.context = rclpy.Context()
        # Keep Python's own Ctrl-C (KeyboardInterrupt) so the command can stop its node.
        init_rclpy(args=[], context=self.context,
                   signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node('s4fusion_flood', namespace=namespace,
                                      context=self.context)
        self.node_pid = node_pid
        self.node_name = f'{namespace.rstrip("/")}/{settings.NODE_NAME}'
        # As a camera driver matching the node's inputs would publish, and as a reader of its
        # outputs must ask (a reliable reader hears nothing from a best_effort output).
        values = {**settings.defaults(), **params}
        input_qos, output_qos = (direction_qos(values, direction)
                                 for direction in ('input', 'output'))
        self.thermal_pub = self.node.create_publisher(Image, 'thermal/image_raw', input_qos)
        self.visible_pub = self.node.create_publisher(Image, 'visible/image_raw', input_qos)
        self.fused_topic = f'{self.node_name}/fused'
        self.outputs = []  # (receive monotonic s, latency s) of every fused output
        self.diagnostics, self.diagnostics_at = {}, 0.0
        self.rss_kb = []
        self.node.create_subscription(Image, self.fused_topic, self._on_fused, output_qos)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        self.node.create_timer(0.1, self._sample_memory)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._stopping = False
        self._thread = threading.Thread(target=self._spin, name='flood-spin', daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stopping and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def _on_fused(self, msg) -> None:
        stamp_ns = stamp_to_ns(msg.header.stamp)
        self.outputs.append((time.monotonic(), (time.time_ns() - stamp_ns) / 1e9))

    def _on_diagnostics(self, msg) -> None:
        status = node_status(msg, self.node_name)
        if status is not None:
            self.diagnostics = values_of(status)
            self.diagnostics_at = time.monotonic()

    def _sample_memory(self) -> None:
        rss = process_memory_kib(self.node_pid).get('VmRSS')
        if rss is not None:
            self.rss_kb.append((time.monotonic(), rss))

    def unmatched(self) -> list[str]:
        """The node's topics not yet discovered: its inputs' subscriptions, its fused output."""
        return ([publisher.topic_name for publisher in (self.thermal_pub, self.visible_pub)
                 if publisher.get_subscription_count() == 0]
                + [self.fused_topic] * (self.node.count_publishers(self.fused_topic) == 0))

    def matched(self) -> bool:
        """Whether the node's subscriptions and fused publisher have been discovered."""
        return not self.unmatched()

    def dropping_everything(self) -> bool:
        """Whether the node's diagnostics show frames of both inputs received and no pair fused,
        queued or in inference: a node that pairs or takes none of them (a sync.thermal_offset,
        say) fails the warm-up at once, not after 120 s."""
        values = self.diagnostics
        received = min(number(values, received) + number(values, bad) for received, bad in (
            (Key.THERMAL_RECEIVED, Key.THERMAL_BAD_MESSAGE),
            (Key.VISIBLE_RECEIVED, Key.VISIBLE_BAD_MESSAGE)))
        return received >= WARM_UP_RECEIVED and all(
            number(values, key) == 0
            for key in (Key.PAIRS_FUSED, Key.PAIRS_QUEUED, Key.PAIRS_IN_INFERENCE))

    def counters(self) -> str:
        """The node's non-zero counters, from its last diagnostics."""
        return ', '.join(f'{key} {value}' for key, value in self.diagnostics.items()
                         if number(self.diagnostics, key) > 0) or 'none received'

    def messages(self, thermal: np.ndarray, visible: np.ndarray) -> tuple:
        """Build the image messages once; publishing only sets their stamps."""
        from .images import image_message
        return (image_message(thermal, 'mono16', 0, 'thermal_optical_frame'),
                image_message(visible, 'bgr8', 0, 'rgb_optical_frame'))

    def publish_pair(self, thermal_msg, visible_msg) -> bool:
        """Publish both with the current time as stamp; False when rclpy refused one."""
        from .images import set_stamp
        stamp_ns = time.time_ns()
        ok = True
        for publisher, msg in ((self.thermal_pub, thermal_msg), (self.visible_pub, visible_msg)):
            set_stamp(msg, stamp_ns)
            try:
                publisher.publish(msg)
            except Exception:  # noqa: BLE001 - RCLError 'cannot publish data' under a flood
                ok = False
        return ok

    def close(self) -> None:
        """Stop spinning and shut the context down."""
        self._stopping = True
        self._thread.join(2.0)
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


def _wait(condition, timeout: float, node: NodeProcess, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if not node.running():
            raise RuntimeError(f'the node exited while {what}:\n{node.log_path.read_text()}')
        if time.monotonic() > end:
            raise RuntimeError(f'timed out after {timeout:g} s {what}')
        time.sleep(0.05)


def _settled(driver: Driver, since: float) -> bool:
    """Whether a diagnostics message sent after `since` shows nothing pending or running."""
    return driver.diagnostics_at > since and nothing_pending(driver.diagnostics)


def run_flood(params: dict, phases: list[tuple[float, float]], namespace: str = DEFAULT_NAMESPACE,
              size: tuple[int, int] = (640, 480),
              directory: pathlib.Path | None = None) -> FloodReport:
    """Start a node with `params`, flood it with each (rate Hz or 0, seconds) phase, measure.

    The node's parameters file and log go to `directory` (default: a new temporary folder, left
    for the caller to read and remove). The caller's environment (ROS_DOMAIN_ID,
    ROS_AUTOMATIC_DISCOVERY_RANGE, ...) reaches the node.
    """
    directory = directory or pathlib.Path(tempfile.mkdtemp(prefix='s4fusion-flood-'))
    # Diagnostics at least twice a second, so the end of the run is seen promptly.
    params = {'diagnostics.period': 0.5, **params}
    node = NodeProcess(params, namespace, directory)
    driver = None
    done = []
    settled = False
    try:
        driver = Driver(namespace, node.pid, params)
        try:
            _wait(driver.matched, 120.0, node, 'waiting for the node to come up')
        except RuntimeError as error:
            if node.running():
                raise RuntimeError(f'{error}: not discovered: {", ".join(driver.unmatched())}')
            raise
        thermal_msg, visible_msg = driver.messages(*synthetic_pair(*size))
        # Discovery can lose the first messages: publish slowly until the node answers.
        end = time.monotonic() + 120.0
        warm_up_pairs = 0
        while not driver.outputs:
            if not node.running():
                raise RuntimeError(f'the node exited:\n{node.log_path.read_text()}')
            if driver.dropping_everything():
                raise RuntimeError('the node fuses none of the pairs it gets; its counters: '
                                   + driver.counters())
            if time.monotonic() > end:
                raise RuntimeError('no fused output arrived in 120 s; the node\'s counters: '
                                   + driver.counters())
            driver.publish_pair(thermal_msg, visible_msg)
            warm_up_pairs += 1
            time.sleep(0.3)
        time.sleep(1.0)  # let the warm-up pairs drain
        rss_before = process_memory_kib(node.pid).get('VmRSS', 0)
        for rate, duration in phases:
            phase = Phase(rate, duration)
            _flood(driver, phase, thermal_msg, visible_msg)
            phase.diagnostics = dict(driver.diagnostics)
            done.append(phase)
        drain_start = time.monotonic()
        try:
            _wait(lambda: _settled(driver, drain_start + params['diagnostics.period']),
                  SETTLE_TIMEOUT_S, node, 'waiting for the node to settle')
            settled = True
        except RuntimeError:
            if not node.running():
                raise
        for phase in done:
            phase.outputs = [(t, latency) for t, latency in driver.outputs
                             if phase.start <= t < phase.end]
        drain_outputs = [(t, latency) for t, latency in driver.outputs if t >= done[-1].end]
        peak = process_memory_kib(node.pid).get('VmHWM', 0)
        diagnostics = dict(driver.diagnostics)
        rss = list(driver.rss_kb)
    finally:
        with stop_signals_handled(signal.SIG_IGN):  # until the node is stopped
            try:
                if driver is not None:
                    driver.close()
            finally:
                returncode = node.stop()
    return FloodReport(done, warm_up_pairs, rss, rss_before, peak, diagnostics, settled,
                       drain_outputs, returncode, node.log_path)


def _flood(driver: Driver, phase: Phase, thermal_msg, visible_msg) -> None:
    period = 1.0 / phase.rate if phase.rate > 0 else 0.0
    phase.start = time.monotonic()
    phase.end = phase.start + phase.duration
    next_time = phase.start
    while (now := time.monotonic()) < phase.end:
        if now < next_time:  # a slow rate's next pair may be due after the phase
            time.sleep(min(next_time, phase.end) - now)
            continue
        # A camera that falls behind does not catch up in a burst.
        next_time = max(next_time + period, now)
        time.sleep(0)  # flat out, still let the receiving thread in (GIL)
        if driver.publish_pair(thermal_msg, visible_msg):
            phase.published += 1
        else:
            phase.publish_failures += 1


def _parse_param(text: str) -> tuple[str, object]:
    name, separator, value = text.partition(':=')
    if not separator:
        raise argparse.ArgumentTypeError(f"expected name:=value, got '{text}'")
    data = os.fsencode(value)  # the bytes given, which rcl reads as UTF-8 YAML
    try:
        return name, yaml.safe_load(data)
    except yaml.YAMLError as error:  # argparse shows only its own errors as a usage error
        raise argparse.ArgumentTypeError(
            f"'{text}': the value is not YAML: {settings.yaml_fault(error, data)}") from None


def shown(figures: dict) -> dict:
    """The figures as printed: counts read from /diagnostics come as floats, and whole ones are
    shown whole (3480, not 3.48e+03), so that the printed counts add up."""
    return {key: int(value) if isinstance(value, float) and value.is_integer() else value
            for key, value in figures.items()}


def main(argv=None) -> int:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    parser.add_argument('--rate', type=float, action='append',
                        help='pairs per second of a phase, 0 = as fast as possible; repeat for '
                        'more phases (default: one phase at 0)')
    parser.add_argument('--duration', type=float, default=10.0,
                        help='seconds per phase (default: %(default)s)')
    parser.add_argument('--size', type=parse_size, default=(640, 480), metavar='WxH',
                        help='image size (default: 640x480)')
    parser.add_argument('-p', '--param', type=_parse_param, action='append', default=[],
                        metavar='NAME:=VALUE', help='a node parameter (repeatable)')
    parser.add_argument('--namespace', default=DEFAULT_NAMESPACE,
                        help='namespace of the node and its topics (default: %(default)s)')
    parser.add_argument('--json', action='store_true', help='print the figures as JSON')
    args = parser.parse_args(argv)
    if not args.duration > 0:
        parser.error('--duration must be > 0')
    if any(not (rate >= 0 and math.isfinite(rate)) for rate in args.rate or []):
        parser.error('--rate must be >= 0 and finite')
    params = dict(args.param)
    for role in ROLES:  # else the node listens on another topic and the flood waits 120 s
        if params.get(f'{role}.transport', 'raw') != 'raw':
            parser.error(f'{role}.transport must be raw: the flood publishes sensor_msgs/Image '
                         f'on {role}/image_raw')
    limit = params.get('max_input_pixels', settings.SPECS['max_input_pixels'].default)
    if isinstance(limit, int) and args.size[0] * args.size[1] > limit:  # it would drop them all
        parser.error(f'--size {args.size[0]}x{args.size[1]} is more than the node takes '
                     f'(max_input_pixels {limit})')
    from rclpy.exceptions import InvalidNamespaceException
    from rclpy.validate_namespace import validate_namespace
    try:
        validate_namespace(args.namespace)
    except InvalidNamespaceException as error:
        parser.error(f'--namespace: {error}')
    # Keep the flood on this machine unless told otherwise.
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    phases = [(rate, args.duration) for rate in (args.rate or [0.0])]
    stop_on_signals()  # SIGTERM too stops the node before the flood exits
    directory = pathlib.Path(tempfile.mkdtemp(prefix='s4fusion-flood-'))

    def flood() -> int:
        report = run_flood(params, phases, args.namespace, args.size,
                           directory=directory)
        figures = shown(report.figures())
        if args.json:  # NaN (a figure without data) as null: JSON has no NaN
            print(json.dumps({key: None if isinstance(value, float) and math.isnan(value)
                              else value for key, value in figures.items()}, indent=2))
        else:
            for key, value in figures.items():
                print(f'{key:>39}: {value:.3g}' if isinstance(value, float) else
                      f'{key:>39}: {value}')
        if report.settled and report.returncode == 0:
            shutil.rmtree(directory)
            return 0
        print(f'{PROG}: the node did not settle or exit cleanly (exit code '
              f'{report.returncode})', file=sys.stderr)
        return 1
    code = run_command(PROG, flood, (RuntimeError,), 'interrupted; the node was stopped')
    if code in (130, READER_LEFT):  # stopped, or its figures' reader left (`| head`): by choice
        shutil.rmtree(directory, ignore_errors=True)
    elif code:
        print(f'{PROG}: the node\'s parameters and log: {directory}', file=sys.stderr)
    return code


if __name__ == '__main__':  # python -m, set up by its package's __init__
    from ..entry_points import run_tool
    sys.exit(run_tool(main))
