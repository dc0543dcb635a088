"""sensor_msgs/Image and CompressedImage messages from arrays, and the header the node gives
every message it publishes for a pair."""

import numpy as np
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

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
    set_header(msg, stamp_ns, frame_id)
    return msg


def compressed_image_message(fmt: str, data: bytes, stamp_ns: int,
                             frame_id: str) -> CompressedImage:
    """A CompressedImage of `fmt` holding `data`, with the given header."""
    msg = CompressedImage(format=fmt, data=data)
    set_header(msg, stamp_ns, frame_id)
    return msg


def set_header(msg, stamp_ns: int, frame_id: str) -> None:
    """Give a message a header of its own with the given stamp and frame_id (a header it
    shares with another message, as a shallow copy does, is left as it was)."""
    msg.header = Header(frame_id=frame_id)
    set_stamp(msg, stamp_ns)


def set_stamp(msg, stamp_ns: int) -> None:
    """Set a message's header stamp to `stamp_ns` (integer nanoseconds)."""
    msg.header.stamp.sec, msg.header.stamp.nanosec = ns_to_sec_nanosec(stamp_ns)
