"""s4fusion-play on bags it cannot play as they are: a line that says why, never a traceback."""

from collections import Counter
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from rosbags.rosbag2 import Reader, StoragePlugin, Writer

from ros_harness import rclpy
from support import (COMPRESSED, IMAGE, THERMAL_TOPIC, TYPESTORE, VISIBLE_TOPIC,
                     bag_image_message, damage_chunk, mcap_chunks, reading, write_bag,
                     write_merged_visible_bag)

pytestmark = pytest.mark.ros

from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

PLAYER = [sys.executable, '-m', 's4fusion_ros.ros.player']


def test_a_topic_name_ros2_refuses_is_named_with_the_remap_that_plays_it(tmp_path):
    # ROS 1 allows a token that starts with a digit; bags converted from ROS 1 keep such names.
    topic = '/camera/1/image_raw'
    with Writer(tmp_path / 'bag', version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connection = writer.add_connection(topic, IMAGE, typestore=TYPESTORE)
        for time_ns in (10**9, 2 * 10**9):
            writer.write(connection, time_ns, TYPESTORE.serialize_cdr(
                bag_image_message(np.zeros((4, 4), np.uint8), 'mono8', time_ns, 'camera'), IMAGE))
    refused = subprocess.run([*PLAYER, str(tmp_path / 'bag'), '--wait', '0'],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and 'Traceback' not in refused.stderr, refused.stderr
    assert re.fullmatch(rf's4fusion-play: .*: {topic}: Invalid topic name: .*; publish it under '
                        rf'another name with --remap {topic}:=NEW\n', refused.stderr), \
        refused.stderr
    played = subprocess.run([*PLAYER, str(tmp_path / 'bag'), '--wait', '0', '--rate', '10',
                             '--remap', f'{topic}:=/camera/one/image_raw'],
                            capture_output=True, text=True, timeout=60)
    assert played.returncode == 0, played.stderr
    assert 'published /camera/one/image_raw 2; end of bag' in played.stderr, played.stderr


def test_a_home_where_rcl_cannot_make_its_log_folder_is_one_line_naming_the_fix(tmp_path):
    # A service's user with a read-only home, or none: rcl's failure to make ~/.ros/log came
    # out as a traceback. A folder cannot be made under a file, not even by root.
    bag = write_bag(tmp_path / 'bag', [(10**9, THERMAL_TOPIC, 10**9, 'mono8',
                                        np.zeros((4, 4), np.uint8))], 'mcap')
    (tmp_path / 'home').write_text('')
    env = {name: value for name, value in os.environ.items()
           if name not in ('ROS_LOG_DIR', 'ROS_HOME')}
    refused = subprocess.run([*PLAYER, str(bag), '--wait', '0'], capture_output=True, text=True,
                             timeout=60, env={**env, 'HOME': str(tmp_path / 'home')})
    assert refused.returncode == 1 and 'Traceback' not in refused.stderr, refused.stderr
    assert re.fullmatch(r"s4fusion-play: failed to initialize logging: .*; rcl writes its log "
                        r"files into ROS_LOG_DIR, else ROS_HOME/log, else ~/.ros/log \(HOME\): "
                        r"set ROS_LOG_DIR to a folder this user may write\n", refused.stderr), \
        refused.stderr


def test_a_window_past_the_end_of_the_bag_is_refused_with_its_span(tmp_path):
    image = np.zeros((4, 4), np.uint8)
    bag = write_bag(tmp_path / 'bag', [(time_ns, THERMAL_TOPIC, time_ns, 'mono8', image)
                                       for time_ns in (10**9, 2 * 10**9)], 'mcap')
    refused = subprocess.run([*PLAYER, str(bag), '--wait', '0', '--start-offset', '1.5'],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and refused.stderr == (
        f's4fusion-play: {bag}: --start-offset 1.5 is past the end of the bag: its messages span '
        '1 s\n'), refused.stderr


def test_a_topic_recorded_with_several_types_plays_its_images_or_is_named(tmp_path):
    # rosbags gives such a topic no type: the player died in a traceback with --topics and
    # left the topic out without a word otherwise.
    string = 'std_msgs/msg/String'
    with Writer(tmp_path / 'bag', version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        images = writer.add_connection(THERMAL_TOPIC, IMAGE, typestore=TYPESTORE)
        notes = writer.add_connection(THERMAL_TOPIC, string, typestore=TYPESTORE)
        log = writer.add_connection('/log', string, typestore=TYPESTORE)
        other = writer.add_connection('/log', 'std_msgs/msg/Int32', typestore=TYPESTORE)
        for time_ns in (10**9, 2 * 10**9):
            writer.write(images, time_ns, TYPESTORE.serialize_cdr(
                bag_image_message(np.zeros((4, 4), np.uint16), 'mono16', time_ns, 'ir'), IMAGE))
            for connection in (notes, log):
                writer.write(connection, time_ns + 1, TYPESTORE.serialize_cdr(
                    TYPESTORE.types[string](data='x'), string))
            writer.write(other, time_ns + 2, TYPESTORE.serialize_cdr(
                TYPESTORE.types['std_msgs/msg/Int32'](data=1), 'std_msgs/msg/Int32'))
    for topics in ([], ['--topics', THERMAL_TOPIC]):
        played = subprocess.run([*PLAYER, str(tmp_path / 'bag'), '--wait', '0', '--rate', '10',
                                 *topics], capture_output=True, text=True, timeout=60)
        assert played.returncode == 0, played.stderr
        assert (f's4fusion-play: {THERMAL_TOPIC}: playing its {IMAGE} messages, not those of '
                f'{string} recorded on it too') in played.stderr, played.stderr
        assert f'published {THERMAL_TOPIC} 2; end of bag' in played.stderr, played.stderr
    refused = subprocess.run([*PLAYER, str(tmp_path / 'bag'), '--wait', '0', '--topics', '/log'],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and 'Traceback' not in refused.stderr, refused.stderr
    assert (f'/log was recorded with several message types (std_msgs/msg/Int32, {string}): it '
            'cannot be played as one topic') in refused.stderr, refused.stderr


def test_an_image_topic_recorded_as_both_image_types_is_named_with_them(tmp_path):
    # A merged bag, the visible camera raw then compressed: rosbags gives the topic no type, and
    # the player played the thermal camera alone without a word.
    events = [(10**9 + i * 10**8, topic, 10**9 + i * 10**8, encoding, image)
              for i in range(4) for topic, encoding, image in (
                  (THERMAL_TOPIC, 'mono16', np.zeros((4, 4), np.uint16)),
                  (VISIBLE_TOPIC, 'bgr8', np.zeros((4, 4, 3), np.uint8)))]
    bag = write_merged_visible_bag(tmp_path / 'merged', events)
    refused = subprocess.run([*PLAYER, str(bag), '--wait', '0'], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and 'Traceback' not in refused.stderr, refused.stderr
    assert (f'{VISIBLE_TOPIC} was recorded with several message types ({COMPRESSED}, {IMAGE}): '
            'it cannot be played as one topic') in refused.stderr, refused.stderr


SQLITE_PAGE = 4096  # SQLite's default page size, which rosbags' writer keeps


def damaged_midway(source: pathlib.Path, path: pathlib.Path) -> Counter:
    """A copy of the sqlite3 bag at `path` with one page overwritten with 0xFF, chosen so that
    rosbags opens the copy and fails only while reading its messages; returns {topic: messages
    rosbags read before it failed}."""
    database = next(source.glob('*.db3'))
    pages = database.stat().st_size // SQLITE_PAGE
    for page in range(pages // 2, pages):
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(source, path)
        with open(path / database.name, 'r+b') as damaged:
            damaged.seek(page * SQLITE_PAGE)
            damaged.write(b'\xff' * SQLITE_PAGE)
        read = Counter()
        try:
            with Reader(path) as reader:
                for connection, _, _ in reader.messages():
                    read[connection.topic] += 1
        except Exception:  # noqa: BLE001 - rosbags' ReaderError or apsw's CorruptError
            if read:
                return read
    raise AssertionError(f'no page of {database} fails midway')


def test_a_bag_that_fails_midway_delivers_and_counts_what_it_played(tmp_path):
    # It printed the error alone: no count of what was published, nor a wait for the reliable
    # subscribers to receive it. A 10000-byte image fills a page and two overflow pages, whose
    # chain SQLite follows only when it reads that message.
    image = np.zeros((100, 100), np.uint8)
    events = [(10**9 + i * 10**8, topic, 10**9 + i * 10**8, 'mono8', image)
              for i in range(40) for topic in (THERMAL_TOPIC, VISIBLE_TOPIC)]
    read = damaged_midway(write_bag(tmp_path / 'bag', events, 'sqlite3'), tmp_path / 'damaged')
    rclpy.init()
    try:
        node, received = rclpy.create_node('listener', namespace='/player_errors'), Counter()
        for topic in (THERMAL_TOPIC, VISIBLE_TOPIC):
            node.create_subscription(Image, topic, lambda _, t=topic: received.update([t]),
                                     QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        player = subprocess.Popen([*PLAYER, str(tmp_path / 'damaged'), '--wait', '30', '--rate',
                                   '10'], stderr=subprocess.PIPE, text=True)
        with reading(player, player.stderr) as said:
            end = time.monotonic() + 120
            while player.poll() is None:
                assert time.monotonic() < end, f'the player did not stop:\n{said.text()}'
                rclpy.spin_once(node, timeout_sec=0.05)
        for _ in range(20):  # what the player's exit left in the queue
            rclpy.spin_once(node, timeout_sec=0.05)
        stderr = said.text()
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
    assert player.returncode == 1 and 'Traceback' not in stderr, stderr
    summary = stderr.splitlines()[-1]
    assert re.fullmatch(r's4fusion-play: published .*; stopped: .*damaged: cannot read the bag '
                        r'\(truncated or corrupt\?\): database disk image is malformed',
                        summary), stderr
    published = {topic: int(count) for topic, count in re.findall(r'(/\S+) (\d+)', summary)}
    assert published == read == received and 0 < sum(read.values()) < len(events), stderr
    # --keep-alive is for a bag played to its end: it does not keep a failed one running.
    kept = subprocess.run([*PLAYER, str(tmp_path / 'damaged'), '--wait', '0', '--rate', '10',
                           '--keep-alive'], capture_output=True, text=True, timeout=60)
    assert kept.returncode == 1 and 'stopped: ' in kept.stderr, kept.stderr


def test_an_mcap_cut_off_by_a_crash_plays_up_to_its_cut_and_says_so(tmp_path):
    # Image messages of 250 KB: rosbags closes a chunk past 1 MiB, so 12 make three.
    image = np.zeros((500, 500), np.uint8)
    events = [(10**9 + i * 10**8, THERMAL_TOPIC, 10**9 + i * 10**8, 'mono8', image)
              for i in range(12)]
    storage = write_bag(tmp_path / 'bag', events, 'mcap') / 'bag.mcap'
    chunks = mcap_chunks(storage)
    storage.write_bytes(storage.read_bytes()[:chunks[-1].chunk_start_offset + 1000])
    whole = sum(sum(chunk.channel_count.values()) for chunk in chunks[:-1])
    played = subprocess.run([*PLAYER, str(storage), '--wait', '0', '--rate', '10'],
                            capture_output=True, text=True, timeout=60)
    assert played.returncode == 0 and 0 < whole < len(events), played.stderr
    assert f'{storage}: cut off (no MCAP footer' in played.stderr, played.stderr
    assert f'{THERMAL_TOPIC} {whole}; end of bag' in played.stderr, played.stderr


def test_a_metadata_topic_named_by_a_number_is_refused_naming_the_file(tmp_path):
    # rosbags takes metadata.yaml's topics as they come: the player died in a TypeError.
    image = np.zeros((4, 4), np.uint8)
    bag = write_bag(tmp_path / 'bag', [(time_ns, THERMAL_TOPIC, time_ns, 'mono8', image)
                                       for time_ns in (10**9, 2 * 10**9)], 'mcap')
    metadata = bag / 'metadata.yaml'
    metadata.write_text(metadata.read_text().replace(f'name: {THERMAL_TOPIC}', 'name: 7'))
    refused = subprocess.run([*PLAYER, str(bag), '--wait', '0'], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and 'Traceback' not in refused.stderr, refused.stderr
    assert f'{metadata}: topic 7 of type' in refused.stderr, refused.stderr


def test_an_mcap_with_a_damaged_chunk_plays_the_others_and_says_what_was_lost(tmp_path):
    # A chunk whose data does not match its CRC stopped the playback there.
    image = np.zeros((500, 500), np.uint8)
    events = [(10**9 + i * 10**8, THERMAL_TOPIC, 10**9 + i * 10**8, 'mono8', image)
              for i in range(12)]
    storage = write_bag(tmp_path / 'bag', events, 'mcap') / 'bag.mcap'
    damaged = mcap_chunks(storage)[1]
    damage_chunk(storage, damaged, 'crc')
    lost = sum(damaged.channel_count.values())
    played = subprocess.run([*PLAYER, str(storage), '--wait', '0', '--rate', '10'],
                            capture_output=True, text=True, timeout=60)
    assert played.returncode == 1 and 0 < lost < len(events), played.stderr
    span = (f'{(damaged.message_start_time - 10**9) / 1e9:g} s to '
            f'{(damaged.message_end_time - 10**9) / 1e9:g} s')
    assert (f'{storage}: 1 damaged chunk skipped (first: Chunk checksum mismatch): {lost} '
            f'messages logged from {span} into the bag lost') in played.stderr, \
        played.stderr
    assert (f'{THERMAL_TOPIC} {len(events) - lost}; lost: {lost} messages of the damaged chunks '
            'skipped; end of bag') in played.stderr, played.stderr

    # Looped and stopped: "lost" was one pass's count beside every pass's published count.
    looping = subprocess.Popen([*PLAYER, str(storage), '--wait', '0', '--rate', '10', '--loop'],
                               stderr=subprocess.PIPE, text=True)
    with reading(looping, looping.stderr) as said:
        assert said.wait_for('damaged chunk skipped', 60), said.text()  # the first pass's loss
        time.sleep(1.0)  # more passes, each 0.1 s
        looping.send_signal(signal.SIGINT)
        looping.wait(timeout=60)
    stopped = said.text().split('damaged chunk skipped', 1)[1]  # after the first pass
    summary = re.search(rf'{THERMAL_TOPIC} (\d+); lost: (\d+) messages of the damaged chunks '
                        'skipped; stopped', stopped)
    assert summary, stopped
    published, missed = map(int, summary.groups())
    assert looping.returncode == 1 and 'damaged chunk skipped' not in stopped, stopped
    passes = published // (len(events) - lost)  # whole ones; the last may have passed the loss
    assert missed % lost == 0 and passes <= missed // lost <= passes + 1, (published, missed)
    assert passes >= 2, stopped
