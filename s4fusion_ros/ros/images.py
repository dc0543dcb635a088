"""sensor_msgs/Image messages from arrays, as the node publishes them."""

import numpy as np
from sensor_msgs.msg import Image

from ..imaging.encodings import RawImage, encode_image
from ..messages import ns_to_sec_nanosec


def image_message(array: np.ndarray, encoding: str, stamp_ns: int, frame_id: str) -> Image:
    """Pack `array` in `encoding` into an Image with the given header."""
    return raw_image_message(encode_image(array, encoding), stamp_ns, frame_id)


def raw_image_message(raw: RawImage, stamp_ns: int, frame_id: str) -> Image:
    """An Image holding the packed `raw`, with the given header."""
    msg = Image(height=raw.height, width=raw.width, encoding=raw.encoding,
                is_bigendian=raw.is_bigendian, step=raw.step)
    msg.data = bytes(raw.data)  # bytes assignment is fast; a NumPy array costs ~0.5 s per image
    set_stamp(msg, stamp_ns)
    msg.header.frame_id = frame_id
    return msg


def set_stamp(msg, stamp_ns: int) -> None:
    """Set a message's header stamp to `stamp_ns` (integer nanoseconds)."""
    msg.header.stamp.sec, msg.header.stamp.nanosec = ns_to_sec_nanosec(stamp_ns)
