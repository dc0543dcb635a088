"""s4fusion-demo: the whole live chain on the shipped sample bag, in a couple of minutes on a CPU.

    s4fusion-play (bag, /clock) -> s4fusion_node (a process, default parameters, sim time)
        -> a recorder (this process) -> DIR/fused_bag, DIR/preview_*.png, DIR/demo.mp4,
           DIR/summary.txt

Everything runs in a DDS domain of its own, on loopback only, with the package's Fast DDS
profile. The node runs as it would on a robot: when inference is slower than the cameras it
drops pairs (keep_newest). So that a slow CPU still shows every pair, the bag is played slower
than recorded when the node's model, timed here on the bag's first pair, could not keep up with
the thermal camera; the summary says at what rate, and how many pairs were dropped and why.
"""

import argparse
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from importlib import resources

import numpy as np
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions

from .. import settings
from ..cli import (interrupt, output_path, run_command, start_child, stop_on_signals,
                   stop_signals_handled)
from ..bagio import (IMAGE, WRITE_ERRORS, BagError, ImageTopic, create_bag, deserialize,
                     image_topics, log_span, open_bag, output_qos_of, pick_topics, read_messages)
from ..diagnostics import ROLES, Key, node_status, number, pairing_summary, per_input, values_of
from ..engine import FusionEngine, fusion_settings, pipeline_from_params
from ..files import check_writable_folder, resolved, write_png, write_text_atomically
from ..imaging.encodings import decode_visible, image_to_array
from ..messages import stamp_to_ns
from ..model import CheckpointError
from ..runtime import model_from_params
from ..video import bag_pairs, export_recording, outputs_by_stamp, saliency_bgr
from .parameters import qos_profile
from .player import RATE_LIMITS
from .recorder import TopicRecorder
from .spin import spin_until

PROG = 's4fusion-demo'
FUSED_TOPIC, SALIENCY_TOPIC = settings.OUTPUT_TOPICS
SAMPLE_BAG = 'm3svd_sample'
NODE_TOPICS = {'thermal': '/thermal/image_raw', 'visible': '/visible/image_raw'}
PREVIEWS = 4
VIDEO = 'demo.mp4'
# Share of the CPU time between two thermal frames the model may take: the node also decodes,
# normalizes and publishes, and the player and the recorder run on the same cores.
HEADROOM = 0.5
ARRIVALS_SETTLE_S = 10.0  # after the bag's end, no frame for this long: the others were lost
MIN_RATE = 0.01  # the slowest playback the demo picks (rates are rounded to hundredths)
# The highest ROS_DOMAIN_ID Fast DDS computes ports for; above it the processes exit at their
# first node, and rcl takes a negative one for its default domain, 0: the user's graph.
MAX_DOMAIN_ID = 232


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument('--output-dir', type=output_path, default=pathlib.Path('demo_output'),
                        help='where the fused bag, previews and summary go (default: '
                        '%(default)s)')
    parser.add_argument('--bag', type=pathlib.Path,
                        help='play this bag instead of the shipped sample (topics detected)')
    parser.add_argument('--thermal-topic',
                        help="the bag's thermal topic (default: detected)")
    parser.add_argument('--visible-topic',
                        help="the bag's visible topic (default: detected)")
    parser.add_argument('--params', type=pathlib.Path,
                        help="the node's parameter file (default: the node's defaults)")
    parser.add_argument('--rate', type=float,
                        help='playback speed factor (default: 1, or slower when the model, '
                        'timed on the first pair, cannot keep up with the thermal camera)')
    parser.add_argument('--domain-id', type=int, default=demo_domain(),
                        help='ROS_DOMAIN_ID of the demo, kept apart from your graph '
                        '(default: one of 60-99 derived from the pid, never your ROS_DOMAIN_ID; '
                        'name one to watch the demo with ros2 topic echo or rviz there, with '
                        'ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST)')
    parser.add_argument('--timeout', type=float, default=180.0,
                        help='give up after this many seconds (default: %(default)s)')
    args = parser.parse_args(argv)
    if args.rate is not None and not RATE_LIMITS[0] <= args.rate <= RATE_LIMITS[1]:
        parser.error(f'--rate must be from {RATE_LIMITS[0]:g} to {RATE_LIMITS[1]:g} (those '
                     's4fusion-play takes)')
    if not 0 <= args.domain_id <= MAX_DOMAIN_ID:
        parser.error(f'--domain-id must be from 0 to {MAX_DOMAIN_ID}')
    return args


def demo_domain() -> int:
    """A ROS_DOMAIN_ID of 60-99 from the pid (two demos at once rarely share one), never the
    domain the caller's environment names."""
    domain = 60 + os.getpid() % 40
    if str(domain) == os.environ.get('ROS_DOMAIN_ID', '').strip():
        domain = 60 + (domain - 59) % 40
    return domain


def sample_bag() -> pathlib.Path:
    """Return the sample bag shipped in the package (s4fusion_ros/data/)."""
    return pathlib.Path(str(resources.files('s4fusion_ros') / 'data' / SAMPLE_BAG))


def executable(name: str) -> str:
    """Return a console script of this installation, beside the running Python or this command.

    pip puts them beside the Python; colcon puts them all in lib/s4fusion_ros (`ros2 run`).
    """
    path = pathlib.Path(sys.executable).parent / name
    if not path.exists():
        path = pathlib.Path(sys.argv[0]).resolve().parent / name
    if not path.exists():
        raise BagError(f'{path} not found: install the package (scripts/setup.sh)')
    return str(path)


def isolate_dds(domain_id: int, log_dir: pathlib.Path) -> None:
    """Keep this process and its children on loopback, in their own domain."""
    os.environ.update({'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST',
                       'ROS_DOMAIN_ID': str(domain_id),
                       'ROS_LOG_DIR': str(log_dir / 'ros')})


def stop(process: subprocess.Popen | None) -> None:
    """Ctrl-C a child and wait for it (killed after 10 s)."""
    if process is not None:
        interrupt(process)


def tail(path: pathlib.Path) -> str:
    """Return the last 15 lines of a log file."""
    return '\n'.join(path.read_text(errors='replace').splitlines()[-15:])


class Monitor(Node):
    """The demo's own node: records the fused outputs and follows the fusion node's diagnostics."""

    def __init__(self):
        """Join the demo's sim time (the player's /clock) and listen to /diagnostics."""
        super().__init__('s4fusion_demo',
                         parameter_overrides=[Parameter('use_sim_time', value=True)])
        self.status = {}
        self.status_stamp = 0
        self.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)

    def _on_diagnostics(self, array: DiagnosticArray) -> None:
        status = node_status(array, f'/{settings.NODE_NAME}')
        if status is not None:
            self.status = values_of(status)
            self.status_stamp = stamp_to_ns(array.header.stamp)

    def number(self, key: Key) -> float:
        """Return a numeric diagnostics value (NaN until known)."""
        return number(self.status, key)

    def spin_until(self, condition, timeout: float) -> bool:
        """Spin until condition() holds or timeout seconds pass."""
        return spin_until(self, condition, timeout)


class Arrivals:
    """The node's received counts and since when (monotonic seconds) they have stood still."""

    def __init__(self):
        self.counts, self.since = None, time.monotonic()

    def still_for(self, counts: dict) -> float:
        now = time.monotonic()
        if counts != self.counts:
            self.counts, self.since = counts, now
        return now - self.since


def received_counts(monitor: Monitor, expected: dict) -> dict:
    """{role: messages the node received of it, bad ones included}."""
    return {role: monitor.number(per_input(role, 'received'))
            + monitor.number(per_input(role, 'rejected (bad message)')) for role in expected}


def drained(monitor: Monitor, recorder: TopicRecorder, expected: dict, done_after_ns: int,
            arrivals: Arrivals) -> bool:
    """Whether the node received the whole bag (or all it will), decided every pair and its
    outputs all arrived."""
    number = monitor.number
    counts = received_counts(monitor, expected)
    # A frame the middleware lost on the way (a node behind its inputs: a publisher's KEEP_LAST
    # history overwrites what its reader has not taken) never comes: once the bag has been
    # played and nothing more arrives for ARRIVALS_SETTLE_S, the node has all it will get.
    received = (all(counts[role] >= count for role, count in expected.items())
                or (monitor.status_stamp >= done_after_ns
                    and arrivals.still_for(counts) >= ARRIVALS_SETTLE_S))
    settled = number(Key.PAIRS) == (number(Key.PAIRS_FUSED) + number(Key.PAIRS_DROPPED)
                                    + number(Key.INFERENCE_ERRORS) + number(Key.PUBLISH_ERRORS))
    recorded = recorder.counts[SALIENCY_TOPIC] >= number(Key.PAIRS_FUSED)
    return received and settled and recorded and monitor.status_stamp >= done_after_ns


def playable_messages(bag: pathlib.Path, topics: dict[str, ImageTopic]
                      ) -> tuple[dict[str, int], int]:
    """({role: messages of its topic that decode}, the last log time (ns) of the topics'
    messages): what the node can receive, since the player skips the others (and says so in its
    log), and when the player has played them all (the bag's end may be another topic's)."""
    roles = {topic.topic: role for role, topic in topics.items()}
    counts = dict.fromkeys(topics, 0)
    last_ns = 0
    with open_bag(bag) as reader:
        for connection, log_time, raw in read_messages(reader, bag, roles):
            last_ns = max(last_ns, log_time)
            try:
                deserialize(bag, connection, raw)
            except BagError:
                continue
            counts[roles[connection.topic]] += 1
    skipped = sum(topic.count for topic in topics.values()) - sum(counts.values())
    if skipped:
        print(f'{PROG}: {skipped} undecodable message(s) in {bag} not played (the player '
              'names them in its log)', file=sys.stderr)
    return counts, last_ns


def sustainable_rate(bag: pathlib.Path, thermal: ImageTopic, visible: ImageTopic,
                     values: dict, period: float) -> tuple[float, float]:
    """(rate, seconds the model takes a pair) for this CPU, with `period` seconds between
    thermal frames.

    The rate is at most 1 and leaves HEADROOM of each thermal period to everything else.
    """
    pair = next(bag_pairs(bag, thermal.topic, visible.topic,
                          pipeline_from_params(values)), None)
    if pair is None:
        return 1.0, float('nan')
    engine = FusionEngine(model_from_params(values), fusion_settings(values))
    engine.warm_up()
    seconds = float(np.median([engine.infer(pair).inference_seconds for _ in range(3)]))
    # At least MIN_RATE: a model far too slow for the bag would round the rate to 0, which
    # would never play; the summary then says what it dropped.
    return min(1.0, max(MIN_RATE, round(HEADROOM * period / seconds, 2))), seconds


def thermal_period(span_s: float, count: int) -> float:
    """Seconds between the thermal frames of a bag: `count` frames make count - 1 intervals."""
    return span_s / max(count - 1, 1)


def write_previews(bag: pathlib.Path, directory: pathlib.Path) -> list[pathlib.Path]:
    """Fused image beside its saliency map (inferno) for a few pairs spread over the bag."""
    fused_images, saliency_maps, stamps = outputs_by_stamp(bag, FUSED_TOPIC, SALIENCY_TOPIC)
    chosen = [stamps[i] for i in np.linspace(0, len(stamps) - 1, min(PREVIEWS, len(stamps)),
                                             dtype=int)] if stamps else []
    paths = []
    for index, stamp in enumerate(chosen):
        fused = decode_visible(fused_images[stamp])
        saliency = np.asarray(image_to_array(saliency_maps[stamp]))
        panel = np.hstack([fused, saliency_bgr(saliency)])
        path = directory / f'preview_{index}.png'
        write_png(path, panel)
        paths.append(path)
    return paths


def summary_line(status: dict, fused: int, seconds: float, drained_ok: bool, rate: float,
                 period_s: float) -> str:
    """Sum up pairs fused, dropped (and why), unpaired, frames dropped before pairing, latency
    and device in one line, from the fusion node's last diagnostics values (`status`).

    `period_s` is the bag's time between thermal frames; at `rate` the node gets one every
    period_s / rate seconds of wall time.
    """
    def ms(key: Key) -> str:  # 'n/a' before the first pair
        value = number(status, key)
        return 'n/a' if math.isnan(value) else f'{value * 1e3:.0f} ms'

    state = '' if drained_ok else ' (stopped at the timeout before the node had caught up)'
    why = ('the node fuses the newest pair and drops those that arrive while the model runs; '
           if number(status, Key.PAIRS_DROPPED) > 0 else '')
    busy = (f'{why}inference took {ms(Key.INFERENCE_LATENCY_MEAN)} mean against a thermal frame '
            f'every {period_s / rate * 1e3:.0f} ms at playback rate {rate:g}')
    return (pairing_summary(status, fused, busy) + '; end-to-end latency '
            f'{ms(Key.END_TO_END_LATENCY_MEAN)} mean (sim time); device '
            f'{status.get(Key.DEVICE, "?")} ({status.get(Key.MODEL, "?")}); '
            f'{seconds:.0f} s wall{state}')


def node_params_file(args: argparse.Namespace, directory: pathlib.Path) -> pathlib.Path:
    """Return the node's parameter file: the one given, else the defaults."""
    if args.params:
        return args.params
    path = directory / 'params.yaml'
    tree = {'/**': {'ros__parameters': settings.nest(settings.defaults())}}
    path.write_text(yaml.safe_dump(tree))
    return path


class StoppedAtTimeout(Exception):
    """The node had not fused the whole bag by --timeout; the summary line so far."""


def run(args: argparse.Namespace) -> str:
    """Run the chain; return the summary line. Raises StoppedAtTimeout, with nothing written,
    when the node has not fused the whole bag by --timeout."""
    started = time.monotonic()
    bag = args.bag or sample_bag()
    out_dir, logs = args.output_dir, args.output_dir / 'logs'
    # The fused bag is replaced whole: an input that is it, holds it or lies inside it would go.
    source, fused_bag = resolved(bag), resolved(out_dir / 'fused_bag')
    if source.is_relative_to(fused_bag) or fused_bag.is_relative_to(source):
        raise BagError(f'--bag {bag}: the demo writes {out_dir / "fused_bag"}, which cannot be '
                       'the input bag, hold it or lie inside it; choose another --output-dir')
    check_writable_folder(out_dir)  # before the bag is read; made once it has been
    if (out_dir / 'fused_bag').exists():
        print(f'{PROG}: the outputs of an earlier run in {out_dir} are replaced once this run has '
              'fused the whole bag', file=sys.stderr)
    # Its recorder subscribes with the QoS of qos.output.*: a reliable recorder would hear
    # nothing from an output made best_effort by a publisher override, which is refused.
    values = settings.load_offline_params(args.params)
    with open_bag(bag) as reader:
        thermal, visible = pick_topics(image_topics(reader, bag), bag, args.thermal_topic,
                                       args.visible_topic, values)
        # The thermal topic's own span: the bag's may be another topic's (a status topic).
        _, span_s = log_span(reader, bag, thermal.topic)
    period_s = thermal_period(span_s, thermal.count)
    rate = args.rate
    if rate is None:
        rate, model_s = sustainable_rate(bag, thermal, visible, values, period_s)
        print(f'{PROG}: the model takes {model_s * 1e3:.0f} ms a pair here and the thermal '
              f'camera sends a frame every {period_s * 1e3:.0f} ms: playing at rate {rate:g} '
              '(--rate to choose)', file=sys.stderr)
    # Read before the chain starts: the recorder must not wait on a pass over a long bag.
    expected, end_ns = playable_messages(bag, {'thermal': thermal, 'visible': visible})
    shutil.rmtree(logs / 'ros', ignore_errors=True)  # this run's ROS logs, not every run's
    logs.mkdir(parents=True, exist_ok=True)
    isolate_dds(args.domain_id, logs)
    play, node_command = chain_commands(args, bag, (thermal, visible), values, rate, logs)
    print(f'{PROG}: playing {bag} ({thermal.describe()}, {visible.describe()}) through '
          f'{settings.NODE_NAME} in ROS_DOMAIN_ID {args.domain_id} on loopback; logs in {logs}',
          file=sys.stderr)

    def summary(status: dict, fused: int, drained_ok: bool) -> str:
        return summary_line(status, fused, time.monotonic() - started, drained_ok, rate,
                            period_s)

    # Done once the clock passed the sync timeout of the cameras' last frame and all is fused.
    done_after = end_ns + round((values['sync.timeout'] + values['sync.slop'] + 1) * 1e9)
    status, fused = record(out_dir / 'fused_bag', values, node_command, play, expected,
                           done_after, logs, started + args.timeout, summary)
    frames, previews = write_outputs(bag, (thermal, visible), values, out_dir)
    line = summary(status, fused, True)
    write_text_atomically(out_dir / 'summary.txt', line + '\n')
    video = f'{VIDEO} ({frames} frames)' if frames else 'no video (no pair was fused)'
    print(f'{PROG}: wrote {out_dir / "fused_bag"}, {len(previews)} previews, {video} and '
          f'summary.txt in {out_dir}', file=sys.stderr)
    return line


def chain_commands(args: argparse.Namespace, bag: pathlib.Path, topics: tuple, values: dict,
                   rate: float, logs: pathlib.Path) -> tuple[list, list]:
    """The player's and the node's command lines: the bag's (thermal, visible) `topics`
    remapped onto the node's inputs of their transports, played at `rate`."""
    play = [executable('s4fusion-play'), str(bag), '--clock', '--keep-alive',
            '--rate', str(rate), '--topics', *(topic.topic for topic in topics)]
    # On sim time the node times sync.timeout at the pace of the player's /clock (below 1).
    node_command = [executable(settings.NODE_NAME), '--ros-args', '--params-file',
                    str(node_params_file(args, logs)), '-p', 'use_sim_time:=true']
    for role, topic in zip(ROLES, topics):
        # A CompressedImage topic goes to the node's input of its transport.
        suffix = '' if topic.transport == 'raw' else f'/{topic.transport}'
        play += ['--remap', f'{topic.topic}:={NODE_TOPICS[role]}{suffix}']
        node_command += ['-p', f'{role}.transport:={topic.transport}']
    return play, node_command


def record(fused_bag: pathlib.Path, values: dict, node_command: list, play: list,
           expected: dict, done_after: int, logs: pathlib.Path, deadline: float,
           summary) -> tuple[dict, int]:
    """Start the node, then the player once the node subscribes, and record the node's outputs
    into `fused_bag` until it has fused the whole bag; returns the node's last diagnostics and
    the fused images recorded. Past the monotonic `deadline` raises StoppedAtTimeout with
    summary(diagnostics, fused images, False), and a failed write into the bag (a full disk)
    BagError naming it, the partial bag discarded: an earlier run's outputs stay. Both children
    are stopped whatever happens."""
    # Ctrl-C must reach this code as KeyboardInterrupt, so that the children are stopped.
    rclpy.init(args=[PROG], signal_handler_options=SignalHandlerOptions.NO)
    node_process = player = None
    try:
        monitor = Monitor()
        with create_bag(fused_bag, 'mcap', overwrite=True) as writer:
            # The node's output reliability: a reliable subscription hears no best_effort one.
            qos = qos_profile(values['qos.output.reliability'], 50)
            recorder = TopicRecorder(monitor, writer, dict.fromkeys(settings.OUTPUT_TOPICS, IMAGE),
                                     qos, output_qos_of(values))
            node_process = start_child(node_command, logs / 'node.log')
            if not monitor.spin_until(lambda: node_process.poll() is not None
                                      or monitor.count_publishers(FUSED_TOPIC) > 0, 120):
                raise BagError(f'{settings.NODE_NAME} did not come up in 120 s')
            if node_process.poll() is not None:
                raise BagError(f'{settings.NODE_NAME} exited:\n{tail(logs / "node.log")}')
            # Plays once the node subscribes: it joins the graph before its model is loaded.
            player = start_child(play + ['--wait-for', settings.NODE_NAME], logs / 'player.log')
            arrivals = Arrivals()
            drained_ok = monitor.spin_until(
                lambda: player.poll() is not None or node_process.poll() is not None
                or drained(monitor, recorder, expected, done_after, arrivals),
                max(1.0, deadline - time.monotonic()))
            for process, name in ((player, 'player'), (node_process, 'node')):
                if process.poll() is not None:
                    raise BagError(f'the {name} exited early:\n{tail(logs / f"{name}.log")}')
            fused, status = recorder.counts[FUSED_TOPIC], monitor.status
            if not (drained_ok and drained(monitor, recorder, expected, done_after, arrivals)):
                raise StoppedAtTimeout(summary(status, fused, False))
            counts = received_counts(monitor, expected)
            lost = {role: expected[role] - counts[role] for role in expected
                    if counts[role] < expected[role]}
            if lost:
                print(f'{PROG}: ' + ' and '.join(f'{count:.0f} {role}'
                                                 for role, count in lost.items())
                      + ' frame(s) did not reach the node (the middleware dropped them while the '
                      'node was behind; a lower --rate avoids it)', file=sys.stderr)
            # Stopped before the bag gets its name: a Ctrl-C while they stop (seconds) leaves
            # the earlier run's outputs whole, as the message then says.
            stop(player)
            stop(node_process)
        return status, fused
    except WRITE_ERRORS as error:  # rosbags' (a full disk) name no file
        raise BagError(f'recording {fused_bag} failed: {error}; nothing was written in '
                       f'{fused_bag.parent} (the outputs of an earlier run there stay)') from error
    finally:
        # Another Ctrl-C (a second press, ros2 launch's SIGTERM) asks for what is under way:
        # cut short, the node would be left to stop on its own after the demo has exited.
        with stop_signals_handled(signal.SIG_IGN):
            stop(player)
            stop(node_process)
            rclpy.try_shutdown()


def write_outputs(bag: pathlib.Path, topics: tuple, values: dict, out_dir: pathlib.Path
                  ) -> tuple[int, list]:
    """The previews and the video of the fused bag now in `out_dir`, after removing what an
    earlier run made from its own; returns the video's frames and the previews' paths."""
    missing = f'{out_dir / "fused_bag"} was written, its previews, video and summary were not'
    try:
        for stale in [*out_dir.glob('preview_*.png'), out_dir / VIDEO, out_dir / 'summary.txt']:
            stale.unlink(missing_ok=True)
        previews = write_previews(out_dir / 'fused_bag', out_dir)
        frames = export_recording(bag, *(topic.topic for topic in topics),
                                  pipeline_from_params(values), out_dir / 'fused_bag',
                                  *settings.OUTPUT_TOPICS, out_dir / VIDEO)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(missing) from None
    except (BagError, OSError, ValueError) as error:
        raise BagError(f'{error}; {missing}') from error
    return frames, previews


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    args = parse_args(argv)
    stop_on_signals()

    def describe(error: Exception) -> str:
        if isinstance(error, StoppedAtTimeout):  # outputs of part of the bag would pass as whole
            return (f'{error}\n{PROG}: the bag was not fused to its end within --timeout '
                    f'{args.timeout:g} s; nothing was written in {args.output_dir} (the outputs '
                    'of an earlier run there stay)')
        return str(error)  # ValueError: e.g. a device it does not have

    return run_command(
        PROG, lambda: print(f'{PROG}: {run(args)}') or 0,
        (StoppedAtTimeout, BagError, settings.SettingsError, OSError, CheckpointError, ValueError),
        lambda stop: f'interrupted; {str(stop) or "no fused bag written"}', describe)


if __name__ == '__main__':  # python -m, set up by its package's __init__
    from ..entry_points import run_tool
    sys.exit(run_tool(main))
