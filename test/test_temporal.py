"""Flicker measure (evaluation/temporal.py): synthetic sequences, real M3SVD clips, the report."""

import cv2
import numpy as np
import pytest

from s4fusion_ros.evaluation import baselines, temporal
from s4fusion_ros.model import shipped_weights
from s4fusion_ros.tools import evaluate


def scene(rng, frames, noise=0.0, size=(48, 64)):
    """A still textured scene: (thermal, visible) frames with independent sensor noise."""
    thermal, visible = rng.uniform(0.2, 0.8, size), rng.uniform(0.2, 0.8, size)
    return [(np.clip(thermal + rng.normal(0, noise, size), 0, 1),
             np.clip(visible + rng.normal(0, noise, size), 0, 1)) for _ in range(frames)]


def test_a_still_scene_fused_steadily_does_not_flicker():
    frames = scene(np.random.default_rng(1), 10)
    score = temporal.flicker((ir, vi, baselines.fuse_average(ir, vi)) for ir, vi in frames)
    assert score.flicker == 0.0 and score.fused_change == 0.0
    assert score.static_fraction == 1.0


def test_a_flashing_fusion_of_a_still_scene_flickers():
    frames = scene(np.random.default_rng(2), 10, noise=1 / 255)
    steady = temporal.flicker((ir, vi, (ir + vi) / 2) for ir, vi in frames)
    flashing = temporal.flicker((ir, vi, np.clip((ir + vi) / 2 + (0.1 if i % 2 else -0.1), 0, 1))
                                for i, (ir, vi) in enumerate(frames))
    assert 0.3 < steady.flicker < 1.0  # averaging halves independent noise
    assert flashing.flicker > 10.0
    assert flashing.fused_change == pytest.approx(0.2 * 255, rel=0.01)


def test_moving_objects_are_left_out_and_max_never_exceeds_one():
    still = scene(np.random.default_rng(3), 8, noise=1 / 255)
    walking = []
    for t, (ir, vi) in enumerate(still):
        ir = ir.copy()
        ir[10:20, 4 * t:4 * t + 10] = 1.0  # a warm object walking through
        walking.append((ir, vi))
    calm, moving = (temporal.flicker((ir, vi, baselines.fuse_max(ir, vi)) for ir, vi in frames)
                    for frames in (still, walking))
    assert moving.static_fraction < 0.95  # the walker's path is not static
    assert moving.flicker <= 1.0
    # Gray levels: the walker (a change of up to 200 levels) is not counted.
    assert moving.fused_change == pytest.approx(calm.fused_change, abs=0.3)


def test_texture_that_pans_is_moving_not_static():
    # A camera panning 1 px a frame over texture: the signed change averages out under the
    # smoothing, yet every textured pixel changes by several gray levels.
    rng = np.random.default_rng(6)
    texture = rng.normal(0.5, 15 / 255, (48, 96))
    frames = [(texture[:, t:t + 64], texture[:, t:t + 64]) for t in range(10)]
    score = temporal.flicker((ir, vi, vi) for ir, vi in frames)
    assert score.static_fraction < 0.05


def test_sensor_noise_is_static_and_a_lighting_change_in_either_source_is_not():
    # White noise up to about 4 gray levels stays static (a noisy camera is not a moving one).
    noisy = scene(np.random.default_rng(7), 10, noise=4 / 255)
    assert temporal.flicker((ir, vi, (ir + vi) / 2) for ir, vi in noisy).static_fraction > 0.95
    # A whole source brightening or darkening by 4 gray levels a frame (auto exposure, the
    # sun behind a cloud) is no still scene; by 2, under STATIC_LEVEL, it is.
    still = scene(np.random.default_rng(8), 6)
    for step, static in ((4, 0.0), (-4, 0.0), (2, 1.0), (-2, 1.0)):
        for source in ('thermal', 'visible'):
            change = [t * step / 255 for t in range(len(still))]
            frames = [(ir + (source == 'thermal') * dv, vi + (source == 'visible') * dv)
                      for dv, (ir, vi) in zip(change, still)]
            score = temporal.flicker((ir, vi, (ir + vi) / 2) for ir, vi in frames)
            assert score.static_fraction == static, (step, source)


def test_a_sequence_too_short_or_of_changing_size_is_reported():
    meter = temporal.FlickerMeter()
    image = np.zeros((8, 8), np.float32)
    meter.add(image, image, image)
    assert np.isnan(meter.result().flicker)
    resized = np.zeros((9, 8), np.float32)
    for _ in range(2):  # a refused frame is not the next one's previous
        with pytest.raises(ValueError, match='frame size changed'):
            meter.add(resized, resized, resized)
    with pytest.raises(ValueError):
        meter.add(image, image, np.zeros((8, 9)))
    meter.add(image, image, image)
    assert meter.result().flicker == 0.0
    with pytest.raises(ValueError, match='three'):  # of another shape from the first frame on
        temporal.FlickerMeter().add(image, image, np.zeros((8, 9)))


def test_the_section_is_replaced_in_place_and_appended_when_missing():
    section = f'{temporal.SECTION_BEGIN} x -->\nold\n{temporal.SECTION_END}'
    report = '# Fusion quality\n\nbody\n'
    appended = temporal.replace_section(report, section)
    assert appended.startswith(report) and temporal.section_of(appended) == section
    new = section.replace('old', 'new')
    replaced = temporal.replace_section(appended + '\nreading\n', new)
    assert temporal.section_of(replaced) == new and 'old' not in replaced
    assert replaced.endswith('\nreading\n')


def test_the_section_takes_text_as_it_is_and_averages_the_clips_that_have_a_flicker():
    # A Windows path in the command or a note is text, not a regular expression's escapes; a
    # clip without static pixels is 'n/a' and left out of the mean.
    scores = {'drive': {'Average': temporal.Flicker(0.5, 1.0, 2.0, 0.9)},
              'pan': {'Average': temporal.Flicker(float('nan'), float('nan'), float('nan'), 0.0)},
              'walk': {'Average': temporal.Flicker(0.25, 0.5, 2.0, 0.8)}}
    section = temporal.render_section(scores, 3, r's4fusion-eval --flicker C:\videos\1', [])
    assert '| pan | n/a |' in section and '| **mean** | **0.375** |' in section
    assert 'drive 90%, pan 0%, walk 80%' in section
    report = temporal.replace_section('# Fusion quality\n', section)
    assert temporal.section_of(temporal.replace_section(report, section)) == section
    assert r'`s4fusion-eval --flicker C:\videos\1`' in section


def test_clips_are_those_with_both_videos(tmp_path):
    for side, clips in (('ir', ('both', 'ir_only')), ('vi', ('both', 'vi_only'))):
        (tmp_path / side).mkdir()
        for clip in clips:
            (tmp_path / side / f'{clip}.mp4').touch()
    assert temporal.clip_names(tmp_path) == ['both']
    (tmp_path / 'vi' / 'both.mp4').unlink()
    with pytest.raises(OSError, match='no clip with both'):
        temporal.clip_names(tmp_path)


@pytest.fixture(scope='module')
def video_dir(ivif_dir):
    path = ivif_dir / 'm3svd' / 'videos'
    if not (path / 'ir').is_dir():
        pytest.skip(f'M3SVD videos not found at {path}')
    return path


def test_clips_run_through_the_node_pipeline(video_dir):
    clip = temporal.clip_names(video_dir)[0]
    pairs = temporal.prepared_pairs(video_dir, clip, 4)
    assert len(pairs) == 4  # every frame paired, none rejected for its stamp
    step = pairs[1].visible_stamp_ns - pairs[0].visible_stamp_ns
    assert step == pytest.approx(1e9 / 30, abs=1e6)
    engines = {'average': temporal.BaselineEngine(baselines.fuse_average)}
    score = temporal.measure_clips(video_dir, [clip], 4, engines)[clip]['average']
    assert 0.0 < score.flicker <= 1.0 and score.static_fraction > 0.5


def test_a_baseline_runs_at_a_reduced_inference_size_as_the_model_does():
    # The engine restores the detail lost above a reduced size with the model's gain; a
    # baseline, which has no model, restores it as it is.
    from s4fusion_ros.engine import FusionSettings
    rng = np.random.default_rng(3)
    thermal = rng.uniform(0, 1, (48, 64)).astype(np.float32)
    visible = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    engine = temporal.BaselineEngine(baselines.fuse_average, FusionSettings(
        inference_size=(32, 24)))
    result = engine.fuse_images((thermal * 255).astype(np.uint8), visible)
    assert result.fused.shape == (48, 64, 3)


def test_eval_writes_only_the_flicker_section(video_dir, tmp_path):
    out = tmp_path / 'quality.md'
    out.write_text('# Fusion quality\n\nkept\n')
    argv = ['--flicker', str(video_dir), '--flicker-frames', '3', '--methods', 'average,max',
            '--out', str(out)]
    assert evaluate.main(argv) == 0
    text = out.read_text()
    assert text.startswith('# Fusion quality\n\nkept\n')
    section = temporal.section_of(text)
    assert '| clip | Average | Max |' in section and str(video_dir) not in section
    assert '(flicker on M3SVD video)' in section and 'the M3SVD test videos' in section
    for clip in temporal.clip_names(video_dir):
        assert f'| {clip} |' in section
    # Videos of one's own are not given M3SVD's name and origin.
    own = tmp_path / 'own'
    for side in ('ir', 'vi'):
        (own / side).mkdir(parents=True)
        (own / side / 'my_drive.mp4').symlink_to(next((video_dir / side).glob('*.mp4')))
    assert evaluate.main(['--flicker', str(own), *argv[2:]]) == 0
    section = temporal.section_of(out.read_text())
    assert '(flicker on video)' in section and 'M3SVD' not in section
    assert f'VIDEO_DIR: `{own}`; clips: my_drive.' in section


def test_clips_shorter_than_the_frames_asked_for_are_refused(video_dir, tmp_path, capsys):
    # A clip that ended early was measured on the frames it had, in a section saying that its
    # flicker was that of the first --flicker-frames.
    own = tmp_path / 'own'
    clip = temporal.clip_names(video_dir)[0]
    for side, frames in (('ir', 4), ('vi', 6)):  # the shorter video sets the clip's length
        (own / side).mkdir(parents=True)
        (own / side / 'long.mp4').symlink_to(video_dir / side / f'{clip}.mp4')
        capture = cv2.VideoCapture(str(video_dir / side / f'{clip}.mp4'))
        images = [capture.read()[1] for _ in range(frames)]
        capture.release()
        writer = cv2.VideoWriter(str(own / side / 'short.mp4'), cv2.VideoWriter_fourcc(*'mp4v'),
                                 30, images[0].shape[1::-1])
        for image in images:
            writer.write(image)
        writer.release()
    out = tmp_path / 'quality.md'
    argv = ['--flicker', str(own), '--methods', 'average', '--out', str(out)]
    assert evaluate.main([*argv, '--flicker-frames', '5']) == 1
    assert (f'--flicker-frames 5: {own} has clips of fewer frames (those both their videos '
            'have): short 4; ') in capsys.readouterr().err
    assert not out.exists()
    assert evaluate.main([*argv, '--flicker-frames', '4']) == 0
    assert '| short |' in temporal.section_of(out.read_text())


def test_a_full_report_run_keeps_the_flicker_section(ivif_dir, tmp_path):
    out = tmp_path / 'quality.md'
    section = f'{temporal.SECTION_BEGIN} -->\n## Temporal stability\n{temporal.SECTION_END}'
    out.write_text(f'\n\n{section}\n')  # as --flicker writes it to a new --out
    assert evaluate.main(['--data', str(ivif_dir), '--datasets', 'tno42', '--limit', '1',
                          '--methods', 'average', '--out', str(out),
                          '--grid', str(tmp_path / 'grid.png')]) == 0
    text = out.read_text()
    assert text.startswith('# Fusion quality')
    assert temporal.section_of(text) == section
    # A report of this version: what is below its reading marker stays, the reading included.
    kept = f'\n\n{section}\n\nthe maintainers\' reading\n'
    out.write_text(text.replace(section, '').rstrip('\n') + kept)
    assert evaluate.main(['--data', str(ivif_dir), '--datasets', 'tno42', '--limit', '1',
                          '--methods', 'average,max', '--out', str(out),
                          '--grid', str(tmp_path / 'grid.png')]) == 0
    again = out.read_text()
    assert '| Max |' in again and again.count(section) == 1
    assert again.endswith(f'-->{kept}')


def test_measured_frames_count_as_trained_by_clip_and_frame_whatever_their_folder(video_dir):
    # The shipped compact weights trained on every 10th frame of the test videos and on the
    # still frames 0, 2, ..., 18 of M3SVD's frame clip 0111_1716, the same recording.
    compact = evaluate.OursConfig('compact', shipped_weights('compact'))
    clips = temporal.clip_names(video_dir)
    frames = [f'{clip}_{index:04d}' for clip in clips for index in range(20)]
    note = evaluate.training_overlap(compact, frames, 'frames', evaluate.frame_of_clip)
    assert '0111_1716' in clips and len(clips) == 5
    assert note.startswith(f'compact: {10 + 2 * 4} of the 100 frames are among its 401 training')
    assert '0111_1716_0002' in note  # a still frame's number, not a video's every 10th
    # By clip, every measured clip trained: each video's every 10th frame is a training pair.
    note = evaluate.training_overlap(compact, clips, 'clips', evaluate.clip_of_frame,
                                     'have frames among')
    assert note.startswith('compact: 5 of the 5 clips have frames among its 401 training')


def test_eval_counts_the_measured_frames_and_clips_the_weights_trained_on(video_dir, tmp_path):
    # The notes of a --flicker run, for the shipped compact weights (every 10th frame of the
    # test videos and the still frames 0, 2, ... of 0111_1716): of frames 0-2 of the 5 clips,
    # frame 0 of each and 0111_1716's frame 2. Base alone runs the weights' base, not the network.
    out = tmp_path / 'quality.md'
    compact = shipped_weights('compact')
    assert evaluate.main(['--flicker', str(video_dir), '--flicker-frames', '3', '--methods',
                          'base', '--weights', str(compact), '--out', str(out)]) == 0
    section = ' '.join(temporal.section_of(out.read_text()).split())
    label = 'S4Fusion (weights/s4fusion_compact)'
    assert f"| clip | Laplacian pyramid 1.1/1.4 ({label}'s base) |" in section
    assert (f'{label}: 6 of the 15 measured frames (as video or still frames, by clip and frame '
            'number) are among its 401 training pairs (0111_1716_0000, 0111_1716_0002, '
            '0113_1714_0000, 0117_1605_0000, 0117_1620_0000, ...).') in section
    assert (f'{label}: 5 of the 5 measured clips have frames (near duplicates of the others) '
            'among its 401 training pairs') in section
