"""The side-by-side MP4 (s4fusion_ros/video.py): written with OpenCV here and read back."""

import os
import signal

import cv2
import numpy as np
import pytest

from s4fusion_ros import settings
from s4fusion_ros.bagio import create_bag
from s4fusion_ros.engine import pipeline_from_params
from s4fusion_ros.imaging.encodings import decode_visible
from s4fusion_ros.tools import bag as bag_tool
from s4fusion_ros.video import (FPS_RANGE, VIDEO_SUFFIXES, SideBySideVideo, bag_pairs,
                                export_recording, frame_rate, outputs_by_stamp, panel_row)
from support import (SIZE, THERMAL_TOPIC, VISIBLE_TOPIC, camera_messages, file_size_limit,
                     with_thermal_stall, write_bag)

FUSED_TOPIC, SALIENCY_TOPIC = '/s4fusion_node/fused', '/s4fusion_node/saliency'


def test_the_video_reads_back_with_every_panel_where_it_belongs(tmp_path):
    size = (160, 120)
    visible = np.zeros((size[1], size[0], 3), np.uint8)
    visible[:, :, 2] = 200  # red
    thermal = np.full(size[::-1], 0.25, np.float32)  # not mid-gray: 1 - thermal would pass
    fused = np.full((size[1], size[0], 3), 60, np.uint8)
    saliency = np.zeros(size[::-1], np.float32)
    path = tmp_path / 'out' / 'demo.mp4'
    with SideBySideVideo(path, 9.0) as video:
        for index in range(5):
            video.add(panel_row(visible, thermal, fused, saliency, 10**9 + index * 111_111_111))
    capture = cv2.VideoCapture(str(path))
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == 5
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(9.0, abs=0.05)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 5 and frames[0].shape == (size[1], 4 * size[0], 3)
    # Panel centres (away from the titles and the stamp) hold their images, up to the codec.
    centre = (slice(40, 80), slice(40, 120))
    panels = [frames[2][:, i * size[0]:(i + 1) * size[0]][centre].mean(axis=(0, 1))
              for i in range(4)]
    np.testing.assert_allclose(panels[0], [0, 0, 200], atol=12)
    np.testing.assert_allclose(panels[1], [64] * 3, atol=12)
    np.testing.assert_allclose(panels[2], [60] * 3, atol=12)
    np.testing.assert_allclose(panels[3], cv2.applyColorMap(np.zeros((1, 1), np.uint8),
                                                            cv2.COLORMAP_INFERNO)[0, 0], atol=12)


def test_the_frame_rate_stays_where_opencv_writes_video(tmp_path):
    # 9 frames in 1 s are 8 intervals; frames logged at one instant or 25 minutes apart would
    # ask OpenCV's writer for rates it refuses to open with.
    assert frame_rate(9, 1.0) == 8.0 and frame_rate(1, 5.0) == frame_rate(5, 0.0) == 1.0
    assert frame_rate(2, 1e-9) == FPS_RANGE[1] and frame_rate(2, 1500.0) == FPS_RANGE[0]
    for fps in FPS_RANGE:
        video = SideBySideVideo(tmp_path / f'{fps}.mp4', fps)
        with video:
            video.add(np.zeros((32, 64, 3), np.uint8))
        assert (tmp_path / f'{fps}.mp4').stat().st_size > 0


def test_a_wide_row_is_scaled_to_even_sides_within_the_limit(tmp_path):
    row = np.full((481, 4 * 1001, 3), 90, np.uint8)
    path = tmp_path / 'wide.mp4'
    with SideBySideVideo(path, 30.0) as video:
        video.add(row)
    capture = cv2.VideoCapture(str(path))
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    assert width <= 2560 and width % 2 == 0 and height % 2 == 0
    assert capture.read()[0]


def test_the_video_gets_its_name_only_when_complete(tmp_path):
    row = np.full((48, 4 * 64, 3), 90, np.uint8)
    path = tmp_path / 'fused.mp4'
    path.write_bytes(b'an earlier video')
    with pytest.raises(RuntimeError), SideBySideVideo(path, 30.0) as video:
        video.add(row)
        assert path.read_bytes() == b'an earlier video'  # frames go to a hidden file meanwhile
        raise RuntimeError('interrupted')
    assert path.read_bytes() == b'an earlier video'
    # A name that cannot be given (a folder there) fails and leaves no hidden partial file.
    path.unlink()
    path.mkdir()
    with pytest.raises(OSError), SideBySideVideo(path, 30.0) as video:
        video.add(row)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['fused.mp4']
    assert path.is_dir()


@pytest.mark.parametrize('suffix', VIDEO_SUFFIXES)
def test_a_video_the_disk_cut_short_is_an_error_not_a_file(tmp_path, suffix):
    # OpenCV's writer drops the writes a full disk refuses without a word: the video, without
    # the index at its end, got its name and s4fusion-bag said it wrote every frame (exit 0).
    path = tmp_path / f'fused{suffix}'
    path.write_bytes(b'an earlier video')
    noise = np.random.default_rng(0).integers(0, 255, (120, 4 * 160, 3), np.uint8)
    # A real write failure: files may not grow past 64 KiB (EFBIG, as ENOSPC on a full disk).
    with file_size_limit(1 << 16), pytest.raises(
            OSError, match=f'{path}: the video file was cut short: its frame 10 does not read '
            'back'):
        with SideBySideVideo(path, 9.0) as video:
            for _ in range(10):
                video.add(noise)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert path.read_bytes() == b'an earlier video'


class StoppedAsItFinishes:
    """A video writer that gets Ctrl-C while it finishes the file (s4fusion-bag's last step)."""

    def __init__(self, writer):
        self.writer = writer

    def release(self):
        self.writer.release()
        os.kill(os.getpid(), signal.SIGINT)  # handled as release returns, as one during it


def test_a_stop_while_the_video_is_finished_leaves_no_hidden_partial_file(tmp_path):
    path = tmp_path / 'fused.mp4'
    path.write_bytes(b'an earlier video')
    with pytest.raises(KeyboardInterrupt), SideBySideVideo(path, 30.0) as video:
        video.add(np.full((48, 4 * 64, 3), 90, np.uint8))
        video._writer = StoppedAsItFinishes(video._writer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['fused.mp4']
    assert path.read_bytes() == b'an earlier video'


def test_a_recording_without_fused_frames_leaves_no_earlier_video(ivif_dir, tmp_path):
    # The demo reuses its output folder: an earlier run's video must not pass for this one's.
    source = write_bag(tmp_path / 'in', camera_messages(ivif_dir, 0.5), 'mcap')
    with create_bag(tmp_path / 'fused_bag', 'mcap'):
        pass  # the node fused nothing this time
    video = tmp_path / 'fused.mp4'
    video.write_bytes(b'an earlier video')
    assert export_recording(source, THERMAL_TOPIC, VISIBLE_TOPIC,
                            pipeline_from_params(settings.defaults()), tmp_path / 'fused_bag',
                            FUSED_TOPIC, SALIENCY_TOPIC, video) == 0
    assert not video.exists()


def test_the_video_of_a_recording_shows_each_fused_pair_in_order_at_its_rate(ivif_dir, tmp_path):
    # A thermal stall: the held frames' visible partners expired before they came, so the video
    # rebuilds s4fusion-bag's pairs only by deciding them at each message's log time as it does;
    # the recording ends with a thermal frame, whose pair only the end of the bag decides.
    events = with_thermal_stall(camera_messages(ivif_dir, 2.0))
    last_thermal = max(i for i, event in enumerate(events) if event[1] == THERMAL_TOPIC)
    source = write_bag(tmp_path / 'in', events[:last_thermal + 1], 'mcap')
    fused_bag = tmp_path / 'fused_bag'
    assert bag_tool.main([str(source), str(fused_bag)]) == 0
    fused, saliency, stamps = outputs_by_stamp(fused_bag, FUSED_TOPIC, SALIENCY_TOPIC)
    assert stamps == sorted(fused) == sorted(saliency)
    pipeline = pipeline_from_params(settings.defaults())
    assert [pair.visible_stamp_ns for pair in bag_pairs(source, THERMAL_TOPIC, VISIBLE_TOPIC,
                                                        pipeline)] == stamps
    video = tmp_path / 'fused.mp4'
    assert export_recording(source, THERMAL_TOPIC, VISIBLE_TOPIC,
                            pipeline_from_params(settings.defaults()), fused_bag, FUSED_TOPIC,
                            SALIENCY_TOPIC, video) == len(stamps) == 10
    capture = cv2.VideoCapture(str(video))
    span = (stamps[-1] - stamps[0]) / 1e9
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx((len(stamps) - 1) / span, rel=0.01)
    # Frame by frame, in stamp order, the fused panel (between its title and the stamp) is that
    # pair's fused image, up to the codec; the scene changes twice in the recording.
    width, height = SIZE
    rows = slice(25, height - 25)
    for stamp in stamps:
        ok, frame = capture.read()
        panel = frame[rows, 2 * width:3 * width].astype(int)
        assert ok and np.abs(panel - decode_visible(fused[stamp])[rows]).mean() < 6
    assert not capture.read()[0]


def test_the_video_skips_inputs_cut_short_or_unusable_as_s4fusion_bag_does(ivif_dir, tmp_path):
    events = camera_messages(ivif_dir, 0.5)
    cut, unusable = [i for i, event in enumerate(events) if event[1] == THERMAL_TOPIC][1:3]
    # A float thermal frame of NaN only: decoded, then refused (ImageDecodeError, a ValueError).
    log_time, topic, stamp, _, image = events[unusable]
    nan = (log_time, topic, stamp, '32FC1', np.full(image.shape, np.nan, np.float32))
    damaged = write_bag(tmp_path / 'cut', events[:unusable] + [nan] + events[unusable + 1:],
                        'mcap', cut_short={events[cut][0]})
    kept = [event for i, event in enumerate(events) if i not in (cut, unusable)]
    without = write_bag(tmp_path / 'without', kept, 'mcap')
    stamps = [[pair.visible_stamp_ns for pair in bag_pairs(
        source, THERMAL_TOPIC, VISIBLE_TOPIC, pipeline_from_params(settings.defaults()))]
        for source in (damaged, without)]
    assert stamps[0] == stamps[1] and len(stamps[0]) >= 3


def test_titles_stay_legible_on_a_camera_wider_than_the_video(tmp_path):
    # Four 1920x1080 panels are scaled to MAX_WIDTH: titles drawn before that were 3 pixels tall.
    black = np.zeros((1080, 1920, 3), np.uint8)
    path = tmp_path / 'hd.mp4'
    with SideBySideVideo(path, 9.0) as video:
        video.add(panel_row(black, black[..., 0], black, black[..., 0], 10**9))
    ok, frame = cv2.VideoCapture(str(path)).read()
    assert ok and frame.shape[1] == 2560
    title_rows = np.flatnonzero(frame[:40, :frame.shape[1] // 4].max(axis=(1, 2)) > 128)
    assert title_rows.max() - title_rows.min() >= 9  # as tall as at 640x480, 1:1
