#!/usr/bin/env python3
"""Regenerate the demo's sample bag (s4fusion_ros/data/m3svd_sample/) from M3SVD video clips.

Three scenes of real synchronized thermal/visible video, 2 s each, as a robot would record them:

- thermal: a radiometric core at 9 Hz, mono16 counts (the clip's 8-bit IR scaled into a 14-bit
  range with a slowly drifting offset, as scripts/make_sample_bag.py does), raw Image on
  /thermal/image_raw. Each exposure shows the clip frame nearest to it in time, and its stamp is
  the exposure time plus a constant THERMAL_STAMP_DELAY: the driver stamps a frame when the core
  has sent it (the node's sync.thermal_offset takes this out);
- visible: every clip frame at the clip's own 30 Hz timing, bgr8 JPEG (quality 85) as
  image_transport's compressed plugin publishes it on /visible/image_raw/compressed (raw bgr8
  would make the bag about 4x larger).

Both 320x240 (INTER_AREA from 640x480), stamps with 1-2 ms jitter, log times a few milliseconds
after the stamps. MCAP with zstd chunks. M3SVD is MIT licensed; see
s4fusion_ros/data/NOTICE-M3SVD.md.

Usage: .venv/bin/python scripts/make_video_bag.py M3SVD_VIDEOS [--output DIR]
  (M3SVD_VIDEOS holds ir/<clip>.mp4 and vi/<clip>.mp4: Linfeng-Tang/M3SVD Video/test/infrared
  and Video/test/visible)
"""

import argparse
import pathlib
import sys

import cv2
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from make_sample_bag import (add_output_argument, thermal_counts,  # noqa: E402 (beside it)
                             write_sample_bag)
from s4fusion_ros.bagio import (COMPRESSED_IMAGE, IMAGE, compressed_image_cdr,  # noqa: E402
                                image_cdr)
from s4fusion_ros.imaging.encodings import encode_image  # noqa: E402

# (clip, first frame): a person walking out of smoke, people on stairs, people on a river bank.
SCENES = (('0117_1605', 0), ('0111_1716', 0), ('0113_1714', 0))
SCENE_SECONDS = 2.0
SIZE = (320, 240)  # (width, height)
START_NS = 1_735_000_000 * 10**9  # a fixed epoch keeps the bag byte-for-byte reproducible
THERMAL_TOPIC, VISIBLE_TOPIC = '/thermal/image_raw', '/visible/image_raw/compressed'
THERMAL_FRAME, VISIBLE_FRAME = 'thermal_optical_frame', 'rgb_optical_frame'
THERMAL_PERIOD = 1 / 9.0
THERMAL_STAMP_DELAY = 0.025  # s; what sync.thermal_offset: -0.025 corrects
JPEG_QUALITY = 85
JPEG_FORMAT = 'bgr8; jpeg compressed bgr8'
SEED = 2025


def read_scene(videos: pathlib.Path, clip: str, first: int) -> tuple[list, list, list]:
    """(times s from the excerpt's start, thermal uint8 frames, visible BGR frames) of a scene."""
    captures = [cv2.VideoCapture(str(videos / kind / f'{clip}.mp4')) for kind in ('ir', 'vi')]
    times, thermal, visible = [], [], []
    try:
        for capture in captures:
            if not capture.isOpened():
                raise SystemExit(f'make_video_bag: cannot read {clip}.mp4 under {videos}/ir, /vi')
            capture.set(cv2.CAP_PROP_POS_FRAMES, first)
        start = None
        while True:
            (ok_ir, ir), (ok_vi, vi) = (capture.read() for capture in captures)
            if not (ok_ir and ok_vi):
                break
            at = captures[1].get(cv2.CAP_PROP_POS_MSEC) / 1e3
            start = at if start is None else start
            if at - start >= SCENE_SECONDS:
                break
            times.append(at - start)
            thermal.append(cv2.resize(cv2.cvtColor(ir, cv2.COLOR_BGR2GRAY), SIZE,
                                      interpolation=cv2.INTER_AREA))
            visible.append(cv2.resize(vi, SIZE, interpolation=cv2.INTER_AREA))
    finally:
        for capture in captures:
            capture.release()
    if not times or times[-1] < SCENE_SECONDS - 0.1:
        raise SystemExit(f'make_video_bag: {clip} has no {SCENE_SECONDS:g} s from frame {first}')
    return times, thermal, visible


def scene_events(videos: pathlib.Path, index: int, clip: str, first: int,
                 rng: np.random.Generator) -> list[tuple]:
    """[(log time ns, topic, serialized message)] of one scene, placed after the earlier ones."""
    times, thermal, visible = read_scene(videos, clip, first)
    offset = index * SCENE_SECONDS
    events = []

    def add(topic, t, data_for_stamp, latency):
        stamp = START_NS + round((offset + t + rng.normal(0.0, 0.001)) * 1e9)
        log_time = stamp + round(latency * 1e9 * rng.uniform(0.5, 1.5))
        events.append((log_time, topic, data_for_stamp(stamp)))

    for t, image in zip(times, visible):
        jpeg = cv2.imencode('.jpg', image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes()
        add(VISIBLE_TOPIC, t, lambda stamp, jpeg=jpeg: compressed_image_cdr(
            jpeg, JPEG_FORMAT, stamp, VISIBLE_FRAME), 0.006)
    exposure = rng.uniform(0.0, THERMAL_PERIOD)  # a free-running core: its own phase
    while exposure < SCENE_SECONDS:
        nearest = int(np.argmin(np.abs(np.asarray(times) - exposure)))
        counts = thermal_counts(thermal[nearest], offset + exposure)
        add(THERMAL_TOPIC, exposure + THERMAL_STAMP_DELAY, lambda stamp, counts=counts: image_cdr(
            encode_image(counts, 'mono16'), stamp, THERMAL_FRAME), 0.004)
        exposure += THERMAL_PERIOD
    return events


def make_video_bag(videos: pathlib.Path, output: pathlib.Path) -> None:
    """Write the bag to `output` (replacing an earlier one)."""
    rng = np.random.default_rng(SEED)
    events = [event for index, (clip, first) in enumerate(SCENES)
              for event in scene_events(videos, index, clip, first, rng)]
    events.sort(key=lambda event: event[0])
    write_sample_bag(output, {THERMAL_TOPIC: IMAGE, VISIBLE_TOPIC: COMPRESSED_IMAGE}, events,
                     'make_video_bag')


def main() -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('videos', type=pathlib.Path,
                        help='M3SVD video folder with ir/<clip>.mp4 and vi/<clip>.mp4')
    add_output_argument(parser, 'm3svd_sample')
    args = parser.parse_args()
    make_video_bag(args.videos, args.output)


if __name__ == '__main__':
    main()
