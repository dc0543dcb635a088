"""The side-by-side MP4 (s4fusion_ros/video.py): written with OpenCV here and read back."""

import cv2
import numpy as np
import pytest

from s4fusion_ros import settings
from s4fusion_ros.bagio import create_bag
from s4fusion_ros.engine import pipeline_from_params
from s4fusion_ros.video import (FPS_RANGE, SideBySideVideo, bag_pairs, export_recording,
                                frame_rate, panel_row)
from support import THERMAL_TOPIC, VISIBLE_TOPIC, camera_messages, write_bag


def test_the_video_reads_back_with_every_panel_where_it_belongs(tmp_path):
    size = (160, 120)
    visible = np.zeros((size[1], size[0], 3), np.uint8)
    visible[:, :, 2] = 200  # red
    thermal = np.full(size[::-1], 0.5, np.float32)
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
    np.testing.assert_allclose(panels[1], [128] * 3, atol=12)
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


def test_a_recording_without_fused_frames_leaves_no_earlier_video(ivif_dir, tmp_path):
    # The demo reuses its output folder: an earlier run's video must not pass for this one's.
    source = write_bag(tmp_path / 'in', camera_messages(ivif_dir, 0.5), 'mcap')
    with create_bag(tmp_path / 'fused_bag', 'mcap'):
        pass  # the node fused nothing this time
    video = tmp_path / 'fused.mp4'
    video.write_bytes(b'an earlier video')
    assert export_recording(source, THERMAL_TOPIC, VISIBLE_TOPIC,
                            pipeline_from_params(settings.defaults()), tmp_path / 'fused_bag',
                            '/s4fusion_node/fused', '/s4fusion_node/saliency', video) == 0
    assert not video.exists()


def test_the_video_skips_an_input_message_cut_short_as_s4fusion_bag_does(ivif_dir, tmp_path):
    events = camera_messages(ivif_dir, 0.5)
    cut = [i for i, event in enumerate(events) if event[1] == THERMAL_TOPIC][1]
    damaged = write_bag(tmp_path / 'cut', events, 'mcap', cut_short={events[cut][0]})
    without = write_bag(tmp_path / 'without', events[:cut] + events[cut + 1:], 'mcap')
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
