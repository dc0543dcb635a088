"""~/fused/compressed and ~/saliency/compressed: the outputs as image_transport's compressed
transport publishes them."""

import cv2
import numpy as np
import pytest

pytest.importorskip('rclpy', reason='rclpy (ROS 2) is not installed')

from rclpy.parameter import Parameter  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from sensor_msgs.msg import CompressedImage  # noqa: E402

from ros_harness import Probe, image_message, load_pairs, node_log, running_node  # noqa: E402
from s4fusion_ros.engine import encode_saliency  # noqa: E402
from s4fusion_ros.messages import stamp_to_ns  # noqa: E402

pytestmark = pytest.mark.ros


def fuse_one(probe, proc, thermal, visible, stamp: int, compressed: dict) -> int:
    """Publish the pair stamped `stamp` until its raw outputs and both compressed transports
    came (a first pair may be lost to discovery); returns the stamp of the pair that did."""
    outputs = (probe.fused, probe.saliency, *compressed.values())
    for _ in range(5):
        probe.thermal_pub.publish(image_message(thermal, 'mono16', stamp, 'thermal'))
        probe.visible_pub.publish(image_message(visible, 'bgr8', stamp, 'rgb'))
        if probe.spin_until(lambda: all(any(stamp_to_ns(m.header.stamp) == stamp for m in output)
                                        for output in outputs), 10):
            return stamp
        assert proc.poll() is None, node_log(proc)
        stamp += 100_000_000
    pytest.fail(f'5 pairs published, not all outputs came: {node_log(proc)}')


def raw_and_compressed(raw_messages, compressed_messages, stamp: int, channels: int):
    """The raw output of the pair stamped `stamp` as an array, its compressed message, and that
    message decoded."""
    [raw] = [m for m in raw_messages if stamp_to_ns(m.header.stamp) == stamp]
    [message] = [m for m in compressed_messages if stamp_to_ns(m.header.stamp) == stamp]
    dtype = np.float32 if raw.encoding == '32FC1' else np.uint8
    shape = (raw.height, raw.width, channels)[:3 if channels > 1 else 2]
    decoded = cv2.imdecode(np.frombuffer(message.data, np.uint8),
                           cv2.IMREAD_COLOR if channels > 1 else cv2.IMREAD_GRAYSCALE)
    return np.frombuffer(raw.data, dtype).reshape(shape), message, decoded


def test_the_outputs_are_published_compressed_as_image_transport_does(ros_context, ivif_dir):
    [(thermal, visible)] = load_pairs(ivif_dir, ['00537D.png'])
    probe = Probe('compressed_probe')
    compressed = {name: [] for name in ('fused', 'saliency')}
    for name, messages in compressed.items():
        probe.create_subscription(CompressedImage, f's4fusion_node/{name}/compressed',
                                  messages.append, 10)
    with running_node({'device': 'cpu', 'inference_size': [160, 120]}) as proc:
        probe.wait_for_node(proc)
        stamp = fuse_one(probe, proc, thermal, visible, probe.get_clock().now().nanoseconds,
                         compressed)
        fused, message, decoded = raw_and_compressed(probe.fused, compressed['fused'], stamp, 3)
        assert message.format == 'bgr8; jpeg compressed bgr8'
        assert message.header.frame_id == 'rgb'
        assert cv2.PSNR(decoded, fused) > 33  # quality 95
        saliency, message, decoded = raw_and_compressed(probe.saliency, compressed['saliency'],
                                                        stamp, 1)
        assert message.format == 'mono8; jpeg compressed '
        assert message.header.frame_id == 'rgb'
        assert saliency.any() and cv2.PSNR(decoded, saliency) > 33

        # Lossless PNG and a float saliency map, set while the node runs: the saliency map's
        # transport stays mono8, the 0-255 map that encoding publishes.
        client = probe.create_client(SetParameters, 's4fusion_node/set_parameters')
        assert client.wait_for_service(timeout_sec=10)
        future = client.call_async(SetParameters.Request(parameters=[
            Parameter(name, value=value).to_parameter_msg() for name, value in (
                ('fused.compressed.format', 'png'), ('saliency.compressed.format', 'png'),
                ('saliency.encoding', '32FC1'))]))
        assert probe.spin_until(future.done, 10)
        assert all(result.successful for result in future.result().results)
        stamp = fuse_one(probe, proc, thermal, visible, stamp + 10**9, compressed)
        fused, message, decoded = raw_and_compressed(probe.fused, compressed['fused'], stamp, 3)
        assert message.format == 'bgr8; png compressed bgr8'
        np.testing.assert_array_equal(decoded, fused)
        saliency, message, decoded = raw_and_compressed(probe.saliency, compressed['saliency'],
                                                        stamp, 1)
        assert message.format == 'mono8; png compressed '
        np.testing.assert_array_equal(decoded, encode_saliency(saliency, 'mono8'))
    probe.destroy_node()
