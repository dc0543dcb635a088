"""launch_testing: s4fusion.launch.py starts the node, and fused and saliency images arrive.

Runs where a ROS 2 distro provides launch, launch_ros and launch_testing (`colcon test`). Those
have no PyPI wheels, so on a machine without a distro this module is skipped; test_node.py covers
the same path there by starting the node's console entry point as a process.
"""

import os
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
from ament_index_python.packages import get_package_share_directory  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402

from ros_harness import IVIF, Probe, image_message, load_pairs  # noqa: E402


@pytest.mark.launch_test
def generate_test_description():
    launch_file = os.path.join(get_package_share_directory('s4fusion_ros'), 'launch',
                               's4fusion.launch.py')
    return launch.LaunchDescription([
        launch.actions.IncludeLaunchDescription(
            PythonLaunchDescriptionSource(launch_file),
            launch_arguments={'device': 'cpu', 'namespace': 'launch_test'}.items()),
        launch_testing.actions.ReadyToTest(),
    ])


class TestFusedOutputs(unittest.TestCase):
    """Active test: publish real pairs until both outputs arrive."""

    def test_fused_and_saliency_arrive(self):
        if not (IVIF / 'msrs').is_dir():
            self.skipTest(f'shared image data not found at {IVIF}')
        rclpy.init()
        try:
            probe = Probe('launch_probe', namespace='/launch_test')
            thermal, visible = load_pairs(IVIF, ['00004N.png'])[0]
            deadline = time.monotonic() + 120
            stamp = probe.get_clock().now().nanoseconds
            while not (probe.fused and probe.saliency) and time.monotonic() < deadline:
                probe.thermal_pub.publish(image_message(thermal, 'mono16', stamp, 'thermal'))
                probe.visible_pub.publish(image_message(visible, 'bgr8', stamp, 'rgb'))
                probe.spin_for(0.5)
                stamp += 100_000_000
            self.assertTrue(probe.fused and probe.saliency, 'no fused/saliency output arrived')
            self.assertEqual(probe.fused[0].header.frame_id, 'rgb')
            self.assertEqual((probe.fused[0].width, probe.fused[0].height), (640, 480))
            probe.destroy_node()
        finally:
            rclpy.shutdown()


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    """The node exits cleanly when launch stops it."""

    def test_exit_codes(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)
