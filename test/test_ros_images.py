"""The Image and CompressedImage messages the node publishes, as a subscriber deserializes them."""

import copy

import numpy as np
import pytest

pytest.importorskip('rclpy', reason='rclpy (ROS 2) is not installed')

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CameraInfo  # noqa: E402

from s4fusion_ros.imaging.encodings import encode_image, image_to_array  # noqa: E402
from s4fusion_ros.messages import stamp_to_ns  # noqa: E402
from s4fusion_ros.ros.images import (compressed_image_message, image_message,  # noqa: E402
                                     raw_image_message, set_header)

STAMP_NS = 1_735_000_123 * 10**9 + 456_789  # seconds and nanoseconds both non-zero


def received(msg):
    """`msg` as a subscriber gets it: through CDR."""
    return deserialize_message(serialize_message(msg), type(msg))


def test_an_image_message_holds_the_array_with_its_layout_and_header():
    # Not square, two bytes a pixel, big-endian and padded rows: the height, width, step and
    # byte order a reader unpacks the data with each have to be the packed image's own.
    counts = np.arange(3 * 5, dtype=np.uint16).reshape(3, 5) * 4001
    raw = encode_image(counts, 'mono16', bigendian=True, row_padding=6)
    assert (raw.step, raw.is_bigendian) == (16, 1)
    msg = received(raw_image_message(raw, STAMP_NS, 'thermal_optical'))
    assert (msg.height, msg.width, msg.step, msg.encoding, msg.is_bigendian) == (
        3, 5, 16, 'mono16', 1)
    np.testing.assert_array_equal(image_to_array(msg), counts)
    assert stamp_to_ns(msg.header.stamp) == STAMP_NS
    assert msg.header.frame_id == 'thermal_optical'

    colour = np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    msg = received(image_message(colour, 'rgb8', STAMP_NS + 1, 'rgb'))
    assert (msg.height, msg.width, msg.step, msg.encoding, msg.is_bigendian) == (
        2, 3, 9, 'rgb8', 0)
    np.testing.assert_array_equal(image_to_array(msg), colour)
    assert (stamp_to_ns(msg.header.stamp), msg.header.frame_id) == (STAMP_NS + 1, 'rgb')


def test_a_compressed_image_message_holds_its_format_data_and_header():
    msg = received(compressed_image_message('bgr8; png compressed bgr8', b'\x89PNG...',
                                            STAMP_NS, 'rgb'))
    assert (msg.format, bytes(msg.data)) == ('bgr8; png compressed bgr8', b'\x89PNG...')
    assert (stamp_to_ns(msg.header.stamp), msg.header.frame_id) == (STAMP_NS, 'rgb')


def test_a_header_set_on_a_shallow_copy_leaves_the_original_as_it_was():
    # The node republishes a cached camera info with each output's header: the cached one keeps
    # its own stamp, which later images are matched against.
    info = CameraInfo(width=160, height=120)
    set_header(info, STAMP_NS, 'rgb_optical')
    published = copy.copy(info)
    set_header(published, STAMP_NS + 10**9, 'rgb')
    assert (stamp_to_ns(info.header.stamp), info.header.frame_id) == (STAMP_NS, 'rgb_optical')
    assert (stamp_to_ns(published.header.stamp), published.header.frame_id) == (
        STAMP_NS + 10**9, 'rgb')
