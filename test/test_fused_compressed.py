"""~/fused/compressed: the fused image as image_transport's compressed transport publishes it."""

import cv2
import numpy as np
import pytest

pytest.importorskip('rclpy', reason='rclpy (ROS 2) is not installed')

from rclpy.parameter import Parameter  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from sensor_msgs.msg import CompressedImage  # noqa: E402

from ros_harness import Probe, image_message, load_pairs, node_log, running_node  # noqa: E402
from s4fusion_ros.messages import stamp_to_ns  # noqa: E402

pytestmark = pytest.mark.ros


def fuse_one(probe, proc, thermal, visible, stamp: int, compressed: list) -> int:
    """Publish the pair stamped `stamp` until its fused image and its compressed transport came
    (a first pair may be lost to discovery); returns the stamp of the pair that did."""
    while True:
        fused = len(probe.fused)
        probe.thermal_pub.publish(image_message(thermal, 'mono16', stamp, 'thermal'))
        probe.visible_pub.publish(image_message(visible, 'bgr8', stamp, 'rgb'))
        if probe.spin_until(lambda: len(probe.fused) > fused and any(
                stamp_to_ns(m.header.stamp) == stamp for m in compressed), 10):
            return stamp
        assert proc.poll() is None, node_log(proc)
        stamp += 100_000_000


def test_the_fused_image_is_published_compressed_as_image_transport_does(
        ros_context, ivif_dir):
    [(thermal, visible)] = load_pairs(ivif_dir, ['00537D.png'])
    probe = Probe('compressed_probe')
    compressed = []
    probe.create_subscription(CompressedImage, 's4fusion_node/fused/compressed',
                              compressed.append, 10)
    with running_node({'device': 'cpu', 'inference_size': [160, 120]}) as proc:
        probe.wait_for_node(proc)
        stamp = fuse_one(probe, proc, thermal, visible, probe.get_clock().now().nanoseconds,
                         compressed)

        def raw_and_compressed(stamp):
            [raw] = [m for m in probe.fused if stamp_to_ns(m.header.stamp) == stamp]
            [jpeg] = [m for m in compressed if stamp_to_ns(m.header.stamp) == stamp]
            shape = (raw.height, raw.width, 3)
            return (np.frombuffer(raw.data, np.uint8).reshape(shape), jpeg,
                    cv2.imdecode(np.frombuffer(jpeg.data, np.uint8), cv2.IMREAD_COLOR))
        fused, message, decoded = raw_and_compressed(stamp)
        assert message.format == 'bgr8; jpeg compressed bgr8'
        assert message.header.frame_id == 'rgb'
        assert cv2.PSNR(decoded, fused) > 33  # quality 95

        # Lossless PNG, set while the node runs.
        client = probe.create_client(SetParameters, 's4fusion_node/set_parameters')
        assert client.wait_for_service(timeout_sec=10)
        future = client.call_async(SetParameters.Request(parameters=[
            Parameter('fused.compressed.format', value='png').to_parameter_msg()]))
        assert probe.spin_until(future.done, 10) and future.result().results[0].successful
        stamp = fuse_one(probe, proc, thermal, visible, stamp + 10**9, compressed)
        fused, message, decoded = raw_and_compressed(stamp)
        assert message.format == 'bgr8; png compressed bgr8'
        np.testing.assert_array_equal(decoded, fused)
    probe.destroy_node()
