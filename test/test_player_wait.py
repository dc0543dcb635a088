"""s4fusion-play --wait-for NODE: playback starts once that node subscribes to the topics.

Even when another subscriber is there first: a fusion node joins the ROS graph before it has
loaded its model and subscribed.
"""

from collections import Counter
import pathlib
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from rosbags.rosbag2 import Reader, StoragePlugin, Writer

from ros_harness import rclpy
from support import (CAMERA_INFO, COMPRESSED, IMAGE, THERMAL_TOPIC, TYPESTORE, VISIBLE_TOPIC,
                     StreamReader, bag_image_message, reading, visible_camera_info, write_bag)

pytestmark = pytest.mark.ros

from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from s4fusion_ros.bagio import image_topics, open_bag, pick_topics  # noqa: E402
from s4fusion_ros.cli import interrupt  # noqa: E402
from s4fusion_ros.messages import stamp_to_ns  # noqa: E402
from s4fusion_ros.ros.demo import sample_bag  # noqa: E402
from s4fusion_ros.ros.player import (SUBSCRIBE_GRACE_S, BagPlayer,  # noqa: E402
                                    message_class)

PLAYER = [sys.executable, '-m', 's4fusion_ros.ros.player']
NAMESPACE = '/wait_test'


def subscribe(node, topics: dict, received: list) -> None:
    """Record (arrival time, name) of every message on the names of {name: the bag's topic}."""
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    for name, topic in topics.items():
        node.create_subscription(message_class(topic.msgtype), name,
                                 lambda msg, n=name: received.append((time.monotonic(), n)), qos)


def played_topics(bag: pathlib.Path) -> dict:
    """{name the player publishes it on below NAMESPACE: the bag's topic} of the two cameras."""
    with open_bag(bag) as reader:
        played = pick_topics(image_topics(reader, bag), bag)
    return {f'{NAMESPACE}/{role}': topic for role, topic in zip(('thermal', 'visible'), played)}


def remaps(topics: dict) -> list[str]:
    """The player's options that publish the bag's topics under their names in `topics`."""
    return [option for name, topic in topics.items()
            for option in ('--remap', f'{topic.topic}:={name}')]


def play_for(node: str, bag: pathlib.Path, topics: dict, wait: float) -> subprocess.Popen:
    """s4fusion-play of `bag` at rate 4 with --wait-for the node NAMESPACE/`node`, its
    `topics` remapped into the namespace; stderr joins stdout, read into `player.output`."""
    return with_output(subprocess.Popen(
        [*PLAYER, str(bag), '--rate', '4', '--wait', str(wait), '--wait-for',
         f'{NAMESPACE}/{node}', *remaps(topics)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))


def with_output(player: subprocess.Popen) -> subprocess.Popen:
    """The player, its stdout read into `player.output` (a StreamReader), so that a test waits
    for it with a deadline and shows what it said."""
    player.output = StreamReader(player.stdout)
    return player


def spin_while_playing(player: subprocess.Popen, *nodes) -> str:
    """Spin the nodes until the player (from with_output) has exited and its last messages are
    in; its output. The player is stopped however this ends: a player left running would publish
    into later tests."""
    executor = rclpy.executors.SingleThreadedExecutor()
    for node in nodes:
        executor.add_node(node)
    try:
        end = time.monotonic() + 180
        while player.poll() is None:
            assert time.monotonic() < end, f'the player did not stop:\n{player.output.text()}'
            executor.spin_once(timeout_sec=0.05)
        for _ in range(40):  # messages still in flight when the player exits
            executor.spin_once(timeout_sec=0.05)
    finally:
        executor.shutdown(timeout_sec=10)
        interrupt(player)
    player.output.close()
    return player.output.text()


def with_messages(source: pathlib.Path, path: pathlib.Path, extra) -> pathlib.Path:
    """The bag with the messages `extra(reader)` yields, as (topic, type, log time, message)."""
    with Reader(source) as reader, Writer(path, version=9,
                                          storage_plugin=StoragePlugin.MCAP) as writer:
        copies = {connection.id: writer.add_connection(connection.topic, connection.msgtype,
                                                       typestore=TYPESTORE)
                  for connection in reader.connections}
        for connection, log_time, raw in reader.messages():
            writer.write(copies[connection.id], log_time, raw)
        added = {}
        for topic, msgtype, log_time, message in extra(reader):
            if topic not in added:
                added[topic] = writer.add_connection(topic, msgtype, typestore=TYPESTORE)
            writer.write(added[topic], log_time, TYPESTORE.serialize_cdr(message, msgtype))
    return path


def with_other_image_topics(source: pathlib.Path, path: pathlib.Path,
                            topics: tuple[str, ...]) -> pathlib.Path:
    """The bag with one more image on each of `topics` beside the cameras'."""
    image = np.zeros((8, 8), np.uint8)
    return with_messages(source, path, lambda reader: (
        (topic, IMAGE, reader.start_time,
         bag_image_message(image, 'mono8', reader.start_time, 'depth')) for topic in topics))


def with_visible_infos(source: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    """The bag with a CameraInfo before each visible frame, on the camera_info sibling of the
    visible topic's base topic (/visible/camera_info for /visible/image_raw/compressed)."""
    def infos(reader):
        for connection, log_time, raw in reader.messages():
            if connection.topic == '/visible/image_raw/compressed':
                stamp = stamp_to_ns(TYPESTORE.deserialize_cdr(raw, COMPRESSED).header.stamp)
                yield ('/visible/camera_info', CAMERA_INFO, log_time - 1,
                       visible_camera_info(stamp))
    return with_messages(source, path, infos)


def play_to_subscriber(bag: pathlib.Path, name: str, wait: float) -> tuple[str, int, int]:
    """s4fusion-play of `bag` --wait-for a node NAMESPACE/`name` that subscribes to its two
    cameras from the start: (the player's output, once it exited 0, the camera messages that
    node received, those the bag has)."""
    topics = played_topics(bag)
    rclpy.init()
    try:
        target, received = rclpy.create_node(name, namespace=NAMESPACE), []
        subscribe(target, topics, received)
        player = play_for(name, bag, topics, wait)
        output = spin_while_playing(player, target)
        target.destroy_node()
    finally:
        rclpy.try_shutdown()
    assert player.returncode == 0, output
    return output, len(received), sum(topic.count for topic in topics.values())


def test_a_camera_info_is_played_beside_its_remapped_image_and_not_waited_for(tmp_path):
    # The node subscribes to the visible camera's info, not to every camera's: the player
    # waited for a subscriber on each until --wait ran out.
    output, received, recorded = play_to_subscriber(
        with_visible_infos(sample_bag(), tmp_path / 'bag'), 'info_target', 60)
    assert 'playing anyway' not in output and 'no subscriber' not in output, output
    # /visible/image_raw/compressed played as {NAMESPACE}/visible: its info beside it.
    assert re.search(f'{NAMESPACE}/camera_info 180\\b', output), output
    assert received == recorded, output


def test_a_camera_info_that_topics_names_follows_its_remapped_image(tmp_path):
    # Named with --topics, it stayed where the bag had it while its image was remapped.
    bag = with_visible_infos(sample_bag(), tmp_path / 'bag')
    image = '/visible/image_raw/compressed'
    played = subprocess.run([*PLAYER, str(bag), '--rate', '20', '--wait', '0', '--topics', image,
                             '/visible/camera_info', '--remap',
                             f'{image}:={NAMESPACE}/color/image_raw/compressed'],
                            capture_output=True, text=True, timeout=60)
    assert played.returncode == 0, played.stderr
    assert re.search(f'{NAMESPACE}/color/camera_info 180\\b', played.stderr), played.stderr


def test_playback_waits_for_the_named_node(tmp_path):
    # Not for the bystander there first; the node's own recorded output is not played by default.
    bag = with_other_image_topics(sample_bag(), tmp_path / 'bag', ('/s4fusion_node/fused',))
    topics = played_topics(bag)
    rclpy.init()
    try:
        bystander, early = rclpy.create_node('bystander', namespace=NAMESPACE), []
        subscribe(bystander, topics, early)
        player = play_for('target', bag, topics, 120)
        try:
            # The bystander is matched within a few seconds; the target joins past the grace
            # (SUBSCRIBE_GRACE_S), which runs from its first subscription, not from the start.
            end = time.monotonic() + SUBSCRIBE_GRACE_S + 5  # the player's start-up too
            while time.monotonic() < end:
                rclpy.spin_once(bystander, timeout_sec=0.05)
            assert player.poll() is None and not early, \
                f'the player did not wait for the target:\n{player.output.text()}'
            target, received = rclpy.create_node('target', namespace=NAMESPACE), []
            subscribe(target, topics, received)
            target_started = time.monotonic()
            output = spin_while_playing(player, bystander, target)
        finally:
            interrupt(player)
        assert player.returncode == 0, output
        assert f'waiting for {NAMESPACE}/target to subscribe' in output, output
        assert 'playing anyway' not in output, output
        assert "not playing the fusion node's outputs /s4fusion_node/fused" in output, output
        assert len(received) == sum(t.count for t in topics.values()), output
        assert early and min(t for t, _ in early) > target_started, output
        bystander.destroy_node()
        target.destroy_node()
    finally:
        rclpy.try_shutdown()


def test_playback_waits_for_a_subscriber_on_every_topic_without_a_named_node(tmp_path):
    image = np.zeros((4, 4), np.uint8)
    bag = write_bag(tmp_path / 'bag', [(time_ns, topic, time_ns, 'mono8', image)
                                       for time_ns in (10**9, 2 * 10**9)
                                       for topic in (THERMAL_TOPIC, VISIBLE_TOPIC)], 'mcap')
    topics = {f'{NAMESPACE}{topic}': SimpleNamespace(topic=topic, msgtype=IMAGE)
              for topic in (THERMAL_TOPIC, VISIBLE_TOPIC)}
    player = with_output(subprocess.Popen(
        [*PLAYER, str(bag), '--wait', '30', '--rate', '10', *remaps(topics)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        time.sleep(3)  # a subscriber that joins after the player
        rclpy.init()
        node, received = rclpy.create_node('late_subscriber', namespace=NAMESPACE), []
        subscribe(node, topics, received)
        output = spin_while_playing(player, node)
        node.destroy_node()
    finally:
        interrupt(player)
        rclpy.try_shutdown()
    assert player.returncode == 0 and 'playing anyway' not in output, output
    assert Counter(name for _, name in received) == dict.fromkeys(topics, 2), output


def test_playback_waits_until_the_named_node_subscribes_to_every_topic():
    # It started once the node subscribed to one topic: a node that subscribes to the next one
    # a few seconds later missed the start of the bag there.
    bag = sample_bag()
    topics = played_topics(bag)
    (thermal_name, thermal), (visible_name, visible) = topics.items()
    rclpy.init()
    try:
        target, received = rclpy.create_node('stepwise_target', namespace=NAMESPACE), []
        subscribe(target, {thermal_name: thermal}, received)
        player = play_for('stepwise_target', bag, topics, 60)
        try:
            end = time.monotonic() + 6  # the thermal subscription is matched within seconds
            while time.monotonic() < end:
                rclpy.spin_once(target, timeout_sec=0.05)
            assert player.poll() is None and not received, \
                f'the player did not wait for visible:\n{player.output.text()}'
            subscribe(target, {visible_name: visible}, received)
            output = spin_while_playing(player, target)
        finally:
            interrupt(player)
        assert player.returncode == 0, output
        assert 'playing anyway' not in output, output
        assert Counter(topic for _, topic in received) == {
            thermal_name: thermal.count, visible_name: visible.count}, output
        target.destroy_node()
    finally:
        rclpy.try_shutdown()


def test_topics_the_named_node_does_not_subscribe_to_are_named_when_the_wait_ends(tmp_path):
    # They are played too (a depth camera the node has no input for, say), 10 s after the node
    # subscribed to its first topic, not at the end of --wait.
    output, received, recorded = play_to_subscriber(
        with_other_image_topics(sample_bag(), tmp_path / 'bag', ('/depth/image_raw',)),
        'target', 120)
    assert re.search(f'{NAMESPACE}/target does not subscribe to /depth/image_raw after '
                     r'1[0-9] s; playing anyway\n', output), output
    assert 'no subscriber' not in output, output
    assert re.search(r'/depth/image_raw 1\b', output), output
    assert received == recorded, output


def test_a_camera_the_named_node_takes_in_another_transport_is_named_with_the_fix():
    # The shipped sample bag's visible camera is CompressedImage; a node started with its
    # defaults subscribes to the raw topic beside it: the player said only that the node does
    # not subscribe to .../compressed, and the node fused nothing.
    bag = sample_bag()
    with open_bag(bag) as reader:
        thermal, visible = pick_topics(image_topics(reader, bag), bag)
    assert visible.topic == '/visible/image_raw/compressed'
    names = {f'{NAMESPACE}/thermal/image_raw': thermal,
             f'{NAMESPACE}/visible/image_raw/compressed': visible}
    rclpy.init()
    try:
        target = rclpy.create_node('raw_target', namespace=NAMESPACE)
        for name in (f'{NAMESPACE}/thermal/image_raw', f'{NAMESPACE}/visible/image_raw'):
            target.create_subscription(Image, name, lambda _: None, 10)
        player = play_for('raw_target', bag, names, 60)
        output = spin_while_playing(player, target)
        target.destroy_node()
    finally:
        rclpy.try_shutdown()
    assert player.returncode == 0, output
    assert (f'{NAMESPACE}/visible/image_raw/compressed: {NAMESPACE}/raw_target subscribes to '
            f'{NAMESPACE}/visible/image_raw, the same image in the raw transport: start the node '
            "with that camera's transport at compressed (-p thermal.transport:=compressed or "
            '-p visible.transport:=compressed) to fuse it\n') in output, output


def test_ctrl_c_stops_a_player_started_with_sigint_ignored():
    # As a shell starts a background job, and as the demo then stops its player (cli.interrupt).
    player = subprocess.Popen(
        [*PLAYER, str(sample_bag()), '--wait', '120', '--wait-for', f'{NAMESPACE}/nobody'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    with reading(player, player.stdout) as output:
        assert output.wait_for('waiting for', 60), output.text()
        started = time.monotonic()
        assert interrupt(player, timeout=30) == 0, output.text()
        assert time.monotonic() - started < 30


@pytest.mark.parametrize('argv, message', [
    (['--rate', 'inf'], '--rate must be from 1e-06 to 1e+06'),
    (['--rate', '1e-300'], '--rate must be from'),  # its waits would overflow time.sleep
    (['--clock-rate', 'nan'], '--clock-rate must be from'),
    (['--wait-for', 'bad-name'], 'node name must not contain'),
    (['--wait-for', 'ns-x/name'], 'namespace'),
    (['--remap', '/thermal/image_raw:=/bad topic'], 'topic name'),
    (['--remap', '/thermal/image_raw:=bad//x'], "must not contain repeated '/'"),
    (['--remap', '/a:=/b', '--remap', '/a:=/c'], '--remap /a is given twice'),
    (['--remap', '/a:=/s4fusion_node/fused'], "/s4fusion_node/fused is the fusion node's output"),
    (['--remap', '/a:=s4fusion_node/saliency'], "s4fusion_node/saliency is the fusion node's"),
    (['--wait', '-1'], '--wait must be >= 0'),
    (['--wait', 'nan'], '--wait must be >= 0'),  # it played without waiting
    (['--start-offset', '-1'], "--start-offset: expected a number of seconds >= 0, got '-1'"),
    (['--playback-duration', '0'], "--playback-duration: expected a number of seconds > 0"),
])
def test_bad_options_are_usage_errors_not_tracebacks(argv, message, capsys):
    from s4fusion_ros.ros.player import parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse_args(['bag', *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_rate_limits_are_rates_it_plays_at_and_a_relative_node_is_below_the_root():
    from s4fusion_ros.ros.player import parse_args
    limits = parse_args(['bag', '--rate', '1e-06', '--clock-rate', '1e6'])
    assert (limits.rate, limits.clock_rate) == (1e-6, 1e6)
    # As the graph is asked for the node's subscriptions: (name, absolute namespace).
    assert parse_args(['bag', '--wait-for', 'robot/fusion']).wait_for_node == ('fusion', '/robot')
    assert parse_args(['bag', '--wait-for', 'fusion']).wait_for_node == ('fusion', '/')


def test_two_topics_remapped_onto_one_are_refused(tmp_path):
    image = np.zeros((4, 4), np.uint8)
    bag = write_bag(tmp_path / 'bag', [(5 * 10**9, THERMAL_TOPIC, 5 * 10**9, 'mono8', image),
                                       (5 * 10**9, VISIBLE_TOPIC, 5 * 10**9, 'mono8', image)],
                    'mcap')
    played = subprocess.run([*PLAYER, str(bag), '--wait', '0', '--remap',
                             f'{THERMAL_TOPIC}:={VISIBLE_TOPIC}'], capture_output=True, text=True,
                            timeout=60)
    assert played.returncode == 1, played.stderr
    assert re.search(rf'({THERMAL_TOPIC}|{VISIBLE_TOPIC}) and ({THERMAL_TOPIC}|{VISIBLE_TOPIC}) '
                     rf'would both be published on {VISIBLE_TOPIC}', played.stderr), played.stderr
    assert 'Traceback' not in played.stderr


def test_a_topic_named_twice_is_played_once_and_a_remap_of_one_not_played_is_named(tmp_path):
    # `--topics T T` was refused as two streams on T; `--remap` of a topic in the bag that
    # --topics leaves out said there was no such topic, and then listed it among the bag's.
    from s4fusion_ros.ros.player import parse_args
    assert parse_args(['bag', '--topics', THERMAL_TOPIC, THERMAL_TOPIC]).topics == [THERMAL_TOPIC]
    image = np.zeros((4, 4), np.uint8)
    bag = write_bag(tmp_path / 'bag', [(5 * 10**9, THERMAL_TOPIC, 5 * 10**9, 'mono8', image),
                                       (5 * 10**9, VISIBLE_TOPIC, 5 * 10**9, 'mono8', image)],
                    'mcap')
    refused = subprocess.run([*PLAYER, str(bag), '--wait', '0', '--topics', THERMAL_TOPIC,
                              '--remap', f'{VISIBLE_TOPIC}:=/elsewhere'], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1, refused.stderr
    in_bag = ', '.join(sorted([THERMAL_TOPIC, VISIBLE_TOPIC]))
    assert (f'{bag}: --remap {VISIBLE_TOPIC}: not a played topic; played: {THERMAL_TOPIC}; '
            f'topics in the bag: {in_bag}\n') in refused.stderr


def test_a_loop_over_one_moment_repeats_once_a_second_and_over_nothing_is_an_error(tmp_path):
    image = np.zeros((4, 4), np.uint8)
    one_moment = write_bag(tmp_path / 'one', [
        (5 * 10**9, THERMAL_TOPIC, 5 * 10**9, 'mono8', image),
        (5 * 10**9, VISIBLE_TOPIC, 5 * 10**9, 'mono8', image)], 'mcap')
    player = subprocess.Popen([*PLAYER, str(one_moment), '--loop', '--wait', '0'],
                              stderr=subprocess.PIPE, text=True)
    with reading(player, player.stderr) as said:
        # Timed from its first pass: its start-up (2 s here) takes longer on a loaded machine,
        # and a Ctrl-C before it left nothing published.
        assert said.wait_for('playing ', 60), said.text()
        time.sleep(3.0)  # a pass a second (it spun: thousands)
        assert interrupt(player) == 0, said.text()
    stderr = said.text()
    published = re.search(rf'{THERMAL_TOPIC} (\d+)', stderr)
    assert published and 1 <= int(published.group(1)) <= 5, published
    # Its stamps jump back by 0 s each pass: a node's synchronizer counts them late, not a jump.
    assert 'warning: the played messages span 0.00 s; looped' in stderr
    # Nor by as much as sync.clock_jump (1 s by default) from one pass to the next: a jump of
    # exactly that is not taken.
    one_second = write_bag(tmp_path / 'second', [
        (time_ns, topic, time_ns, 'mono8', image) for time_ns in (5 * 10**9, 6 * 10**9)
        for topic in (THERMAL_TOPIC, VISIBLE_TOPIC)], 'mcap')
    log = tmp_path / 'second.log'
    with open(log, 'w') as stderr:
        player = subprocess.Popen([*PLAYER, str(one_second), '--loop', '--wait', '0', '--rate',
                                   '10'], stderr=stderr, text=True)
    end = time.monotonic() + 60  # the warning comes after the first pass
    while 'looped' not in log.read_text() and time.monotonic() < end:
        time.sleep(0.1)
    assert interrupt(player) == 0
    assert 'warning: the played messages span 1.00 s; looped' in log.read_text()
    empty = write_bag(tmp_path / 'empty', [], 'mcap')
    looped = subprocess.run([*PLAYER, str(empty), '--loop', '--wait', '0'], capture_output=True,
                            text=True, timeout=60)
    assert looped.returncode == 1 and 'nothing to loop' in looped.stderr
    assert 'warning' not in looped.stderr


def test_a_window_loops_after_the_calibration_before_it_with_its_own_clock(tmp_path):
    # --start-offset 2 --playback-duration 1 --loop: the frames the bag logged in that second,
    # pass after pass, each pass after the camera_info a driver published once at the start
    # (the calibration in effect), and /clock counting from the window's start.
    image = np.zeros((4, 4), np.uint8)
    events = [(time_ns, topic, time_ns, 'mono8', image) for i in range(40)
              for topic, time_ns in ((THERMAL_TOPIC, 10**9 + i * 10**8),
                                     (VISIBLE_TOPIC, 10**9 + i * 10**8 + 5 * 10**7))]
    once = events[1][2]
    bag = write_bag(tmp_path / 'bag', events, 'mcap', visible_infos=lambda stamp: stamp == once)
    start, stop = 3 * 10**9, 4 * 10**9
    window = {topic: [stamp for log_time, name, stamp, *_ in events
                      if name == topic and start <= log_time < stop]
              for topic in (THERMAL_TOPIC, VISIBLE_TOPIC)}
    names = {THERMAL_TOPIC: f'{NAMESPACE}/flir/image_raw',
             VISIBLE_TOPIC: f'{NAMESPACE}/color/image_raw'}
    received = {topic: [] for topic in window}
    infos, clocks = [], []
    rclpy.init()
    try:
        node = rclpy.create_node('window_listener', namespace=NAMESPACE)
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        # Before the images, which the player waits for: it does not wait for an info.
        node.create_subscription(CameraInfo, f'{NAMESPACE}/color/camera_info',
                                 lambda msg: infos.append(stamp_to_ns(msg.header.stamp)), qos)
        for topic, name in names.items():
            node.create_subscription(Image, name, lambda msg, t=topic: received[t].append(
                stamp_to_ns(msg.header.stamp)), qos)
        node.create_subscription(Clock, '/clock', lambda msg: clocks.append(
            stamp_to_ns(msg.clock)), QoSProfile(depth=100,
                                                reliability=ReliabilityPolicy.BEST_EFFORT))
        player = subprocess.Popen(
            [*PLAYER, str(bag), '--start-offset', '2', '--playback-duration', '1', '--loop',
             '--clock', '--clock-rate', '400', '--rate', '2', '--wait', '60', '--wait-for',
             f'{NAMESPACE}/window_listener', *(option for topic, name in names.items()
                                               for option in ('--remap', f'{topic}:={name}'))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with reading(player, player.stdout) as said:
            end = time.monotonic() + 90  # into the third pass
            while (len(received[THERMAL_TOPIC]) <= 2 * len(window[THERMAL_TOPIC])
                   and time.monotonic() < end and player.poll() is None):
                rclpy.spin_once(node, timeout_sec=0.05)
            stopped = interrupt(player)  # it loops until stopped
        output = said.text()
        assert stopped == 0, output
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
    assert f"playing {bag} from 2 s to 3 s of the bag's 3.95 s" in output, output
    for topic, stamps in window.items():
        assert len(stamps) == 10 and received[topic][:20] == 2 * stamps, output
    assert len(infos) >= 2 and set(infos) == {once}, output
    assert start <= min(clocks) < start + 10**8 and stop - 10**8 < max(clocks) < stop + 10**8, \
        output
    # /clock at --clock-rate between the frames too: 400 Hz, 0.005 s of bag time at rate 2, so
    # that a loaded machine's late ticks stay well below the frames' 0.05 s.
    assert np.median([b - a for a, b in zip(clocks, clocks[1:]) if b > a]) < 0.03 * 10**9, output


def played_beside(listener: str, subscribe, topic: str, name: str, wait: float,
                  *options: str) -> str:
    """s4fusion-play of the sample bag's `topic` alone as `name`, at rate 8, with a node
    NAMESPACE/`listener` that `subscribe(node)` sets up in the graph: the player's stderr, once
    it exited 0."""
    rclpy.init()
    try:
        node = rclpy.create_node(listener, namespace=NAMESPACE)
        subscribe(node)
        done = subprocess.run([*PLAYER, str(sample_bag()), '--rate', '8', '--wait', str(wait),
                               *options, '--topics', topic, '--remap', f'{topic}:={name}'],
                              capture_output=True, text=True, timeout=120)
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
    assert done.returncode == 0, done.stderr
    return done.stderr


def sample_cameras() -> tuple:
    """The sample bag's (thermal, visible) ImageTopics."""
    bag = sample_bag()
    with open_bag(bag) as reader:
        return pick_topics(image_topics(reader, bag), bag)


def test_a_subscriber_the_qos_keeps_apart_is_named_with_the_fix(tmp_path):
    # A reliable subscriber never matches a best-effort publisher: "no subscriber" alone would
    # send the user looking for a node that is there.
    thermal, _ = sample_cameras()
    # --wait: discovery alone took over 3 s in a loaded suite run (no subscriber seen at all).
    error = played_beside(
        'reliable_listener', lambda node: subscribe(node, {f'{NAMESPACE}/thermal': thermal}, []),
        thermal.topic, f'{NAMESPACE}/thermal', 8, '--best-effort')
    assert (f'{NAMESPACE}/thermal: {NAMESPACE}/reliable_listener subscribes with a QoS the '
            "player does not offer: reliability reliable against the player's best_effort "
            '(drop --best-effort)\n') in error, error


def test_a_subscriber_of_another_type_is_named_with_both_types():
    # A CompressedImage topic remapped onto a node's raw input: the player said "no subscriber"
    # of a node that subscribes there, as sensor_msgs/Image.
    _, visible = sample_cameras()
    error = played_beside(
        'raw_listener',
        lambda node: node.create_subscription(Image, f'{NAMESPACE}/visible', lambda _: None, 10),
        visible.topic, f'{NAMESPACE}/visible', 6)
    assert (f'{NAMESPACE}/visible: {NAMESPACE}/raw_listener subscribes to it as '
            f'sensor_msgs/msg/Image; the player publishes {visible.msgtype} on it\n'
            ) in error, error


def test_a_node_the_graph_cannot_name_yet_is_not_named_by_placeholders():
    # The graph knows an endpoint before its node's name (later under load): the player named
    # a subscriber "_NODE_NAMESPACE_UNKNOWN_/_NODE_NAME_UNKNOWN_".
    from rclpy.topic_endpoint_info import TopicEndpointInfo
    from s4fusion_ros.ros.graph import node_of
    # Spelt as rmw_dds_common's graph cache spells them, not through the module's constant.
    unnamed = TopicEndpointInfo(node_name='_NODE_NAME_UNKNOWN_',
                                node_namespace='_NODE_NAMESPACE_UNKNOWN_')
    assert node_of(unnamed) == 'a node not yet discovered by name'
    rclpy.init()
    try:
        node = rclpy.create_node('named_listener', namespace=NAMESPACE)
        node.create_subscription(Image, f'{NAMESPACE}/named', lambda msg: None, 1)
        deadline = time.monotonic() + 10
        names = []
        while time.monotonic() < deadline and f'{NAMESPACE}/named_listener' not in names:
            names = [node_of(info) for info in node.get_subscriptions_info_by_topic(
                f'{NAMESPACE}/named')]
            time.sleep(0.05)
        assert names == [f'{NAMESPACE}/named_listener']
        node.destroy_node()
    finally:
        rclpy.try_shutdown()


@pytest.mark.parametrize('best_effort', [False, True])
def test_a_topic_recorded_latched_is_played_latched_for_late_subscribers(best_effort, tmp_path):
    # /robot_description as robot_state_publisher offers it (transient local): played volatile,
    # a late subscriber asking for it (rviz, tf static listeners) never got it (found by a
    # review). --best-effort is for the images: a best-effort latched topic reaches no reliable
    # late subscriber.
    from rclpy.qos import DurabilityPolicy
    from rosbags.interfaces import QosDurability
    from s4fusion_ros.bagio import output_qos
    latched = output_qos()._replace(durability=QosDurability.TRANSIENT_LOCAL)
    string = 'std_msgs/msg/String'
    with Writer(tmp_path / 'bag', version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        for topic, qos in (('/robot_description', latched), ('/chatter', output_qos())):
            connection = writer.add_connection(topic, string, typestore=TYPESTORE,
                                               offered_qos_profiles=[qos])
            writer.write(connection, 10**9, TYPESTORE.serialize_cdr(
                TYPESTORE.types[string](data=f'<robot name="{topic}"/>'), string))
    names = {topic: f'{NAMESPACE}{topic}' for topic in ('/robot_description', '/chatter')}
    remapped = [option for topic, name in names.items()
                for option in ('--remap', f'{topic}:={name}')]
    player = subprocess.Popen([*PLAYER, str(tmp_path / 'bag'), '--wait', '0', '--keep-alive',
                               '--topics', *names, *remapped,
                               *(['--best-effort'] if best_effort else [])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with reading(player, player.stdout) as said:
        try:
            rclpy.init()
            node = rclpy.create_node('late_listener', namespace=NAMESPACE)
            end = time.monotonic() + 60
            while not all(node.get_publishers_info_by_topic(name) for name in names.values()):
                # Kept alive, the player runs until stopped: its output so far.
                assert time.monotonic() < end and player.poll() is None, said.text()
                time.sleep(0.1)
            offered = {topic: node.get_publishers_info_by_topic(name)[0].qos_profile
                       for topic, name in names.items()}
            assert {topic: (qos.durability, qos.reliability)
                    for topic, qos in offered.items()} == {
                '/robot_description': (DurabilityPolicy.TRANSIENT_LOCAL,
                                       ReliabilityPolicy.RELIABLE),
                '/chatter': (DurabilityPolicy.VOLATILE, ReliabilityPolicy.BEST_EFFORT
                             if best_effort else ReliabilityPolicy.RELIABLE)}
            time.sleep(3)  # played by now: the subscriber below joins late
            received = []
            node.create_subscription(message_class(string), names['/robot_description'],
                                     lambda msg: received.append(msg.data), QoSProfile(
                                         depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
            while not received and time.monotonic() < end:
                rclpy.spin_once(node, timeout_sec=0.1)
            assert received == ['<robot name="/robot_description"/>']
            node.destroy_node()
        finally:
            rclpy.try_shutdown()
    assert 'published' in said.text()


def test_kept_alive_the_clock_runs_on_from_the_end_of_the_bag(tmp_path):
    image = np.zeros((4, 4), np.uint8)
    bag = write_bag(tmp_path / 'bag', [(time_ns, THERMAL_TOPIC, time_ns, 'mono8', image)
                                       for time_ns in (5 * 10**9, 6 * 10**9)], 'mcap')
    rclpy.init()
    try:
        node, clocks = rclpy.create_node('clock_listener', namespace=NAMESPACE), []
        node.create_subscription(Clock, '/clock', lambda msg: clocks.append(
            stamp_to_ns(msg.clock)), QoSProfile(depth=100,
                                                reliability=ReliabilityPolicy.BEST_EFFORT))
        # Played once it has a subscriber: /clock, published beside, is heard from the start.
        topics = {f'{NAMESPACE}{THERMAL_TOPIC}': SimpleNamespace(topic=THERMAL_TOPIC,
                                                                 msgtype=IMAGE)}
        subscribe(node, topics, [])
        player = subprocess.Popen([*PLAYER, str(bag), '--wait', '30', '--clock',
                                   '--keep-alive', '--topics', THERMAL_TOPIC, *remaps(topics)],
                                  stderr=subprocess.PIPE, text=True)
        with reading(player, player.stderr) as said:  # kept alive, it runs until stopped
            end = time.monotonic() + 60
            while max(clocks, default=0) < 7 * 10**9 and time.monotonic() < end:  # a second on
                rclpy.spin_once(node, timeout_sec=0.05)
            assert interrupt(player) == 0, said.text()
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
    stderr = said.text()
    assert 'end of bag' in stderr and clocks[0] < 5.5 * 10**9 and max(clocks) >= 7 * 10**9, \
        stderr
    assert all(b >= a for a, b in zip(clocks, clocks[1:])), stderr  # never back to the start


def test_an_undecodable_image_is_skipped_and_counted_not_published(tmp_path):
    # Subscribers drop a message rmw cannot deserialize without a word: the player says so.
    image = np.zeros((4, 4), np.uint8)
    events = [(time_ns, topic, time_ns, 'mono8', image) for time_ns in (10**9, 2 * 10**9)
              for topic in (THERMAL_TOPIC, VISIBLE_TOPIC)]
    bag = write_bag(tmp_path / 'bag', events, 'mcap', cut_short={2 * 10**9})
    done = subprocess.run([*PLAYER, str(bag), '--wait', '0', '--rate', '10'],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f'{THERMAL_TOPIC}: cannot decode a sensor_msgs/msg/Image message' in done.stderr
    assert 'subscriber' not in done.stderr, done.stderr  # --wait 0: played without waiting
    assert (f'published {VISIBLE_TOPIC} 1, {THERMAL_TOPIC} 1; skipped as undecodable: '
            f'{VISIBLE_TOPIC} 1, {THERMAL_TOPIC} 1') in done.stderr, done.stderr


def test_a_second_ctrl_c_while_stopping_still_stops_cleanly():
    # timeout and ros2 launch send SIGINT twice: the second one, inside the clean stop, gave a
    # traceback and exit code 130 instead of 0.
    player = subprocess.Popen([*PLAYER, str(sample_bag()), '--wait', '0', '--keep-alive'],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with reading(player, player.stdout) as reader:
        assert reader.wait_for('end of bag', 60), reader.text()
        player.send_signal(signal.SIGINT)
        time.sleep(0.005)
        player.send_signal(signal.SIGINT)
        player.wait(timeout=60)
    output = reader.text()
    assert player.returncode == 0 and 'Traceback' not in output, output
    assert output.rstrip().endswith('; stopped'), output


SILENT_SUBSCRIBER = """
import sys, time, rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
rclpy.init()
node = rclpy.create_node('silent_subscriber')
for topic in sys.argv[1:]:
    node.create_subscription(Image, topic, lambda msg: None,
                             QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
print('subscribed', flush=True)
rclpy.spin(node)
"""


def test_a_reliable_subscriber_that_never_confirms_is_named_and_waited_for_once(tmp_path):
    # A stopped reliable subscriber held the player 10 s per topic, deaf to Ctrl-C, and the
    # summary did not say that delivery went unconfirmed.
    image = np.zeros((4, 4), np.uint8)
    events = [(5 * 10**9 + i * 10**8, topic, 5 * 10**9 + i * 10**8, 'mono8', image)
              for i in range(20) for topic in (THERMAL_TOPIC, VISIBLE_TOPIC)]
    bag = write_bag(tmp_path / 'bag', events, 'mcap')
    subscriber = subprocess.Popen([sys.executable, '-c', SILENT_SUBSCRIBER, THERMAL_TOPIC,
                                   VISIBLE_TOPIC], stdout=subprocess.PIPE, text=True)
    try:
        assert StreamReader(subscriber.stdout).wait_for('subscribed', 60)
        player = subprocess.Popen([*PLAYER, str(bag), '--wait', '30'], stderr=subprocess.PIPE,
                                  text=True)
        with reading(player, player.stderr) as output:
            assert output.wait_for('playing', 60), output.text()
            assert 'no subscriber' not in output.text()  # it has matched the subscriber
            subscriber.send_signal(signal.SIGSTOP)  # which acknowledges nothing more
            started = time.monotonic()
            player.wait(timeout=120)
            seconds = time.monotonic() - started
    finally:
        subscriber.kill()
        subscriber.wait()
    stderr = output.text()
    assert player.returncode == 0, stderr
    assert 'end of bag; not confirmed within 10 s by a reliable subscriber of ' in stderr, stderr
    assert THERMAL_TOPIC in stderr.split('not confirmed')[1], stderr
    assert seconds < 20  # one wait for both topics, not 10 s each on top of playing


def test_the_transport_fix_offers_only_the_cameras_that_take_it():
    # compressedDepth is a thermal transport only: the hint offered visible.transport too.
    waiting = SimpleNamespace(args=SimpleNamespace(wait_for='/node'),
                              _subscribed=lambda: {'/lwir/image_raw'})
    [line] = BagPlayer._other_transports(waiting, ['/lwir/image_raw/compressedDepth'])
    assert line.endswith('(-p thermal.transport:=compressedDepth) to fuse it'), line
