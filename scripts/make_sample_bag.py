#!/usr/bin/env python3
"""Regenerate the sample bag shipped in s4fusion_ros/data/ from real MSRS pairs (deterministic).

The bag looks like a robot's thermal + RGB recording: a radiometric thermal core at about 9 Hz
(mono16 counts: the 8-bit MSRS IR scaled into a 14-bit range with a slowly drifting offset, and one
flat-field-correction pause) and an RGB camera at 30 Hz (bgr8), both 320x240, with stamp jitter,
transport latency between header stamp and log time, and the scene switching between MSRS pairs
once a second. MCAP with zstd chunks. MSRS is MIT licensed; see s4fusion_ros/data/NOTICE-MSRS.md.

Usage: .venv/bin/python scripts/make_sample_bag.py MSRS_DIR [--output DIR]   (MSRS_DIR: ir/, vi/)
"""

import argparse
import pathlib
import sys

import cv2
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s4fusion_ros.bagio import (IMAGE, RELIABLE_QOS, add_topic, bag_size,  # noqa: E402
                                create_bag, image_cdr)
from s4fusion_ros.imaging.encodings import encode_image  # noqa: E402

SCENES = ('00024N.png', '00537D.png', '00036N.png', '00633D.png')  # night, day, night, day
SIZE = (320, 240)  # (width, height)
DURATION = 4.0  # seconds, one scene each
START_NS = 1_700_000_000 * 10**9  # a fixed epoch keeps the bag byte-for-byte reproducible
THERMAL_TOPIC, VISIBLE_TOPIC = '/thermal/image_raw', '/visible/image_raw'
THERMAL_FRAME, VISIBLE_FRAME = 'thermal_optical_frame', 'rgb_optical_frame'
THERMAL_PERIOD, VISIBLE_PERIOD = 1 / 8.7, 1 / 30.0
FFC_PAUSE = (2.4, 2.75)  # thermal cores stop for a flat-field correction now and then
COUNTS_BASE, COUNTS_GAIN = 7200.0, 28.0  # 8-bit IR -> 14-bit counts (max ~14300 < 16383)
SEED = 2022


def load_scenes(msrs: pathlib.Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(ir uint8 (H, W), vi BGR uint8 (H, W, 3))] at the sample size."""
    scenes = []
    for name in SCENES:
        ir = cv2.imread(str(msrs / 'ir' / name), cv2.IMREAD_GRAYSCALE)
        vi = cv2.imread(str(msrs / 'vi' / name), cv2.IMREAD_COLOR)
        if ir is None or vi is None:
            raise SystemExit(f'make_sample_bag: cannot read {name} under {msrs}/ir and /vi')
        scenes.append((cv2.resize(ir, SIZE, interpolation=cv2.INTER_AREA),
                       cv2.resize(vi, SIZE, interpolation=cv2.INTER_AREA)))
    return scenes


def capture_times(period: float, jitter: float, rng: np.random.Generator,
                  pause: tuple[float, float] | None = None) -> list[float]:
    """Exposure times (s) of a free-running camera: a random phase, period and Gaussian jitter."""
    times, t = [], rng.uniform(0.0, period)
    while t < DURATION:
        if pause is None or not pause[0] <= t < pause[1]:
            times.append(t + rng.normal(0.0, jitter))
        t += period
    return times


def thermal_counts(ir8: np.ndarray, t: float) -> np.ndarray:
    """Turn 8-bit IR into a radiometric core's counts, with an offset drifting over seconds.

    The drift (a few tens of counts) is what a core's own temperature does to real counts.
    """
    offset = 40.0 * np.sin(2 * np.pi * t / 5.0) + 15.0 * t
    return np.rint(COUNTS_BASE + offset + COUNTS_GAIN * ir8.astype(np.float64)).astype(np.uint16)


def make_sample_bag(msrs: pathlib.Path, output: pathlib.Path) -> None:
    """Write the sample bag to `output` (replacing an earlier one)."""
    rng = np.random.default_rng(SEED)
    scenes = load_scenes(msrs)
    events = []  # (log time ns, topic, stamp ns, image)
    for topic, period, jitter, latency in ((THERMAL_TOPIC, THERMAL_PERIOD, 0.002, 0.012),
                                           (VISIBLE_TOPIC, VISIBLE_PERIOD, 0.001, 0.006)):
        pause = FFC_PAUSE if topic == THERMAL_TOPIC else None
        for t in capture_times(period, jitter, rng, pause):
            ir, vi = scenes[min(int(t / (DURATION / len(scenes))), len(scenes) - 1)]
            image = thermal_counts(ir, t) if topic == THERMAL_TOPIC else vi
            stamp = START_NS + round(t * 1e9)
            # Log time = when the recorder got it: stamp + transport latency (never negative).
            log_time = stamp + round(latency * 1e9 * rng.uniform(0.5, 1.5))
            events.append((log_time, topic, stamp, image))
    events.sort(key=lambda event: event[0])
    # Serialized one at a time, as they are written.
    messages = ((log_time, topic, _serialize(topic, stamp, image))
                for log_time, topic, stamp, image in events)
    write_sample_bag(output, {THERMAL_TOPIC: IMAGE, VISIBLE_TOPIC: IMAGE}, messages,
                     'make_sample_bag')


def _serialize(topic: str, stamp: int, image: np.ndarray) -> memoryview:
    if topic == THERMAL_TOPIC:
        return image_cdr(encode_image(image, 'mono16'), stamp, THERMAL_FRAME)
    return image_cdr(encode_image(image, 'bgr8'), stamp, VISIBLE_FRAME)


def write_sample_bag(output: pathlib.Path, topic_types: dict, messages, prog: str) -> None:
    """Write (log time, topic, serialized message) in log-time order to a new compressed MCAP
    bag (replacing an earlier one), each topic with its message type and reliable QoS."""
    counts = dict.fromkeys(topic_types, 0)
    with create_bag(output, 'mcap', overwrite=True, compress=True) as writer:
        connections = {topic: add_topic(writer, topic, RELIABLE_QOS, msgtype)
                       for topic, msgtype in topic_types.items()}
        for log_time, topic, data in messages:
            writer.write(connections[topic], log_time, data)
            counts[topic] += 1
    print(f'{prog}: wrote {output} ({bag_size(output) / 1e6:.2f} MB): '
          + ', '.join(f'{topic} {count} msgs' for topic, count in counts.items()))


def main() -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('msrs', type=pathlib.Path, help='MSRS folder with ir/ and vi/')
    add_output_argument(parser, 'msrs_sample')
    args = parser.parse_args()
    make_sample_bag(args.msrs, args.output)


def add_output_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """--output: the bag directory to write, by default the shipped sample `name`."""
    parser.add_argument('--output', type=pathlib.Path,
                        default=REPO / 's4fusion_ros' / 'data' / name,
                        help='bag directory to write (default: %(default)s)')


if __name__ == '__main__':
    main()
