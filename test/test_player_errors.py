"""s4fusion-play on bags it cannot play as they are: a line that says why, never a traceback."""

import re
import subprocess
import sys

import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer

from ros_harness import rclpy  # noqa: F401 (skips the module without ROS 2)
from support import IMAGE, TYPESTORE, bag_image_message

pytestmark = pytest.mark.ros

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
