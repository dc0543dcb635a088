"""The ROS-free fusion path: pipeline (decode, pair, normalize, register) and engine outputs."""

import shutil
import time

import cv2
import numpy as np
import pytest
import torch

from s4fusion_ros import settings
from s4fusion_ros.engine import (SIZES_KEEP_CHANGING, SIZES_NAMED, FusionEngine,
                                 FusionPipeline, FusionSettings, PreparedPair, compose_output,
                                 fusion_settings, model_input_size, pipeline_from_params,
                                 restore_detail)
from s4fusion_ros.imaging.color import bgr_to_gray, bgr_to_ycrcb, to_uint8
from s4fusion_ros.imaging.encodings import (ImageDecodeError, RawCompressedImage, RawImage,
                                            encode_image, image_to_array)
from s4fusion_ros.imaging.normalization import ThermalNormalizer
from s4fusion_ros.imaging.registration import ThermalRegistration
from s4fusion_ros.model import shipped_weights
from s4fusion_ros.runtime import (DeviceError, default_preset, load_fusion_model,
                                  resolve_device)
from s4fusion_ros.sync import ArrivalClock, PairSynchronizer

MS = 1_000_000


def make_pipeline():
    return FusionPipeline(PairSynchronizer(slop=0.02, queue_size=10), ThermalNormalizer(),
                          ThermalRegistration())


@pytest.fixture(scope='module')
def loaded():
    return load_fusion_model(device='cpu')


def test_pipeline_pairs_decodes_and_normalizes_real_images(msrs_pair):
    ir, vi = msrs_pair
    counts = (20000 + 30 * ir.astype(np.float64)).astype(np.uint16)
    pipeline = make_pipeline()
    assert pipeline.add_thermal(encode_image(counts, 'mono16'), 1000 * MS, 'ir') == []
    [pair] = pipeline.add_visible(encode_image(vi, 'bgr8'), 1005 * MS, 'rgb')
    assert (pair.thermal_stamp_ns, pair.visible_stamp_ns, pair.frame_id) == (1000 * MS,
                                                                             1005 * MS, 'rgb')
    assert pair.thermal.dtype == np.float32 and pair.thermal.shape == ir.shape
    assert 0.0 <= pair.thermal.min() and pair.thermal.max() <= 1.0
    # Between the clipping percentiles, normalizing counts is a linear map of the 8-bit image.
    inside = (pair.thermal > 0.0) & (pair.thermal < 1.0)
    assert inside.mean() > 0.9
    assert np.corrcoef(pair.thermal[inside], ir[inside])[0, 1] > 0.999
    np.testing.assert_array_equal(pair.visible_bgr, vi)


def test_bad_message_is_refused_before_it_takes_a_partner(msrs_pair):
    ir, vi = msrs_pair
    pipeline = make_pipeline()
    good = encode_image(ir, 'mono8')
    truncated = type(good)(good.height, good.width, good.encoding, good.step, False,
                           bytes(good.data)[:-1])
    with pytest.raises(ImageDecodeError):
        pipeline.add_thermal(truncated, 1000 * MS, 'ir')
    assert pipeline.synchronizer.stats.thermal_received == 0
    assert pipeline.add_thermal(good, 1001 * MS, 'ir') == []
    assert len(pipeline.add_visible(encode_image(vi, 'bgr8'), 1002 * MS, 'rgb')) == 1


def test_size_mismatch_is_resized_with_a_single_notice(msrs_pair):
    ir, vi = msrs_pair
    small_ir = cv2.resize(ir, (320, 240), interpolation=cv2.INTER_AREA)
    pipeline = make_pipeline()
    pairs = []
    for k in range(3):
        pipeline.add_thermal(encode_image(small_ir, 'mono8'), (1000 + 100 * k) * MS, 'ir')
        pairs += pipeline.add_visible(encode_image(vi, 'bgr8'), (1001 + 100 * k) * MS, 'rgb')
    assert len(pairs) == 3 and all(p.thermal.shape == (480, 640) for p in pairs)
    assert pipeline.notices == [
        'thermal and visible images differ in size (thermal 320x240, visible 640x480) and '
        'registration.homography is the identity: the thermal image is resized to the visible '
        'geometry; set a homography to register them']
    # Another aspect ratio is stretched, and said so; each size it comes in is named once.
    wide_ir = cv2.resize(ir, (320, 120), interpolation=cv2.INTER_AREA)
    for k in range(3, 5):
        pipeline.add_thermal(encode_image(wide_ir, 'mono8'), (1000 + 100 * k) * MS, 'ir')
        pipeline.add_visible(encode_image(vi, 'bgr8'), (1001 + 100 * k) * MS, 'rgb')
    assert len(pipeline.notices) == 2
    assert ('(thermal 320x120, visible 640x480, another aspect ratio: stretched)'
            in pipeline.notices[1])


def test_a_camera_changing_size_under_a_homography_is_named_as_misregistered(msrs_pair):
    # A thermal camera calibrated at 320x240 (the homography doubles its pixels) switched to
    # 640x480: the hot spots moved to the wrong place in the fused image, without a word.
    ir, vi = msrs_pair
    pipeline = FusionPipeline(PairSynchronizer(slop=0.02, queue_size=10), ThermalNormalizer(),
                              ThermalRegistration([2, 0, 0, 0, 2, 0, 0, 0, 1]))
    for k, size in enumerate([(320, 240)] * 2 + [(640, 480)] * 2):
        small = cv2.resize(ir, size, interpolation=cv2.INTER_AREA)
        pipeline.add_thermal(encode_image(small, 'mono8'), (1000 + 100 * k) * MS, 'ir')
        pipeline.add_visible(encode_image(vi, 'bgr8'), (1001 + 100 * k) * MS, 'rgb')
    assert pipeline.notices == [
        'the cameras changed image size (thermal 320x240, visible 640x480; now thermal '
        '640x480, visible 640x480), but registration.homography maps the pixels of the sizes '
        'it was found for: the thermal image is misregistered until it is set for these']


def test_cameras_changing_size_together_without_a_homography_are_not_misregistered(msrs_pair):
    # The identity maps any size to its own: nothing is misregistered, nothing to say.
    ir, vi = msrs_pair
    pipeline = make_pipeline()
    for k, size in enumerate([(320, 240), (640, 480)]):
        pipeline.add_thermal(encode_image(cv2.resize(ir, size), 'mono8'), (1000 + 100 * k) * MS,
                             'ir')
        pipeline.add_visible(encode_image(cv2.resize(vi, size), 'bgr8'), (1001 + 100 * k) * MS,
                             'rgb')
    assert pipeline.synchronizer.stats.pairs == 2 and pipeline.notices == []


def test_colour_on_the_thermal_topic_is_noticed_once(msrs_pair):
    ir, vi = msrs_pair
    pipeline = make_pipeline()
    for k in range(2):
        pipeline.add_thermal(encode_image(cv2.cvtColor(ir, cv2.COLOR_GRAY2BGR), 'bgr8'),
                             (1000 + 100 * k) * MS, 'ir')
    assert [notice.split(':')[0] for notice in pipeline.notices] == [
        'a colour image arrived on the thermal topic']


@pytest.mark.parametrize('homography', [[1, 0, 0, 0, 1, 0, 0, 0, 1],
                                        [2, 0, 0, 0, 2, 0, 0, 0, 1]])
def test_cameras_changing_size_with_every_frame_are_named_a_bounded_number_of_times(homography):
    # A driver whose frames came at another size each time: the node logged a size notice per
    # frame, without rate limit, and the pipeline kept every text (a list that grew without
    # bound, searched at each pair).
    pipeline = FusionPipeline(PairSynchronizer(slop=0.02, queue_size=10), ThermalNormalizer(),
                              ThermalRegistration(homography))
    rng = np.random.default_rng(3)
    for k in range(40):
        thermal = rng.integers(0, 255, (int(rng.integers(2, 60)), int(rng.integers(2, 80))))
        visible = rng.integers(0, 255, (int(rng.integers(2, 60)), int(rng.integers(2, 80)), 3))
        pipeline.add_thermal(encode_image(thermal.astype(np.uint8), 'mono8'), (1000 + k) * MS,
                             'ir')
        assert len(pipeline.add_visible(encode_image(visible.astype(np.uint8), 'bgr8'),
                                        (1000 + k) * MS, 'rgb')) == 1
    assert len(pipeline.notices) == SIZES_NAMED + 1, pipeline.notices
    assert pipeline.notices[-1] == SIZES_KEEP_CHANGING
    assert all('thermal ' in notice for notice in pipeline.notices[:-1])


def test_a_corrupt_32fc1_thermal_frame_is_held_out_of_the_window_with_one_notice(msrs_pair):
    ir, vi = msrs_pair
    celsius = 15.0 + ir.astype(np.float32) / 10.0
    garbage = np.random.default_rng(1).uniform(-7e36, 7e36, ir.shape).astype(np.float32)
    pipeline = make_pipeline()
    frames = [celsius, celsius, garbage, garbage, celsius, celsius]
    pairs = []
    for k, frame in enumerate(frames):
        pipeline.add_thermal(encode_image(frame, '32FC1'), (1000 + 100 * k) * MS, 'ir')
        pairs += pipeline.add_visible(encode_image(vi, 'bgr8'), (1001 + 100 * k) * MS, 'rgb')
    assert len(pairs) == len(frames)
    # The frames after keep the scene's contrast, as the frames before had it.
    np.testing.assert_array_equal(pairs[-1].thermal, pairs[0].thermal)
    assert pipeline.normalizer.outliers == 2
    assert len(pipeline.notices) == 1, pipeline.notices
    assert pipeline.notices[0].startswith("a thermal frame's values lay far outside")
    assert 'thermal frames outside the window (scaled by it)' in pipeline.notices[0]


def test_the_stamp_skew_compares_middleware_receipts_where_given(msrs_pair):
    # Live, the callback runs as late as the executor is behind, one topic's more than the
    # other's: the node's own lag read as the cameras' clocks differing by 0.36 s.
    ir, vi = msrs_pair
    pipeline = make_pipeline()
    for k in range(5):
        stamp = (1000 + 100 * k) * MS
        pipeline.add_thermal(encode_image(ir, 'mono8'), stamp, 'ir', arrived=stamp / 1e9 + 0.4,
                             received=stamp / 1e9 + 0.01)
        pipeline.add_visible(encode_image(vi, 'bgr8'), stamp, 'rgb', arrived=stamp / 1e9 + 0.04,
                             received=stamp / 1e9 + 0.01)
    assert pipeline.stamp_skew.seconds() == pytest.approx(0.0, abs=1e-9)
    unreceived = make_pipeline()  # offline: the log time is the receipt
    for k in range(5):
        stamp = (1000 + 100 * k) * MS
        unreceived.add_thermal(encode_image(ir, 'mono8'), stamp, 'ir', arrived=stamp / 1e9 + 0.4)
        unreceived.add_visible(encode_image(vi, 'bgr8'), stamp, 'rgb', arrived=stamp / 1e9 + 0.04)
    assert unreceived.stamp_skew.seconds() == pytest.approx(-0.36)


def test_thermal_stamps_far_ahead_overflow_the_queue_and_the_clock_hint_says_why(msrs_pair):
    # A thermal camera at 10 Hz stamping 3 s ahead of a 20 Hz visible one (queue_size 10): its
    # frames wait for the stamps' clock and overflow the queue, none unpaired, and the node's
    # clock hint, given only for unpaired thermal frames, said nothing of the stall.
    from s4fusion_ros.diagnostics import Key, clock_skew_hint, thermal_frames_lost
    ir, vi = msrs_pair
    thermal, visible = encode_image(ir, 'mono8'), encode_image(vi, 'bgr8')
    pipeline = make_pipeline()
    sync = pipeline.synchronizer
    for tick in range(200):  # 10 s, in steps of 50 ms
        now = 1000 + tick / 20
        pipeline.expire(now)
        if tick % 2 == 0:
            pipeline.add_thermal(thermal, round((now + 3) * 1e9), 'ir', arrived=now)
        pipeline.add_visible(visible, round(now * 1e9), 'rgb', arrived=now)
    stats = sync.stats
    grown = {Key.THERMAL_UNPAIRED: stats.thermal_unpaired,
             Key.THERMAL_OVERFLOW: stats.thermal_overflow}
    assert stats.pairs == 0 and stats.thermal_unpaired == 0 and stats.thermal_overflow == 90
    assert thermal_frames_lost(grown)
    assert clock_skew_hint(pipeline.stamp_skew.seconds(), sync.slop, 0.0, sync.timeout).startswith(
        'thermal stamps run 3.000 s ahead of visible ones')


def _burst_delivered_visible(pipeline, thermal, visible):
    """10 s of a 10 Hz thermal camera delivered on time and a 20 Hz visible one whose frames
    the middleware holds and delivers in one burst a second."""
    held = []
    for tick in range(200):  # steps of 50 ms
        now = 1000 + tick / 20
        pipeline.expire(now)
        held.append(round(now * 1e9))
        if tick % 20 == 19:
            for stamp in held:
                pipeline.add_visible(visible, stamp, 'rgb', arrived=now)
            held.clear()
        if tick % 2 == 0:
            pipeline.add_thermal(thermal, round(now * 1e9), 'ir', arrived=now)
    pipeline.flush()
    return pipeline.synchronizer.stats


def test_an_input_delivered_in_bursts_is_named_with_the_timeout_that_waits_for_it(msrs_pair):
    # In a soak test the middleware came to deliver one camera's images in bursts, up to 2 s
    # late: most thermal frames went unpaired, past sync.timeout, and the node's only hint, a
    # clock offset read from the stamps' medians (which the bursts move), paired the wrong frames.
    from s4fusion_ros.diagnostics import clock_skew_hint, unpaired_hint
    ir, vi = msrs_pair
    thermal, visible = encode_image(ir, 'mono8'), encode_image(vi, 'bgr8')
    slop = 0.02

    def run(timeout):
        pipeline = FusionPipeline(PairSynchronizer(slop=slop, queue_size=30, timeout=timeout),
                                  ThermalNormalizer(), ThermalRegistration())
        return pipeline, _burst_delivered_visible(pipeline, thermal, visible)

    pipeline, stats = run(0.5)
    assert stats.thermal_unpaired > 40 and stats.pairs < 60, stats
    skew = pipeline.stamp_skew
    offset = clock_skew_hint(skew.seconds(), slop, 0.0, 0.5)
    assert 'sync.thermal_offset -0.350 pairs them' in offset
    delivery = skew.delivery()
    assert delivery['thermal'].spread == pytest.approx(0.0, abs=1e-6)
    spread, behind = delivery['visible']
    assert 0.7 < spread < behind < 0.95  # the visible frames of a second came 0 to 0.95 s late
    hint = unpaired_hint(skew, slop, 0.0, 0.5)
    assert hint.startswith(f'visible frames arrive in bursts: a tenth of the latest came '
                           f'{spread:.2f} s or more later')
    assert hint.endswith(f'sync.timeout {behind:.2f} (read at start: restart the node with it) '
                         'waits for most of them')
    _, waited = run(round(behind, 2))
    assert waited.pairs >= 80 and waited.thermal_unpaired <= 20, waited  # of 100: most
    # Nor, once the timeout waits for them, the offset: the skew is within the bursts' spread.
    assert unpaired_hint(skew, slop, 0.0, round(behind, 2)) == ''
    # Offline, where no node restarts, the tools name the setting alone.
    assert unpaired_hint(skew, slop, 0.0, 0.5, live=False).endswith(
        f'sync.timeout {behind:.2f} waits for most of them')


def test_a_looping_recording_starts_the_stamps_lateness_afresh(msrs_pair):
    # A bag played in a loop: its stamps jump 3 s back while arrivals go on. Kept across the
    # jump, the window's lateness spread 3 s wide and read as an input delivered in bursts.
    ir, vi = msrs_pair
    thermal, visible = encode_image(ir, 'mono8'), encode_image(vi, 'bgr8')
    pipeline = make_pipeline()
    for frame in range(45):
        now, stamp = 1000 + frame / 10, round((100 + (frame % 30) / 10) * 1e9)
        pipeline.expire(now)
        pipeline.add_thermal(thermal, stamp, 'ir', arrived=now)
        pipeline.add_visible(visible, stamp, 'rgb', arrived=now + 0.01)
    assert pipeline.synchronizer.stats.resets == 1
    delivery = pipeline.stamp_skew.delivery()
    assert delivery['thermal'].spread < 0.01 and delivery['visible'].spread < 0.01, delivery
    assert pipeline.stamp_skew.seconds() == pytest.approx(0.01)


def test_the_delivery_is_told_by_stamps_and_arrivals_together():
    from s4fusion_ros.sync import StampSkew
    skew = StampSkew()
    # A bag played at half speed (without /clock) delivers stamps 0.1 s apart every 0.2 s, on
    # clocks 45 s apart: the arrivals minus the stamps grow steadily, not unevenly.
    for frame in range(StampSkew.WINDOW):
        skew.add('thermal', round((5 + frame / 10) * 1e9), 1000 + frame / 5)
        skew.add('visible', round((50 + frame / 10) * 1e9), 1000 + frame / 5 + 0.01)
    assert skew.delivery()['thermal'].spread == pytest.approx(0.0, abs=1e-6)
    assert skew.delivery()['visible'].spread == pytest.approx(0.0, abs=1e-6)
    # A 30 Hz camera delivered in 2 s bursts beside a 10 Hz one on time: its last 30 frames
    # arrived at one instant, a flat line fitted on them alone left no spread.
    bursts = StampSkew()
    for tick in range(120):  # 4 s in steps of 1/30 s
        now = tick / 30
        if tick % 3 == 0:
            bursts.add('thermal', round((100 + now) * 1e9), 1000 + now)
        if tick % 60 == 59:
            for held in range(tick - 59, tick + 1):
                bursts.add('visible', round((100 + held / 30) * 1e9), 1000 + now)
    assert bursts.delivery()['thermal'].spread < 0.05
    assert bursts.delivery()['visible'].spread > 0.7
    assert bursts.delivery()['visible'].behind > bursts.delivery()['visible'].spread
    assert StampSkew().delivery() == {'thermal': None, 'visible': None}
    few = StampSkew()  # 9 frames of each: too few to tell
    for frame in range(9):
        few.add('thermal', round((5 + frame / 10) * 1e9), 1000 + frame / 10)
        few.add('visible', round((5 + frame / 30) * 1e9), 1000 + frame / 30)
    assert few.delivery() == {'thermal': None, 'visible': None}


def test_outside_the_thermal_view_the_model_gets_the_visible_luminance(msrs_pair):
    # A thermal lens narrower than the visible one: its view covers the top-left 3/4. Outside
    # it the model used to get 0 (cold), and the fused image went dark with a hard seam.
    ir, vi = msrs_pair
    height, width = ir.shape
    pipeline = FusionPipeline(PairSynchronizer(slop=0.02, queue_size=10), ThermalNormalizer(),
                              ThermalRegistration(np.diag([0.75, 0.75, 1.0])))
    pipeline.add_thermal(encode_image(ir, 'mono8'), 1000 * MS, 'ir')
    [pair] = pipeline.add_visible(encode_image(vi, 'bgr8'), 1000 * MS, 'rgb')
    gray = bgr_to_gray(vi)
    seen_width, seen_height = int(0.75 * width), int(0.75 * height)
    np.testing.assert_array_equal(pair.thermal[:, seen_width + 1:], gray[:, seen_width + 1:])
    np.testing.assert_array_equal(pair.thermal[seen_height + 1:], gray[seen_height + 1:])
    seen = np.s_[:seen_height - 1, :seen_width - 1]
    assert np.abs(pair.thermal[seen] - gray[seen]).mean() > 0.05  # the thermal image there


def test_engine_outputs_visible_geometry_and_colour(msrs_pair, loaded):
    ir, vi = msrs_pair
    pipeline = make_pipeline()
    pipeline.add_thermal(encode_image(ir, 'mono8'), 1000 * MS, 'ir')
    [pair] = pipeline.add_visible(encode_image(vi, 'bgr8'), 1001 * MS, 'rgb')
    engine = FusionEngine(loaded, FusionSettings(inference_size=(160, 120)))
    result = engine.infer(pair)
    assert result.fused.shape == (480, 640, 3) and result.fused.dtype == np.uint8
    assert result.saliency.shape == (480, 640) and result.saliency.dtype == np.float32
    # Colour comes from the visible image: chroma equal up to uint8 rounding where not clipped.
    _, fused_cr, fused_cb = bgr_to_ycrcb(result.fused)
    _, vi_cr, vi_cb = bgr_to_ycrcb(vi)
    y = bgr_to_ycrcb(result.fused)[0]
    unclipped = (y > 0.1) & (y < 0.9)
    assert np.abs(fused_cr - vi_cr)[unclipped].mean() < 0.01
    assert np.abs(fused_cb - vi_cb)[unclipped].mean() < 0.01
    engine.settings = FusionSettings(output_encoding='rgb8', inference_size=(160, 120))
    np.testing.assert_array_equal(engine.infer(pair).fused, result.fused[:, :, ::-1])
    engine.settings = FusionSettings(output_encoding='mono8', inference_size=(160, 120))
    mono = engine.infer(pair).fused
    assert mono.shape == (480, 640)
    # mono8 is the fused luminance itself; the colour image has the same Y except where a BGR
    # channel saturated (a bright Y with strong visible chroma cannot be shown in colour, nor a
    # dark one: in this night scene the stretched base takes 9% of the pixels to a channel's 0).
    in_gamut = (result.fused > 0).all(axis=2) & (result.fused < 255).all(axis=2)
    assert in_gamut.mean() > 0.85
    assert np.abs(mono.astype(int) - np.rint(y * 255).astype(int))[in_gamut].max() <= 3


def test_inference_size_never_runs_the_model_above_the_image_size(msrs_pair, loaded):
    # A side larger than the image's runs at the image's: it would only upsample, and an
    # inference_size of 8192x8192 would ask for gigabytes past what max_input_pixels allows.
    ir, vi = (cv2.resize(image, (96, 72), interpolation=cv2.INTER_AREA) for image in msrs_pair)
    pair = PreparedPair(1, 1, 'rgb', ir.astype(np.float32) / 255.0, vi)

    def fused(size):
        return FusionEngine(loaded, FusionSettings(inference_size=size)).infer(pair).fused

    assert model_input_size((8192, 8192), 96, 72) == model_input_size((0, 0), 96, 72) == (96, 72)
    np.testing.assert_array_equal(fused((8192, 8192)), fused((0, 0)))
    np.testing.assert_array_equal(fused((1000, 48)), fused((96, 48)))
    assert np.abs(fused((96, 48)).astype(int) - fused((0, 0))).max() > 0


@pytest.mark.parametrize('saliency_encoding', ['mono8', '32FC1'])
def test_engine_packs_both_outputs_as_its_settings_say(msrs_pair, loaded, saliency_encoding):
    ir, vi = msrs_pair
    pipeline = make_pipeline()
    pipeline.add_thermal(encode_image(ir, 'mono8'), 1000 * MS, 'ir')
    [pair] = pipeline.add_visible(encode_image(vi, 'bgr8'), 1001 * MS, 'rgb')
    settings = FusionSettings(output_encoding='rgb8', saliency_encoding=saliency_encoding,
                              inference_size=(160, 120))
    result = FusionEngine(loaded, settings).infer(pair)
    fused, saliency = result.packed()
    assert (fused.encoding, fused.width, fused.height) == ('rgb8', 640, 480)
    np.testing.assert_array_equal(image_to_array(fused), result.fused)
    assert saliency.encoding == saliency_encoding
    published = (to_uint8(result.saliency) if saliency_encoding == 'mono8'
                 else result.saliency)
    np.testing.assert_array_equal(image_to_array(saliency), published)
    # The compressed transport carries the map as mono8 whatever it is published as.
    transported, encoding = result.transported('saliency')
    assert encoding == 'mono8'
    np.testing.assert_array_equal(transported, to_uint8(result.saliency))
    assert result.transported('fused') == (result.fused, 'rgb8')


def test_a_reduced_inference_size_fuses_there_and_restores_detail_at_the_models_gain(
        msrs_pair, loaded):
    ir, vi = msrs_pair
    thermal, visible_y = ir.astype(np.float32) / 255.0, bgr_to_ycrcb(vi)[0]
    engine = FusionEngine(loaded, FusionSettings(output_encoding='mono8',
                                                 inference_size=(160, 120)))
    result = engine.infer(PreparedPair(1, 1, 'rgb', thermal, vi))
    ir_small, vi_small = (torch.from_numpy(cv2.resize(image, (160, 120),
                                                      interpolation=cv2.INTER_AREA))[None, None]
                          for image in (thermal, visible_y))
    fused_small = loaded.model.infer(ir_small, vi_small)[0, 0].clamp(0.0, 1.0).numpy()
    assert loaded.model.config.detail_gain != 1.0
    expected = to_uint8(restore_detail(fused_small, thermal, visible_y,
                                       loaded.model.config.detail_gain))
    assert np.abs(result.fused.astype(int) - expected).max() <= 1


@pytest.mark.parametrize('thermal_size', [(160, 120), (640, 480)], ids=['smaller', 'larger'])
def test_fuse_images_resizes_a_thermal_file_of_another_size_as_the_node_does(
        msrs_pair, loaded, thermal_size):
    # A thermal file 4x the visible image (reduced here), or a quarter of it: the identity
    # registration, the node's, shrinks by area (each pixel the mean of the 4x4 it covers;
    # bilinear would sample 2 of each 4 rows and columns, aliasing thin hot detail) and enlarges
    # bilinearly.
    ir, vi = msrs_pair
    visible_size = (160, 120) if thermal_size == (640, 480) else (640, 480)
    thermal = cv2.resize(ir, thermal_size, interpolation=cv2.INTER_AREA)
    visible = cv2.resize(vi, visible_size, interpolation=cv2.INTER_AREA)
    engine = FusionEngine(loaded, FusionSettings(output_encoding='mono8',
                                                 inference_size=(160, 120)))
    normalized = thermal.astype(np.float32) / 255.0
    if thermal_size == (640, 480):
        registered = normalized.reshape(120, 4, 160, 4).mean(axis=(1, 3))
    else:
        registered = cv2.resize(normalized, visible_size, interpolation=cv2.INTER_LINEAR)
    expected = engine.infer(PreparedPair(1, 1, 'ir', registered, visible))
    fused = engine.fuse_images(thermal, visible).fused
    assert fused.shape == visible.shape[:2]
    assert np.abs(fused.astype(int) - expected.fused).max() <= 1


def test_fuse_images_reads_thermal_as_training_does_and_keeps_the_settings(msrs_pair, loaded):
    ir, vi = msrs_pair
    settings = FusionSettings(inference_size=(160, 120))
    engine = FusionEngine(loaded, settings)
    result = engine.fuse_images(ir, vi, 'mono8')
    assert engine.settings == settings and result.pair is None
    assert result.fused_encoding == 'mono8' and result.fused.shape == ir.shape
    # Dataset thermal images are display-ready 8-bit: the model sees them / 255.
    mono = FusionEngine(loaded, FusionSettings(output_encoding='mono8', inference_size=(160, 120)))
    expected = mono.infer(PreparedPair(1, 1, 'ir', ir.astype(np.float32) / 255.0, vi))
    # x / 255 and the normalizer's x * (1 / 255) may differ in the last float bit.
    assert np.abs(result.fused.astype(int) - expected.fused).max() <= 1
    assert engine.fuse_images(ir, vi).fused_encoding == 'bgr8'
    # A 16-bit one as value / 65535: the 8-bit image scaled by 257 fuses as it does.
    wide = engine.fuse_images(ir.astype(np.uint16) * 257, vi, 'mono8')
    assert np.abs(wide.fused.astype(int) - result.fused).max() <= 1
    # Raw counts (a sliver of the 16-bit range), stretched as the node does: by this image's
    # percentile window.
    counts = ir.astype(np.uint16) * 16 + 3000
    stretched = engine.fuse_images(counts, vi, 'mono8', stretch_thermal=True)
    node = mono.infer(PreparedPair(1, 1, 'ir', ThermalNormalizer(smoothing=0.0)(counts), vi))
    assert np.abs(stretched.fused.astype(int) - node.fused).max() <= 1


def test_a_cuda_device_index_is_read_as_written_or_refused_as_a_device_error(monkeypatch):
    # On a machine with one GPU (torch's answers here, as a GPU machine gives them): torch.device
    # refused 'cuda:01' and an index past 16 bits, which the device form allows, with a
    # RuntimeError of its own, which the tools print as a traceback.
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert resolve_device(' CUDA ') == torch.device('cuda')
    assert resolve_device('cuda:00') == resolve_device('cuda:0') == torch.device('cuda', 0)
    for spec in ('cuda:1', 'cuda:01', 'cuda:128', 'cuda:99999999999999999999'):
        with pytest.raises(DeviceError, match=f"'{spec}' requested but only 1 CUDA device"):
            resolve_device(spec)


def test_auto_picks_cuda_and_the_authors_network_where_cuda_is_present(monkeypatch):
    # torch's answer here, as a GPU machine gives it; the CPU keeps the compact network.
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert resolve_device('auto') == torch.device('cuda')
    assert default_preset(resolve_device('auto')) == 'authors'
    assert default_preset(resolve_device('cpu')) == 'compact'


def test_cpu_threads_gives_each_library_its_count_back_after_the_block():
    # s4fusion-batch's bench times its loop on the Ray tasks' CPUs, then runs on with the
    # machine's threads.
    import numba
    from s4fusion_ros.runtime import cpu_threads

    def counts():
        return torch.get_num_threads(), cv2.getNumThreads(), numba.get_num_threads()

    with cpu_threads(2):
        before = counts()
        with cpu_threads(1):
            assert counts() == (1, 1, 1)
        assert counts() == before == (2, 2, min(2, numba.config.NUMBA_NUM_THREADS))


def test_half_precision_on_the_cpu_is_refused():
    with pytest.raises(DeviceError, match=r'half precision \(fp16\) needs a CUDA device'):
        load_fusion_model(device='cpu', half=True)


def test_weights_under_home_named_with_a_tilde_load(tmp_path, monkeypatch):
    # `-p model.weights:=~/w.safetensors` reaches the node with its ~: "weights file not found".
    shipped = shipped_weights('compact')
    for path in (shipped, shipped.with_suffix('.json')):
        shutil.copy(path, tmp_path / f'w{path.suffix}')
    monkeypatch.setenv('HOME', str(tmp_path))
    loaded = load_fusion_model('~/w.safetensors', device='cpu')
    assert loaded.weights == tmp_path / 'w.safetensors' and loaded.trained


def test_detail_gain_parameter_replaces_the_weights_gain(msrs_pair, loaded, capsys):
    ir, vi = msrs_pair
    plain = load_fusion_model(device='cpu', detail_gain=1.0)
    assert loaded.model.config.detail_gain == 1.1 and plain.model.config.detail_gain == 1.0
    assert plain.name == f'{loaded.name} (detail gain 1)'  # what the logs and diagnostics show

    def sharpness(model):
        fused = FusionEngine(model, FusionSettings()).fuse_images(ir, vi, 'mono8').fused
        return np.abs(cv2.Laplacian(fused.astype(np.float32), cv2.CV_32F)).mean()

    # The gain scales the pyramid's details, so the plain base gives a less sharp image.
    assert sharpness(plain) < 0.95 * sharpness(loaded)
    # A model without the pyramid base has no details to scale: it says so and runs as it is.
    warned = []
    authors = load_fusion_model(preset='authors', device='cpu', detail_gain=1.3,
                                warn=warned.append)
    assert authors.model.config.detail_gain == 1.0
    assert warned == ['model.detail_gain 1.3 ignored: s4fusion_authors has no Laplacian base']
    load_fusion_model(preset='authors', device='cpu', detail_gain=1.3)  # the tools' line
    assert ': warning: model.detail_gain 1.3 ignored' in capsys.readouterr().err


def test_weights_decide_the_network_and_a_preset_that_names_another_is_refused(tmp_path):
    import dataclasses
    from s4fusion_ros.model import CheckpointError, S4Fusion, S4FusionConfig, save_checkpoint
    # Compact weights as s4fusion-train writes them with the plain base (gains 1): not the
    # compact preset's configuration, but its network.
    config = dataclasses.replace(S4FusionConfig.preset('compact'), detail_gain=1.0,
                                 base_contrast=1.0)
    path = tmp_path / 's4fusion_custom.safetensors'
    save_checkpoint(S4Fusion(config), path)
    for preset in ('auto', 'compact'):
        assert load_fusion_model(str(path), preset, 'cpu').model.config == config
    # It ran the compact network under an authors preset, without a word.
    with pytest.raises(CheckpointError, match=f'{path} holds the compact network, but the '
                       f'preset asked for is authors: ask for auto \\(or compact\\)$'):
        load_fusion_model(str(path), 'authors', 'cpu')
    # A network of no preset (other widths) runs under auto only, which the message names alone.
    wider = tmp_path / 'wider.safetensors'
    save_checkpoint(S4Fusion(dataclasses.replace(config, dims=(24, 48, 96))), wider)
    with pytest.raises(CheckpointError, match=f'{wider} holds a network of no preset, but the '
                       f'preset asked for is compact: ask for auto$'):
        load_fusion_model(str(wider), 'compact', 'cpu')
    assert load_fusion_model(str(wider), 'auto', 'cpu').model.config.dims == (24, 48, 96)


def test_untrained_weights_are_the_same_each_start_and_leave_the_global_generator(
        monkeypatch, tmp_path):
    import torch
    from s4fusion_ros import runtime
    monkeypatch.setattr(runtime, 'shipped_weights', lambda preset: tmp_path / 'absent')
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    first = load_fusion_model(preset='compact', device='cpu')
    assert torch.equal(torch.rand(4), expected)  # it reseeded the caller's generator to 0
    second = load_fusion_model(preset='compact', device='cpu')
    assert not first.trained and first.name == 's4fusion_compact (untrained)'
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


def test_restore_detail_returns_full_resolution_edges(msrs_pair):
    ir, vi = msrs_pair
    ir_f = ir.astype(np.float32) / 255
    vi_f = bgr_to_ycrcb(vi)[0]
    # If the model reproduced the visible image at low resolution, restoring detail must bring
    # back (nearly) the full-resolution visible image wherever it has the stronger detail.
    small = cv2.resize(vi_f, (160, 120), interpolation=cv2.INTER_AREA)
    restored = restore_detail(small, np.zeros_like(ir_f), vi_f)
    upsampled = cv2.resize(small, (640, 480), interpolation=cv2.INTER_LINEAR)
    assert np.abs(restored - vi_f).mean() < 0.25 * np.abs(upsampled - vi_f).mean()
    # The model's detail gain applies to the restored detail too (linear where not clipped).
    gained = restore_detail(small, np.zeros_like(ir_f), vi_f, gain=1.15)
    inside = (gained > 0) & (gained < 1) & (restored > 0) & (restored < 1)
    assert not inside.all() and 0.0 <= gained.min() and gained.max() <= 1.0  # clipped
    np.testing.assert_allclose((gained - upsampled)[inside], 1.15 * (restored - upsampled)[inside],
                               atol=1e-5)


def test_the_factories_take_each_parameter_to_its_place():
    values = {**settings.defaults(), 'sync.timeout': 0.7, 'saliency.contrast': 0.3,
              'saliency.threshold': 0.1, 'inference_size': [320, 240],
              'output_encoding': 'rgb8', 'saliency.encoding': '32FC1'}
    assert pipeline_from_params(values).synchronizer.timeout == 0.7
    assert fusion_settings(values) == FusionSettings('rgb8', '32FC1', 0.3, 0.1, (320, 240))


def test_compose_output_rejects_unknown_encoding():
    y = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match='yuv422'):
        compose_output(y, y + 0.5, y + 0.5, 'yuv422')


def test_a_clock_jump_resets_the_thermal_range_with_the_synchronizer():
    # A bag that loops from a hot scene back to a cold one: the cold scene's first frame must be
    # scaled by its own range, not by the smoothed range of the hot scene it follows.
    pipeline = FusionPipeline(PairSynchronizer(slop=0.01, queue_size=30), ThermalNormalizer(),
                              ThermalRegistration())
    visible = encode_image(np.full((8, 8, 3), 128, np.uint8), 'bgr8')
    hot = np.linspace(30000, 40000, 64, dtype=np.uint16).reshape(8, 8)
    cold = np.linspace(1000, 2000, 64, dtype=np.uint16).reshape(8, 8)
    for second in range(100, 120):
        pipeline.add_thermal(encode_image(hot, 'mono16'), second * 10**9, 'ir')
        pipeline.add_visible(visible, second * 10**9, 'rgb')
    pipeline.add_thermal(encode_image(cold, 'mono16'), 10**9, 'ir')
    [pair] = pipeline.add_visible(visible, 10**9, 'rgb')
    assert pipeline.synchronizer.stats.resets == 1
    assert pair.thermal.max() == pytest.approx(1.0)


def test_a_frame_still_of_the_old_timeline_does_not_move_the_expiry_clock():
    # A looping bag whose thermal topic jumps back first, borne out by its next frame; the last
    # visible frame of the first pass is still in flight. It is late: neither a second jump, nor
    # the stamps' clock that would make the new thermal frames overdue before their partners.
    pipeline = FusionPipeline(PairSynchronizer(slop=0.01, queue_size=30, timeout=0.5),
                              ThermalNormalizer(), ThermalRegistration())
    thermal = encode_image(np.linspace(1000, 2000, 64, dtype=np.uint16).reshape(8, 8), 'mono16')
    visible = encode_image(np.full((8, 8, 3), 128, np.uint8), 'bgr8')
    for second in range(100, 120):
        pipeline.add_thermal(thermal, second * 10**9, 'ir')
        pipeline.add_visible(visible, second * 10**9, 'rgb')
    pipeline.add_thermal(thermal, 10**9, 'ir')
    pipeline.add_thermal(thermal, 10**9 + 111 * MS, 'ir')
    assert pipeline.synchronizer.stats.resets == 1
    assert pipeline.add_visible(visible, 119 * 10**9 + 500 * MS, 'rgb') == []
    assert pipeline.expire(time.monotonic()) == []
    [pair] = pipeline.add_visible(visible, 10**9 + 5 * MS, 'rgb')
    assert (pair.thermal_stamp_ns, pair.visible_stamp_ns) == (10**9, 10**9 + 5 * MS)
    stats = pipeline.synchronizer.stats
    assert stats.resets == 1 and stats.visible_late == 1


def test_a_jump_confirmed_after_a_pause_does_not_leave_the_old_timeline_clock():
    # A looping bag: the visible topic jumps back first, then both pause 1.5 s (more than
    # sync.clock_jump), so the visible frame that confirms the jump stands alone far ahead of
    # the held one and anchors nothing. The old timeline's anchor must not stay: extrapolated
    # from it the expiry clock ran 90 s ahead and pruned the new timeline's frames.
    pipeline = FusionPipeline(PairSynchronizer(slop=0.02, queue_size=30, timeout=0.5),
                              ThermalNormalizer(), ThermalRegistration())
    thermal = encode_image(np.linspace(1000, 2000, 64, dtype=np.uint16).reshape(8, 8), 'mono16')
    visible = encode_image(np.full((8, 8, 3), 128, np.uint8), 'bgr8')
    events = [(k * 111 + 10, 0, 100_000 + k * 111) for k in range(30)]
    events += [(k * 33 + 5, 1, 100_000 + k * 33) for k in range(100)]
    events += [(3500, 1, 10_000), (5000, 1, 11_500), (5020, 0, 11_490)]
    pairs = []
    for arrived_ms, kind, stamp_ms in sorted(events):
        pairs += pipeline.expire(arrived_ms / 1000)  # as s4fusion-bag does before each message
        add = pipeline.add_visible if kind else pipeline.add_thermal
        pairs += add(visible if kind else thermal, stamp_ms * MS, 'f', arrived=arrived_ms / 1000)
    assert pipeline.synchronizer.stats.resets == 1
    assert (pairs[-1].thermal_stamp_ns, pairs[-1].visible_stamp_ns) == (11_490 * MS, 11_500 * MS)


@pytest.mark.parametrize('topic, stamp_ms, partner_ms', [(1, 330, 333), (0, 222, 222)])
def test_one_stamp_glitched_ahead_does_not_move_the_expiry_clock(topic, stamp_ms, partner_ms):
    # Thermal every 111 ms arriving 120 ms after its stamp, visible every 33 ms arriving 5 ms
    # after; one frame stamped 2 s ahead. Taken as the stamps' clock, it expired thermal frames
    # and pruned visible ones a delayed thermal frame still needed: a neighbour's pair lost.
    thermal = encode_image(np.linspace(1000, 2000, 64, dtype=np.uint16).reshape(8, 8), 'mono16')
    visible = encode_image(np.full((8, 8, 3), 128, np.uint8), 'bgr8')

    def pairs(glitch):
        pipeline = FusionPipeline(PairSynchronizer(slop=0.02, queue_size=30, timeout=0.5),
                                  ThermalNormalizer(), ThermalRegistration())
        events = sorted([(k * 111 + 120, 0, k * 111) for k in range(6)]
                        + [(k * 33 + 5, 1, k * 33) for k in range(20)])
        got = []
        for arrived_ms, kind, stamp in events:
            if glitch and (kind, stamp) == (topic, stamp_ms):
                stamp += 2000
            got += pipeline.expire(arrived_ms / 1000)  # as s4fusion-bag does before each message
            add = pipeline.add_visible if kind else pipeline.add_thermal
            got += add(visible if kind else thermal, 100 * 10**9 + stamp * MS, 'f',
                       arrived=arrived_ms / 1000)
        got += pipeline.flush()
        stats = pipeline.synchronizer.stats
        assert stats.resets == 0 and stats.thermal_late + stats.visible_late == glitch
        return {(pair.thermal_stamp_ns - 100 * 10**9) // MS for pair in got}

    clean, glitched = pairs(False), pairs(True)
    assert len(clean) == 6
    assert clean - glitched == {partner_ms}  # its own pair only


def test_one_thermal_stamp_glitched_back_keeps_the_thermal_range():
    # No reset for a glitch: the thermal range smoothed over the scene goes on.
    pipeline = FusionPipeline(PairSynchronizer(slop=0.01, queue_size=30), ThermalNormalizer(),
                              ThermalRegistration())
    visible = encode_image(np.full((8, 8, 3), 128, np.uint8), 'bgr8')
    hot = encode_image(np.linspace(30000, 40000, 64, dtype=np.uint16).reshape(8, 8), 'mono16')
    narrow = np.linspace(35000, 36000, 64, dtype=np.uint16).reshape(8, 8)
    for second in range(100, 120):
        pipeline.add_thermal(hot, second * 10**9, 'ir')
        pipeline.add_visible(visible, second * 10**9, 'rgb')
    pipeline.add_thermal(hot, 110 * 10**9, 'ir')  # 10 s back: held
    pipeline.add_thermal(encode_image(narrow, 'mono16'), 120 * 10**9, 'ir')
    [pair] = pipeline.add_visible(visible, 120 * 10**9, 'rgb')
    stats = pipeline.synchronizer.stats
    assert (stats.resets, stats.thermal_late) == (0, 1)
    assert pair.thermal.max() < 0.9  # scaled by the smoothed range, not its own


@pytest.mark.parametrize('ahead', [0.0, 0.3, 0.6])
def test_a_thermal_clock_ahead_corrected_by_its_offset_pairs_as_without_it(ahead):
    # A thermal camera stamping `ahead` s after the exposure the visible one stamps, corrected by
    # sync.thermal_offset = -ahead. The expiry clock used to be anchored on the thermal stamp
    # itself: once `ahead` neared sync.timeout every thermal frame expired before its partner
    # arrived and nothing paired. Events come as from a bag: expire at each arrival, then add.
    pipeline = FusionPipeline(PairSynchronizer(slop=0.05, queue_size=30, thermal_offset=-ahead,
                                               timeout=0.5),
                              ThermalNormalizer(), ThermalRegistration())
    thermal = encode_image(np.linspace(1000, 2000, 64, dtype=np.uint16).reshape(8, 8), 'mono16')
    visible = encode_image(np.full((8, 8, 3), 128, np.uint8), 'bgr8')
    events = [(100 + i / 9 + 0.01, 'thermal', 100 + i / 9 + ahead) for i in range(40)]
    events += [(100 + i / 30 + 0.084, 'visible', 100 + i / 30 + 0.004) for i in range(135)]
    pairs = []
    for arrived, topic, stamp in sorted(events):
        pairs += pipeline.expire(arrived)
        add = pipeline.add_thermal if topic == 'thermal' else pipeline.add_visible
        pairs += add(thermal if topic == 'thermal' else visible, round(stamp * 1e9), topic,
                     arrived)
    pairs += pipeline.flush()
    assert len(pairs) == 40
    for pair in pairs:  # each thermal frame with the visible frame of its exposure
        assert abs(pair.thermal_stamp_ns - round(ahead * 1e9) - pair.visible_stamp_ns) < 20 * MS


def test_a_thermal_offset_set_while_running_moves_the_expiry_clock_with_it():
    # The thermal stamps run 0.6 s ahead (beyond sync.timeout) and sync.thermal_offset -0.6 is
    # set while a thermal frame waits for its partner. The expiry clock, extrapolated from that
    # frame, must follow the new offset: on the old one it ran 0.6 s ahead and paired the frame
    # at once with the nearest visible frame there was, 33 ms off, instead of its own.
    pipeline = FusionPipeline(PairSynchronizer(slop=0.05, queue_size=30, timeout=0.5),
                              ThermalNormalizer(), ThermalRegistration())
    thermal = encode_image(np.linspace(1000, 2000, 64, dtype=np.uint16).reshape(8, 8), 'mono16')
    visible = encode_image(np.full((8, 8, 3), 128, np.uint8), 'bgr8')
    assert pipeline.add_visible(visible, 100_000 * MS, 'rgb', arrived=100.004) == []
    assert pipeline.add_thermal(thermal, 100_633 * MS, 'ir', arrived=100.035) == []
    pipeline.synchronizer.thermal_offset = -0.6
    assert pipeline.expire(100.036) == []
    [pair] = pipeline.add_visible(visible, 100_033 * MS, 'rgb', arrived=100.037)
    assert (pair.thermal_stamp_ns, pair.visible_stamp_ns) == (100_633 * MS, 100_033 * MS)


def test_a_slow_simulation_heard_after_the_start_pairs_its_first_frames():
    # The node's timing on sim time, started before the simulator: rclpy reads 0 until the first
    # /clock. The simulator runs at a tenth of real time, with sync.timeout 0.2: a visible frame
    # 40 ms of sim time after its thermal partner comes 0.4 s later by the wall clock. Timed at
    # wall pace for the first 2 s of /clock, the first thermal frame expired unpaired.
    pipeline = FusionPipeline(PairSynchronizer(slop=0.05, queue_size=30, timeout=0.2),
                              ThermalNormalizer(), ThermalRegistration())
    thermal = encode_image(np.linspace(1000, 2000, 64, dtype=np.uint16).reshape(8, 8), 'mono16')
    visible = encode_image(np.full((8, 8, 3), 128, np.uint8), 'bgr8')
    arrivals = ArrivalClock()
    pairs = []
    for tick in range(400):  # the node's expiry timer every 50 ms; /clock from wall 10 s on
        wall = tick / 20
        sim = 0.0 if wall < 10.0 else 100.0 + 0.1 * (wall - 10.0)
        now = arrivals.now(wall, sim)
        if tick == 210:  # sim 100.05
            pairs += pipeline.add_thermal(thermal, 100_050 * MS, 'ir', arrived=now)
        if tick == 218:  # sim 100.09
            pairs += pipeline.add_visible(visible, 100_090 * MS, 'rgb', arrived=now)
        pairs += pipeline.expire(now)
    assert [(p.thermal_stamp_ns, p.visible_stamp_ns) for p in pairs] == [
        (100_050 * MS, 100_090 * MS)]


def test_an_image_over_max_input_pixels_is_a_bad_message_before_it_takes_a_partner():
    # The model's memory grows with the image: a camera misconfigured to a huge size must cost a
    # dropped frame, not the process.
    pipeline = pipeline_from_params({**settings.defaults(), 'max_input_pixels': 64 * 48})
    small = encode_image(np.full((48, 64, 3), 100, np.uint8), 'bgr8')
    large = encode_image(np.full((49, 64), 1000, np.uint16), 'mono16')
    message = r'mono16 image: 64x49 exceeds 3072 pixels \(max_input_pixels\)'
    with pytest.raises(ImageDecodeError, match=message):
        pipeline.add_thermal(large, 1000 * MS, 'ir')
    with pytest.raises(ImageDecodeError, match='bgr8 image: 64x49'):
        pipeline.add_visible(encode_image(np.zeros((49, 64, 3), np.uint8), 'bgr8'), 1000 * MS,
                             'rgb')
    # A raw image is refused from its header, before its data is read or copied.
    with pytest.raises(ImageDecodeError, match=message):
        pipeline.add_thermal(RawImage(49, 64, 'mono16', 128, 0, b''), 1000 * MS, 'ir')
    # PNG and JPEG from theirs, before decoding (cut short after it: still refused for its size).
    for extension in ('png', 'jpeg'):
        encoded = cv2.imencode(f'.{extension}', np.zeros((49, 64, 3), np.uint8))[1]
        cut = RawCompressedImage(extension, encoded.tobytes()[:300])
        with pytest.raises(ImageDecodeError, match=f"'{extension}' image: 64x49 exceeds 3072"):
            pipeline.add_visible(cut, 1000 * MS, 'rgb')
    assert pipeline.synchronizer.stats.thermal_received == 0
    pipeline.add_thermal(encode_image(np.full((48, 64), 1000, np.uint16), 'mono16'), 1000 * MS,
                         'ir')
    assert len(pipeline.add_visible(small, 1000 * MS, 'rgb')) == 1
