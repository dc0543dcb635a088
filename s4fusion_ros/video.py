"""Side-by-side MP4 of a fused stream: visible | thermal | fused | saliency, with stamps.

OpenCV's VideoWriter with the MPEG-4 Part 2 codec ('mp4v'), the one opencv-python-headless's
bundled FFmpeg encodes (its H.264 encoders are absent); ordinary players (VLC, mpv, browsers with
MPEG-4 support, QuickTime) open it. Panels keep the visible image's size unless four of them would
be wider than MAX_WIDTH.
"""

import contextlib
import os
import pathlib
import sys
from typing import Iterator

import cv2
import numpy as np
from tqdm import tqdm

from .bagio import BagError, deserialize, open_bag, read_messages
from .engine import FusionPipeline, PreparedPair
from .files import opencv_path
from .imaging.color import to_uint8
from .imaging.encodings import decode_visible, image_to_array
from .messages import stamp_to_ns

FOURCC = 'mp4v'
# The containers whose muxer takes FOURCC (checked with the bundled FFmpeg); OpenCV picks the
# container by the suffix, and any other suffix fails only once the first frame is written.
VIDEO_SUFFIXES = ('.mp4', '.mov', '.mkv', '.avi')
MAX_WIDTH = 2560  # pixels of the whole row
TITLES = ('visible', 'thermal', 'fused', 'saliency')
# OpenCV's mp4v writer opens only from 0.001 to 65535 frames/s: frames logged at one instant,
# or minutes apart, would ask for more or less.
FPS_RANGE = (0.01, 1000.0)


def frame_rate(frames: int, seconds: float) -> float:
    """The rate of `frames` spread evenly over `seconds` (frames - 1 intervals), within
    FPS_RANGE; 1 for fewer than two frames or no time."""
    if frames < 2 or not seconds > 0:
        return 1.0
    return min(FPS_RANGE[1], max(FPS_RANGE[0], (frames - 1) / seconds))


def saliency_bgr(saliency: np.ndarray) -> np.ndarray:
    """A saliency map (uint8 0-255, or float in [0, 1]) as an inferno-coloured BGR image."""
    if saliency.dtype != np.uint8:
        saliency = to_uint8(saliency)
    return cv2.applyColorMap(saliency, cv2.COLORMAP_INFERNO)


def _label(image: np.ndarray, text: str, origin: tuple[int, int]) -> None:
    """White text with a dark outline, readable on any background."""
    for color, thickness in (((0, 0, 0), 2), ((255, 255, 255), 1)):
        cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, thickness,
                    cv2.LINE_AA)


def panel_row(visible_bgr: np.ndarray, thermal: np.ndarray, fused_bgr: np.ndarray,
              saliency: np.ndarray, stamp_ns: int) -> np.ndarray:
    """One video frame: the four images side by side, titled, with the visible stamp; panels
    are scaled to fit MAX_WIDTH before the titles are drawn, so those stay legible (drawn first,
    SideBySideVideo's scaling shrank them to 3 pixels on a 1920x1080 camera)."""
    scale = min(1.0, MAX_WIDTH / (len(TITLES) * visible_bgr.shape[1]))
    height, width = (round(side * scale) for side in visible_bgr.shape[:2])
    panels = [visible_bgr, cv2.cvtColor(to_uint8(thermal), cv2.COLOR_GRAY2BGR),
              fused_bgr if fused_bgr.ndim == 3 else cv2.cvtColor(fused_bgr, cv2.COLOR_GRAY2BGR),
              saliency_bgr(saliency)]
    # Area averaging where a panel shrinks (no aliasing), bilinear where it grows (a thermal
    # camera of lower resolution), as before.
    row = np.hstack([cv2.resize(p, (width, height), interpolation=cv2.INTER_AREA
                                if p.shape[1] > width else cv2.INTER_LINEAR)
                     if p.shape[:2] != (height, width) else p for p in panels])
    for index, title in enumerate(TITLES):
        _label(row, title, (index * width + 8, 20))
    _label(row, f'stamp {stamp_ns / 1e9:.3f} s', (8, height - 10))
    return row


class SideBySideVideo:
    """Writes panel rows to an MP4; the frame size is fixed by the first row.

    The video is written beside ``path`` under a hidden name and renamed to ``path`` by
    ``close``, so a crash or an interruption never leaves a cut-off video under the final name;
    closed without a frame, it leaves no file there (an earlier video is not this one). As a
    context manager it closes on success and discards the partial file on an exception.
    """

    def __init__(self, path: pathlib.Path, fps: float):
        """Open nothing yet: the size comes with the first frame."""
        self.path = pathlib.Path(path)
        self.fps = fps
        self.frames = 0
        self._writer = None
        self._size = None
        # The .mp4 suffix stays last: OpenCV picks the container by it.
        self._partial = self.path.with_name(f'.{self.path.stem}.partial{self.path.suffix}')

    def add(self, row: np.ndarray) -> None:
        """Append one frame (a BGR row from panel_row), scaled to even sides within MAX_WIDTH."""
        if self._writer is None:
            height, width = row.shape[:2]
            scale = min(1.0, MAX_WIDTH / width)
            self._size = (round(width * scale / 2) * 2, round(height * scale / 2) * 2)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = cv2.VideoWriter(opencv_path(self._partial),
                                           cv2.VideoWriter_fourcc(*FOURCC), self.fps, self._size)
            if not self._writer.isOpened():
                raise OSError(f'{self.path}: OpenCV cannot write {FOURCC} video here '
                              '(OPENCV_LOG_LEVEL=WARNING shows its reason)')
        if row.shape[1::-1] != self._size:
            row = cv2.resize(row, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(row)
        self.frames += 1

    def close(self) -> None:
        """Finish the video and give it its name; without a frame, remove what is at ``path``."""
        if not self.frames:
            self.path.unlink(missing_ok=True)
            return
        try:
            if self._release():
                self._check_whole()
                os.replace(self._partial, self.path)
        # `path` is a folder, say, or a stop signal came while the writer finished the file (it
        # raises as release returns): no hidden partial left behind.
        except BaseException:
            self._partial.unlink(missing_ok=True)
            raise

    def _check_whole(self) -> None:
        """OSError unless the finished file reads back to its last frame: OpenCV's writer drops
        the writes a full disk (or a file size limit) refuses without a word, leaving an MP4
        without the index a player needs, or an AVI or MKV whose header counts frames it lacks."""
        capture = cv2.VideoCapture(opencv_path(self._partial))
        try:
            whole = (capture.isOpened() and capture.set(cv2.CAP_PROP_POS_FRAMES, self.frames - 1)
                     and capture.read()[0])
        finally:
            capture.release()
        if not whole:
            raise OSError(f'{self.path}: the video file was cut short: its frame {self.frames} '
                          'does not read back (a full disk?)')

    def discard(self) -> None:
        """Stop writing and remove the partial video; ``path`` is left as it was."""
        self._release()
        self._partial.unlink(missing_ok=True)

    def _release(self) -> bool:
        """Finish the writer, if one is open; returns whether one was."""
        if self._writer is None:
            return False
        self._writer.release()
        self._writer = None
        return True

    def __enter__(self):
        """Use as a context manager: closed on success, discarded on an exception."""
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Close the video, or discard it when leaving by an exception."""
        if exc_type is None:
            self.close()
        else:
            self.discard()


def bag_pairs(bag: pathlib.Path, thermal_topic: str, visible_topic: str,
              pipeline: FusionPipeline) -> Iterator[PreparedPair]:
    """Every pair the node's pipeline prepares from an input bag, in recorded order.

    The pipeline (the node's, same parameters) runs on every input message in recorded order, so
    the thermal image of each pair is exactly what the node normalized and fused.
    """
    roles = {thermal_topic: 'thermal', visible_topic: 'visible'}
    with open_bag(bag) as reader:
        for connection, log_time, raw in read_messages(reader, bag, roles):
            yield from pipeline.expire(log_time / 1e9)  # as replay.BagFuser does
            # Bytes that are not the message type, undecodable or unusable: dropped, as there.
            with contextlib.suppress(BagError, ValueError):
                yield from pipeline.add_message(roles[connection.topic],
                                                deserialize(bag, connection, raw), log_time / 1e9)
    yield from pipeline.flush()


def export_recording(input_bag: pathlib.Path, thermal_topic: str, visible_topic: str,
                     pipeline: FusionPipeline, output_bag: pathlib.Path, fused_topic: str,
                     saliency_topic: str, path: pathlib.Path) -> int:
    """Write the side-by-side MP4 of a recorded fused stream and its inputs; returns its frames.

    Frames follow the fused stamps; the video plays at the rate they were fused at.
    """
    fused, saliency_maps, stamps = outputs_by_stamp(output_bag, fused_topic, saliency_topic)
    wanted = set(stamps)
    pairs = {pair.visible_stamp_ns: pair for pair in bag_pairs(input_bag, thermal_topic,
                                                               visible_topic, pipeline)
             if pair.visible_stamp_ns in wanted}
    stamps = [stamp for stamp in stamps if stamp in pairs]
    span = (stamps[-1] - stamps[0]) / 1e9 if stamps else 0.0
    with SideBySideVideo(path, frame_rate(len(stamps), span)) as video:
        for stamp in tqdm(stamps, desc='video', unit='frame', file=sys.stderr, leave=False):
            pair = pairs[stamp]
            saliency = np.asarray(image_to_array(saliency_maps[stamp]))
            video.add(panel_row(pair.visible_bgr, pair.thermal, decode_visible(fused[stamp]),
                                saliency, stamp))
    return video.frames


def outputs_by_stamp(bag: pathlib.Path, fused_topic: str, saliency_topic: str
                     ) -> tuple[dict, dict, list]:
    """The fused images and saliency maps a bag recorded, each {stamp ns: message}, and the
    stamps both have, in order."""
    outputs = {fused_topic: {}, saliency_topic: {}}
    with open_bag(bag) as reader:
        for connection, _, raw in read_messages(reader, bag, outputs):
            message = deserialize(bag, connection, raw)
            outputs[connection.topic][stamp_to_ns(message.header.stamp)] = message
    fused, saliency_maps = outputs[fused_topic], outputs[saliency_topic]
    return fused, saliency_maps, sorted(set(fused) & set(saliency_maps))
