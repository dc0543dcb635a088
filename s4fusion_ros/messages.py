"""Field-level conversion between image messages and the core, without importing any ROS library.

rclpy messages (live) and rosbags messages (offline) have the same field names, so one duck-typed
conversion serves both paths and they decode byte-for-byte the same way.
"""

import numpy as np

from .imaging.encodings import RawCompressedImage, RawImage


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_sec_nanosec(stamp_ns: int) -> tuple[int, int]:
    """Integer nanoseconds -> (sec, nanosec) for builtin_interfaces/Time."""
    return divmod(int(stamp_ns), 1_000_000_000)


def raw_from_message(message):
    """sensor_msgs Image or CompressedImage (rclpy or rosbags) -> RawImage / RawCompressedImage."""
    if hasattr(message, 'format'):
        return RawCompressedImage(format=message.format, data=_as_bytes_view(message.data))
    return RawImage(height=message.height, width=message.width, encoding=message.encoding,
                    step=message.step, is_bigendian=bool(message.is_bigendian),
                    data=_as_bytes_view(message.data))


def _as_bytes_view(data):
    # rclpy gives array('B') or bytes, rosbags an ndarray: all expose the buffer without a copy.
    return data if isinstance(data, np.ndarray) else memoryview(data)
