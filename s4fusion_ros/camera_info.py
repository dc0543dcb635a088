"""The visible camera's calibration beside the outputs (no ROS needed).

The fused and saliency images are the visible image's size and geometry, so the visible camera's
CameraInfo describes them. The node republishes it, and s4fusion-bag writes it, where
image_transport's CameraPublisher and CameraSubscriber (rviz's Camera display, image_proc, a
detector that projects) look for it: the `camera_info` sibling of the image topic, stamped as
the image it goes with.
"""

import collections
import math
import threading

from .messages import stamp_to_ns

CAMERA_INFO = 'sensor_msgs/msg/CameraInfo'
# Infos kept by stamp: a pair's visible frame waits at most sync.timeout plus the inference
# queue before it is published; 128 frames are over 4 s of a 30 Hz camera.
CACHE_SIZE = 128


def camera_info_topic(image_topic: str, transport: bool = False) -> str:
    """The camera_info topic image_transport pairs with an image topic: its sibling
    (/camera/color/image_raw -> /camera/color/camera_info); with `transport`, the topic is a
    transport plugin's below its base topic (/camera/color/image_raw/compressed), whose
    sibling it is."""
    base = image_topic.rpartition('/')[0] if transport else image_topic
    return base.rpartition('/')[0] + '/camera_info'


def output_info_topics(image_topics) -> list[str]:
    """The camera_info topics beside the outputs' image topics, as image_transport's
    CameraPublisher of each names its info: one, or one in each folder where the outputs lie
    apart (remapped or given apart), so a CameraSubscriber of either finds it."""
    return list(dict.fromkeys(camera_info_topic(topic) for topic in image_topics))


def calibration_fault(info, width: int, height: int) -> str:
    """Why `info` (rclpy's or rosbags' CameraInfo) does not describe the `width` x `height`
    visible images it goes with ('' where it may): a size that its region of interest and
    binning do not reduce to theirs, or a camera matrix K that is not finite. All zeros (size, K)
    is an uncalibrated camera's, as sensor_msgs documents it, and fine. The node and s4fusion-bag
    pass the info on as it came either way; a user must hear that rectifying or projecting with
    it beside the outputs goes wrong."""
    if not all(math.isfinite(value) for value in info.k):
        return 'its camera matrix K is not finite'
    if not (info.width or info.height):
        return ''
    roi = info.roi
    calibrated = ((roi.width or info.width) // max(info.binning_x, 1),
                  (roi.height or info.height) // max(info.binning_y, 1))
    if calibrated == (width, height):
        return ''
    reduced = (' with its region of interest and binning' if calibrated != (info.width,
                                                                            info.height) else '')
    return (f'it describes {calibrated[0]}x{calibrated[1]} images{reduced}, the visible images '
            f'are {width}x{height}')


class CameraInfoCache:
    """A camera's latest CameraInfo messages (rclpy's or rosbags') by stamp; thread-safe: the
    node's executor adds, its inference thread takes."""

    def __init__(self, size: int = CACHE_SIZE):
        self._by_stamp = collections.OrderedDict()  # stamp (ns) -> message, oldest first
        self._size = size
        self._lock = threading.Lock()
        self.received = 0

    def add(self, msg) -> None:
        with self._lock:
            self.received += 1
            stamp_ns = stamp_to_ns(msg.header.stamp)
            self._by_stamp.pop(stamp_ns, None)
            self._by_stamp[stamp_ns] = msg
            while len(self._by_stamp) > self._size:
                self._by_stamp.popitem(last=False)

    def for_image(self, stamp_ns: int):
        """The info stamped as the image stamped `stamp_ns`; else (a lost info, or a driver
        that sends its info apart from its frames) the newest stamped before it, and failing
        that the last to arrive; None before any arrived. By stamps, not by what arrived by
        the time of asking, so the live node and s4fusion-bag choose alike. The caller stamps
        what it sends as the image."""
        with self._lock:
            if not self._by_stamp:
                return None
            if stamp_ns in self._by_stamp:
                return self._by_stamp[stamp_ns]
            before = [stamp for stamp in self._by_stamp if stamp < stamp_ns]
            return self._by_stamp[max(before) if before else next(reversed(self._by_stamp))]
