"""The visible camera's calibration beside the outputs.

The fused and saliency images are the visible image's size and geometry, so the visible camera's
CameraInfo describes them. The node republishes it where image_transport's CameraPublisher and
CameraSubscriber (rviz's Camera display, image_proc, a detector that projects) look for it: the
`camera_info` sibling of the image topic, stamped as the image it goes with.
"""

import collections
import copy
import threading

from std_msgs.msg import Header

from ..messages import stamp_to_ns
from .images import set_stamp

# Infos kept by stamp: a pair's visible frame waits at most sync.timeout plus the inference
# queue before it is published; 128 frames are over 4 s of a 30 Hz camera.
CACHE_SIZE = 128


def camera_info_topic(image_topic: str) -> str:
    """The camera_info topic image_transport pairs with an image topic: its sibling
    (/camera/color/image_raw -> /camera/color/camera_info)."""
    return image_topic.rpartition('/')[0] + '/camera_info'


class CameraInfoCache:
    """The latest CameraInfo messages of a camera by stamp (thread-safe: the executor adds, the
    inference thread takes)."""

    def __init__(self, size: int = CACHE_SIZE):
        self._by_stamp = collections.OrderedDict()  # stamp (ns) -> CameraInfo, oldest first
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

    def for_image(self, stamp_ns: int, frame_id: str):
        """The info of the image stamped `stamp_ns`, or else the latest (a driver that sends
        its info apart from its frames, or a lost one), with that image's stamp and frame_id;
        None before any arrived."""
        with self._lock:
            if not self._by_stamp:
                return None
            info = self._by_stamp.get(stamp_ns) or next(reversed(self._by_stamp.values()))
        info = copy.copy(info)  # the header is replaced, the calibration shared
        info.header = Header(frame_id=frame_id)
        set_stamp(info, stamp_ns)
        return info
