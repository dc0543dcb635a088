"""s4fusion-play: publish a rosbag2's image topics with their recorded timing (no ros2 bag needed).

By default every image topic but the fusion node's outputs, and their cameras' camera_info (the
`camera_info` sibling of an image topic, which follows a --remap of its image topic as
image_transport looks for it; not waited for: a node may not want every camera's).

Messages are read with rosbags and published as the recorded CDR bytes (rclpy's publish(bytes)),
typed from the bag's metadata, at the recorded pace scaled by --rate; an image message that does
not decode (a torn recording) is skipped and counted, since its subscribers would drop it without
a word. With --clock the player also
publishes /clock (bag time) so that nodes with use_sim_time see the recording's time and their
timers (diagnostics) run on it; the fusion node then times sync.timeout at that pace too
where it is slower than real time. Played
without /clock into a node on wall time at --rate R below 1, a frame recorded more than
R x sync.timeout after its stamp is given up (its pair lost, and the pixels of later pairs moved by
the thermal normalization's smoothing) where s4fusion-bag pairs it: give that node
sync.timeout / R.

With --start-offset / --playback-duration (seconds from the bag's first message, as ros2 bag play
counts them) only the messages the bag logged in that window are played, the newest camera_info
of each played camera before it first (its calibration, in effect at the window's start); --loop
plays the window again and again, and /clock starts at the window's start.

Reliable keep-last publishers by default: large best-effort images are lost between processes on
one machine (docs/node.md, "QoS"); a topic recorded transient-local (latched, such as
/robot_description with --topics) is played so, and reliable even with --best-effort. Playback
starts once every topic has a subscriber (or --wait seconds passed) and discovery had a moment to
settle, so early messages are not lost.
With --wait-for NODE it also waits for that node to subscribe to every played topic: a node that
joins the graph first and subscribes only once its model is loaded, or one topic after another,
would otherwise miss the start of the bag on a topic. Topics it still does not subscribe to after
--wait seconds, or SUBSCRIBE_GRACE_S after its first subscription (a camera it has no input
for), are named, and played.
"""

import argparse
import importlib
import pathlib
import sys
import time

import rclpy
from rclpy.duration import Duration
from rclpy.exceptions import (InvalidNamespaceException, InvalidNodeNameException,
                              InvalidTopicNameException)
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node, NodeNameNonExistentError
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rclpy.validate_full_topic_name import validate_full_topic_name
from rclpy.validate_namespace import validate_namespace
from rclpy.validate_node_name import validate_node_name
from rosgraph_msgs.msg import Clock

from ..bagio import (COMPRESSED_IMAGE, IMAGE_TYPES, NODE_OUTPUT, BagError, cut_files,
                     damaged_files, deserialize, latched_topics, log_window, lost_messages,
                     newest_before, open_bag, read_messages, topic_types)
from ..camera_info import CAMERA_INFO, camera_info_topic
from ..cli import add_window_options, ignore_stop_signals, stop_on_signals, time_window
from ..messages import ns_to_sec_nanosec
from ..settings import SPECS, THERMAL_TRANSPORTS
from ..sync import CLOCK_JUMP_S
from .context import init_rclpy, LogFolderError
from .graph import node_known, node_of
from .parameters import kept_apart, qos_profile

PROG = 's4fusion-play'
# Reliable history a late-matching reader can still be repaired from (one second at 30 Hz).
PUBLISH_DEPTH = 30
# Fast DDS can drop the first samples even after the writer sees the reader: give it a moment.
DISCOVERY_SETTLE_S = 1.0
# With --wait-for: how long after the node's first subscription to a played topic the player
# waits for its others (a node subscribing lazily) before naming them and playing.
SUBSCRIBE_GRACE_S = 10.0
NAMES_WAIT_S = 2.0  # for the graph to name a subscriber's node (graph.UNKNOWN_NAMES)
ACK_TIMEOUT_S = 10.0
ACK_SLICE_S = 0.1  # waited at a time, so that a Ctrl-C is heard between (the wait is in C)
# A --loop pass lasts at least this much bag time: a bag of one moment repeats, not spins.
LOOP_MINIMUM_S = 1.0
RATE_LIMITS = (1e-6, 1e6)  # of --rate and --clock-rate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument('bag', type=pathlib.Path, help='rosbag2 directory or .db3 / .mcap file')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='playback speed factor (default: %(default)s); below 1 without '
                             '--clock and use_sim_time, give the node sync.timeout / RATE')
    add_window_options(parser, 'play')
    parser.add_argument('--loop', action='store_true',
                        help='play the bag (or the window of the options above) again and again')
    parser.add_argument('--clock', action='store_true',
                        help='publish /clock (bag time, from the start of the window) for nodes '
                        'with use_sim_time')
    parser.add_argument('--clock-rate', type=float, default=100.0, metavar='HZ',
                        help='/clock messages per second (default: %(default)s)')
    parser.add_argument('--topics', nargs='+', metavar='TOPIC',
                        help="topics to play (default: every Image/CompressedImage topic but "
                        "the fusion node's outputs, and their camera_info siblings)")
    parser.add_argument('--remap', action='append', default=[], metavar='OLD:=NEW',
                        help='publish topic OLD as NEW (repeatable)')
    parser.add_argument('--wait', type=float, default=30.0, metavar='SECONDS',
                        help='wait up to SECONDS for a subscriber on every topic before playing '
                        '(0: do not wait; default: %(default)s)')
    parser.add_argument('--wait-for', metavar='NODE',
                        help='before playing, wait (up to --wait seconds) until the node NODE '
                        '(name or /namespace/name) subscribes to every played topic, e.g. a '
                        'fusion node still loading its model; at most 10 s after it subscribes '
                        'to the first (topics NODE does not subscribe to by then are named, and '
                        'played; --topics leaves them out)')
    parser.add_argument('--best-effort', action='store_true',
                        help='publish best effort instead of reliable (not the topics '
                        'recorded latched)')
    parser.add_argument('--keep-alive', action='store_true',
                        help='after the end keep running (and advancing /clock) until Ctrl-C, '
                        'so that nodes on sim time finish their timers')
    args = parser.parse_args(argv)
    if args.topics:  # a topic named twice is played once, not refused as two streams on it
        args.topics = list(dict.fromkeys(args.topics))
    for option in ('rate', 'clock_rate'):
        # Beyond these a wait overflows time.sleep, or /clock ticks faster than it can publish.
        if not RATE_LIMITS[0] <= getattr(args, option) <= RATE_LIMITS[1]:
            parser.error(f'--{option.replace("_", "-")} must be from {RATE_LIMITS[0]:g} to '
                         f'{RATE_LIMITS[1]:g}')
    if not args.wait >= 0:  # nan too
        parser.error('--wait must be >= 0')
    try:
        args.remap = _remaps(args.remap)
        if args.wait_for:  # (name, namespace), as the graph is asked for its subscriptions
            namespace, _, name = args.wait_for.rpartition('/')
            args.wait_for_node = name, '/' + namespace.lstrip('/')
            validate_node_name(name)
            if namespace:
                validate_namespace(args.wait_for_node[1])
    except (ValueError, InvalidTopicNameException, InvalidNodeNameException,
            InvalidNamespaceException) as error:
        parser.error(str(error))
    return args


def _remaps(items: list[str]) -> dict[str, str]:
    """{OLD: NEW} of the --remap options; ValueError (or rclpy's) for a malformed one, a topic
    remapped twice, or a NEW that is the fusion node's output."""
    remaps = {}
    for item in items:
        old, separator, new = item.partition(':=')
        if not (separator and old and new):
            raise ValueError(f"--remap expects OLD:=NEW, got '{item}'")
        if old in remaps:
            raise ValueError(f'--remap {old} is given twice')
        # As the player resolves it: relative names go below the root namespace.
        full = new if new.startswith('/') else '/' + new
        validate_full_topic_name(full)
        if NODE_OUTPUT.search(full):
            raise ValueError(f"--remap {item}: {new} is the fusion node's output")
        remaps[old] = new
    return remaps


def message_class(msgtype: str):
    """Import the rclpy message class of a bag type name like 'sensor_msgs/msg/Image'."""
    package, _, name = msgtype.rpartition('/')
    try:
        return getattr(importlib.import_module(package.replace('/', '.')), name)
    except (ImportError, AttributeError):
        raise BagError(f"no Python message type for '{msgtype}' (install its ROS package, "
                       f"e.g. ros-{msgtype.split('/')[0].replace('_', '-')})") from None


def split_transport(topic: str) -> tuple[str, str]:
    """(base topic, transport) of an image topic as image_transport names a transport's topic:
    /cam/image_raw/compressed is /cam/image_raw in the compressed transport, /cam/image_raw raw."""
    base, _, last = topic.rpartition('/')
    if base and last in THERMAL_TRANSPORTS[1:]:
        return base, last
    return topic, 'raw'


class BagPlayer:
    """Publishes a bag's topics at their recorded pace, with an optional /clock."""

    def __init__(self, node: Node, args: argparse.Namespace):
        self.node = node
        self.args = args
        with open_bag(args.bag) as reader:
            self.window = log_window(reader, args.bag, time_window(args))
            types = topic_types(reader)
            recorded = [(c.topic, c.msgtype) for c in reader.connections]
            latched = latched_topics(reader)
            for cut in cut_files(reader):
                print(f'{PROG}: {args.bag}: {cut}', file=sys.stderr)
        # Those recorded with both image types too (merged bags): refused below, by name.
        images = sorted({topic for topic, msgtype in recorded if msgtype in IMAGE_TYPES})
        wanted = args.topics or [t for t in images if not NODE_OUTPUT.search(t)]
        if not args.topics and len(wanted) < len(images):
            print(f"{PROG}: not playing the fusion node's outputs "
                  f"{', '.join(t for t in images if t not in wanted)} (name them with --topics "
                  f"to play them)", file=sys.stderr)
        # {camera_info topic: its image topic}: played beside the images (as remapped), not
        # waited for; with --topics, those it names.
        siblings = {image: camera_info_topic(image, types.get(image) == COMPRESSED_IMAGE)
                    for image in wanted if types.get(image) in IMAGE_TYPES}
        self.camera_infos = {info: image for image, info in siblings.items()
                             if types.get(info) == CAMERA_INFO
                             and (not args.topics or info in args.topics)}
        wanted = [*wanted, *(info for info in self.camera_infos if info not in wanted)]
        in_bag = f"topics in the bag: {', '.join(sorted(types)) or 'none'}"
        missing = [t for t in wanted if t not in types]
        if missing or not wanted:
            raise BagError(f"{args.bag}: no topic {', '.join(missing) or 'with images'} to play; "
                           f'{in_bag}')
        unplayed = [t for t in args.remap if t not in wanted]  # a typo, or left out by --topics
        if unplayed:
            raise BagError(f"{args.bag}: --remap {', '.join(unplayed)}: not a played topic; "
                           f"played: {', '.join(wanted)}; {in_bag}")
        for topic in wanted:  # a ROS 2 topic has one type
            skipped = sorted({msgtype for name, msgtype in recorded
                              if name == topic and msgtype != types[topic]})
            if types[topic] is None:
                raise BagError(f'{args.bag}: {topic} was recorded with several message types '
                               f'({", ".join(skipped)}): it cannot be played as one topic')
            if skipped:
                print(f'{PROG}: {topic}: playing its {types[topic]} messages, not those of '
                      f'{", ".join(skipped)} recorded on it too', file=sys.stderr)
        for info, image in self.camera_infos.items():  # beside its image, as remapped
            if info not in args.remap and image in args.remap:
                new = args.remap[image]
                # Still a transport's topic where it keeps the transport's name (.../compressed).
                transport = (types[image] == COMPRESSED_IMAGE
                             and new.rpartition('/')[2] == image.rpartition('/')[2])
                args.remap[info] = camera_info_topic(new, transport)
        names = {}
        for topic in wanted:  # two streams on one topic: a subscriber gets both, mixed
            name = args.remap.get(topic, topic)
            if name.lstrip('/') in names:
                raise BagError(f'{topic} and {names[name.lstrip("/")]} would both be published '
                               f'on {name}: --remap one of them elsewhere')
            names[name.lstrip('/')] = topic
            try:  # ROS 1 allows names ROS 2 refuses, such as /camera/1/image_raw
                validate_full_topic_name(name if name.startswith('/') else '/' + name)
            except InvalidTopicNameException as error:
                reason = str(error).splitlines()[0].rstrip(':')  # the rest points at the fault
                raise BagError(f'{args.bag}: {topic}: {reason}; publish it under another name '
                               f'with --remap {topic}:=NEW') from None
        self.publishers = {}
        self.types = types  # {the bag's topic: its message type}
        for topic in wanted:
            # As recorded, for subscribers that join late; reliable whatever --best-effort
            # says (meant for the image streams): a best-effort writer reaches only best-effort
            # late readers.
            latching = topic in latched
            qos = qos_profile('best_effort' if args.best_effort and not latching else 'reliable',
                              PUBLISH_DEPTH)
            if latching:
                qos.durability = DurabilityPolicy.TRANSIENT_LOCAL
            self.publishers[topic] = node.create_publisher(
                message_class(types[topic]), args.remap.get(topic, topic), qos)
        self.clock_pub = (node.create_publisher(
            Clock, '/clock', QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
            if args.clock else None)
        self.published = dict.fromkeys(wanted, 0)
        self.undecodable = dict.fromkeys(wanted, 0)
        self.publish_errors = 0
        self.bag_time = 0  # ns, what /clock says
        self.played_span_s = 0.0  # s of bag time the last pass played (play_once)
        self.lost = 0  # messages of the damaged chunks skipped: a partial play (exit 1)
        self.next_tick = 0.0  # monotonic time of the next /clock message

    def wait_for_subscribers(self) -> None:
        """Wait (at most --wait s) for a subscriber on every topic, then let discovery settle.

        With --wait-for for that node's subscription to every topic instead: once it subscribes
        to one, at most SUBSCRIBE_GRACE_S more for the others, since a recording often holds a
        camera the node has no input for (those are named, and played).
        """
        if self.args.wait <= 0:
            return
        start = time.monotonic()
        deadline, graced = start + self.args.wait, False
        if self._unsubscribed():
            print(f'{PROG}: waiting for {self.args.wait_for} to subscribe', file=sys.stderr)
        while True:
            unsubscribed = self._unsubscribed()
            unmatched = [topic for topic in self._unmatched() if topic not in unsubscribed]
            now = time.monotonic()
            waited_for = len(self.publishers) - len(self.camera_infos)
            if not graced and self.args.wait_for and len(unsubscribed) < waited_for:
                deadline, graced = min(deadline, now + SUBSCRIBE_GRACE_S), True
            if not (unsubscribed or unmatched) or now >= deadline:
                break
            time.sleep(0.05)
        waited = f'after {time.monotonic() - start:.0f} s'  # --wait, or the grace
        if unsubscribed:
            print(f'{PROG}: {self.args.wait_for} does not subscribe to {", ".join(unsubscribed)} '
                  f'{waited}; playing anyway', file=sys.stderr)
            for line in self._other_transports(unsubscribed):
                print(f'{PROG}: {line}', file=sys.stderr)
        if unmatched:
            print(f'{PROG}: no subscriber on {", ".join(unmatched)} {waited}; playing anyway',
                  file=sys.stderr)
            for line in self._incompatible(unmatched):
                print(f'{PROG}: {line}', file=sys.stderr)
        time.sleep(DISCOVERY_SETTLE_S)

    def _incompatible(self, topics: list[str]) -> list[str]:
        """Subscribers on `topics` that the player's QoS keeps apart (parameters.kept_apart), or
        that take another message type, waiting at most NAMES_WAIT_S for the graph to name their
        nodes."""
        played = {p.topic_name: (p.qos_profile, self.types[topic])
                  for topic, p in self.publishers.items()}
        deadline = time.monotonic() + NAMES_WAIT_S
        while True:
            kept = [(topic, info, kept_apart(played[topic][0], info.qos_profile))
                    for topic in topics
                    for info in self.node.get_subscriptions_info_by_topic(topic)]
            kept = [(topic, info, policies) for topic, info, policies in kept
                    if policies or info.topic_type != played[topic][1]]
            if all(node_known(info) for _, info, _ in kept) or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        lines = []
        for topic, info, policies in kept:
            (offered, msgtype), wanted = played[topic], info.qos_profile
            if info.topic_type != msgtype:
                lines.append(f'{topic}: {node_of(info)} subscribes to it as {info.topic_type}; '
                             f'the player publishes {msgtype} on it')
                continue
            reasons = [f'{name} {getattr(wanted, name).name.lower()} against the player\'s '
                       f'{getattr(offered, name).name.lower()}'
                       + (' (drop --best-effort)' if name == 'reliability' else '')
                       for name in policies]
            lines.append(f'{topic}: {node_of(info)} subscribes with a QoS the player does not '
                         f'offer: {", ".join(reasons)}')
        return lines

    def _subscribed(self) -> set[str]:
        """Topic names the --wait-for node subscribes to (none while the graph lacks it)."""
        try:
            return {topic for topic, _ in self.node.get_subscriber_names_and_types_by_node(
                *self.args.wait_for_node)}
        except NodeNameNonExistentError:
            return set()

    def _unsubscribed(self) -> list[str]:
        """Played topic names the --wait-for node does not subscribe to (yet); none without it."""
        if not self.args.wait_for:
            return []
        subscribed = self._subscribed()
        return [p.topic_name for topic, p in self.publishers.items()
                if p.topic_name not in subscribed and topic not in self.camera_infos]

    def _other_transports(self, topics: list[str]) -> list[str]:
        """For each of `topics` that the --wait-for node takes in another image_transport
        transport (the bag's /visible/image_raw/compressed, the node's /visible/image_raw, as
        for the shipped sample bag and a node started with its defaults): the fix."""
        by_base = {}  # base topic -> the first subscribed topic of it, by name
        for other in sorted(self._subscribed()):
            by_base.setdefault(split_transport(other)[0], other)
        lines = []
        for topic in topics:  # none of them subscribed: another name of its base is the other
            base, transport = split_transport(topic)
            other = by_base.get(base)
            if other is None:
                continue
            # The camera options that take this transport (compressedDepth: thermal).
            options = ' or '.join(f'-p {camera}.transport:={transport}'
                                  for camera in ('thermal', 'visible')
                                  if transport in SPECS[f'{camera}.transport'].choices)
            lines.append(
                f'{topic}: {self.args.wait_for} subscribes to {other}, the same image in the '
                f'{split_transport(other)[1]} transport: start the node with that camera\'s '
                f'transport at {transport} ({options}) to fuse it')
        return lines

    def _unmatched(self) -> list[str]:
        """Played topic names still without a matched subscriber."""
        return [p.topic_name for topic, p in self.publishers.items()
                if p.get_subscription_count() == 0 and topic not in self.camera_infos]

    def play_once(self, minimum_s: float = 0.0) -> int:
        """Publish the bag's window (the whole bag without one) once, from its start, at --rate,
        taking at least `minimum_s` seconds of bag time; returns the number of messages it read
        in the window (and keeps in `played_span_s` the bag time from the first played message
        to the last).

        The newest camera_info before the window comes first: the calibration in effect at its
        start, which the node's cache finds by stamp (a driver may publish it seldom)."""
        read = 0
        first = last = None
        with open_bag(self.args.bag) as reader:
            start_ns = self.window.start
            start_wall = time.monotonic()
            self.bag_time = start_ns
            self.next_tick = start_wall
            for connection, _, raw in newest_before(reader, self.args.bag, self.camera_infos,
                                                    start_ns):
                self._publish(connection.topic, bytes(raw))
            try:
                for connection, log_time, raw in read_messages(
                        reader, self.args.bag, self.publishers, start_ns, self.window.stop):
                    self._sleep_until(start_wall + (log_time - start_ns) / 1e9 / self.args.rate,
                                      start_wall, start_ns)
                    # An image rmw cannot deserialize its subscribers drop without a word:
                    # skipped here, counted and named, as s4fusion-bag skips it.
                    try:
                        if connection.msgtype in IMAGE_TYPES:
                            deserialize(self.args.bag, connection, raw)
                    except BagError as error:
                        self._undecodable(connection.topic, error)
                    else:
                        self._publish(connection.topic, bytes(raw))
                    read += 1
                    first, last = (log_time if first is None else first), log_time
            finally:  # a stop mid-pass too: the summary counts what its skipped chunks lost
                lost = lost_messages(reader, start_ns, self.window.stop)
                if lost and not self.lost:  # said once, not on every --loop pass
                    for damaged in damaged_files(reader, start_ns, self.window.stop):
                        print(f'{PROG}: {self.args.bag}: {damaged}', file=sys.stderr)
                self.lost += lost  # over the passes, as the published counts are
            self._sleep_until(start_wall + minimum_s / self.args.rate, start_wall, start_ns)
        self.played_span_s = 0.0 if first is None else (last - first) / 1e9
        return read

    def play(self) -> None:
        """Publish the bag's window once, or with --loop again and again."""
        if not self.play_once(LOOP_MINIMUM_S if self.args.loop else 0.0) and self.args.loop:
            within = '' if self.window.whole else f' {self.window.describe()}'
            raise BagError(f'{self.args.bag}: no message on the played topics{within}, nothing '
                           'to loop')
        if self.args.loop and self.played_span_s <= CLOCK_JUMP_S:
            print(f'{PROG}: warning: the played messages span {self.played_span_s:.2f} s; '
                  f'looped, their stamps jump back by no more than the {CLOCK_JUMP_S:g} s a '
                  f"node's synchronizer takes for a clock jump by default, so it counts the "
                  f'passes after the first as late (unless its sync.clock_jump is lower)',
                  file=sys.stderr)
        while self.args.loop:
            self.play_once(LOOP_MINIMUM_S)

    def idle(self) -> None:
        """Keep /clock advancing from the end of the bag until interrupted."""
        start_wall, start_ns = time.monotonic(), self.bag_time
        while True:
            self._sleep_until(time.monotonic() + 1.0, start_wall, start_ns)

    def _sleep_until(self, target: float, start_wall: float, start_ns: int) -> None:
        """Sleep until the monotonic time `target`, publishing /clock ticks on the way."""
        while True:
            now = time.monotonic()
            if self.clock_pub is not None and now >= self.next_tick:
                self._publish_clock(start_ns + round((now - start_wall) * self.args.rate * 1e9))
                self.next_tick = max(self.next_tick + 1.0 / self.args.clock_rate, now)
            wake = min(target, self.next_tick) if self.clock_pub is not None else target
            if wake <= now:
                return
            time.sleep(wake - now)

    def _publish_clock(self, stamp_ns: int) -> None:
        self.bag_time = stamp_ns
        message = Clock()
        message.clock.sec, message.clock.nanosec = ns_to_sec_nanosec(stamp_ns)
        self.clock_pub.publish(message)

    def _publish(self, topic: str, data: bytes) -> None:
        try:
            self.publishers[topic].publish(data)
        except Exception as error:  # noqa: BLE001 - RCLError 'cannot publish data' under load
            self.publish_errors += 1
            if self.publish_errors == 1:
                print(f'{PROG}: publishing on {topic} failed: {error}', file=sys.stderr)
            return
        self.published[topic] += 1

    def _undecodable(self, topic: str, error: BagError) -> None:
        self.undecodable[topic] += 1
        if self.undecodable[topic] == 1:
            print(f'{PROG}: skipping undecodable messages (first: {error})', file=sys.stderr)

    def wait_for_acks(self) -> list[str]:
        """Let reliable subscribers receive everything before the publishers go away, for
        ACK_TIMEOUT_S in all; returns the topics whose subscribers had not confirmed by then."""
        deadline = time.monotonic() + ACK_TIMEOUT_S
        waiting = list(self.publishers.values())
        while waiting and time.monotonic() < deadline:
            waiting = [publisher for publisher in waiting
                       if not publisher.wait_for_all_acked(Duration(seconds=ACK_SLICE_S))]
        return [publisher.topic_name for publisher in waiting]

    def summary(self) -> str:
        """One line: messages published per topic."""
        counts = ', '.join(f'{self.publishers[topic].topic_name} {count}'
                           for topic, count in self.published.items())
        errors = f'; {self.publish_errors} publish errors' if self.publish_errors else ''
        skipped = ', '.join(f'{self.publishers[topic].topic_name} {count}'
                            for topic, count in self.undecodable.items() if count)
        return (f'{PROG}: published {counts}{errors}'
                + (f'; skipped as undecodable: {skipped}' if skipped else '')
                + (f'; lost: {self.lost} messages of the damaged chunks skipped' if self.lost
                   else ''))


def main(argv: list[str] | None = None) -> int:
    """Console entry point; Ctrl-C stops playback cleanly (exit code 0), a bag that fails
    midway after a summary of what was played (exit code 1), as does one whose damaged chunks
    were skipped."""
    args = parse_args(argv)
    # Not sys.argv: rcl would take OLD:=NEW there as a global remap. No rclpy signal handlers:
    # they invalidate the context at Ctrl-C while the player is still publishing (it never spins).
    try:
        init_rclpy(args=[PROG], signal_handler_options=SignalHandlerOptions.NO)
    except LogFolderError as error:
        print(f'{PROG}: {error}', file=sys.stderr)
        return 1
    stop_on_signals()
    node = player = failure = None
    try:
        node = Node('s4fusion_player', start_parameter_services=False)
        player = BagPlayer(node, args)
        player.wait_for_subscribers()
        whole = player.window.whole
        print(f'{PROG}: playing {args.bag}' + ('' if whole else f' {player.window.describe()}')
              + f' at rate {args.rate:g}'
              + (f' with /clock at {args.clock_rate:g} Hz' if args.clock else ''), file=sys.stderr)
        try:
            player.play()
        except BagError as error:  # a bag that fails midway: what it played is still delivered
            failure = error
        unconfirmed = player.wait_for_acks()
        ended = f'stopped: {failure}' if failure else 'end of bag' if whole else 'end of window'
        print(f'{player.summary()}; {ended}'
              + (f'; not confirmed within {ACK_TIMEOUT_S:g} s by a reliable subscriber of '
                 f'{", ".join(unconfirmed)}' if unconfirmed else ''), file=sys.stderr, flush=True)
        if args.keep_alive and not failure:
            player.idle()
    except (KeyboardInterrupt, ExternalShutdownException):
        ignore_stop_signals()
        if player is not None:
            print(f'{player.summary()}; stopped' + (f': {failure}' if failure else ''),
                  file=sys.stderr)
        else:  # while the bag's metadata was read: nothing was published
            print(f'{PROG}: stopped before playing', file=sys.stderr)
    except BagError as error:
        print(f'{PROG}: {error}', file=sys.stderr)
        return 1
    finally:
        ignore_stop_signals()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 1 if failure or (player is not None and player.lost) else 0


if __name__ == '__main__':  # python -m, set up by its package's __init__
    from ..entry_points import run_tool
    sys.exit(run_tool(main))
