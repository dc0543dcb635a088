"""launch_testing: the launch file's node fuses the sample bag and exits cleanly.

s4fusion.launch.py starts the node, the shipped sample bag's pairs come back fused with a saliency
map, and the node exits with code 0 when launch stops it.

Runs where a ROS 2 distro provides launch, launch_ros and launch_testing (`colcon test`, or
`launch_test test/test_launch.py`). Those have no PyPI wheels, so on a machine without a distro
this module is skipped; test_node.py and test_node_start_stop.py cover the same path there by
starting the node's console entry point as a process.
"""

import os
import pathlib
import sys
import tempfile
import time
import unittest

import pytest

launch_testing = pytest.importorskip('launch_testing',
                                     reason='launch_testing needs a ROS 2 distro')
pytest.importorskip('launch_ros', reason='launch_ros needs a ROS 2 distro')

import launch  # noqa: E402  (guarded above: PyPI's unrelated `launch` must not satisfy it)
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import rclpy  # noqa: E402
import yaml  # noqa: E402
from ament_index_python.packages import get_package_share_directory  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402

# `launch_test FILE` imports this file by path, without its folder on sys.path (pytest adds it).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from ros_harness import Probe  # noqa: E402
from s4fusion_ros import settings  # noqa: E402
from s4fusion_ros.bagio import image_topics, open_bag, pick_topics, read_messages  # noqa: E402
from s4fusion_ros.ros.demo import sample_bag  # noqa: E402
from s4fusion_ros.ros.player import message_class  # noqa: E402

NAMESPACE = 'launch_test'


def sample_inputs():
    """The sample bag's thermal and visible topics and its messages as recorded (CDR bytes)."""
    bag = sample_bag()
    with open_bag(bag) as reader:
        topics = dict(zip(('thermal', 'visible'), pick_topics(image_topics(reader, bag), bag)))
        roles = {topic.topic: role for role, topic in topics.items()}
        messages = [(roles[connection.topic], bytes(raw)) for connection, _, raw
                    in read_messages(reader, bag, roles)]
    return topics, messages


def params_file(topics) -> str:
    """The node's defaults with each input's transport as the bag records it."""
    values = settings.defaults()
    for role, topic in topics.items():
        values[f'{role}.transport'] = topic.transport
    path = pathlib.Path(tempfile.mkdtemp(prefix='s4fusion-launch-test-')) / 'params.yaml'
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': settings.nest(values)}}))
    return str(path)


@pytest.mark.launch_test
def generate_test_description():
    launch_file = os.path.join(get_package_share_directory('s4fusion_ros'), 'launch',
                               's4fusion.launch.py')
    topics, _ = sample_inputs()
    return launch.LaunchDescription([
        launch.actions.IncludeLaunchDescription(
            PythonLaunchDescriptionSource(launch_file),
            launch_arguments={'device': 'cpu', 'namespace': NAMESPACE,
                              'params_file': params_file(topics)}.items()),
        launch_testing.actions.ReadyToTest(),
    ])


class TestFusedOutputs(unittest.TestCase):
    """Active test: play the sample bag's pairs until both outputs arrive."""

    def test_fused_and_saliency_arrive(self):
        topics, messages = sample_inputs()
        rclpy.init()
        try:
            probe = Probe('launch_probe', namespace=f'/{NAMESPACE}')
            publishers = {role: probe.create_publisher(
                message_class(topic.msgtype), f'{role}/image_raw' + (
                    '' if topic.transport == 'raw' else f'/{topic.transport}'), 10)
                for role, topic in topics.items()}
            deadline = time.monotonic() + 180
            while not (probe.fused and probe.saliency) and time.monotonic() < deadline:
                for role, data in messages:  # again from the start: the node resets its sync
                    publishers[role].publish(data)
                    probe.spin_for(0.05)
                    if probe.fused and probe.saliency:
                        break
            self.assertTrue(probe.fused and probe.saliency, 'no fused/saliency output arrived')
            self.assertEqual(probe.saliency[0].encoding, 'mono8')
            self.assertEqual(probe.fused[0].encoding, 'bgr8')
            probe.destroy_node()
        finally:
            rclpy.shutdown()


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    """The node exits cleanly (code 0) when launch stops it."""

    def test_exit_codes(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)
