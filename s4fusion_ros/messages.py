"""Header-stamp conversion for messages, without importing any ROS library.

rclpy messages (live) and rosbags messages (offline) have the same field names, so the core takes
either as they are: the image decoders read their fields (imaging/encodings.py) and these helpers
their stamps, and both paths decode byte-for-byte the same way.
"""


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_sec_nanosec(stamp_ns: int) -> tuple[int, int]:
    """Integer nanoseconds -> (sec, nanosec) for builtin_interfaces/Time."""
    return divmod(int(stamp_ns), 1_000_000_000)
