"""What several test modules share: fake cameras, bags, reference data, flood checks.

Test modules import from here, never from one another.
"""

import contextlib
import csv
import functools
import json
import os
import pathlib
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import cv2
from hypothesis import strategies as st
import numpy as np
import pytest
import torch
import yaml
from rosbags.rosbag2 import CompressionFormat, CompressionMode, Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from s4fusion_ros.diagnostics import Key, ROLES, per_input
from s4fusion_ros.imaging.encodings import FORMATS, RawImage
from s4fusion_ros.ros.flood import FloodReport
from s4fusion_ros.tools import bag as bag_tool


# Recorded camera bags (written with rosbags, not the code under test) -------------------------

TYPESTORE = get_typestore(Stores.ROS2_KILTED)


IMAGE, COMPRESSED = 'sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage'
CAMERA_INFO = 'sensor_msgs/msg/CameraInfo'


SCENES = ['00004N.png', '00537D.png', '00012N.png']


SIZE = (160, 120)
START_NS = 1_650_000_000 * 10**9  # the first stamp of camera_messages' schedule


THERMAL_TOPIC, VISIBLE_TOPIC = '/flir/image_raw', '/camera/color/image_raw'
VISIBLE_INFO_TOPIC = '/camera/color/camera_info'


THERMAL_FRAME, VISIBLE_FRAME = 'flir_optical_frame', 'camera_color_optical_frame'


def camera_schedule(duration: float, scenes: int, rng: random.Random):
    """[(time offset s, role, scene index)] for thermal at ~9 Hz and visible at ~30 Hz with 2 ms
    stamp jitter, sorted by time; both cameras see scene k during [k, k+1) * duration / scenes."""
    events = []
    for role, period in (('thermal', 1 / 9), ('visible', 1 / 30)):
        t = rng.uniform(0.0, period)
        while t < duration:
            scene = min(int(t / duration * scenes), scenes - 1)
            events.append((t + rng.gauss(0.0, 0.002), role, scene))
            t += period
    return sorted(events)


def camera_messages(ivif_dir: pathlib.Path, duration: float, seed: int = 3):
    """[(log time, topic, stamp, encoding, image)]: thermal mono16 at ~9 Hz and bgr8 at ~30 Hz.

    Real MSRS pairs at SIZE, the scene changing over time (`camera_schedule`), a log time 2-15 ms
    after the stamp (transport), sorted by log time as a recorder writes them.
    """
    rng = random.Random(seed)
    scenes = []
    for name in SCENES:
        ir = cv2.imread(str(ivif_dir / 'msrs' / 'ir' / name), cv2.IMREAD_GRAYSCALE)
        vi = cv2.imread(str(ivif_dir / 'msrs' / 'vi' / name), cv2.IMREAD_COLOR)
        counts = (7000 + 30 * cv2.resize(ir, SIZE, interpolation=cv2.INTER_AREA).astype(np.uint16))
        scenes.append((counts, cv2.resize(vi, SIZE, interpolation=cv2.INTER_AREA)))
    events = []
    for offset, role, scene in camera_schedule(duration, len(scenes), rng):
        stamp = START_NS + round(offset * 1e9)
        thermal, visible = scenes[scene]
        topic, encoding, image = ((THERMAL_TOPIC, 'mono16', thermal) if role == 'thermal'
                                  else (VISIBLE_TOPIC, 'bgr8', visible))
        events.append((stamp + rng.randint(2, 15) * 10**6, topic, stamp, encoding, image))
    return sorted(events, key=lambda event: event[0])


def with_thermal_stall(events: list) -> list:
    """`events` as a recorder logs a thermal core's USB stall: its frames stamped 0.4-0.6 s into
    the schedule delivered together at 1.31 s, after a flat-field correction pause (no frames
    stamped 0.6-1.3 s). They arrive long after sync.timeout (0.5 s), so their visible partners
    are gone, live and offline alike; those went at least 0.2 s before the burst, four periods
    of the node's expiry timer, so the live outcome does not hang on the timer's phase."""
    def offset(event):
        return (event[2] - START_NS) / 1e9

    stalled = []
    for event in events:
        if event[1] == THERMAL_TOPIC and 0.4 <= offset(event) < 1.3:
            if offset(event) >= 0.6:
                continue  # the pause
            event = (START_NS + round(1.31e9), *event[1:])
        stalled.append(event)
    return sorted(stalled, key=lambda event: event[0])


def bag_image_message(image: np.ndarray, encoding: str, stamp: int, frame_id: str,
                      compressed: bool = False):
    """Build a rosbags sensor_msgs Image, or a CompressedImage as image_transport makes one."""
    types = TYPESTORE.types
    sec, nanosec = divmod(stamp, 10**9)
    header = types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec), frame_id=frame_id)
    if compressed:
        data = cv2.imencode('.jpg', image)[1].ravel()
        return types[COMPRESSED](header=header, format=f'{encoding}; jpeg compressed bgr8',
                                 data=data)
    data = np.ascontiguousarray(image).view(np.uint8).ravel()
    return types[IMAGE](header=header, height=image.shape[0], width=image.shape[1],
                        encoding=encoding, is_bigendian=0, step=data.size // image.shape[0],
                        data=data)


def visible_camera_info(stamp: int):
    """The visible camera's CameraInfo of a frame, its focal length telling the frames apart."""
    types = TYPESTORE.types
    sec, nanosec = divmod(stamp, 10**9)
    header = types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec),
        frame_id=VISIBLE_FRAME)
    focal = 100.0 + stamp % 10**9 / 1e7
    roi = types['sensor_msgs/msg/RegionOfInterest'](x_offset=0, y_offset=0, height=0, width=0,
                                                    do_rectify=False)
    return types[CAMERA_INFO](
        header=header, height=SIZE[1], width=SIZE[0], distortion_model='plumb_bob',
        d=np.zeros(5), k=np.array([focal, 0, 80, 0, focal, 60, 0, 0, 1], float),
        r=np.eye(3).ravel(), p=np.array([focal, 0, 80, 0, 0, focal, 60, 0, 0, 0, 1, 0], float),
        binning_x=0, binning_y=0, roi=roi)


def most_frames(stamp: int) -> bool:
    """A visible_infos for write_bag: three visible frames in four come with their info."""
    return stamp // 10**6 % 4 != 1


def write_bag(path: pathlib.Path, events, storage: str, compressed_visible: bool = False,
              cut_short=(), thermal_notes: bool = False, zstd_chunks: bool = False,
              visible_infos=None):
    """Write the events as `ros2 bag record` would (rosbags directly, not the code under test),
    in their order; the messages logged at a time in `cut_short` keep only their first 40 bytes.
    With `thermal_notes` a std_msgs/String follows each thermal image on its topic (a second
    type on one topic, which ROS 2 tools do not play); with `zstd_chunks` MCAP chunks are
    compressed, as rosbag2's MCAP storage writes them by default. `visible_infos(stamp)`: whether
    a visible frame's visible_camera_info precedes it on VISIBLE_INFO_TOPIC, as a driver
    publishes them."""
    visible_type = COMPRESSED if compressed_visible else IMAGE
    visible_topic = VISIBLE_TOPIC + ('/compressed' if compressed_visible else '')
    string = 'std_msgs/msg/String'
    writer = Writer(path, version=9, storage_plugin=StoragePlugin[storage.upper()])
    if zstd_chunks:
        writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    with writer:
        connections = {
            THERMAL_TOPIC: writer.add_connection(THERMAL_TOPIC, IMAGE, typestore=TYPESTORE),
            VISIBLE_TOPIC: writer.add_connection(visible_topic, visible_type,
                                                 typestore=TYPESTORE)}
        notes = (writer.add_connection(THERMAL_TOPIC, string, typestore=TYPESTORE)
                 if thermal_notes else None)
        infos = (writer.add_connection(VISIBLE_INFO_TOPIC, CAMERA_INFO, typestore=TYPESTORE)
                 if visible_infos else None)
        for log_time, topic, stamp, encoding, image in events:
            if infos is not None and topic == VISIBLE_TOPIC and visible_infos(stamp):
                writer.write(infos, log_time - 1, TYPESTORE.serialize_cdr(
                    visible_camera_info(stamp), CAMERA_INFO))
            if notes is not None and topic == THERMAL_TOPIC:
                writer.write(notes, log_time + 1, TYPESTORE.serialize_cdr(
                    TYPESTORE.types[string](data='note'), string))
            thermal = topic == THERMAL_TOPIC
            message = bag_image_message(image, encoding, stamp,
                                        THERMAL_FRAME if thermal else VISIBLE_FRAME,
                                        compressed=compressed_visible and not thermal)
            raw = TYPESTORE.serialize_cdr(message, IMAGE if thermal else visible_type)
            writer.write(connections[topic], log_time, raw[:40] if log_time in cut_short else raw)
    return path


def write_merged_visible_bag(path: pathlib.Path, events) -> pathlib.Path:
    """A merged bag: the thermal camera, and the visible one raw in its first half and
    CompressedImage in its second, on one topic (two recordings joined)."""
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        thermal = writer.add_connection(THERMAL_TOPIC, IMAGE, typestore=TYPESTORE)
        visible = {msgtype: writer.add_connection(VISIBLE_TOPIC, msgtype, typestore=TYPESTORE)
                   for msgtype in (IMAGE, COMPRESSED)}
        for index, (log_time, topic, stamp, encoding, image) in enumerate(events):
            msgtype = IMAGE if topic == THERMAL_TOPIC or index < len(events) // 2 else COMPRESSED
            message = bag_image_message(image, encoding, stamp, 'camera', msgtype == COMPRESSED)
            writer.write(thermal if topic == THERMAL_TOPIC else visible[msgtype], log_time,
                         TYPESTORE.serialize_cdr(message, msgtype))
    return path


def mcap_chunks(storage: pathlib.Path) -> list:
    """The chunks of an intact MCAP file, as its own summary indexes them (rosbags' ChunkInfo:
    offset, length and message counts per channel)."""
    with Reader(storage) as reader:
        return list(reader.storage.chunks)


def damage_chunk(storage: pathlib.Path, chunk, how: str) -> None:
    """Damage `chunk` of the MCAP file as failing storage does: a bit flipped in its compressed
    data (here in its zstd frame's magic, which zstd always checks), a CRC that its data does not
    match, or a wrong length of a record inside it."""
    data = bytearray(storage.read_bytes())
    records = chunk.chunk_start_offset + 9 + 40 + len(chunk.compression)
    if how == 'bit flip':
        data[records] ^= 0x04
    elif how == 'crc':
        struct.pack_into('<I', data, chunk.chunk_start_offset + 9 + 24, 0x5EED)
    else:  # its first message record's length, past the chunk's end
        struct.pack_into('<Q', data, records + 1, 2**40)
    storage.write_bytes(bytes(data))


def read_bag(path: pathlib.Path) -> dict[str, list]:
    """{topic: [(log time, message type, raw CDR)]} of every message, with rosbags."""
    topics = {}
    with Reader(path) as reader:
        for connection, log_time, raw in reader.messages():
            topics.setdefault(connection.topic, []).append((log_time, connection.msgtype,
                                                            bytes(raw)))
    return topics


# Bags for s4fusion-batch and what s4fusion-bag makes of them ----------------------------------

# Small images at a reduced inference size keep a pair at a few ms; smoothing 0.3 keeps the
# segment warm-up (derived from it) well inside a 30 s bag.
BATCH_PARAMS = {'s4fusion_node': {'ros__parameters': {
    'device': 'cpu', 'inference_size': [96, 72], 'sync': {'slop': 0.02},
    'normalization': {'smoothing': 0.3}}}}


# One level, no encoder or decoder blocks, one fusion block (its interleaved scan), on the
# Laplacian base: a real S4Fusion network, seeded and untrained, that fuses a pair in about a
# quarter of the compact network's time (most of what is left is decoding and writing).
TINY_NETWORK = {'dims': (4,), 'encoder_depths': (0,), 'decoder_depths': (0,), 'd_state': 1,
                'fusion_d_state': 1, 'fusion_blocks': 1, 'base': 'laplacian'}


@pytest.fixture(scope='module')
def params_file(tmp_path_factory):
    """BATCH_PARAMS with TINY_NETWORK's weights: for tests that compare what the tools write
    with the same parameters, whatever the network."""
    from s4fusion_ros.model.checkpoint import save_checkpoint
    from s4fusion_ros.model.s4fusion import S4Fusion, S4FusionConfig
    folder = tmp_path_factory.mktemp('params')
    with torch.random.fork_rng():
        torch.manual_seed(0)
        weights, _ = save_checkpoint(S4Fusion(S4FusionConfig(**TINY_NETWORK)),
                                     folder / 'tiny.safetensors')
    values = json.loads(json.dumps(BATCH_PARAMS))
    values['s4fusion_node']['ros__parameters']['model'] = {'weights': str(weights)}
    path = folder / 'params.yaml'
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope='module')
def compact_params_file(tmp_path_factory):
    """BATCH_PARAMS as they are (the shipped compact network, about 20 ms a pair here): for
    tests whose stop signal or kill must land while a unit still fuses."""
    path = tmp_path_factory.mktemp('params') / 'params.yaml'
    path.write_text(yaml.safe_dump(BATCH_PARAMS))
    return path


def drifting(events, seed=5):
    """The thermal frames with a per-frame offset on a random walk, as a drifting core has.

    The percentile range then changes every frame, so a segment's pixels depend on the range
    smoothed over the frames before it.
    """
    rng, offset, out = random.Random(seed), 0, []
    for event in events:
        if event[1] == THERMAL_TOPIC:
            offset = max(-2000, min(2000, offset + rng.randint(-150, 150)))
            event = (*event[:4], (event[4].astype(np.int32) + offset).astype(np.uint16))
        out.append(event)
    return out


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread, as the tasks do.

    Torch's CPU kernels round differently with another thread count (a pixel level here and
    there), so equal bytes need equal threads, as the README says.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference(source: pathlib.Path, output: pathlib.Path, params: pathlib.Path) -> dict:
    """What s4fusion-bag writes for the bag (with the tasks' thread count), read back."""
    with one_torch_thread():
        assert bag_tool.main([str(source), str(output), '--params', str(params)]) == 0
    return read_bag(output)


# Malformed image messages ---------------------------------------------------------------------

_FIELDS = st.one_of(st.integers(-3, 12), st.sampled_from([0, 1 << 16, 1 << 40]), st.none(),
                    st.floats(allow_nan=True), st.text(max_size=3))


def zstd_transport_data(img: RawImage, codec: str = 'zstd') -> bytes:
    """A CompressedImage's data as image_transport's zstd plugin publishes `img` (format 'zstd'):
    its 17-byte little-endian header and the encoding, then the rows as the gzip stream of its
    releases so far (`codec` 'gzip') or the zstd frame of its newest sources ('zstd')."""
    rows = bytes(img.data)
    if codec == 'zstd':
        try:
            from compression import zstd  # Python 3.14
        except ImportError:
            from backports import zstd
        payload = zstd.compress(rows, options={zstd.CompressionParameter.checksum_flag: 1})
    else:
        packer = zlib.compressobj(3, zlib.DEFLATED, 31)
        payload = packer.compress(rows) + packer.flush()
    encoding = img.encoding.encode()
    return struct.pack('<IIBII', img.height, img.width, img.is_bigendian, img.step,
                       len(encoding)) + encoding + payload


@st.composite
def raw_images(draw):
    """Plausible small images, most with one random fault (a field, the size or the data)."""
    fault = draw(st.sampled_from(['none', 'encoding', 'field', 'field', 'size', 'container']))
    encoding = draw(st.sampled_from(sorted(FORMATS)))
    fmt = FORMATS[encoding]
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    step = width * fmt.channels * np.dtype(fmt.dtype).itemsize + draw(st.integers(0, 3))
    fields = dict(height=height, width=width, encoding=encoding, step=step,
                  is_bigendian=draw(st.integers(0, 1)))
    data = draw(st.binary(min_size=height * step, max_size=height * step))
    if fault == 'encoding':
        fields['encoding'] = draw(st.one_of(st.text(max_size=6), st.none(), st.integers()))
    elif fault == 'field':
        fields[draw(st.sampled_from(['height', 'width', 'step', 'is_bigendian']))] = draw(
            _FIELDS)
    elif fault == 'size':
        data = draw(st.binary(max_size=2 * len(data) + 2))
    elif fault == 'container':
        data = draw(st.one_of(st.lists(st.integers(0, 255), max_size=8), st.integers(),
                              st.just(np.zeros((height, step), np.uint8)),
                              st.just(np.zeros(height * step // 2, np.uint16))))
    if draw(st.booleans()) and isinstance(data, bytes):
        data = np.frombuffer(data, np.uint8)
    return RawImage(data=data, **fields)


# Flooding the live node -----------------------------------------------------------------------

# The model at 160x120 fuses a few to a few tens of pairs a second here: slower than either phase.
FLOOD_PARAMS = {'device': 'cpu', 'inference_size': [160, 120]}


BACKLOG_S = 1.0  # latency growth within a phase; a queue that grows adds about 0.5 s per s


def check_counters(report: FloodReport) -> None:
    """Check that every frame the node took and every pair it made is accounted for."""
    assert report.returncode == 0, report.log()
    assert 'Traceback' not in report.log()
    assert report.settled, f'the node did not settle: {report.diagnostics}'
    number = report.number
    published = report.warm_up_pairs + sum(phase.published for phase in report.phases)
    for role in ROLES:
        parts = ('unpaired', 'late', 'overflow', 'rejected (bad stamp)', 'pending')
        assert number(per_input(role, 'received')) == number(Key.PAIRS) + sum(
            number(per_input(role, part)) for part in parts), report.diagnostics
        arrived = number(per_input(role, 'received')) + number(
            per_input(role, 'rejected (bad message)'))
        assert 0 < arrived <= published
    assert number(Key.PAIRS) == sum(number(key) for key in (
        Key.PAIRS_FUSED, Key.PAIRS_DROPPED, Key.INFERENCE_ERRORS, Key.PUBLISH_ERRORS,
        Key.PAIRS_QUEUED, Key.PAIRS_IN_INFERENCE)), report.diagnostics
    assert number(Key.PAIRS_DROPPED) > 0, 'the model kept up: not a flood'


def check_latency(report: FloodReport) -> None:
    """Check that the node fuses at the model's own rate, without a backlog."""
    for phase in report.phases:
        latencies = phase.latencies()
        assert latencies.size >= 6, f'{phase.rate} Hz: only {latencies.size} outputs'
        inference = float(phase.diagnostics[Key.INFERENCE_LATENCY_MEAN])
        # The worker never waits for work. The node's mean covers its last 200 inferences,
        # which may reach into the previous phase: hence the loose factor.
        assert 0.4 < phase.fused_rate() * inference < 2.5, (phase.fused_rate(), inference)
        # Late outputs are not later than early ones, and none waited for many inferences.
        third = latencies.size // 3
        growth = np.median(latencies[-third:]) - np.median(latencies[:third])
        assert growth < BACKLOG_S, f'{phase.rate} Hz: a backlog, latency grew {growth:.2f} s'
        median = np.median(latencies)
        assert median < 3 * inference + 0.5, \
            f'{phase.rate} Hz: a backlog, median latency {median:.2f} s'


# Memory that runs out -------------------------------------------------------------------------

# What a process holds of address space once torch, OpenCV and numba are loaded (VmPeak, bytes):
# 1.1 GiB here with the CPU build of torch; a CUDA build takes about 2.5 GiB more (a GPU robot).
LOADED_ADDRESS_SPACE = (
    'import re, cv2, numba, torch\n'
    'print(int(re.search(r"VmPeak:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) << 10)')


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Files this process writes may not grow past `limit` bytes while the block runs: a real
    write failure (EFBIG, as ENOSPC on a full disk; Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def address_space_limit(beyond_libraries: int):
    """A preexec_fn that ends a child's address space `beyond_libraries` bytes past what the
    libraries take once loaded: a large image's allocations fail in it as on a machine without
    the memory for them."""
    return functools.partial(_limit_address_space, _loaded_address_space() + beyond_libraries)


@functools.cache  # measured once per test run: it starts a Python that loads torch
def _loaded_address_space() -> int:
    return int(subprocess.run([sys.executable, '-c', LOADED_ADDRESS_SPACE], check=True,
                              capture_output=True, text=True, timeout=120).stdout)


def _limit_address_space(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# The MATLAB reference metrics on TNO ----------------------------------------------------------

REFERENCE_METRICS = ('EN', 'SD', 'SF', 'AG', 'MI', 'CC', 'SCD', 'VIF', 'Qabf', 'MSE', 'PSNR')


# 01/07: grey levels 0 and 255 (MI quirk) and the largest Qabf gap; 05, 08, 34: small or odd sizes
ALL_TNO = os.environ.get('S4FUSION_ALL_TNO') == '1'


TNO_IMAGES = ([f'{i:02d}.png' for i in range(1, 43)] if ALL_TNO
              else ['01.png', '05.png', '07.png', '08.png', '21.png', '34.png'])


def read_reference(ivif_dir, method):
    """Return {image: {metric: value}} for one method of the MATLAB reference CSV."""
    table = {}
    with open(ivif_dir / 'tno' / 'reference' / 'matlab_per_image_metrics.csv', newline='') as f:
        for row in csv.DictReader(f):
            if row['method'] == method:
                table.setdefault(row['image'], {})[row['metric']] = float(row['value'])
    return table


def read_gray(path):
    """Read an 8-bit image as (H, W) uint8 (the TNO PNGs are RGB with equal channels)."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert img is not None, f'cannot read {path}'
    return img


# Child processes ------------------------------------------------------------------------------

def exited(process: subprocess.Popen, timeout: float) -> bool:
    """Whether the child exits within `timeout` seconds: for an assertion that shows its output,
    where Popen.wait's TimeoutExpired says nothing of it."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def wait_while_running(process: subprocess.Popen, condition, timeout: float,
                       output=str) -> None:
    """Wait until condition() holds; fail, with output() as the message, if the child exits
    first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, output()
        time.sleep(0.05)


def exit_with_stderr_unread(process: subprocess.Popen, stop, ready) -> int:
    """The exit code of a child (stderr piped) run as under `|& tee log` whose tee a Ctrl-C
    ended: once `ready()` holds (asked until it does, 120 s at most), the reading end of its
    stderr is closed and `stop` (a signal, or None) sent. The child is killed however this ends.
    """
    try:
        wait_while_running(process, ready, 120)
        # Held stopped meanwhile, so that both reach it at once, as one Ctrl-C ends tee and the
        # tool: else a pause of this process between the two (0.2 s was enough) let the child
        # see its reader gone and end (141) before the signal came.
        process.send_signal(signal.SIGSTOP)
        process.stderr.close()
        if stop:
            process.send_signal(stop)
        process.send_signal(signal.SIGCONT)
        assert exited(process, 60)
    finally:
        process.kill()
        process.wait()
    return process.returncode


class StreamReader:
    """Reads a child's text stream on a thread, so that a test waits for what it writes with a
    deadline (a readline on the pipe waits for ever on a child that hangs before writing)."""

    def __init__(self, stream):
        self._chunks = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        while chunk := stream.read(1):
            self._chunks.append(chunk)

    def text(self) -> str:
        """Return what was read so far (all of it once the stream has closed)."""
        return ''.join(self._chunks)

    def wait_for(self, wanted, timeout: float) -> bool:
        """Whether `wanted` (a string, or a compiled pattern) appears in the stream within
        `timeout` seconds; False at once when the stream closes without it."""
        def found(text: str) -> bool:
            return bool(wanted.search(text)) if isinstance(wanted, re.Pattern) else wanted in text
        end = time.monotonic() + timeout
        while not found(self.text()):
            if time.monotonic() > end or not self._thread.is_alive():
                return found(self.text())
            time.sleep(0.05)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Wait until the stream has closed (the child exited)."""
        self._thread.join(timeout)


@contextlib.contextmanager
def reading(process: subprocess.Popen, stream, stop: int = signal.SIGINT):
    """A StreamReader of the child's `stream` for the block. However the block ends, the child
    is then stopped if it still runs, so that a failed check leaves none behind: `stop` (SIGINT,
    its clean stop as cli.interrupt sends it; or SIGKILL), SIGKILL 10 s later; and the reader
    waits for the stream to close, so that its whole text is there after the block."""
    said = StreamReader(stream)
    try:
        yield said
    finally:
        if process.poll() is None:
            process.send_signal(stop)
            if not exited(process, 10.0):
                process.kill()
                process.wait()
        said.close()


def stop_once_logged(process: subprocess.Popen, log: pathlib.Path, lines: int, start_s: float,
                     stop_s: float) -> str:
    """SIGTERM a training child (stderr piped) once its `log` has `lines` whole lines (a line
    still being written does not count); return its stderr once it has exited. The child is
    killed however this ends."""
    with reading(process, process.stderr, stop=signal.SIGKILL) as said:
        wait_while_running(process, lambda: log.exists() and log.read_text().count('\n') >= lines,
                           start_s, said.text)
        process.send_signal(signal.SIGTERM)
        assert exited(process, stop_s), said.text()
    return said.text()


# Permissions as a user has them -----------------------------------------------------------------

def as_a_user() -> list[str]:
    """A command prefix under which file permissions stop the command as they stop a user: none
    for a user; for root (CI) setpriv without the capabilities that override them, so that a file
    of mode 0 is unreadable to it too. Skips where root has no setpriv."""
    if os.geteuid() != 0:
        return []
    if not shutil.which('setpriv'):
        pytest.skip('root, and no setpriv to drop the override of file permissions')
    caps = '-dac_override,-dac_read_search'
    return ['setpriv', f'--inh-caps={caps}', f'--bounding-set={caps}']
