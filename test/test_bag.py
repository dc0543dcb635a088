"""s4fusion-bag on real bags: every pair fused, stamps kept, atomic output, clear errors."""

import argparse
import os
import pathlib
import re
import resource
import select
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import tracemalloc

import cv2
import lz4.frame
import numpy as np
import pytest
import yaml
from rosbags.interfaces import QosReliability
from rosbags.rosbag2 import (CompressionFormat, CompressionMode, Reader, StoragePlugin, Writer,
                             WriterError)
from rosbags.rosbag2.storage_mcap import zstd

from paths import executable
from s4fusion_ros import bagio, replay, settings
from s4fusion_ros.cli import READER_LEFT, TimeWindow
from s4fusion_ros.imaging.color import to_uint8
from s4fusion_ros.imaging.encodings import RawImage
from s4fusion_ros.messages import stamp_to_ns
from s4fusion_ros.tools import bag as bag_tool
from support import (CAMERA_INFO, COMPRESSED, IMAGE, SIZE, THERMAL_FRAME, THERMAL_TOPIC,
                     TYPESTORE, VISIBLE_FRAME, VISIBLE_INFO_TOPIC, VISIBLE_TOPIC,
                     address_space_limit, as_a_user, bag_image_message, camera_messages,
                     damage_chunk, exit_with_stderr_unread, mcap_chunks, most_frames, read_bag,
                     reading, visible_camera_info, write_bag, write_merged_visible_bag,
                     zstd_transport_data)

SLOP = 0.02
# Nested keys under the node-specific section, as a robot's parameter file would have them.
PARAMS = {'s4fusion_node': {'ros__parameters': {
    'device': 'cpu', 'inference_size': [96, 72], 'sync': {'slop': SLOP}}}}
BAG_TOOL = executable('s4fusion-bag')


def expected_pairs(events) -> dict[int, int]:
    """{visible stamp: thermal stamp}: each thermal frame with the nearest visible within slop."""
    thermal = [e[2] for e in events if e[1] == THERMAL_TOPIC]
    visible = [e[2] for e in events if e[1] == VISIBLE_TOPIC]
    pairs = {}
    for stamp in thermal:
        nearest = min(visible, key=lambda v: abs(v - stamp))
        if abs(nearest - stamp) <= SLOP * 1e9:
            pairs[nearest] = stamp
    return pairs


def decided_at(events, thermal_stamp: int) -> int:
    """Log time at which a thermal frame's pair is decided: when both it and the first visible
    frame stamped at or after it have arrived, and where that frame is beyond slop also a frame
    that bears it out: the second such visible frame or a thermal frame stamped as late, within
    slop (the bag's end if none is)."""
    arrived = next(e[0] for e in events if e[1] == THERMAL_TOPIC and e[2] == thermal_stamp)
    later = sorted((e[2], e[0]) for e in events if e[1] == VISIBLE_TOPIC
                   and e[2] >= thermal_stamp)  # (stamp, log time), in stamp order
    if not later:
        return max(arrived, events[-1][0])
    (first, logged), slop = later[0], SLOP * 1e9
    if first - thermal_stamp <= slop:
        return max(arrived, logged)
    witnesses = [log_time for _, log_time in later[1:2]] + [
        e[0] for e in events if e[1] == THERMAL_TOPIC and e[2] >= first - slop]
    return max(arrived, logged, min(witnesses, default=events[-1][0]))


@pytest.fixture(scope='module')
def params_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('params') / 'params.yaml'
    path.write_text(yaml.safe_dump(PARAMS))
    return path


@pytest.fixture(scope='module')
def short_events(ivif_dir):
    return camera_messages(ivif_dir, duration=0.6)


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_every_pair_fused_with_stamps_kept(storage, short_events, params_file, tmp_path,
                                           capsys):
    # sqlite3 input with a jpeg CompressedImage visible topic, MCAP input with raw images.
    compressed = storage == 'sqlite3'
    source = write_bag(tmp_path / 'in', short_events, storage, compressed_visible=compressed)
    output, png_dir = tmp_path / 'out', tmp_path / 'png'
    video = tmp_path / 'video' / 'fused.mp4'
    extra = [] if compressed else ['--include-inputs', '--export-png', str(png_dir),
                                   '--export-every', '3', '--export-video', str(video)]
    assert bag_tool.main([str(source), str(output), '--params', str(params_file)] + extra) == 0

    expected = expected_pairs(short_events)
    assert len(expected) >= 5
    messages = read_bag(output)  # readable by rosbags
    fused = messages.pop('/s4fusion_node/fused')
    saliency = messages.pop('/s4fusion_node/saliency')
    assert len(fused) == len(saliency) == len(expected), capsys.readouterr().err
    fused_images = {}
    for (log_time, msgtype, raw), encoding in [(m, 'bgr8') for m in fused] + [
            (m, 'mono8') for m in saliency]:
        message = TYPESTORE.deserialize_cdr(raw, msgtype)
        stamp = message.header.stamp.sec * 10**9 + message.header.stamp.nanosec
        # Logged when the node would have fused it, on the inputs' timeline.
        assert msgtype == IMAGE and stamp in expected
        assert log_time == decided_at(short_events, expected[stamp])
        assert message.header.frame_id == VISIBLE_FRAME
        assert (message.encoding, message.width, message.height) == (encoding, *SIZE)
        if encoding == 'bgr8':
            fused_images[stamp] = message.data.reshape(SIZE[1], SIZE[0], 3)
    assert sorted(stamp_to_ns(TYPESTORE.deserialize_cdr(raw, msgtype).header.stamp)
                  for _, msgtype, raw in fused) == sorted(expected)
    assert next(output.iterdir()).suffix == ('.db3' if storage == 'sqlite3' else '.mcap')
    if compressed:
        assert not messages
    else:  # the inputs, byte for byte at their recorded log times
        assert sorted(messages) == [VISIBLE_TOPIC, THERMAL_TOPIC]
        recorded = read_bag(source)
        assert messages == recorded
        assert len(list(png_dir.glob('*_fused.png'))) == len(range(0, len(expected), 3))
        for png in png_dir.glob('*_fused.png'):  # the fused image as published (bgr8)
            stamp = int(png.name.split('_')[1])
            assert np.array_equal(cv2.imread(str(png)), fused_images[stamp])
        assert len(list(png_dir.glob('*_saliency.png'))) == len(range(0, len(expected), 3))
        capture = cv2.VideoCapture(str(video))  # one frame per pair, four panels wide
        assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == len(expected)
        assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) \
            == (4 * SIZE[0], SIZE[1])
        capture.release()
        assert sorted(path.name for path in video.parent.iterdir()) == ['fused.mp4']
    assert f'fused {len(expected)} pairs' in capsys.readouterr().err
    if not compressed:  # an existing video, like an existing bag, needs --overwrite
        assert bag_tool.main([str(source), str(tmp_path / 'out2'), '--params',
                              str(params_file)] + extra) == 1
        assert f'{video} exists; pass --overwrite' in capsys.readouterr().err
        assert not (tmp_path / 'out2').exists()
        # A recording of the live system holds the node's bgr8 output beside the cameras:
        # not a second visible camera.
        again = tmp_path / 'again'
        assert bag_tool.main([str(output), str(again), '--params', str(params_file)]) == 0
        assert len(read_bag(again)['/s4fusion_node/fused']) == len(expected)


def test_a_thermal_frame_logged_after_its_partners_timeout_is_not_paired(short_events,
                                                                         params_file, tmp_path,
                                                                         capsys):
    # The last paired thermal frame logged 0.7 s after its visible partner, nothing between: live,
    # the node's timer expired the partner (sync.timeout 0.5 s) before the thermal frame came, so
    # the decisions due by a message's log time are taken before the message is added.
    partner, thermal = max(expected_pairs(short_events).items(), key=lambda pair: pair[1])
    logged = next(event[0] for event in short_events if event[2] == partner)
    events = [event for event in short_events if event[0] <= logged and event[2] != thermal]
    late = next((logged + 700_000_000, *event[1:]) for event in short_events
                if event[2] == thermal)
    events.append(late)
    source = write_bag(tmp_path / 'in', events, 'mcap')
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params',
                          str(params_file)]) == 0
    fused = read_bag(tmp_path / 'out')['/s4fusion_node/fused']
    expected = expected_pairs(events)
    assert sorted(stamp_to_ns(TYPESTORE.deserialize_cdr(raw, msgtype).header.stamp)
                  for _, msgtype, raw in fused) == sorted(
        visible for visible, paired in expected.items() if paired != thermal)
    assert 'unpaired: 1 thermal' in capsys.readouterr().err


def test_the_video_plays_at_the_thermal_camera_rate_whatever_else_the_bag_spans(
        short_events, params_file, tmp_path, capsys):
    # A 1 Hz status topic recorded from 10 s before the cameras to 10 s after: the video's rate
    # came from the whole bag's span: tens of times too slow.
    source = write_bag(tmp_path / 'cameras', short_events, 'mcap')
    string = 'std_msgs/msg/String'
    first, last = short_events[0][0] - 10 * 10**9, short_events[-1][0] + 10 * 10**9
    with Writer(tmp_path / 'in', version=9, storage_plugin=StoragePlugin.MCAP) as writer, \
            Reader(source) as reader:
        copies = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=TYPESTORE)
                  for c in reader.connections}
        status = writer.add_connection('/status', string, typestore=TYPESTORE)
        for log_time in range(first, last + 1, 10**9):
            writer.write(status, log_time, TYPESTORE.serialize_cdr(
                TYPESTORE.types[string](data='ok'), string))
        for connection, log_time, raw in reader.messages():
            writer.write(copies[connection.id], log_time, raw)
    video = tmp_path / 'fused.MP4'  # a suffix in capitals names the container too
    assert bag_tool.main([str(tmp_path / 'in'), str(tmp_path / 'out'), '--params',
                          str(params_file), '--export-video', str(video)]) == 0
    thermal = [log_time for log_time, topic, *_ in short_events if topic == THERMAL_TOPIC]
    fps = (len(thermal) - 1) / ((thermal[-1] - thermal[0]) / 1e9)
    pairs = len(expected_pairs(short_events))
    assert f'{video} ({pairs} frames at {fps:.1f} frames/s)' in capsys.readouterr().err
    capture = cv2.VideoCapture(str(video))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(fps, rel=0.01)
    capture.release()


def test_the_compressed_transports_carry_what_the_node_publishes_on_them(short_events,
                                                                         tmp_path):
    # The node's ~/fused/compressed and ~/saliency/compressed, here lossless PNG (the params
    # file's), so their pixels equal the raw images beside them; a float saliency map goes as
    # mono8.
    source = write_bag(tmp_path / 'in', short_events, 'mcap')
    params = tmp_path / 'params.yaml'
    values = {**PARAMS['s4fusion_node']['ros__parameters'],
              'fused': {'compressed': {'format': 'png'}},
              'saliency': {'encoding': '32FC1', 'compressed': {'format': 'png'}}}
    params.write_text(yaml.safe_dump({'s4fusion_node': {'ros__parameters': values}}))
    both, compressed = tmp_path / 'both', tmp_path / 'compressed'
    for output, transport in ((both, 'both'), (compressed, 'compressed')):
        assert bag_tool.main([str(source), str(output), '--params', str(params),
                              '--transport', transport]) == 0
    written = read_bag(both)
    assert read_bag(compressed) == {topic: messages for topic, messages in written.items()
                                    if topic.endswith('/compressed')}
    count = len(expected_pairs(short_events))
    for topic, decode in (('/s4fusion_node/fused', lambda raw: raw),
                          ('/s4fusion_node/saliency', lambda raw: to_uint8(raw))):
        raws, transports = written[topic], written[f'{topic}/compressed']
        assert len(raws) == len(transports) == count
        for (log_time, _, raw), (transport_time, msgtype, data) in zip(raws, transports):
            image = TYPESTORE.deserialize_cdr(raw, IMAGE)
            message = TYPESTORE.deserialize_cdr(data, msgtype)
            assert msgtype == COMPRESSED and transport_time == log_time
            assert message.header == image.header
            assert message.format == ('bgr8; png compressed bgr8' if image.encoding == 'bgr8'
                                      else 'mono8; png compressed ')
            dtype = np.float32 if image.encoding == '32FC1' else np.uint8
            pixels = np.frombuffer(image.data, dtype).reshape(image.height, image.width, -1)
            np.testing.assert_array_equal(
                cv2.imdecode(message.data, cv2.IMREAD_UNCHANGED).reshape(pixels.shape),
                decode(pixels))


def test_topics_detected_by_encoding_and_name(short_events, tmp_path):
    # A mono8 thermal core on a thermal-named topic, an RGB camera with its /compressed twin, and
    # a mono8 camera that is not thermal.
    path = tmp_path / 'cams'
    stamp = short_events[0][2]
    thermal8 = cv2.convertScaleAbs(short_events[0][4], alpha=1 / 64)
    rgb = next(e[4] for e in short_events if e[3] == 'bgr8')
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        for topic, msgtype, message in (
                ('/lwir/image', IMAGE, bag_image_message(thermal8, 'mono8', stamp, 'lwir')),
                ('/front/image', IMAGE, bag_image_message(rgb, 'rgb8', stamp, 'front')),
                ('/front/image/compressed', COMPRESSED,
                 bag_image_message(rgb, 'rgb8', stamp, 'front', compressed=True)),
                ('/nav/mono', IMAGE, bag_image_message(thermal8, 'mono8', stamp, 'nav'))):
            connection = writer.add_connection(topic, msgtype, typestore=TYPESTORE)
            writer.write(connection, stamp, TYPESTORE.serialize_cdr(message, msgtype))
    with bagio.open_bag(path) as reader:
        topics = bagio.image_topics(reader, path)
    roles = {t.topic: (t.encoding, t.role) for t in topics}
    assert roles == {'/lwir/image': ('mono8', 'thermal'), '/front/image': ('rgb8', 'visible'),
                     '/front/image/compressed': ('rgb8', 'visible'), '/nav/mono': ('mono8', '')}
    thermal, visible = bagio.pick_topics(topics, path)
    assert (thermal.topic, visible.topic) == ('/lwir/image', '/front/image')
    thermal, visible = bagio.pick_topics(topics, path, visible='/front/image/compressed')
    assert (thermal.topic, visible.topic) == ('/lwir/image', '/front/image/compressed')
    # Parameters that subscribe the node to the compressed transport take the /compressed twin,
    # as the live node would have (replay pairs what live paired).
    values = {**settings.defaults(), 'visible.transport': 'compressed'}
    thermal, visible = bagio.pick_topics(topics, path, values=values)
    assert (thermal.topic, visible.topic) == ('/lwir/image', '/front/image/compressed')
    # ... also where its format names no source encoding, so that it looks like no camera.
    roleless = [bagio.ImageTopic(t.topic, t.msgtype, t.count, '', '') if t.compressed else t
                for t in topics]
    assert bagio.pick_topics(roleless, path, values=values)[1].topic == '/front/image/compressed'
    # A compressed topic of another camera is not a twin: two cameras, whatever the transport.
    rear = bagio.ImageTopic('/rear/image/compressed', COMPRESSED, 1, 'rgb8', 'visible')
    for chosen in (values, None):
        with pytest.raises(bagio.BagError, match='several topics could be the visible camera'):
            bagio.pick_topics([t for t in topics if not t.compressed] + [rear], path,
                              values=chosen)
    with pytest.raises(bagio.BagError, match='no topic looks like the thermal camera'):
        bagio.pick_topics([t for t in topics if t.topic != '/lwir/image'], path)
    # A 16-bit thermal core recorded raw and through image_transport's compressed_depth plugin:
    # one camera, taken in the transport of the parameters.
    depth_twin = bagio.ImageTopic('/lwir/image/compressedDepth', COMPRESSED, 1, '16UC1',
                                  'thermal')
    twins = [*topics, depth_twin]
    assert bagio.pick_topics(twins, path)[0].topic == '/lwir/image'
    values = {**settings.defaults(), 'thermal.transport': 'compressedDepth'}
    assert bagio.pick_topics(twins, path, values=values)[0] == depth_twin


def test_a_false_colour_view_of_the_thermal_camera_is_no_visible_camera(short_events, tmp_path):
    # A thermal driver's colour-mapped bgr8 view beside its counts: named like a thermal
    # camera, it is not the visible one (else two cameras, and the user had to name it).
    path = tmp_path / 'in'
    thermal = next(e for e in short_events if e[1] == THERMAL_TOPIC)
    rgb = next(e for e in short_events if e[1] == VISIBLE_TOPIC)
    false_colour = cv2.applyColorMap(cv2.convertScaleAbs(thermal[4], alpha=1 / 128),
                                     cv2.COLORMAP_INFERNO)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        for topic, (_, _, stamp, encoding, image) in (
                (THERMAL_TOPIC, thermal), ('/flir/image_color', (*thermal[:3], 'bgr8',
                                                                 false_colour)),
                (VISIBLE_TOPIC, rgb)):
            connection = writer.add_connection(topic, IMAGE, typestore=TYPESTORE)
            writer.write(connection, stamp, TYPESTORE.serialize_cdr(
                bag_image_message(image, encoding, stamp, 'camera'), IMAGE))
    with bagio.open_bag(path) as reader:
        topics = bagio.image_topics(reader, path)
    assert {t.topic: t.role for t in topics}['/flir/image_color'] == ''
    assert [t.topic for t in bagio.pick_topics(topics, path)] == [THERMAL_TOPIC, VISIBLE_TOPIC]
    # One topic named as both cameras is refused, not fused with itself.
    with pytest.raises(bagio.BagError, match=f"'{VISIBLE_TOPIC}' cannot be both thermal and "
                       'visible'):
        bagio.pick_topics(topics, path, thermal=VISIBLE_TOPIC, visible=VISIBLE_TOPIC)


def test_a_bag_without_image_topics_says_to_name_the_camera(tmp_path, capsys):
    # Images on a topic whose type is not an image one (a custom wrapper) are not found: the
    # user is told how to name the topic.
    source = tmp_path / 'in'
    string = 'std_msgs/msg/String'
    with Writer(source, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connection = writer.add_connection('/notes', string, typestore=TYPESTORE)
        note = TYPESTORE.types[string](data='x')
        writer.write(connection, 1, TYPESTORE.serialize_cdr(note, string))
    assert bag_tool.main([str(source), str(tmp_path / 'out')]) == 1
    error = capsys.readouterr().err
    assert ('no topic looks like the thermal camera; image topics in the bag: none. Name it '
            'with --thermal-topic') in error, error


def test_a_depth_camera_is_not_taken_for_the_thermal_one(tmp_path):
    # An RGB-D robot's bag: depth images are 16UC1 (mm) or 32FC1 (m) like thermal ones, and
    # were fused with the colour camera as if thermal (found by a review).
    depth = [('/camera/camera/depth/image_rect_raw', IMAGE, '16UC1'),
             ('/camera/camera/aligned_depth_to_color/image_raw', IMAGE, '16UC1'),
             ('/zed/zed_node/depth/depth_registered', IMAGE, '32FC1'),
             ('/camera/depth/image_raw/compressedDepth', COMPRESSED, '16UC1'),
             ('/stereo/disparity', IMAGE, '32FC1')]
    assert [bagio.guess_role(topic, encoding) for topic, _, encoding in depth] == [''] * 5
    topics = [bagio.ImageTopic(topic, msgtype, 1, encoding, bagio.guess_role(topic, encoding))
              for topic, msgtype, encoding in [
                  *depth, ('/camera/camera/color/image_raw', IMAGE, 'rgb8'),
                  ('/boson/image_raw', IMAGE, 'mono8')]]  # a FLIR Boson's 8-bit AGC output
    thermal, visible = bagio.pick_topics(topics, tmp_path)
    assert (thermal.topic, visible.topic) == ('/boson/image_raw', '/camera/camera/color/image_raw')
    # A 16-bit thermal core's compressedDepth transport is still thermal, and so is a topic
    # named both ways, or with 'depth' only inside a word.
    for topic, encoding in (('/lwir/image/compressedDepth', '16UC1'),
                            ('/lwir/image_aligned_to_depth', '16UC1'),
                            ('/thermal/registered_to_depth/image', 'mono8'),
                            ('/depthai/thermal/image_raw', '16UC1'),
                            ('/depthai/image_raw', '16UC1')):
        assert bagio.guess_role(topic, encoding) == 'thermal', topic


@pytest.mark.parametrize('camera', [
    # OpenNI / Orbbec drivers and the Azure Kinect's: near-infrared mono16 on a topic named 'ir',
    # which was fused with the colour camera as if thermal where it was the only 16-bit one.
    ('/camera/ir/image', '/camera/depth/image_raw', '/camera/rgb/image_color'),
    ('/ir/image_raw', '/depth_to_rgb/image_raw', '/rgb/image_raw'),
])
def test_a_depth_camera_near_infrared_image_is_not_taken_for_the_thermal_one(
        camera, short_events, tmp_path):
    infrared, depth, colour = camera
    stamp = short_events[0][2]
    gray16 = short_events[0][4]
    rgb = next(e[4] for e in short_events if e[3] == 'bgr8')

    def write(path, thermal_topic=None):
        images = [(infrared, 'mono16', gray16), (depth, '16UC1', gray16), (colour, 'rgb8', rgb)]
        images += [(thermal_topic, 'mono16', gray16)] if thermal_topic else []
        with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
            for topic, encoding, image in images:
                connection = writer.add_connection(topic, IMAGE, typestore=TYPESTORE)
                writer.write(connection, stamp, TYPESTORE.serialize_cdr(
                    bag_image_message(image, encoding, stamp, 'camera'), IMAGE))
        with bagio.open_bag(path) as reader:
            return bagio.image_topics(reader, path)

    path = tmp_path / 'rgbd'
    topics = write(path)
    with pytest.raises(bagio.BagError, match=f"no topic looks like the thermal camera; .*"
                       f"{infrared} .*a depth camera's near-infrared"):
        bagio.pick_topics(topics, path)
    # Named, it is taken; beside a thermal camera, that one is taken without a name.
    assert bagio.pick_topics(topics, path, thermal=infrared)[0].topic == infrared
    path = tmp_path / 'rgbd_thermal'
    thermal, visible = bagio.pick_topics(write(path, '/boson/image_raw'), path)
    assert (thermal.topic, visible.topic) == ('/boson/image_raw', colour)
    # A thermal camera named 'ir' beside another camera's depth, or beside a namespace that is
    # not a depth camera's, is still thermal.
    for infrared, depth in (('/ir/image_raw', '/camera/depth/image_raw'),
                            ('/lwir/ir/image', '/lwir/depth/image'),
                            ('/ir_camera/image_raw', '/depth_camera/image_raw'),
                            ('/sensors/ir/image', '/sensors/lidar_depth/image')):
        assert not bagio.depth_camera_infrared(infrared, [depth]), infrared
    assert bagio.depth_camera_infrared('/camera/left_ir/image_raw', ['/camera/depth/points'])


def test_the_outputs_of_a_renamed_fusion_node_are_no_camera():
    # The launch file's node_name: /robot1/fusion_left/fused looked like the visible camera.
    for topic in ('/robot1/fusion_left/fused', '/s4fusion_node/saliency',
                  '/fusion_right/fused/compressed'):
        assert bagio.guess_role(topic, 'bgr8') == '', topic


def assert_fused_as_raw(raw: pathlib.Path, other: pathlib.Path, params_file: pathlib.Path,
                        short_events) -> None:
    """Fuse both bags with s4fusion-bag (beside them, as NAME_out): the bag of other transports
    gives every pair of the raw one, with the same pixels."""
    for source in (raw, other):
        assert bag_tool.main([str(source), str(source.parent / f'{source.name}_out'),
                              '--params', str(params_file)]) == 0
    fused = [read_bag(source.parent / f'{source.name}_out')['/s4fusion_node/fused']
             for source in (raw, other)]
    assert fused[0] == fused[1] and len(fused[0]) == len(expected_pairs(short_events))


def test_a_compressed_depth_thermal_topic_is_fused_as_the_node_decodes_it(
        short_events, params_file, tmp_path):
    # The same bag with its 16-bit thermal frames as image_transport's compressed_depth plugin
    # sends them (12-byte header, PNG): the same pairs and pixels.
    raw = write_bag(tmp_path / 'raw', short_events, 'mcap')
    with Writer(tmp_path / 'depth', version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        thermal = writer.add_connection(THERMAL_TOPIC + '/compressedDepth', COMPRESSED,
                                        typestore=TYPESTORE)
        visible = writer.add_connection(VISIBLE_TOPIC, IMAGE, typestore=TYPESTORE)
        for log_time, topic, stamp, encoding, image in short_events:
            if topic == THERMAL_TOPIC:
                message = bag_image_message(image, encoding, stamp, THERMAL_FRAME)
                message = TYPESTORE.types[COMPRESSED](
                    header=message.header, format='16UC1; compressedDepth png',
                    data=np.frombuffer(struct.pack('<iff', 0, 0.0, 0.0)
                                       + cv2.imencode('.png', image)[1].tobytes(), np.uint8))
                writer.write(thermal, log_time, TYPESTORE.serialize_cdr(message, COMPRESSED))
            else:
                writer.write(visible, log_time, TYPESTORE.serialize_cdr(
                    bag_image_message(image, encoding, stamp, VISIBLE_FRAME), IMAGE))
    assert_fused_as_raw(raw, tmp_path / 'depth', params_file, short_events)


@pytest.mark.parametrize('codec', ['gzip', 'zstd'])
def test_a_zstd_transport_topic_is_fused_as_the_node_decodes_it(
        codec, short_events, params_file, tmp_path):
    # Both cameras through image_transport's zstd plugin (format 'zstd': a header, the raw
    # image compressed), found by the encoding in that header: the same pairs and pixels.
    raw = write_bag(tmp_path / 'raw', short_events, 'mcap')
    with Writer(tmp_path / 'zstd', version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {topic: writer.add_connection(topic + '/zstd', COMPRESSED,
                                                    typestore=TYPESTORE)
                       for topic in (THERMAL_TOPIC, VISIBLE_TOPIC)}
        for log_time, topic, stamp, encoding, image in short_events:
            frame = THERMAL_FRAME if topic == THERMAL_TOPIC else VISIBLE_FRAME
            message = bag_image_message(image, encoding, stamp, frame)
            data = zstd_transport_data(RawImage(message.height, message.width, message.encoding,
                                                message.step, message.is_bigendian,
                                                message.data), codec)
            writer.write(connections[topic], log_time, TYPESTORE.serialize_cdr(
                TYPESTORE.types[COMPRESSED](header=message.header, format='zstd',
                                            data=np.frombuffer(data, np.uint8)), COMPRESSED))
    with bagio.open_bag(tmp_path / 'zstd') as reader:
        topics = bagio.image_topics(reader, tmp_path / 'zstd')
    thermal, visible = bagio.pick_topics(topics, tmp_path / 'zstd')
    assert (thermal.topic, thermal.transport) == (THERMAL_TOPIC + '/zstd', 'zstd')
    assert visible.topic == VISIBLE_TOPIC + '/zstd'
    assert_fused_as_raw(raw, tmp_path / 'zstd', params_file, short_events)


def test_cameras_in_a_bare_compressed_format_are_found_by_their_decoded_data(
        short_events, params_file, tmp_path):
    # A format naming no encoding, as MJPEG camera drivers (usb_cam, gscam) and ROS 1 bags
    # converted publish it ('jpeg', 'png'): colour data is the visible camera, a 16-bit PNG on a
    # thermal topic the thermal one, as a named encoding would tell, without naming either.
    source = tmp_path / 'bare'
    with Writer(source, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {topic: writer.add_connection(f'{topic}/compressed', COMPRESSED,
                                                    typestore=TYPESTORE)
                       for topic in (THERMAL_TOPIC, VISIBLE_TOPIC)}
        for log_time, topic, stamp, _, image in short_events:
            thermal = topic == THERMAL_TOPIC
            message = bag_image_message(image, 'mono16' if thermal else 'bgr8', stamp,
                                        THERMAL_FRAME if thermal else VISIBLE_FRAME)
            data = cv2.imencode('.png' if thermal else '.jpg', image)[1].ravel()
            writer.write(connections[topic], log_time, TYPESTORE.serialize_cdr(
                TYPESTORE.types[COMPRESSED](header=message.header,
                                            format='png' if thermal else 'jpeg', data=data),
                COMPRESSED))
    with bagio.open_bag(source) as reader:
        thermal, visible = bagio.pick_topics(bagio.image_topics(reader, source), source)
    assert (thermal.topic, visible.topic) == (f'{THERMAL_TOPIC}/compressed',
                                              f'{VISIBLE_TOPIC}/compressed')
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params',
                          str(params_file)]) == 0
    assert len(read_bag(tmp_path / 'out')['/s4fusion_node/fused']) >= 4


def test_corrupt_messages_on_another_image_topic_do_not_stop_the_run(
        short_events, tmp_path, capsys):
    # A depth camera whose first two messages are cut short: described by its third, and not
    # read again once the inputs are chosen.
    path = write_bag(tmp_path / 'in', short_events, 'mcap')
    depth = bag_image_message(short_events[0][4], '16UC1', short_events[0][2], 'depth')
    raw = bytes(TYPESTORE.serialize_cdr(depth, IMAGE))
    with Writer(tmp_path / 'with_depth', version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connection = writer.add_connection('/depth/image_raw', IMAGE, typestore=TYPESTORE)
        for i in range(3):
            writer.write(connection, short_events[0][0] + i, raw[:40] if i < 2 else raw)
        for topic, messages in read_bag(path).items():
            connection = writer.add_connection(topic, IMAGE, typestore=TYPESTORE)
            for log_time, _, data in messages:
                writer.write(connection, log_time, data)
    source = tmp_path / 'with_depth'
    with bagio.open_bag(source) as reader:
        described = {t.topic: t.encoding for t in bagio.image_topics(reader, source)}
    assert described['/depth/image_raw'] == '16UC1'
    output = tmp_path / 'out'
    assert bag_tool.main([str(source), str(output), '--thermal-topic', THERMAL_TOPIC,
                          '--visible-topic', VISIBLE_TOPIC]) == 0, capsys.readouterr().err
    assert len(read_bag(output)['/s4fusion_node/fused']) == len(expected_pairs(short_events))


@pytest.mark.parametrize('fault', ['cut short', 'all NaN'])
def test_an_input_message_cut_short_or_unusable_is_skipped_and_counted(fault, short_events,
                                                                       params_file, tmp_path,
                                                                       capsys):
    # Live, the middleware drops a message whose bytes are not its type, and the node one it
    # cannot use (a float frame of NaN only); one such thermal message stopped the whole offline
    # run, losing every other pair.
    cut = [i for i, event in enumerate(short_events) if event[1] == THERMAL_TOPIC][2]
    events, cut_short = short_events, {short_events[cut][0]}
    if fault == 'all NaN':
        log_time, topic, stamp, _, image = short_events[cut]
        nan = (log_time, topic, stamp, '32FC1', np.full(image.shape, np.nan, np.float32))
        events, cut_short = short_events[:cut] + [nan] + short_events[cut + 1:], ()
    source = write_bag(tmp_path / 'in', events, 'mcap', cut_short=cut_short)
    output = tmp_path / 'out'
    assert bag_tool.main([str(source), str(output), '--params', str(params_file)]) == 0
    error = capsys.readouterr().err
    expected = expected_pairs(short_events[:cut] + short_events[cut + 1:])
    assert len(read_bag(output)['/s4fusion_node/fused']) == len(expected) >= 5
    assert f'{THERMAL_TOPIC}: skipping undecodable messages (first: ' in error
    assert 'dropped: 1 (1 undecodable)' in error


def test_frames_sent_again_are_counted_late_from_both_cameras(short_events, params_file,
                                                              tmp_path, capsys):
    # A driver that sends a frame twice (one of each camera here), the copy logged at the end of
    # the bag: each is late, and the summary counts both cameras' late frames.
    end = short_events[-1][0]
    again = [next(event for event in reversed(short_events[:-2]) if event[1] == topic)
             for topic in (THERMAL_TOPIC, VISIBLE_TOPIC)]
    events = short_events + [(end + 10**6 * (i + 1), *event[1:]) for i, event in enumerate(again)]
    source = write_bag(tmp_path / 'in', events, 'mcap')
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params',
                          str(params_file)]) == 0
    error = capsys.readouterr().err
    assert 'dropped: 2 (2 late)' in error, error


def test_the_summary_says_why_messages_were_dropped(short_events, params_file, tmp_path, capsys):
    # A thermal driver that leaves the stamps unset: nothing pairs, and the summary says why.
    unstamped = [(log_time, topic, 0 if topic == THERMAL_TOPIC else stamp, *rest)
                 for log_time, topic, stamp, *rest in short_events]
    # A run that fuses nothing fails, for a script too, and writes no bag.
    source = write_bag(tmp_path / 'in', unstamped, 'mcap')
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params',
                          str(params_file)]) == 1
    error = capsys.readouterr().err
    thermal = sum(1 for event in short_events if event[1] == THERMAL_TOPIC)
    assert f'dropped: {thermal} ({thermal} unstamped)' in error
    assert f'warning: {thermal} thermal messages stamped 0 or less were dropped' in error
    assert (f'no pair was fused (the counts above say why); {tmp_path / "out"} was not written'
            in error)
    assert not (tmp_path / 'out').exists()
    assert [path.name for path in tmp_path.iterdir()] == ['in']  # no staging left either


def test_the_output_topics_offer_the_qos_of_the_parameters(short_events, tmp_path):
    params = tmp_path / 'params.yaml'
    params.write_text(yaml.safe_dump({'/**': {'ros__parameters': {
        'device': 'cpu', 'inference_size': [96, 72],
        'qos': {'output': {'reliability': 'best_effort', 'depth': 10}}}}}))
    source = write_bag(tmp_path / 'in', short_events[:20], 'sqlite3')
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params', str(params)]) == 0
    with bagio.open_bag(tmp_path / 'out') as reader:
        offered = {c.topic: c.ext.offered_qos_profiles for c in reader.connections}
    assert sorted(offered) == ['/s4fusion_node/fused', '/s4fusion_node/saliency']
    for (qos,) in offered.values():
        assert (qos.reliability, qos.depth) == (QosReliability.BEST_EFFORT, 10)


def test_a_publisher_qos_override_is_refused_not_ignored(short_events, tmp_path, capsys):
    # The node would offer that output best effort; the bag would have recorded it reliable.
    params = tmp_path / 'params.yaml'
    overrides = {'/s4fusion_node/fused': {'publisher': {'reliability': 'best_effort'}},
                 '/thermal/image_raw': {'subscription': {'depth': 3}},
                 '/diagnostics': {'publisher': {'depth': 3}}}  # not the node's: it ignores it
    params.write_text(yaml.safe_dump({'/**': {'ros__parameters': {
        'device': 'cpu', 'qos_overrides': overrides}}}))
    source = write_bag(tmp_path / 'in', short_events[:20], 'mcap')
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params', str(params)]) == 1
    error = capsys.readouterr().err
    assert ('the offline tools write the outputs with the QoS of qos.output.*; set those instead '
            'of qos_overrides./s4fusion_node/fused.publisher.reliability') in error
    assert 'subscription' not in error and 'diagnostics' not in error
    assert not (tmp_path / 'out').exists()


def test_included_inputs_keep_every_connection_of_a_topic(short_events, params_file, tmp_path):
    # The thermal topic recorded through two connections of other QoS (two publishers, or bags
    # merged): the copy kept only the last connection's QoS for both.
    offered = [bagio.output_qos('reliable', 5), bagio.output_qos('best_effort', 1)]
    source = tmp_path / 'in'
    with Writer(source, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        thermal = [writer.add_connection(THERMAL_TOPIC, IMAGE, typestore=TYPESTORE,
                                         offered_qos_profiles=[qos]) for qos in offered]
        visible = writer.add_connection(VISIBLE_TOPIC, IMAGE, typestore=TYPESTORE)
        thermal_count = 0
        for log_time, topic, stamp, encoding, image in short_events[:20]:
            is_thermal = topic == THERMAL_TOPIC
            message = bag_image_message(image, encoding, stamp,
                                        THERMAL_FRAME if is_thermal else VISIBLE_FRAME)
            connection = thermal[thermal_count % 2] if is_thermal else visible
            thermal_count += is_thermal
            writer.write(connection, log_time, TYPESTORE.serialize_cdr(message, IMAGE))
    assert thermal_count >= 4
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params', str(params_file),
                          '--include-inputs']) == 0

    def connections(bag):
        with bagio.open_bag(bag) as reader:
            return sorted((c.topic, c.msgcount, c.ext.offered_qos_profiles[0].reliability)
                          for c in reader.connections if c.topic == THERMAL_TOPIC)
    assert connections(tmp_path / 'out') == connections(source)
    assert {c[2] for c in connections(source)} == {QosReliability.RELIABLE,
                                                   QosReliability.BEST_EFFORT}
    copied = read_bag(tmp_path / 'out')
    assert all(copied[topic] == messages for topic, messages in read_bag(source).items())


def test_a_topic_of_an_older_bag_is_copied_with_its_type_hash(short_events, tmp_path):
    # rosbag2 before Iron (format version 8) recorded an MCAP topic's definition but no type
    # hash: a copy takes the hash from the type store, not an empty one.
    source = write_bag(tmp_path / 'in', short_events[:4], 'mcap')
    metadata = yaml.safe_load((source / 'metadata.yaml').read_text())
    information = metadata['rosbag2_bagfile_information']
    information['version'] = 5
    for topic in information['topics_with_message_count']:
        del topic['topic_metadata']['type_description_hash']
    (source / 'metadata.yaml').write_text(yaml.safe_dump(metadata))
    with Reader(source) as reader:
        [thermal] = [c for c in reader.connections if c.topic == THERMAL_TOPIC]
        assert thermal.msgdef.data and not thermal.digest
        with bagio.create_bag(tmp_path / 'out') as writer:
            bagio.copy_topic(writer, thermal)
    with Reader(tmp_path / 'out') as reader:
        [copied] = reader.connections
    assert copied.digest == TYPESTORE.hash_rihs01(IMAGE) and copied.msgdef.data


def test_the_visible_camera_info_goes_beside_the_outputs_as_the_node_publishes_it(
        short_events, params_file, tmp_path, capsys):
    # The info of a pair's stamp, or else the one stamped last before it (one frame in four has
    # none), stamped and framed as the pair, on the camera_info sibling of the fused topic; the
    # input info is an input topic --include-inputs copies.
    source = write_bag(tmp_path / 'in', short_events, 'mcap', visible_infos=most_frames)
    output = tmp_path / 'out'
    assert bag_tool.main([str(source), str(output), '--params', str(params_file),
                          '--include-inputs', '--fused-topic', '/fusion/fused']) == 0
    assert f'; {VISIBLE_INFO_TOPIC} -> /fusion/camera_info' in capsys.readouterr().err
    messages, recorded = read_bag(output), read_bag(source)
    assert messages[VISIBLE_INFO_TOPIC] == recorded[VISIBLE_INFO_TOPIC]
    sent = {stamp_to_ns(info.header.stamp): info.k[0] for info in (
        TYPESTORE.deserialize_cdr(raw, CAMERA_INFO) for _, _, raw in recorded[VISIBLE_INFO_TOPIC])}
    fused = messages['/fusion/fused']
    infos = messages['/fusion/camera_info']
    assert len(infos) == len(fused) >= 5
    fallbacks = 0
    for (log_time, _, fused_raw), (info_time, msgtype, raw) in zip(fused, infos):
        image = TYPESTORE.deserialize_cdr(fused_raw, IMAGE)
        info = TYPESTORE.deserialize_cdr(raw, msgtype)
        stamp = stamp_to_ns(info.header.stamp)
        assert msgtype == CAMERA_INFO and info_time == log_time
        assert stamp == stamp_to_ns(image.header.stamp)
        assert info.header.frame_id == image.header.frame_id == VISIBLE_FRAME
        if stamp in sent:
            assert info.k[0] == sent[stamp]
        else:  # the info stamped last before it
            fallbacks += 1
            assert info.k[0] == sent[max(t for t in sent if t < stamp)]
    assert fallbacks, 'no pair without its own info'
    # Beside a compressed visible topic's base topic, as image_transport has it.
    compressed = write_bag(tmp_path / 'jpeg', short_events, 'mcap', compressed_visible=True,
                           visible_infos=most_frames)
    assert bag_tool.main([str(compressed), str(tmp_path / 'jpeg_out'), '--params',
                          str(params_file)]) == 0
    messages = read_bag(tmp_path / 'jpeg_out')
    assert len(messages['/s4fusion_node/camera_info']) == len(messages['/s4fusion_node/fused'])
    assert 'camera_info: it describes' not in capsys.readouterr().err
    # An info of another size than its images: written as it came, and said once.
    small = write_bag(tmp_path / 'small', [(*event[:4], event[4][::2, ::2]) if event[1] ==
                                           VISIBLE_TOPIC else event for event in short_events],
                      'mcap', visible_infos=most_frames)
    assert bag_tool.main([str(small), str(tmp_path / 'small_out'), '--params',
                          str(params_file)]) == 0
    assert capsys.readouterr().err.count(
        f'{small}: the visible camera_info: it describes {SIZE[0]}x{SIZE[1]} images, the '
        f'visible images are {SIZE[0] // 2}x{SIZE[1] // 2}; written beside the outputs as it '
        'came (said once)') == 1
    # Where --fused-topic would put its info on the copied input info: refused.
    assert bag_tool.main([str(source), str(tmp_path / 'out2'), '--include-inputs',
                          '--fused-topic', '/camera/color/fused']) == 1
    assert (f'--fused-topic /camera/color/fused puts its camera_info on {VISIBLE_INFO_TOPIC}, '
            'an input topic copied by --include-inputs' in capsys.readouterr().err)


def test_outputs_in_two_folders_each_get_the_camera_info_as_the_node_publishes_them(
        short_events, params_file, tmp_path, capsys):
    # The node publishes the info beside each output's folder (`-r ~/saliency:=maps/saliency`
    # gives maps/camera_info too); the bag wrote it beside the fused topic only, so a
    # CameraSubscriber on the saliency topic of a played output bag found none.
    source = write_bag(tmp_path / 'in', short_events, 'mcap', visible_infos=most_frames)
    output = tmp_path / 'out'
    assert bag_tool.main([str(source), str(output), '--params', str(params_file),
                          '--fused-topic', '/detector/image_raw',
                          '--saliency-topic', '/maps/saliency']) == 0
    assert (f'; {VISIBLE_INFO_TOPIC} -> /detector/camera_info, /maps/camera_info'
            in capsys.readouterr().err)
    messages = read_bag(output)
    for image_topic, info_topic in (('/detector/image_raw', '/detector/camera_info'),
                                    ('/maps/saliency', '/maps/camera_info')):
        images, infos = messages[image_topic], messages[info_topic]
        assert len(infos) == len(images) >= 5
        for (log_time, _, image_raw), (info_time, msgtype, raw) in zip(images, infos):
            image = TYPESTORE.deserialize_cdr(image_raw, IMAGE)
            info = TYPESTORE.deserialize_cdr(raw, msgtype)
            assert msgtype == CAMERA_INFO and info_time == log_time
            assert info.header == image.header
            assert (info.width, info.height) == (image.width, image.height)
    # The saliency's info on a copied input topic is refused as the fused one's is.
    assert bag_tool.main([str(source), str(tmp_path / 'out2'), '--params', str(params_file),
                          '--include-inputs', '--saliency-topic', '/camera/color/saliency']) == 1
    assert (f'--saliency-topic /camera/color/saliency puts its camera_info on '
            f'{VISIBLE_INFO_TOPIC}, an input topic copied by --include-inputs'
            in capsys.readouterr().err)
    # Both outputs in that folder: the one info is the fused topic's, named by its option.
    assert bag_tool.main([str(source), str(tmp_path / 'out2'), '--params', str(params_file),
                          '--include-inputs', '--fused-topic', '/camera/color/fused',
                          '--saliency-topic', '/camera/color/saliency']) == 1
    assert (f'--fused-topic /camera/color/fused puts its camera_info on {VISIBLE_INFO_TOPIC}, '
            'an input topic copied by --include-inputs' in capsys.readouterr().err)


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_a_window_is_fused_as_a_bag_of_its_messages_alone(storage, short_events, params_file,
                                                          tmp_path, capsys):
    # What the bag logged from 0.15 s after its first message for 0.3 s, as s4fusion-play plays
    # it to the node: a pair straddling an edge is not made, and the messages outside are
    # neither read nor counted (as dropped, say); the summary says which messages it counts.
    first = short_events[0][0]
    inside = [event for event in short_events
              if first + 15 * 10**7 <= event[0] < first + 45 * 10**7]
    assert len(expected_pairs(inside)) >= 3
    source = write_bag(tmp_path / 'in', short_events, storage)
    alone = write_bag(tmp_path / 'alone', inside, storage)
    assert bag_tool.main([str(alone), str(tmp_path / 'alone_out'), '--params', str(params_file),
                          '--include-inputs']) == 0
    counted = re.search(r'(fused .* messages) in .*(; unpaired: .*); wrote',
                        capsys.readouterr().err)
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params', str(params_file),
                          '--include-inputs', '--start-offset', '0.15',
                          '--playback-duration', '0.3']) == 0
    assert read_bag(tmp_path / 'out') == read_bag(tmp_path / 'alone_out')
    error = capsys.readouterr().err
    span = (short_events[-1][0] - first) / 1e9
    window = f"logged from 0.15 s to 0.45 s of the bag's {span:g} s"
    assert f'; only the messages {window}\n' in error, error
    assert f'{counted[1]} {window} in ' in error and counted[2] in error, error


def test_the_calibration_recorded_before_a_window_is_in_effect_from_its_start(
        ivif_dir, params_file, tmp_path):
    # A driver that publishes its camera_info once, latched: a window two seconds later has the
    # visible camera's calibration beside every pair, as the whole bag has.
    events = camera_messages(ivif_dir, duration=2.5)
    once = next(stamp for _, topic, stamp, *_ in events if topic == VISIBLE_TOPIC)
    source = write_bag(tmp_path / 'in', events, 'mcap', visible_infos=lambda stamp: stamp == once)
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params', str(params_file),
                          '--start-offset', '2.1']) == 0
    messages = read_bag(tmp_path / 'out')
    fused = [TYPESTORE.deserialize_cdr(raw, IMAGE) for _, _, raw in
             messages['/s4fusion_node/fused']]
    infos = [TYPESTORE.deserialize_cdr(raw, CAMERA_INFO) for _, _, raw in
             messages.get('/s4fusion_node/camera_info', [])]
    assert len(infos) == len(fused) >= 2
    for info, image in zip(infos, fused):
        assert info.header.stamp == image.header.stamp
        assert info.k[0] == visible_camera_info(once).k[0]


def test_the_progress_bar_of_a_window_counts_the_thermal_frames_it_holds(
        short_events, params_file, tmp_path, capsys):
    # A thermal camera that started 0.3 s into the recording: the window from there holds all
    # its frames, about half the bag's span; a total of that share of them had the bar at 100 %
    # halfway through, and then without a total.
    first = short_events[0][0]
    late = [event for event in short_events
            if event[1] != THERMAL_TOPIC or event[0] >= first + 3 * 10**8]
    frames = sum(event[1] == THERMAL_TOPIC for event in late)
    source = write_bag(tmp_path / 'in', late, 'mcap')
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params', str(params_file),
                          '--start-offset', '0.3']) == 0
    error = capsys.readouterr().err
    assert re.findall(r'fusing: +\d+%\|[^|]*\| *\d+/(\d+)', error)[-1] == str(frames), error
    assert f'fused {frames} pairs' in error, error


def test_a_window_past_the_end_of_the_bag_or_of_negative_seconds_is_refused(
        short_events, tmp_path, capsys):
    source = write_bag(tmp_path / 'in', short_events[:20], 'mcap')
    span = (short_events[19][0] - short_events[0][0]) / 1e9
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--start-offset', '1']) == 1
    assert capsys.readouterr().err == (f'{bag_tool.PROG}: {source}: --start-offset 1 is past the '
                                       f'end of the bag: its messages span {span:g} s\n')
    assert not (tmp_path / 'out').exists()
    for option, value, expected in (('--start-offset', '-1', ">= 0, got '-1'"),
                                    ('--playback-duration', '0', "> 0, got '0'")):
        with pytest.raises(SystemExit) as exit_info:
            bag_tool.parse_args(['in', 'out', option, value])
        assert exit_info.value.code == 2
        assert (f'argument {option}: expected a number of seconds {expected}'
                in capsys.readouterr().err)


def one_second_bag(events, path: pathlib.Path) -> tuple[pathlib.Path, list[int]]:
    """A bag of the first 20 events, the last logged 1 s after the first; and its log times."""
    events = [*events[:19], (events[0][0] + 10**9, *events[19][1:])]
    return write_bag(path, events, 'mcap'), [event[0] for event in events]


def test_a_window_is_placed_to_the_first_and_last_message_of_the_bag(short_events, tmp_path):
    # A window from the last message reads it; one to it reads all but it (its stop is not
    # read); one past it is the whole bag, described to its end.
    source, times = one_second_bag(short_events, tmp_path / 'in')
    first, last = times[0], times[-1]
    with bagio.open_bag(source) as reader:
        def placed(start_offset, duration=None):
            return bagio.log_window(reader, source, TimeWindow(start_offset, duration))

        def read(window):
            return [log_time for _, log_time, _ in bagio.read_messages(
                reader, source, [THERMAL_TOPIC, VISIBLE_TOPIC], window.start, window.stop)]

        whole = placed(0)
        assert whole == bagio.LogWindow(first, None, first, last) and whole.whole
        assert whole.share() == 1 and read(whole) == times
        at_last = placed(1)
        assert at_last == bagio.LogWindow(last, None, first, last) and read(at_last) == [last]
        assert at_last.describe() == "from 1 s to 1 s of the bag's 1 s"
        to_last = placed(0, 1)
        assert not to_last.whole and read(to_last) == times[:-1]
        assert placed(0, 1.000000001).whole
        past = placed(0.5, 2)
        assert not past.whole and past.describe() == "from 0.5 s to 1 s of the bag's 1 s"
        with pytest.raises(bagio.BagError, match='--start-offset 1 is past the end'):
            placed(1.000000001)


def test_the_newest_message_before_a_time_is_searched_back_to_the_bags_start(
        short_events, tmp_path):
    # Within the bag's first second too; a topic the bag lacks has none (rosbags reads an
    # empty selection of connections as all of them).
    source, times = one_second_bag(short_events, tmp_path / 'in')
    thermal = max(event[0] for event in short_events[:19]
                  if event[1] == THERMAL_TOPIC and event[0] < times[0] + 2 * 10**8)
    with bagio.open_bag(source) as reader:
        assert [(connection.topic, log_time) for connection, log_time, _ in bagio.newest_before(
            reader, source, [THERMAL_TOPIC, '/absent'], times[0] + 2 * 10**8)] \
            == [(THERMAL_TOPIC, thermal)]
        assert bagio.newest_before(reader, source, ['/absent'], times[-1]) == []


def test_a_thermal_topic_recorded_with_a_second_type_fuses_its_images(short_events, tmp_path,
                                                                      capsys):
    # rosbags gives a topic of two types none: the images were "no image topic".
    plain = write_bag(tmp_path / 'plain', short_events, 'mcap')
    noted = write_bag(tmp_path / 'noted', short_events, 'mcap', thermal_notes=True)
    for source in (plain, noted):
        assert bag_tool.main([str(source), str(tmp_path / f'{source.name}_out'), '--thermal-topic',
                              THERMAL_TOPIC, '--visible-topic', VISIBLE_TOPIC,
                              '--include-inputs']) == 0
    thermal_count = sum(topic == THERMAL_TOPIC for _, topic, *_ in short_events)
    assert (f'{THERMAL_TOPIC} (Image, mono16, {thermal_count} msgs; {thermal_count} of other '
            'types skipped)') in capsys.readouterr().err
    assert read_bag(tmp_path / 'noted_out') == read_bag(tmp_path / 'plain_out')
    # The copied input keeps its images' type alone (not an empty second one).
    with Reader(tmp_path / 'noted_out') as reader:
        assert {c.msgtype for c in reader.connections if c.topic == THERMAL_TOPIC} == {IMAGE}


def test_a_camera_topic_recorded_as_both_image_types_is_named_with_them(short_events, tmp_path,
                                                                        capsys):
    # rosbags gives such a topic no type: it was left out, "no topic looks like the visible
    # camera", and named, "no image topic".
    source = write_merged_visible_bag(tmp_path / 'merged', short_events)
    several = (f'was recorded with several image types ({COMPRESSED}, {IMAGE}): it cannot be '
               'read as one topic')
    for named, said in (
            ([], f'{source}: no topic looks like the visible camera; {VISIBLE_TOPIC} {several}; '
             f'image topics in the bag: {VISIBLE_TOPIC} (CompressedImage and Image, '),
            (['--visible-topic', VISIBLE_TOPIC], f'{source}: {VISIBLE_TOPIC} (--visible-topic) '
             f'{several}\n')):
        assert bag_tool.main([str(source), str(tmp_path / 'out'), *named]) == 1
        error = capsys.readouterr().err
        assert said in error and 'Name it with' not in error, error
        assert not (tmp_path / 'out').exists()


def test_a_bag_whose_stamps_jump_back_says_so_as_the_node_does(ivif_dir, tmp_path, capsys):
    # The node logs the restart of pairing; s4fusion-bag said nothing of it.
    events = camera_messages(ivif_dir, duration=1.5)
    later = events[-1][0] + 10**8 - events[0][0]  # recorded again: the same stamps, later
    source = write_bag(tmp_path / 'in', events + [(event[0] + later, *event[1:])
                                                  for event in events], 'mcap')
    assert bag_tool.main([str(source), str(tmp_path / 'out')]) == 0
    error = capsys.readouterr().err
    assert error.count('the input stamps jumped back') == 1, error
    assert (f'{source}: the input stamps jumped back (a looping bag, a restarted camera or '
            'clock): pairing restarted on the new timeline (1 time(s) so far)') in error, error


def test_params_file_read_as_the_node_reads_it(short_events, tmp_path, capsys):
    path = tmp_path / 'params.yaml'
    path.write_text(yaml.safe_dump({
        '/**': {'ros__parameters': {'sync': {'slop': 0.1, 'timeout': 0.3}, 'use_sim_time': True}},
        '/robot/s4fusion_node': {'ros__parameters': {'sync': {'slop': 0.02}}},
        'other_node': {'ros__parameters': {'sync': {'slop': 0.5}}}}))
    values = settings.load_offline_params(path)
    assert (values['sync.slop'], values['sync.timeout'], values['device']) == (0.02, 0.3, 'auto')
    for wrong, reason in (({'sync': {'slop': 'fast'}}, "sync.slop: expected double, got 'fast'"),
                          ({'sync': {'slops': 0.1}}, "unknown parameter 'sync.slops'"),
                          ({'sync': {'slop': 2.0}}, r'sync.slop: 2.0 is outside \[0.0, 1.0\]'),
                          ({'inference_size': [96, 0]}, 'inference_size: expected'),
                          ({'normalization': {'fixed_min': 9.0, 'fixed_max': 1.0}},
                           r'normalization.fixed_min \(9.0\) must be below')):
        path.write_text(yaml.safe_dump({'/**': {'ros__parameters': wrong}}))
        with pytest.raises(settings.SettingsError, match=f'^{path}: {reason}'):
            settings.load_offline_params(path)
    source = write_bag(tmp_path / 'in', short_events[:20], 'mcap')
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params', str(path)]) == 1
    assert f'{path}: normalization.fixed_min' in capsys.readouterr().err


def test_thermal_stamps_on_a_clock_ahead_are_named_with_the_offset_that_pairs_them(
        short_events, tmp_path, capsys):
    # The thermal camera stamps 0.3 s ahead of the visible one (slop 0.05 s): thermal frames go
    # unpaired (or pair with the wrong visible frame), and the summary says by how much, as the
    # node's stall warning does.
    ahead = [(log, topic, stamp + 300_000_000 * (topic == THERMAL_TOPIC), encoding, image)
             for log, topic, stamp, encoding, image in short_events]
    source = write_bag(tmp_path / 'in', ahead, 'mcap')
    bag_tool.main([str(source), str(tmp_path / 'out')])
    assert re.search(r'thermal stamps run 0\.3\d\d s ahead of visible ones.*'
                     r'sync.thermal_offset -0\.3\d\d pairs them \(set it in --params\)',
                     capsys.readouterr().err)
    # Cameras on one clock: no such line.
    assert bag_tool.main([str(write_bag(tmp_path / 'in2', short_events, 'mcap')),
                          str(tmp_path / 'out2')]) == 0
    assert 'thermal stamps run' not in capsys.readouterr().err


def test_a_thermal_camera_clock_ahead_of_the_recorder_is_named_with_the_offset_that_fixes_it(
        ivif_dir, params_file, tmp_path, capsys):
    # Recorded on a robot whose thermal camera's clock ran 0.5 s ahead: each thermal frame is
    # stamped 0.5 s after the recorder logged it, and pairs with visible frames captured 0.5 s
    # later. The node warns of it live; s4fusion-bag fused such pairs without a word.
    events = camera_messages(ivif_dir, duration=2.0)

    def stamped(thermal_s, visible_s=None):
        """The events with thermal (and visible) stamps this far after their log times."""
        return [(log, topic, stamp if seconds is None else log + round(seconds * 1e9),
                 encoding, image) for log, topic, stamp, encoding, image in events
                for seconds in [thermal_s if topic == THERMAL_TOPIC else visible_s]]

    ahead = write_bag(tmp_path / 'ahead', stamped(0.5), 'mcap')
    assert bag_tool.main([str(ahead), str(tmp_path / 'out'), '--params', str(params_file)]) == 0
    error = capsys.readouterr().err
    assert re.search(rf'{ahead}: pairs of frames captured about 0\.5\d\d s apart: thermal '
                     r"stamps run 0\.500 s ahead of their arrival on the recorder's clock, "
                     r'as logged .*set sync\.thermal_offset -0\.5\d\d in --params', error), error
    assert 'ros2 param set' not in error, error
    # The same bag with the offset that compensates it: its pairs join frames captured together.
    offset = tmp_path / 'offset.yaml'
    offset.write_text(yaml.safe_dump({'s4fusion_node': {'ros__parameters': {
        **PARAMS['s4fusion_node']['ros__parameters'],
        'sync': {'slop': SLOP, 'thermal_offset': -0.5}}}}))
    assert bag_tool.main([str(ahead), str(tmp_path / 'out2'), '--params', str(offset)]) == 0
    # A normal bag, and one whose stamps are off the recorder's clock altogether (beyond the
    # node's 1 s: another clock, counted apart live), the thermal ones 0.5 s ahead all the same:
    # no such warning.
    normal = write_bag(tmp_path / 'normal', events, 'mcap')
    assert bag_tool.main([str(normal), str(tmp_path / 'out3'), '--params', str(params_file)]) == 0
    off_clock = write_bag(tmp_path / 'off_clock', stamped(5.5, 5.0), 'mcap')
    assert bag_tool.main([str(off_clock), str(tmp_path / 'out4'), '--params',
                          str(params_file)]) == 0
    assert 'captured about' not in capsys.readouterr().err


def test_an_mcap_cut_off_by_a_crash_is_fused_up_to_its_cut(ivif_dir, params_file, tmp_path,
                                                           capsys):
    """A recording cut off by a crash gives what a recording of the same messages that ended
    cleanly gives: every message of the chunks the recorder finished, in log-time order, and a
    warning. Its MCAP file lacks summary and footer, and its last chunk holds blocks the file
    system never wrote (zeros); its chunks are compressed and its log times step back (a
    recorder logs a message at its receipt, writes it as its callback runs), as rosbag2's."""
    events = [(log_time - 15 * 10**6 if topic == THERMAL_TOPIC else log_time, topic, *rest)
              for log_time, topic, *rest in camera_messages(ivif_dir, duration=4.0)]
    source = write_bag(tmp_path / 'in', events, 'mcap', zstd_chunks=True)
    storage = source / 'in.mcap'
    chunks = mcap_chunks(storage)
    assert len(chunks) >= 3
    lost = chunks[2]
    data = bytearray(storage.read_bytes()[:lost.chunk_start_offset + lost.chunk_length])
    data[lost.chunk_start_offset + 100:] = bytes(len(data) - lost.chunk_start_offset - 100)
    storage.write_bytes(bytes(data) + bytes(4096))
    whole = sum(sum(chunk.channel_count.values()) for chunk in chunks[:2])
    clean = write_bag(tmp_path / 'clean', events[:whole], 'mcap', zstd_chunks=True)

    # The bare file (its name is the path's): up to the second chunk's message indexes.
    with bagio.open_bag(storage) as reader:
        assert bagio.cut_files(reader) == [
            'cut off (no MCAP footer: a recording that ended in a crash or power loss): read up '
            f'to its last whole record, {lost.chunk_start_offset} of {len(data) + 4096} bytes']
    # The bag: its metadata.yaml counts what was recorded, the topics what the file holds.
    with bagio.open_bag(source) as reader, bagio.open_bag(clean) as reference:
        assert ([(t.topic, t.count) for t in bagio.image_topics(reader, source)]
                == [(t.topic, t.count) for t in bagio.image_topics(reference, clean)])
    for bag, output in ((source, tmp_path / 'out'), (clean, tmp_path / 'out_clean')):
        assert bag_tool.main([str(bag), str(output), '--params', str(params_file)]) == 0
    error = capsys.readouterr().err
    assert f'{source}: in.mcap: cut off (no MCAP footer' in error and 'Traceback' not in error
    fused = read_bag(tmp_path / 'out')
    assert fused == read_bag(tmp_path / 'out_clean')
    assert len(fused['/s4fusion_node/fused']) == len(expected_pairs(events[:whole])) >= 3


@pytest.mark.parametrize('how', ['bit flip', 'crc', 'record length'])
def test_an_mcap_with_a_damaged_chunk_is_fused_but_for_that_chunk(how, ivif_dir, params_file,
                                                                  tmp_path, capsys):
    """A chunk damaged mid-file (an SD card, a power loss) loses its messages, not the bag: the
    others are fused as a bag without them is, one line names the file and the span lost, the
    summary counts it and the exit code is 1, with the bag written."""
    events = camera_messages(ivif_dir, duration=4.0)
    source = write_bag(tmp_path / 'in', events, 'mcap', zstd_chunks=how != 'record length')
    chunks = mcap_chunks(source / 'in.mcap')
    assert len(chunks) >= 5
    damaged = chunks[3]
    damage_chunk(source / 'in.mcap', damaged, how)
    lost = [event for event in events
            if damaged.message_start_time <= event[0] <= damaged.message_end_time]
    assert len(lost) == sum(damaged.channel_count.values())
    clean = write_bag(tmp_path / 'clean', [e for e in events if e not in lost], 'mcap')

    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params', str(params_file)]) == 1
    error = capsys.readouterr().err
    start = events[0][0]
    span = (f'{(damaged.message_start_time - start) / 1e9:g} s to '
            f'{(damaged.message_end_time - start) / 1e9:g} s')
    assert re.search(rf'{re.escape(str(source))}: in\.mcap: 1 damaged chunk skipped \(first: '
                     rf'.+\): {len(lost)} messages logged from {span} into the bag lost',
                     error), error
    assert f'lost: {len(lost)} messages of the damaged chunks skipped (exit 1)' in error
    assert f'wrote {tmp_path / "out"}' in error and 'Traceback' not in error
    assert bag_tool.main([str(clean), str(tmp_path / 'out_clean'), '--params',
                          str(params_file)]) == 0
    fused = read_bag(tmp_path / 'out')
    assert fused == read_bag(tmp_path / 'out_clean')
    assert len(fused['/s4fusion_node/fused']) >= 10


def test_a_damaged_chunk_before_the_window_is_no_loss(ivif_dir, params_file, tmp_path, capsys):
    # Describing the cameras reads their first chunks, which skipped the damaged one there and
    # counted it lost: a window read whole exited 1 (and failed a batch) over messages it never
    # asked for.
    source = write_bag(tmp_path / 'in', camera_messages(ivif_dir, duration=4.0), 'mcap',
                       zstd_chunks=True)
    damage_chunk(source / 'in.mcap', mcap_chunks(source / 'in.mcap')[0], 'crc')
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params', str(params_file),
                          '--start-offset', '2.5']) == 0
    error = capsys.readouterr().err
    assert 'damaged chunk' not in error and '; lost:' not in error, error
    assert read_bag(tmp_path / 'out')['/s4fusion_node/fused']


def test_a_file_whose_every_chunk_is_damaged_is_not_said_to_have_others_read(short_events,
                                                                             tmp_path):
    source = write_bag(tmp_path / 'in', short_events, 'mcap', zstd_chunks=True)
    storage = source / 'in.mcap'
    chunks = mcap_chunks(storage)
    for chunk in chunks:
        damage_chunk(storage, chunk, 'crc')
    with bagio.open_bag(source) as reader:
        assert not list(bagio.read_messages(reader, source, [THERMAL_TOPIC, VISIBLE_TOPIC]))
        (line,) = bagio.damaged_files(reader)
    many = f'{len(chunks)} damaged chunks' if len(chunks) > 1 else '1 damaged chunk'
    assert re.fullmatch(rf'in\.mcap: {many} skipped \(first: .+\): {len(short_events)} messages '
                        r'logged from .+ into the bag lost; the file holds no other', line), line


def test_a_cut_off_topic_of_two_connections_counts_each_ones_messages(tmp_path):
    # Two publishers of other QoS on one topic: each connection was given the topic's count.
    source = tmp_path / 'in'
    with Writer(source, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = [writer.add_connection('/notes', 'std_msgs/msg/String', typestore=TYPESTORE,
                                             offered_qos_profiles=[bagio.output_qos(reliability)])
                       for reliability in ('reliable', 'best_effort')]
        for index in range(3000):  # over a MiB, rosbags' chunk size: three chunks
            message = TYPESTORE.types['std_msgs/msg/String'](data=f'{index:01000d}')
            writer.write(connections[index % 2], 10**9 + index * 10**6,
                         TYPESTORE.serialize_cdr(message, 'std_msgs/msg/String'))
    storage = source / 'in.mcap'
    lost = mcap_chunks(storage)[-1]
    storage.write_bytes(storage.read_bytes()[:lost.chunk_start_offset + 100])
    with bagio.open_bag(source) as reader:
        assert bagio.cut_files(reader)
        held = {connection.id: 0 for connection in reader.connections}
        for connection, _, _ in bagio.read_messages(reader, source, ['/notes']):
            held[connection.id] += 1
        assert 0 < sum(held.values()) < 3000
        assert {connection.id: connection.msgcount for connection in reader.connections} == held


def read_cut(storage: pathlib.Path) -> tuple[int, list[str], list[str]]:
    """(messages read, cut_files, damaged_files) of a bare MCAP file."""
    with bagio.open_bag(storage) as reader:
        topics = [THERMAL_TOPIC, VISIBLE_TOPIC]
        count = sum(1 for _ in bagio.read_messages(reader, storage, topics))
        return count, bagio.cut_files(reader), bagio.damaged_files(reader)


def cut_line(whole: int, size: int) -> str:
    return ('cut off (no MCAP footer: a recording that ended in a crash or power loss): read up '
            f'to its last whole record, {whole} of {size} bytes')


def test_an_mcap_cut_off_reads_to_its_last_whole_record_and_before_its_broken_chunks(
        ivif_dir, tmp_path):
    # Cut exactly where a chunk ends: that chunk is whole. Cut after two chunks that do not
    # decompress (blocks a file system never wrote): both are the cut, not a damaged chunk
    # before it, and what precedes them is read.
    source = write_bag(tmp_path / 'in', camera_messages(ivif_dir, duration=4.0), 'mcap',
                       zstd_chunks=True)
    intact = source / 'in.mcap'
    chunks = mcap_chunks(intact)
    assert len(chunks) >= 5
    held = [sum(chunk.channel_count.values()) for chunk in chunks]
    boundary = tmp_path / 'boundary.mcap'
    end = chunks[2].chunk_start_offset + chunks[2].chunk_length
    boundary.write_bytes(intact.read_bytes()[:end])
    assert read_cut(boundary) == (sum(held[:3]), [cut_line(end, end)], [])
    for chunk in chunks[2:4]:
        damage_chunk(intact, chunk, 'bit flip')
    broken = tmp_path / 'broken.mcap'
    broken.write_bytes(intact.read_bytes()[:chunks[4].chunk_start_offset + 100])
    assert read_cut(broken) == (sum(held[:2]), [cut_line(chunks[2].chunk_start_offset,
                                                         chunks[4].chunk_start_offset + 100)], [])


def test_an_mcap_cut_off_that_does_not_begin_with_a_header_is_not_said_to_hold_nothing(
        short_events, tmp_path, capsys):
    # Its first record another than the Header (a damaged file, not one cut within its Header):
    # it was called cut off with 0 bytes read; it fails as a file with its footer does.
    source = write_bag(tmp_path / 'in', short_events, 'mcap')
    storage = source / 'in.mcap'
    data = bytearray(storage.read_bytes()[:-100])
    data[len(bagio.MCAP_MAGIC)] = 0x03  # a Schema record's opcode
    storage.write_bytes(bytes(data))
    assert bag_tool.main([str(source), str(tmp_path / 'out')]) == 1
    error = capsys.readouterr().err
    assert f'{source}: cannot open the bag (corrupt or truncated?): ' in error, error
    assert 'cut off' not in error and 'Traceback' not in error, error


@pytest.mark.parametrize('storage, unreadable, named', [
    ('mcap', 'metadata.yaml', 'metadata.yaml'), ('mcap', 'in.mcap', 'in.mcap'),
    ('sqlite3', 'in.db3', 'in.db3'), ('mcap', '.', 'metadata.yaml')])
def test_a_bag_it_may_not_read_is_said_so_not_called_corrupt(short_events, tmp_path, storage,
                                                             unreadable, named):
    # Another user's recording (a root container's, or one made under umask 077) was "cannot
    # open the bag (corrupt or truncated?): [Errno 13] Permission denied: ...", and a bag folder
    # it may not enter (unreadable '.') "writing OUT failed: [Errno 13] Permission denied: ...".
    source = write_bag(tmp_path / 'in', short_events, storage)
    (source / unreadable).chmod(0)
    done = subprocess.run([*as_a_user(), sys.executable, '-m', 's4fusion_ros.tools.bag',
                           str(source), str(tmp_path / 'out')],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr
    assert re.fullmatch(rf's4fusion-bag: {re.escape(str(source))}: cannot read the bag: .*'
                        rf'Permission denied.*{re.escape(named)}.*\n', done.stderr), \
        done.stderr


def test_a_recording_folder_it_may_enter_but_not_list_is_said_so(short_events, tmp_path):
    # No metadata.yaml (a recording cut off) in a folder of mode 100: opening it lists the
    # folder (a recording, or bare bag files?), a PermissionError that the special-file check
    # of a folder it may not enter does not meet; s4fusion-batch takes such a folder for a bag.
    source = write_bag(tmp_path / 'in', short_events, 'mcap')
    (source / 'metadata.yaml').unlink()
    source.chmod(0o100)
    done = subprocess.run([*as_a_user(), sys.executable, '-m', 's4fusion_ros.tools.bag',
                           str(source), str(tmp_path / 'out')],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr
    assert re.fullmatch(rf's4fusion-bag: {re.escape(str(source))}: cannot read the bag: .*'
                        r'Permission denied.*\n', done.stderr), done.stderr


def test_a_split_recording_cut_off_counts_each_topics_messages_in_all_its_files(
        ivif_dir, tmp_path):
    # rosbag2 splits a recording into DIR_0.mcap, DIR_1.mcap, ...: the last cut off, a topic
    # holds what the whole files hold and what is read of the cut one.
    events = camera_messages(ivif_dir, duration=4.0)
    half = len(events) // 2
    source = tmp_path / 'rec'
    for index, part in enumerate((events[:half], events[half:])):
        written = write_bag(tmp_path / f'part{index}', part, 'mcap', zstd_chunks=True)
        (written / f'part{index}.mcap').rename(tmp_path / f'rec_{index}.mcap')
    source.mkdir()
    (tmp_path / 'rec_0.mcap').rename(source / 'rec_0.mcap')
    metadata = yaml.safe_load((written / 'metadata.yaml').read_text())
    metadata['rosbag2_bagfile_information']['relative_file_paths'] = ['rec_0.mcap', 'rec_1.mcap']
    (source / 'metadata.yaml').write_text(yaml.safe_dump(metadata))
    cut = mcap_chunks(tmp_path / 'rec_1.mcap')[-1]
    (source / 'rec_1.mcap').write_bytes(
        (tmp_path / 'rec_1.mcap').read_bytes()[:cut.chunk_start_offset + 100])
    kept = [event for event in events if event[0] < cut.message_start_time]
    with bagio.open_bag(source) as reader:
        assert bagio.cut_files(reader)
        assert {topic.topic: topic.count for topic in bagio.image_topics(reader, source)} == {
            topic: sum(event[1] == topic for event in kept)
            for topic in (THERMAL_TOPIC, VISIBLE_TOPIC)}


def test_a_sqlite3_recording_with_messages_left_in_its_wal_file_says_so(tmp_path):
    # rosbag2's resilient preset writes in WAL mode: a recording cut off leaves its last
    # messages in DIR.db3-wal, which rosbags (opening the database immutable) never read.
    source = tmp_path / 'in'
    note = TYPESTORE.serialize_cdr(TYPESTORE.types['std_msgs/msg/String'](data='x'),
                                   'std_msgs/msg/String')
    with Writer(source, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        connection = writer.add_connection('/notes', 'std_msgs/msg/String', typestore=TYPESTORE)
        for index in range(10):
            writer.write(connection, 10**9 + index, note)
    recorder = sqlite3.connect(source / 'in.db3')  # still open: the crash left its -wal file
    recorder.execute('PRAGMA journal_mode=WAL')
    recorder.executemany('INSERT INTO messages (topic_id, timestamp, data) VALUES (1, ?, ?)',
                         [(10**9 + index, note) for index in range(10, 15)])
    recorder.commit()
    unread = ("not read: the messages in in.db3-wal beside it (a recording cut off, or still "
              "running); once it has stopped, `sqlite3 in.db3 'PRAGMA wal_checkpoint'` merges "
              'them in')
    for bag, name in ((source, 'in.db3: '), (source / 'in.db3', '')):
        with bagio.open_bag(bag) as reader:
            assert sum(1 for _ in reader.messages()) == 10
            assert bagio.cut_files(reader) == [name + unread]
    recorder.close()  # the last connection merges the -wal file in
    # An empty -wal file (a recorder that stopped cleanly, or whose last commit was merged in)
    # leaves nothing unread.
    (source / 'in.db3-wal').touch()
    with bagio.open_bag(source) as reader:
        assert sum(1 for _ in reader.messages()) == 15 and not bagio.cut_files(reader)


def zstd_bomb(data: bytes, inflated: int) -> bytes:
    """One zstd frame of `data` followed by `inflated` zero bytes (declaring no size)."""
    compressor = zstd.ZstdCompressor()
    return b''.join([compressor.compress(data), compressor.compress(bytes(inflated)),
                     compressor.flush()])


def lz4_bomb(data: bytes, inflated: int) -> bytes:
    """One lz4 frame of `data` followed by `inflated` zero bytes (lz4 packs 256 MiB in 1 MB)."""
    compressor = lz4.frame.LZ4FrameCompressor()
    return b''.join([compressor.begin(), compressor.compress(data),
                     compressor.compress(bytes(inflated)), compressor.flush()])


def thermal_images(writer: Writer, events, compress=lambda raw: raw) -> None:
    """Write the thermal images of `events` on THERMAL_TOPIC, each as `compress` makes it."""
    connection = writer.add_connection(THERMAL_TOPIC, IMAGE, typestore=TYPESTORE)
    for log_time, topic, stamp, encoding, image in events:
        if topic == THERMAL_TOPIC:
            writer.write(connection, log_time, compress(bytes(TYPESTORE.serialize_cdr(
                bag_image_message(image, encoding, stamp, THERMAL_FRAME), IMAGE))))


def refused_without_the_memory(source: pathlib.Path, output: pathlib.Path, capsys,
                               inflated: int) -> str:
    """Run s4fusion-bag on `source`: refused, with under a quarter of `inflated` bytes
    allocated; its error line."""
    tracemalloc.start()
    try:
        assert bag_tool.main([str(source), str(output)]) == 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    error = capsys.readouterr().err
    assert f'{source}: ' in error and 'Traceback' not in error, error
    assert peak < inflated // 4 and not output.exists()
    return error


@pytest.mark.parametrize('codec', ['zstd', 'lz4'])
def test_an_mcap_chunk_that_inflates_past_its_size_is_refused_without_taking_the_memory(
        short_events, tmp_path, capsys, codec):
    # zstd packs a GiB of zeros in some 32 kB: rosbags inflated such a chunk whole (3.2 GB peak
    # for 1.5 GiB) before finding it larger than it says it is; lz4 chunks (which the mcap CLI
    # and rosbag2's MCAP storage may write) until the release that bounded both.
    inflated = 256 << 20
    source = tmp_path / 'in'
    writer = Writer(source, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    with writer:
        bomb = zstd_bomb if codec == 'zstd' else lz4_bomb
        writer.storage.compression = codec
        writer.storage.compressor = lambda chunk: bomb(chunk, inflated)
        thermal_images(writer, short_events[:20])
    assert (source / 'in.mcap').stat().st_size < inflated // 100
    error = refused_without_the_memory(source, tmp_path / 'out', capsys, inflated)
    # Its one chunk is damaged so: no message of the camera read, and the fault named.
    assert (f'({source}: in.mcap: 1 damaged chunk skipped (first: Chunk size mismatch'
            in error), error


def message_compressed(source: pathlib.Path) -> None:
    """Mark the bag at `source` as rosbag2's compression_mode 'message' (zstd) writes it."""
    metadata = yaml.safe_load((source / 'metadata.yaml').read_text())
    metadata['rosbag2_bagfile_information'].update(compression_mode='message',
                                                   compression_format='zstd')
    (source / 'metadata.yaml').write_text(yaml.safe_dump(metadata))


def test_a_message_that_inflates_past_the_limit_is_refused_without_taking_the_memory(
        short_events, tmp_path, capsys, monkeypatch):
    # rosbag2's compression_mode 'message' zstd-compresses each message and declares no size:
    # rosbags inflated each whole, whatever it came to. The limit (a GiB) made small to test.
    inflated, source = 64 << 20, tmp_path / 'in'
    monkeypatch.setattr(bagio, 'MESSAGE_LIMIT', 1 << 20)
    bombs = iter([inflated])  # the first message inflates past the limit, the rest do not
    with Writer(source, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        thermal_images(writer, short_events[:20], lambda raw: zstd_bomb(raw, next(bombs, 0)))
    message_compressed(source)
    error = refused_without_the_memory(source, tmp_path / 'out', capsys, inflated)
    assert f'{source}: cannot read the bag' in error, error
    assert f'a message inflates past {1 << 20} bytes' in error, error


def test_a_message_whose_compressed_frame_is_cut_short_is_said_to_be(short_events, tmp_path):
    # Its zstd frame lacks its end: an error says so, rather than what it inflated to being read
    # as the message.
    source = tmp_path / 'in'
    frames = iter([lambda frame: frame[:len(frame) // 2]])  # the first message's, halved
    with Writer(source, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        thermal_images(writer, short_events[:20],
                       lambda raw: next(frames, bytes)(zstd.compress(raw)))
    message_compressed(source)
    with bagio.open_bag(source) as reader:
        with pytest.raises(Exception, match=r'its compressed data ends inside a frame \(cut '
                           r'short\)'):
            list(reader.messages())


def test_a_storage_file_that_inflates_past_the_free_space_is_refused_and_removed(
        short_events, tmp_path, capsys, monkeypatch):
    # rosbag2's compression_mode 'file' zstd-compresses each storage file whole, which rosbags
    # unpacks into the temporary directory, as large as it inflates: until the disk was full.
    inflated, source, unpacked = 256 << 20, tmp_path / 'in', tmp_path / 'tmp'
    unpacked.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(unpacked))
    room = 16 << 20  # of the free space there, to test
    monkeypatch.setattr(bagio, 'UNPACK_SHARE', room / shutil.disk_usage(unpacked).free)
    writer = Writer(source, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.set_compression(CompressionMode.FILE, CompressionFormat.ZSTD)
    with writer:
        thermal_images(writer, short_events[:20])
    with open(source / 'in.mcap.zstd', 'ab') as file:  # a second frame, of zeros
        file.write(zstd_bomb(b'', inflated))
    error = refused_without_the_memory(source, tmp_path / 'out', capsys, inflated)
    assert f"{source / 'in.mcap.zstd'}: inflates past" in error, error
    assert f'free space in {unpacked}' in error and not any(unpacked.iterdir())


@pytest.mark.parametrize('kept', [0, 5, 8, 12])
def test_an_mcap_cut_before_any_message_is_refused_as_such(short_events, tmp_path, capsys, kept):
    # Empty, within the magic, the magic alone (which also ends a file that is whole), within
    # the Header: what a split recording's last file can be.
    source = write_bag(tmp_path / 'in', short_events, 'mcap')
    storage = source / 'in.mcap'
    storage.write_bytes(storage.read_bytes()[:kept])
    assert bag_tool.main([str(source), str(tmp_path / 'out')]) == 1
    error = capsys.readouterr().err
    assert (f'{source}: no message to read: in.mcap: cut off (no MCAP footer: a recording that '
            'ended in a crash or power loss): read up to its last whole record, 0 of '
            f'{kept} bytes') in error, error
    assert 'Traceback' not in error and not (tmp_path / 'out').exists()


def test_missing_topic_error_names_the_topics_found(short_events, tmp_path, capsys):
    source = write_bag(tmp_path / 'in', short_events[:20], 'mcap')
    code = bag_tool.main([str(source), str(tmp_path / 'out'), '--thermal-topic', '/ir/raw'])
    error = capsys.readouterr().err
    assert code == 1
    assert "no image topic '/ir/raw'" in error and str(source) in error
    assert THERMAL_TOPIC in error and VISIBLE_TOPIC in error and 'Traceback' not in error
    assert not (tmp_path / 'out').exists()


def test_a_camera_topic_without_messages_is_said_to_hold_none(short_events, tmp_path, capsys):
    # It was "no topic looks like the thermal camera ... Name it with --thermal-topic", and so
    # named, "no pair was fused".
    visible_only = write_bag(tmp_path / 'visible_only', [e for e in short_events
                                                         if e[1] == VISIBLE_TOPIC], 'sqlite3')
    empty = write_bag(tmp_path / 'empty', [], 'mcap')
    for source, named, held in (
            (visible_only, [], f'{THERMAL_TOPIC} holds no messages'),
            (visible_only, ['--thermal-topic', THERMAL_TOPIC],
             f'{THERMAL_TOPIC} (--thermal-topic) holds no messages'),
            (empty, [], f'{VISIBLE_TOPIC} holds no messages; {THERMAL_TOPIC} holds no '
             'messages')):
        assert bag_tool.main([str(source), str(tmp_path / 'out'), *named]) == 1
        error = capsys.readouterr().err
        assert f'{source}: ' in error and held in error, error
        assert 'Name it with' not in error and 'fused 0 pairs' not in error, error
        assert not (tmp_path / 'out').exists()
    # Where the parameters take a camera's /compressed twin, an empty one is said to be so too.
    thermal = bagio.ImageTopic(THERMAL_TOPIC, IMAGE, 5, 'mono16', 'thermal')
    raw = bagio.ImageTopic(VISIBLE_TOPIC, IMAGE, 5, 'bgr8', 'visible')
    twin = bagio.ImageTopic(f'{VISIBLE_TOPIC}/compressed', COMPRESSED, 0, '', '')
    values = {**settings.defaults(), 'visible.transport': 'compressed'}
    with pytest.raises(bagio.BagError, match=f'{twin.topic}, the visible camera in the transport '
                       'of the parameters, holds no messages'):
        bagio.pick_topics([thermal, raw, twin], tmp_path, values=values)


def test_existing_output_refused_without_overwrite(short_events, tmp_path, capsys):
    source = write_bag(tmp_path / 'in', short_events[:20], 'mcap')
    existing = write_bag(tmp_path / 'existing', short_events[:4], 'mcap')
    before = read_bag(existing)
    assert bag_tool.main([str(source), str(existing)]) == 1
    assert '--overwrite' in capsys.readouterr().err
    assert read_bag(existing) == before
    assert bag_tool.main([str(source), str(tmp_path / 'new'), '--export-video',
                          str(tmp_path), '--overwrite']) == 1
    assert 'is a folder: name the .mp4 file' in capsys.readouterr().err
    # A suffix OpenCV cannot write: refused before the model loads, not at the first frame.
    assert bag_tool.main([str(source), str(tmp_path / 'new'), '--export-video',
                          str(tmp_path / 'fused.webm')]) == 1
    assert 'fused.webm: name a file ending in .mp4, .mov, .mkv, .avi' in capsys.readouterr().err
    assert not (tmp_path / 'new').exists()
    (tmp_path / 'pngs').mkdir()
    (tmp_path / 'pngs' / '000000_1_fused.png').write_bytes(b'an earlier export')
    assert bag_tool.main([str(source), str(tmp_path / 'new'), '--export-png',
                          str(tmp_path / 'pngs')]) == 1
    assert 'holds PNGs already; pass --overwrite' in capsys.readouterr().err
    assert (tmp_path / 'pngs' / '000000_1_fused.png').read_bytes() == b'an earlier export'
    # With --overwrite the earlier export's PNGs go once this run's are written; others stay.
    (tmp_path / 'pngs' / 'notes.png').write_bytes(b'not an export')
    assert bag_tool.main([str(source), str(tmp_path / 'new'), '--export-png',
                          str(tmp_path / 'pngs'), '--overwrite']) == 0
    assert 'removed 1 PNGs of an earlier export' in capsys.readouterr().err
    names = sorted(path.name for path in (tmp_path / 'pngs').iterdir())
    assert 'notes.png' in names and '000000_1_fused.png' not in names
    assert len([name for name in names if name.endswith('_fused.png')]) == len(
        read_bag(tmp_path / 'new')['/s4fusion_node/fused'])
    assert replay.EXPORTED_PNG.fullmatch('1000000_5_saliency.png')  # past 999999 pairs


def test_overwrite_replaces_a_bag_only_never_another_folder(tmp_path):
    # --overwrite on a folder of the user's (no metadata.yaml) must not remove it.
    folder = tmp_path / 'notes'
    folder.mkdir()
    (folder / 'notes.txt').write_text('mine')
    with pytest.raises(bagio.BagError, match='exists and is not a rosbag2 directory'):
        with bagio.create_bag(folder, overwrite=True) as writer:
            bagio.add_topic(writer, '/t')
    assert (folder / 'notes.txt').read_text() == 'mine'


def test_an_output_made_while_the_bag_was_written_is_kept_without_overwrite(
        short_events, tmp_path):
    # Another run (or the user) put a bag at the path after it was checked: without --overwrite
    # it stays, and this bag is refused.
    path = tmp_path / 'out'
    with pytest.raises(bagio.BagError, match='exists; pass --overwrite to replace it'):
        with bagio.create_bag(path) as writer:
            bagio.add_topic(writer, '/t')
            write_bag(path, short_events[:4], 'mcap')
    assert read_bag(path) == read_bag(write_bag(tmp_path / 'same', short_events[:4], 'mcap'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out', 'same']


def test_compress_leaves_a_sqlite3_bag_as_rosbag2_writes_it(short_events, tmp_path):
    # zstd chunks are MCAP's: a sqlite3 bag has none, and is written uncompressed.
    path = tmp_path / 'out'
    with bagio.create_bag(path, storage='sqlite3', compress=True) as writer:
        connection = bagio.add_topic(writer, THERMAL_TOPIC)
        for log_time, topic, stamp, encoding, image in short_events[:6]:
            writer.write(connection, log_time, TYPESTORE.serialize_cdr(
                bag_image_message(image, encoding, stamp, THERMAL_FRAME), IMAGE))
    information = yaml.safe_load((path / 'metadata.yaml').read_text())
    information = information['rosbag2_bagfile_information']
    assert information['compression_mode'] == '' and information['relative_file_paths'] == [
        'out.db3']
    assert len(read_bag(path)[THERMAL_TOPIC]) == 6


def test_an_output_holding_the_input_or_inside_it_is_refused_even_with_overwrite(
        short_events, tmp_path, capsys):
    # --overwrite replaced the output folder whole, and a bare .mcap input inside it went too.
    source = write_bag(tmp_path / 'recording', short_events[:20], 'mcap')
    before = read_bag(source)
    for output in (source, tmp_path / 'recording' / 'fused'):
        assert bag_tool.main([str(source), str(output), '--overwrite']) == 1
        assert 'the output cannot be the input bag, hold it or lie inside it' in (
            capsys.readouterr().err)
    assert bag_tool.main([str(source / 'recording.mcap'), str(source), '--overwrite']) == 1
    assert 'hold it' in capsys.readouterr().err
    assert read_bag(source) == before and sorted(p.name for p in source.iterdir()) == [
        'metadata.yaml', 'recording.mcap']


def test_exports_inside_the_output_or_input_bag_are_refused_before_any_work(
        short_events, tmp_path, capsys):
    # Made early, an export's folder inside the output stopped the bag's rename at the end.
    source = write_bag(tmp_path / 'recording', short_events[:20], 'mcap')
    output = tmp_path / 'fused'
    for flag, path, where in (('--export-video', output / 'v.mp4', 'output'),
                              ('--export-png', output / 'png', 'output'),
                              ('--export-png', source / 'png', 'input')):
        assert bag_tool.main([str(source), str(output), flag, str(path)]) == 1
        assert f'{flag} {path}: inside the {where} bag' in capsys.readouterr().err
        assert not output.exists() and not path.exists()


def test_export_paths_under_a_file_are_refused_by_their_option_before_any_work(
        short_events, tmp_path, capsys):
    # They failed once fusing had begun (the video) or after the model loaded (the PNGs), each
    # worded as a failure to write the output bag; so did the output bag itself, said to have
    # left a partial output removed.
    source = write_bag(tmp_path / 'recording', short_events[:20], 'mcap')
    output, a_file = tmp_path / 'fused', tmp_path / 'a_file'
    a_file.touch()
    assert bag_tool.main([str(source), str(a_file / 'fused')]) == 1
    error = capsys.readouterr().err
    assert f'{a_file / "fused"}: {a_file} is not a folder' in error and '->' not in error, error
    for flag, path in (('--export-png', a_file), ('--export-png', a_file / 'png'),
                       ('--export-video', a_file / 'v.mp4')):
        assert bag_tool.main([str(source), str(output), flag, str(path)]) == 1
        error = capsys.readouterr().err
        assert f'{flag}: {path if flag == "--export-png" else path.parent}: {a_file} is not a ' \
               'folder' in error and '->' not in error, error  # the model is not loaded
        assert not output.exists()


def test_output_topics_that_would_merge_streams_or_are_not_topic_names_are_refused(
        short_events, tmp_path, capsys):
    # Each wrote a bag: the fused images merged into the copied input topic, or both outputs
    # under one name ended in a raw rosbags error.
    source = write_bag(tmp_path / 'in', short_events[:20], 'mcap')
    output = tmp_path / 'out'
    assert bag_tool.main([str(source), str(output), '--include-inputs',
                          '--fused-topic', VISIBLE_TOPIC]) == 1
    assert (f'--fused-topic {VISIBLE_TOPIC} is an input topic copied by --include-inputs'
            in capsys.readouterr().err)
    for extra, message in (
            (['--fused-topic', '/x', '--saliency-topic', '/x'],
             '--fused-topic and --saliency-topic are both /x'),
            (['--saliency-topic', 'relative/name'], "--saliency-topic 'relative/name' is not a "),
            (['--fused-topic', '/fused/2d'], "--fused-topic '/fused/2d' is not a ")):
        with pytest.raises(SystemExit):
            bag_tool.main([str(source), str(output), *extra])
        assert message in capsys.readouterr().err
    # A compressed transport on another output's topic.
    assert bag_tool.main([str(source), str(output), '--transport', 'both',
                          '--fused-topic', '/a', '--saliency-topic', '/a/compressed']) == 1
    assert ('/a/compressed would carry the compressed transport of --fused-topic /a and the '
            'images of --saliency-topic /a/compressed; name another'
            in capsys.readouterr().err)
    assert not output.exists()


def test_the_storage_option_chooses_the_output_format(short_events, params_file, tmp_path):
    source = write_bag(tmp_path / 'in', short_events[:20], 'mcap')
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params', str(params_file),
                          '--storage', 'sqlite3']) == 0
    assert sorted(path.suffix for path in (tmp_path / 'out').iterdir()) == ['.db3', '.yaml']
    assert read_bag(tmp_path / 'out')['/s4fusion_node/fused']


def test_an_export_of_every_zeroth_pair_is_refused_before_any_work(
        short_events, tmp_path, capsys):
    # Every 0th pair is no period: fusing would end at the first pair in a ZeroDivisionError.
    source = write_bag(tmp_path / 'in', short_events[:20], 'mcap')
    with pytest.raises(SystemExit) as refused:
        bag_tool.main([str(source), str(tmp_path / 'out'), '--export-png', str(tmp_path / 'png'),
                       '--export-every', '0'])
    assert refused.value.code == 2
    assert '--export-every must be >= 1' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'png').exists()


def test_corrupt_and_truncated_inputs_give_a_clear_error(short_events, tmp_path, capsys):
    truncated = write_bag(tmp_path / 'truncated', short_events, 'mcap')
    storage_file = truncated / 'truncated.mcap'
    storage_file.write_bytes(storage_file.read_bytes()[:storage_file.stat().st_size // 2])
    garbage = write_bag(tmp_path / 'garbage', short_events[:10], 'sqlite3')
    (garbage / 'garbage.db3').write_bytes(b'not a database' * 1000)
    no_metadata = write_bag(tmp_path / 'no_metadata', short_events[:10], 'mcap')
    (no_metadata / 'metadata.yaml').write_text('rosbag2_bagfile_information: [')
    unfinished = write_bag(tmp_path / 'unfinished', short_events[:10], 'mcap')
    (unfinished / 'metadata.yaml').unlink()  # a recorder still running or cut off
    # One compressed per file (--compression-mode file): its files are DIR_N.mcap.zstd.
    packed = write_bag(tmp_path / 'packed', short_events[:10], 'mcap')
    (packed / 'metadata.yaml').unlink()
    shutil.copy(packed / 'packed.mcap', packed / 'packed_1.mcap.zstd')
    (packed / 'packed.mcap').rename(packed / 'packed_0.mcap.zstd')
    # A folder of bare bags (s4fusion-batch fuses each): it was called an unfinished recording.
    bare = write_bag(tmp_path / 'bare', short_events[:10], 'mcap')
    (bare / 'metadata.yaml').unlink()
    (bare / 'bare.mcap').rename(bare / 'base.mcap')
    for source, named in ((truncated, truncated), (garbage, garbage),
                          (no_metadata, no_metadata / 'metadata.yaml'),
                          (unfinished, f'{unfinished}: no metadata.yaml (a recording still'),
                          (packed, f'{packed}: no metadata.yaml (a recording still running, '
                                   'or one that was cut off: `ros2 bag reindex` writes it)\n'),
                          (bare, f"{bare}: no metadata.yaml, and its bag files are not one "
                                 f"recording's: give one of them ({bare / 'base.mcap'})"),
                          (tmp_path / 'absent', tmp_path / 'absent')):
        output = tmp_path / f'{source.name}_out'
        assert bag_tool.main([str(source), str(output)]) == 1
        error = capsys.readouterr().err
        assert str(named) in error and 'Traceback' not in error, error
        assert not output.exists()


@pytest.mark.parametrize('damage, fault', [
    (lambda text: text.replace("compression_mode: ''", "compression_mode: '' ["),
     r"line 3, column 24: expected <block end>, but found '\[' \(while parsing a block mapping "
     r"at line 2, column 3\)"),
    (lambda text: text.replace('mcap', 'mcap\xe9'), r'byte 0xe9 on line \d+ is not UTF-8, which '
     'ROS 2 reads YAML files in')], ids=['syntax', 'latin-1'])
def test_a_metadata_yaml_that_is_no_yaml_is_named_with_the_fault_on_one_line(
        short_events, tmp_path, capsys, damage, fault):
    # An edit gone wrong, or a Latin-1 byte: rosbags said the first in YAML's seven lines with a
    # snippet of the file, the second as "'utf-8' codec can't decode byte 0xe9 in position
    # 1077", naming no file.
    source = write_bag(tmp_path / 'in', short_events[:10], 'mcap')
    metadata = source / 'metadata.yaml'
    metadata.write_bytes(damage(metadata.read_text()).encode('latin-1'))
    assert bag_tool.main([str(source), str(tmp_path / 'out')]) == 1
    assert re.fullmatch(rf's4fusion-bag: {re.escape(str(metadata))}: not readable as YAML '
                        rf'\(corrupt or truncated\?\): {fault}\n', capsys.readouterr().err)


@pytest.mark.parametrize('field, value', [('message_count', None), ('message_count', 'many'),
                                          ('message_count', -3), ('name', 7)])
def test_a_metadata_topic_of_no_name_or_count_is_refused_naming_the_file(
        short_events, tmp_path, capsys, field, value):
    # rosbags takes metadata.yaml's topics as they come: s4fusion-bag (and s4fusion-play, on
    # the name) ended in a TypeError's traceback.
    source = write_bag(tmp_path / 'in', short_events[:10], 'mcap')
    metadata = yaml.safe_load((source / 'metadata.yaml').read_text())
    topic = metadata['rosbag2_bagfile_information']['topics_with_message_count'][0]
    (topic if field == 'message_count' else topic['topic_metadata'])[field] = value
    (source / 'metadata.yaml').write_text(yaml.safe_dump(metadata))
    assert bag_tool.main([str(source), str(tmp_path / 'out')]) == 1
    error = capsys.readouterr().err
    assert f"{source / 'metadata.yaml'}: topic " in error and 'Traceback' not in error, error
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_a_metadata_starting_time_after_the_messages_drops_none_of_them(
        storage, short_events, params_file, tmp_path, capsys):
    # The bag's start was metadata.yaml's: every message seemed to lie before it, and the window
    # from the start read none (s4fusion-bag: no pair, exit 1; s4fusion-batch: 0 pairs).
    source = write_bag(tmp_path / 'in', short_events, storage)
    metadata = yaml.safe_load((source / 'metadata.yaml').read_text())
    information = metadata['rosbag2_bagfile_information']
    information['starting_time']['nanoseconds_since_epoch'] = short_events[-1][0] + 10**10
    (source / 'metadata.yaml').write_text(yaml.safe_dump(metadata))
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params', str(params_file)]) \
        == 0, capsys.readouterr().err
    assert len(read_bag(tmp_path / 'out')['/s4fusion_node/fused']) \
        == len(expected_pairs(short_events))


def test_a_recording_cut_off_spans_its_messages_not_its_stale_metadata(short_events, tmp_path):
    # A recorder killed after it wrote metadata.yaml (at a split, say) leaves its duration and
    # count short: the span read from it made s4fusion-batch's thermal rate and segments short.
    source = write_bag(tmp_path / 'in', short_events, 'mcap', zstd_chunks=True)
    metadata = yaml.safe_load((source / 'metadata.yaml').read_text())
    information = metadata['rosbag2_bagfile_information']
    information['duration']['nanoseconds'] //= 3
    information['message_count'] //= 3
    (source / 'metadata.yaml').write_text(yaml.safe_dump(metadata))
    log_times = sorted(event[0] for event in short_events)
    with bagio.open_bag(source) as reader:
        assert (reader.start_time, reader.end_time, reader.message_count) \
            == (log_times[0], log_times[-1] + 1, len(log_times))


@pytest.mark.parametrize('special', ['fifo', 'device', 'folder', 'metadata fifo', 'bare fifo'])
def test_a_bag_file_that_is_not_a_regular_file_is_refused_naming_it(
        short_events, tmp_path, special):
    # A FIFO named as a storage file (or as metadata.yaml, or given as the bag) blocked the
    # reading until Ctrl-C: run as a process, which a hang's timeout ends.
    source = write_bag(tmp_path / 'in', short_events[:10], 'mcap')
    named = source / ('metadata.yaml' if special == 'metadata fifo' else 'in.mcap')
    named.unlink()
    if special == 'device':
        named.symlink_to('/dev/zero')
    elif special == 'folder':
        named.mkdir()
    else:
        os.mkfifo(named)
    bag = named if special == 'bare fifo' else source
    result = subprocess.run([str(BAG_TOOL), str(bag), str(tmp_path / 'out')],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == (f's4fusion-bag: {named}: not a regular file (a FIFO, a device or '
                             'a folder): not read as part of a bag\n'), result.stderr
    assert not (tmp_path / 'out').exists()


def run_tool(source: pathlib.Path, output: pathlib.Path, params: pathlib.Path, *extra,
             preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen([str(BAG_TOOL), str(source), str(output), '--params', str(params),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=preexec_fn)


def staging_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
    return list(directory.glob('.*.partial'))


def test_ctrl_c_keeps_the_previous_output_and_leaves_no_partial_bag(ivif_dir, params_file,
                                                                    tmp_path):
    # Long enough (about 100 pairs) that a loaded machine still sees the tool mid-run when it
    # has read the progress bar and sends the signal.
    source = write_bag(tmp_path / 'in', camera_messages(ivif_dir, duration=12.0), 'mcap')
    output = write_bag(tmp_path / 'out', camera_messages(ivif_dir, duration=0.2), 'mcap')
    before = read_bag(output)
    video = tmp_path / 'fused.mp4'
    video.write_bytes(b'an earlier video')
    # Started as a shell starts a background job, with SIGINT ignored (inherited): a supervisor's
    # SIGINT must still stop it.
    proc = run_tool(source, output, params_file, '--overwrite', '--export-video', str(video),
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    with reading(proc, proc.stderr) as stderr:
        # Mid-run: the progress bar counts some pairs fused, however slow the machine.
        assert stderr.wait_for(re.compile(r'fusing: .*\| *[1-9]\d*/'), 120), stderr.text()
        assert staging_dirs(tmp_path) and proc.poll() is None, stderr.text()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    error = stderr.text()
    assert proc.returncode == 130, error
    assert 'interrupted' in error and 'Traceback' not in error
    assert f'{output} was not written (the one there before is kept as it was)' in error
    assert read_bag(output) == before
    assert not staging_dirs(tmp_path)
    assert video.read_bytes() == b'an earlier video'
    assert sorted(path.name for path in tmp_path.iterdir()) == ['fused.mp4', 'in', 'out']


@pytest.mark.parametrize('stop', [signal.SIGINT, None], ids=['and Ctrl-C', 'alone'])
def test_a_run_whose_reader_of_stderr_left_keeps_the_previous_output(ivif_dir, params_file,
                                                                     tmp_path, stop):
    # `s4fusion-bag ... |& tee log` and Ctrl-C, which ends tee too: the clean-up's notice found
    # no reader and the tool exited 1, not 130; without a Ctrl-C, 141 (SIGPIPE's, as `| head`).
    source = write_bag(tmp_path / 'in', camera_messages(ivif_dir, duration=12.0), 'mcap')
    output = write_bag(tmp_path / 'out', camera_messages(ivif_dir, duration=0.2), 'mcap')
    before = read_bag(output)
    proc = run_tool(source, output, params_file, '--overwrite')
    said = []

    def mid_run() -> bool:
        if select.select([proc.stderr], [], [], 0.1)[0]:
            said.append(os.read(proc.stderr.fileno(), 4096).decode(errors='replace'))
        return bool(re.search(r'fusing: .*\| *[1-9]\d*/', ''.join(said)))

    assert exit_with_stderr_unread(proc, stop, mid_run) == (130 if stop else READER_LEFT)
    assert read_bag(output) == before and not staging_dirs(tmp_path)


def test_a_run_stopped_after_its_bag_was_finished_says_it_was_written(tmp_path):
    # The bag is finished before the video and the summary: a Ctrl-C or a video that failed to
    # write then said the bag "was not written" (and, with --overwrite, "the one there before is
    # kept"), where the new one stood in its place.
    args = argparse.Namespace(output=tmp_path / 'out', export_video=tmp_path / 'fused.mp4',
                              export_png=None)
    outcome = bag_tool.Outcome(existed=True)
    assert bag_tool.untouched(args, outcome) == (
        f'the partial output was removed and {args.output} was not written (the one there '
        'before is kept as it was)')
    outcome.written = True
    assert bag_tool.untouched(args, outcome) == (
        f'{args.output} was written, {args.export_video} was not')
    outcome.video_written = True
    assert bag_tool.untouched(args, outcome) == (
        f'{args.output} and {args.export_video} were written')
    args.export_video = None
    assert bag_tool.untouched(args, outcome) == f'{args.output} was written'


def _limit_file_size() -> None:
    # A real write failure: files may not grow past 256 kB (EFBIG instead of SIGXFSZ).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_failed_write_leaves_no_output(short_events, params_file, tmp_path):
    source = write_bag(tmp_path / 'in', short_events, 'mcap')
    output = tmp_path / 'out'
    proc = run_tool(source, output, params_file, '--include-inputs', preexec_fn=_limit_file_size)
    _, error = proc.communicate(timeout=120)
    assert proc.returncode == 1, error
    assert f'{output} was not written' in error and 'Traceback' not in error, error
    assert not output.exists() and not staging_dirs(tmp_path)
    assert os.listdir(tmp_path) == ['in']


def test_an_overwrite_interrupted_between_its_renames_keeps_the_bag_it_was_to_replace(
        tmp_path, monkeypatch):
    out = tmp_path / 'drive'
    with bagio.create_bag(out) as writer:
        bagio.add_topic(writer, '/old')
    rename = pathlib.Path.rename

    def interrupted(self, target):
        # The old bag has gone into the staging directory; the new one is not yet in place.
        if self.name == out.name and self.parent != out.parent:
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(pathlib.Path, 'rename', interrupted)
    with pytest.raises(KeyboardInterrupt):
        with bagio.create_bag(out, overwrite=True) as writer:
            bagio.add_topic(writer, '/new')
    monkeypatch.undo()
    with bagio.open_bag(out) as reader:
        assert [c.topic for c in reader.connections] == ['/old']
    assert os.listdir(tmp_path) == ['drive']


def test_a_bag_is_on_disk_before_it_gets_its_name(tmp_path, monkeypatch):
    # fsync'd files, and whether the final name existed yet when each was synced.
    out, synced = tmp_path / 'drive', []
    fsync = os.fsync

    def recording(descriptor):
        synced.append((pathlib.Path(os.readlink(f'/proc/self/fd/{descriptor}')), out.exists()))
        fsync(descriptor)

    monkeypatch.setattr(os, 'fsync', recording)
    with bagio.create_bag(out, storage='sqlite3') as writer:
        bagio.add_topic(writer, '/fused')
    before = {path.name for path, named in synced if not named}
    assert {'drive.db3', 'metadata.yaml', 'drive'} <= before  # the bag, before its rename
    assert (tmp_path, True) in synced  # and the folder holding the new name, after it


def read_with_bagio(path: pathlib.Path) -> dict[str, list]:
    """read_bag's {topic: [(log time, message type, raw CDR)]}, read through bagio.open_bag."""
    topics = {}
    with bagio.open_bag(path) as reader:
        for connection, log_time, raw in reader.messages():
            topics.setdefault(connection.topic, []).append((log_time, connection.msgtype,
                                                            bytes(raw)))
    return topics


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_bags_under_paths_with_uri_characters_are_read_and_written_whole(
        storage, short_events, params_file, tmp_path, capsys):
    # SQLite takes '#' in a file: URI for a fragment, '?' for a query and '%41' for 'A', and
    # rosbags' sqlite3 storage puts paths in URIs as they are: an output's database went to a
    # stray file beside it, the bag kept its metadata.yaml alone and was reported written; an
    # input could not be opened. MCAP, never a URI, was not affected.
    plain = write_bag(tmp_path / 'in', short_events, storage)
    folder = tmp_path / 'day#2?%41'
    source = shutil.copytree(plain, folder / 'in#1')
    output = folder / 'out#3'
    for bag, fused in ((plain, tmp_path / 'reference'), (source, output)):
        assert bag_tool.main([str(bag), str(fused), '--params', str(params_file)]) == 0
    assert f'wrote {output}' in capsys.readouterr().err
    suffix = '.db3' if storage == 'sqlite3' else '.mcap'
    assert sorted(path.name for path in output.iterdir()) == ['metadata.yaml', f'out#3{suffix}']
    assert sorted(path.name for path in folder.iterdir()) == ['in#1', 'out#3']  # nothing stray
    assert sorted(path.name for path in tmp_path.iterdir()) == ['day#2?%41', 'in', 'reference']
    assert read_with_bagio(output) == read_bag(tmp_path / 'reference')
    assert read_with_bagio(source / f'in{suffix}') == read_bag(plain)  # a bare storage file


def test_a_bag_whose_storage_file_was_not_written_is_not_put_in_place(tmp_path, monkeypatch):
    # rosbags' own sqlite3 storage writes the database of a bag under a path with '#' elsewhere
    # (above): such a bag, metadata.yaml alone, was renamed into place as written.
    monkeypatch.setattr(bagio, '_Writer', Writer, raising=False)
    with pytest.raises(WriterError, match=r'out#1\.db3, which its metadata\.yaml lists, was '
                       r'not written'):
        with bagio.create_bag(tmp_path / 'out#1', 'sqlite3') as writer:
            bagio.add_topic(writer, '/fused')
    assert not (tmp_path / 'out#1').exists() and not bagio.staging_dirs(tmp_path / 'out#1')


def test_staging_directories_are_told_apart_from_a_neighbour_bags(tmp_path):
    # 'drive' and 'drive.1' side by side: sweeping what a dead attempt at 'drive' left must not
    # take 'drive.1''s bag in the making.
    with bagio.create_bag(tmp_path / 'drive') as writer:
        with bagio.create_bag(tmp_path / 'drive.1') as other:
            (neighbour,) = bagio.staging_dirs(tmp_path / 'drive.1')
            (own,) = bagio.staging_dirs(tmp_path / 'drive')
            assert own != neighbour and bagio.staging_dirs(tmp_path / 'driv') == []
            for bag in (writer, other):
                bagio.add_topic(bag, '/fused')
    assert bagio.staging_dirs(tmp_path / 'drive') == bagio.staging_dirs(tmp_path / 'drive.1') == []


def test_a_killed_writers_partial_bag_goes_with_the_next_bag_of_that_name(
        short_events, params_file, tmp_path):
    # A writer killed mid-bag (no finally runs) left its staging directory, gigabytes on a real
    # bag, for ever; a live writer's must stay however many sweeps run beside it.
    out = tmp_path / 'drive'
    code = ('import os, sys\nfrom s4fusion_ros import bagio\n'
            'with bagio.create_bag(sys.argv[1]) as writer:\n'
            '    bagio.add_topic(writer, "/fused")\n'
            '    os.kill(os.getpid(), 9)\n')
    assert subprocess.run([sys.executable, '-c', code, str(out)]).returncode == -9
    (dead,) = bagio.staging_dirs(out)
    with bagio.create_bag(out) as writer:
        (live,) = bagio.staging_dirs(out)  # the dead one went
        assert live != dead
        assert bagio.sweep_staging(out) == [] and bagio.staging_dirs(out) == [live]
        bagio.add_topic(writer, '/fused')
    assert subprocess.run([sys.executable, '-c', code, str(tmp_path / 'fused')]).returncode == -9
    source = write_bag(tmp_path / 'in', short_events[:20], 'mcap')
    assert bag_tool.main([str(source), str(tmp_path / 'fused'), '--params',
                          str(params_file)]) == 0
    assert sorted(os.listdir(tmp_path)) == ['drive', 'fused', 'in']


def test_a_staging_directory_swept_before_its_writer_held_it_is_replaced(tmp_path, monkeypatch):
    # A sweep of the same name (another writer's) can come between a writer's mkdir and its
    # lock: that directory goes, and the writer must notice and write into a new one, not into
    # one that no longer exists.
    out, swept, flock = tmp_path / 'drive', [], bagio.fcntl.flock

    def sweep_first(folder, operation):
        if operation == bagio.fcntl.LOCK_EX and not swept:  # the writer's own, blocking
            swept.extend(bagio.sweep_staging(out))
        return flock(folder, operation)

    monkeypatch.setattr(bagio.fcntl, 'flock', sweep_first)
    with bagio.create_bag(out) as writer:
        (staging,) = bagio.staging_dirs(out)
        assert len(swept) == 1 and staging != swept[0] and not swept[0].exists()
        bagio.add_topic(writer, '/fused')
    with bagio.open_bag(out) as reader:
        assert [c.topic for c in reader.connections] == ['/fused']


def test_a_bag_named_replaced_is_replaced_and_one_interrupted_leaves_nothing(tmp_path):
    # The staging directory held the new bag under the output's name beside 'replaced', the bag
    # it replaces: a bag named 'replaced' could not be overwritten ('Directory not empty'), and
    # one interrupted was put in place, partial, taken for the bag it was to replace.
    out = tmp_path / 'replaced'
    with pytest.raises(KeyboardInterrupt):
        with bagio.create_bag(out) as writer:
            bagio.add_topic(writer, '/fused')
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    for topic in ('/old', '/new'):
        with bagio.create_bag(out, overwrite=True) as writer:
            bagio.add_topic(writer, topic)
    with bagio.open_bag(out) as reader:
        assert [c.topic for c in reader.connections] == ['/new']
    assert os.listdir(tmp_path) == ['replaced']


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_a_bag_named_in_bytes_that_are_not_utf8_lists_its_files_as_rosbag2_reads_them(
        storage, tmp_path):
    # rosbags names the storage file after the bag's folder, and metadata.yaml listed a Latin-1
    # name such as b'drive_\xe9t\xe9' as Python holds it, "drive_\uDCE9t\uDCE9.mcap": yaml-cpp,
    # with which ros2 bag reads it, refuses a surrogate ('invalid unicode'), so `ros2 bag play`
    # could not open what s4fusion-bag and s4fusion-batch wrote under such a name.
    out = tmp_path / os.fsdecode(b'drive_\xe9t\xe9')
    with bagio.create_bag(out, storage) as writer:
        bagio.add_topic(writer, '/fused')
    info = yaml.safe_load((out / 'metadata.yaml').read_bytes().decode())
    listed = info['rosbag2_bagfile_information']['relative_file_paths']
    assert listed == [file['path'] for file in info['rosbag2_bagfile_information']['files']]
    # Each such byte U+FFFD, as a UTF-8 terminal shows the bag's name; not dropped ('drive_t').
    assert listed == [f'drive_\ufffdt\ufffd.{"db3" if storage == "sqlite3" else "mcap"}']
    for name in listed:  # text rosbag2 reads, naming the file in UTF-8's bytes
        assert not re.search('[\ud800-\udfff]', name), ascii(name)
        assert os.path.isfile(os.fsencode(out) + b'/' + name.encode())
    with bagio.open_bag(out) as reader:
        assert [c.topic for c in reader.connections] == ['/fused']


def test_a_bag_named_in_bytes_that_are_not_utf8_is_written_under_an_ascii_locale(tmp_path):
    # The C locale without UTF-8 mode or its coercion to C.UTF-8: Python's file names are ASCII
    # there, each other byte a surrogate, and a storage file named with U+FFFD failed to open
    # ("'ascii' codec can't encode character").
    out = tmp_path / os.fsdecode(b'drive_\xe9t\xe9')
    code = ('import sys\nfrom s4fusion_ros import bagio\n'
            'with bagio.create_bag(sys.argv[1]) as writer:\n'
            '    bagio.add_topic(writer, "/fused")\n')
    environment = {**os.environ, 'LC_ALL': 'C', 'PYTHONCOERCECLOCALE': '0', 'PYTHONUTF8': '0'}
    done = subprocess.run([sys.executable, '-c', code, out], env=environment,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors='replace')
    with bagio.open_bag(out) as reader:
        assert [c.topic for c in reader.connections] == ['/fused']


def test_a_bag_without_pairs_fails_and_replaces_nothing(short_events, params_file, tmp_path,
                                                        capsys):
    # Visible stamps 10 s after the thermal ones: nothing pairs, so the run fails and, as any
    # failed run, replaces nothing, even with --overwrite.
    events = [(log, topic, stamp + (10 * 10**9 if topic == VISIBLE_TOPIC else 0), *rest)
              for log, topic, stamp, *rest in short_events]
    source = write_bag(tmp_path / 'in', events, 'mcap')
    video = tmp_path / 'fused.mp4'
    video.write_bytes(b'an earlier video')
    assert bag_tool.main([str(source), str(tmp_path / 'out'), '--params', str(params_file),
                          '--export-video', str(video), '--overwrite']) == 1
    error = capsys.readouterr().err
    assert 'fused 0 pairs' in error and 'no pair was fused' in error
    assert video.read_bytes() == b'an earlier video'
    assert not (tmp_path / 'out').exists()


def test_a_pair_whose_inference_fails_is_dropped_and_counted_not_the_run(
        short_events, params_file, tmp_path):
    # One pair's out-of-memory ended the run in a traceback and lost every other pair; the
    # live node drops such a pair and goes on.
    expected = expected_pairs(short_events)
    big_visible, big_thermal = sorted(expected.items())[len(expected) // 2]
    events = [(log_time, topic, stamp, encoding,
               cv2.resize(image, (8000, 4000), interpolation=cv2.INTER_NEAREST)
               if stamp == (big_thermal if topic == THERMAL_TOPIC else big_visible) else image)
              for log_time, topic, stamp, encoding, image in short_events]
    source = write_bag(tmp_path / 'in', events, 'mcap')
    output = tmp_path / 'out'
    # A real allocation failure: 2.4 GiB of address space beyond the libraries', about twice what
    # a run at this size takes; the model's buffers for one 32-megapixel pair need more.
    proc = run_tool(source, output, params_file, preexec_fn=address_space_limit(2400 << 20))
    _, error = proc.communicate(timeout=300)
    assert proc.returncode == 0 and 'Traceback' not in error, error
    assert f'inference failed on the pair stamped {big_visible}, dropped' in error
    assert f'fused {len(expected) - 1} pairs' in error and '; 1 pairs failed in inference' in error
    fused = read_bag(output)['/s4fusion_node/fused']
    stamps = {stamp_to_ns(TYPESTORE.deserialize_cdr(raw, msgtype).header.stamp)
              for _, msgtype, raw in fused}
    assert stamps == set(expected) - {big_visible}
