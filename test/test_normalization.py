"""ThermalNormalizer on real MSRS thermal frames and on hostile values."""

import warnings

from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
import pytest

from s4fusion_ros.imaging.normalization import (looks_like_raw_counts, NormalizerSettings,
                                                RESUME_FRAMES, ThermalNormalizer)


@pytest.fixture(scope='module')
def counts(msrs_pair):
    """Scale the MSRS thermal frame to 14-bit-like radiometric counts, float32."""
    return msrs_pair[0].astype(np.float32) * 48.0 + 3000.0


def test_percentile_window_maps_to_unit_range(counts):
    norm = ThermalNormalizer(low_percentile=2.0, high_percentile=98.0)
    out = norm(counts)
    assert out.dtype == np.float32 and out.shape == counts.shape
    assert out.min() == 0.0 and out.max() == 1.0
    low, high = np.percentile(counts, [2.0, 98.0])
    # The subsampled percentiles are close to the full-frame ones (one gray level = 48 counts).
    assert abs(norm.range[0] - low) <= 48 and abs(norm.range[1] - high) <= 48
    assert 0.005 < (out == 0).mean() < 0.05 and 0.005 < (out == 1).mean() < 0.05
    order = np.argsort(counts, axis=None, kind='stable')
    assert (np.diff(out.ravel()[order]) >= 0).all()  # monotonic: no contrast inversion


def test_percentile_smoothing_keeps_output_steady(counts):
    """Keep the background steady while a hot object comes and goes.

    The object moves the 99th percentile in every other frame.
    """
    hot = counts.copy()
    hot[:60, :200] = counts.max() * 1.5  # 4 % of the frame
    background = np.ones(counts.shape, bool)
    background[:60, :200] = False

    def flicker(smoothing):
        norm = ThermalNormalizer(smoothing=smoothing)
        outputs = [norm(hot if k % 2 else counts) for k in range(40)]
        return np.abs(outputs[-1][background] - outputs[-2][background]).mean()

    steady, raw = flicker(0.8), flicker(0.0)
    assert raw > 0.05
    assert steady < 0.2 * raw


def test_smoothing_converges_to_a_new_scene_and_reset_forgets(counts):
    norm = ThermalNormalizer(smoothing=0.5)
    norm(counts)
    first = norm.range
    for _ in range(30):
        norm(counts + 1000.0)
    assert norm.range == pytest.approx((first[0] + 1000.0, first[1] + 1000.0), abs=1e-3)
    norm.reset()
    assert norm.range is None
    norm(counts)
    assert norm.range == pytest.approx(first)


def test_smoothing_weighs_the_previous_window_and_holds_only_frames_four_widths_off(counts):
    # smoothing = 0.8: the previous window's weight, the new frame's 0.2 (at 0.5 the two
    # cannot be told apart). A scene 3 widths away is smoothed in; 5 widths away, held.
    norm = ThermalNormalizer(smoothing=0.8)
    norm(counts)
    low, high = norm.range
    width = high - low
    norm(counts + 3.0 * width)
    assert norm.outliers == 0
    assert norm.range == pytest.approx((low + 0.6 * width, high + 0.6 * width), abs=1e-3)
    far = ThermalNormalizer(smoothing=0.8)
    far(counts)
    far(counts + 5.0 * width)
    assert far.outliers == 1 and far.range == (low, high)


def test_a_frame_far_outside_the_window_is_held_out_of_it(counts):
    """One corrupt frame (uninitialised float memory) or a burst of dead pixels is scaled by the
    smoothed window and leaves it as it was: it moved the window to +-1e36 and took the
    thermal contrast away for 40 s at 9 Hz."""
    garbage = np.random.default_rng(0).uniform(-7e36, 7e36, counts.shape).astype(np.float32)
    dead = counts.copy()
    dead[::2] = 1e6  # half the rows
    for corrupt in (garbage, dead):
        clean, held = ThermalNormalizer(), ThermalNormalizer()
        for frame in (counts, counts + 30.0, counts - 20.0):
            clean(frame)
            held(frame)
        window = held.range
        out = held(corrupt)
        assert held.range == window and held.outliers == 1
        np.testing.assert_array_equal(out, np.clip((corrupt - np.float32(window[0]))
                                                   * np.float32(1 / (window[1] - window[0])),
                                                   0, 1))
        for frame in (counts + 10.0, counts):  # as though the corrupt frame never came
            np.testing.assert_array_equal(held(frame), clean(frame))
        assert held.range == clean.range and held.outliers == 1


def test_corrupt_frames_apart_are_each_held_and_a_reset_forgets_a_run(counts):
    """Only frames far outside in a row start a window: corrupt frames between good ones are
    each held, and a frame held before a reset does not count towards a run after it."""
    garbage = np.random.default_rng(4).uniform(-7e36, 7e36, counts.shape).astype(np.float32)
    clean, norm = ThermalNormalizer(), ThermalNormalizer()
    for _ in range(3):
        clean(counts)
        norm(counts)
        norm(garbage)
    assert norm.outliers == 3 and norm.range == clean.range
    np.testing.assert_array_equal(norm(counts), clean(counts))
    norm(garbage)
    norm.reset()  # right after a held frame
    norm(counts)
    window = norm.range
    for _ in range(2):
        norm(garbage)
    assert norm.outliers == 6 and norm.range == window


@pytest.mark.parametrize('before', ['nothing', 'a reset', 'three corrupt frames'])
def test_good_frames_after_corrupt_ones_start_a_window_of_their_own(counts, before):
    """A corrupt first frame (after start, or after a reset for a clock jump), or three in a
    row, made a window so wide that no good frame was far outside it: 40 s to decay."""
    garbage = np.random.default_rng(2).uniform(-7e36, 7e36, counts.shape).astype(np.float32)
    norm = ThermalNormalizer()
    if before == 'a reset':
        norm(counts)
        norm.reset()
    for _ in range(3 if before == 'three corrupt frames' else 1):
        norm(garbage)
    outputs = [norm(counts) for _ in range(3)]
    np.testing.assert_array_equal(outputs[-1], ThermalNormalizer()(counts))


def test_flat_windows_are_never_far_apart_and_a_shutter_frame_is_held(counts):
    # A simulated camera: a uniform background whose level moves, a hot target on too few
    # pixels to move a percentile. Both windows flat: each frame maps its own extremes.
    norm = ThermalNormalizer()
    for level in (293.0, 294.5, 296.0, 293.0):
        frame = np.full((100, 100), level, np.float32)
        frame[:5, :10] = level + 16.0
        assert (norm(frame)[:5, :10] == 1).all()
    assert norm.outliers == 0
    # A capped 16-bit camera, a count of noise at 30000 (a window of 1.5e-4 of its level) and
    # the cap warming: flat as well, so no frame is reported held out of the window.
    norm, rng = ThermalNormalizer(), np.random.default_rng(9)
    for level in (30000.0, 30040.0, 30080.0, 30120.0):
        norm(np.round(level + rng.normal(0.0, 1.0, (100, 100))).astype(np.float32))
    assert norm.outliers == 0
    # A camera's shutter (flat-field correction) closes for a frame: held out of the window.
    norm = ThermalNormalizer()
    norm(counts)
    window = norm.range
    norm(np.full(counts.shape, float(np.median(counts)), np.float32))
    assert norm.range == window and norm.outliers == 1


@pytest.mark.parametrize('shutter_frames', [3, 4, 15])
def test_the_scene_after_a_long_shutter_resumes_the_window_it_had(counts, shutter_frames):
    """A flat-field correction lasting 3 frames or more (0.3 s at 9 Hz, 0.5 s at 30 Hz) started
    a window from the shutter's few counts of noise; the scene coming back was then held out of
    that window for 2 frames, each nearly all black and white. It resumes the scene's window."""
    shutter = (np.float32(np.median(counts)) + np.random.default_rng(3).normal(
        0.0, 3.0, counts.shape).astype(np.float32))  # uniform but for its noise: not flat
    clean, norm = ThermalNormalizer(), ThermalNormalizer()
    for frame in (counts, counts + 30.0, counts - 20.0):
        clean(frame)
        norm(frame)
    for _ in range(shutter_frames):
        norm(shutter)
    assert norm.range[1] - norm.range[0] < 100  # the shutter's own window, after 3 frames
    for frame in (counts + 10.0, counts, counts - 10.0):  # as though the shutter never closed
        out = norm(frame)
        assert ((out == 0) | (out == 1)).mean() < 0.1
        np.testing.assert_array_equal(out, clean(frame))
    assert norm.outliers == 2
    # The shutter again later: held out of the resumed window as the first time.
    norm(shutter)
    assert norm.range == clean.range and norm.outliers == 3


def test_a_window_replaced_long_ago_is_not_resumed(counts):
    """The scene moved while a long shutter was closed: its frames started a new window,
    replacing the shutter's. Resumable without end, the shutter's window was resumed by the next
    shutter frame, seconds later, instead of holding it out, and the scene after it was held out
    of the shutter's window: 2 frames of nearly all black and white."""
    shutter = (np.float32(np.median(counts)) + np.random.default_rng(3).normal(
        0.0, 3.0, counts.shape).astype(np.float32))
    moved = counts * 0.2 + 10000.0  # another scene, far from the first one's window
    norm = ThermalNormalizer()
    for _ in range(10):
        norm(counts)
    for _ in range(4):
        norm(shutter)
    for _ in range(RESUME_FRAMES + 3):
        norm(moved)
    window, outliers = norm.range, norm.outliers
    norm(shutter)  # a short flat-field correction: one frame
    assert norm.range == window and norm.outliers == outliers + 1
    for _ in range(3):
        out = norm(moved)
        assert ((out == 0) | (out == 1)).mean() < 0.1


def test_a_lasting_change_far_outside_the_window_starts_a_new_one(msrs_pair):
    # A camera that switched from 14-bit counts (a scene a few hundred counts wide) to 8-bit AGC
    # output: two frames held, the third starts the window afresh from its own percentiles
    # instead of decaying for 15.
    eight_bit = msrs_pair[0].astype(np.float32)
    counts = 7000.0 + 2.0 * eight_bit
    norm = ThermalNormalizer()
    norm(counts)
    norm(eight_bit)
    norm(eight_bit)
    assert norm.outliers == 2 and norm.range[0] > 7000
    out = norm(eight_bit)
    assert norm.outliers == 2
    np.testing.assert_array_equal(out, ThermalNormalizer()(eight_bit))
    # A corrupt frame right after is held out of the new window as out of any other.
    window = norm.range
    norm(np.full(counts.shape, 1e30, np.float32))
    assert norm.outliers == 3 and norm.range == window
    # Without smoothing every frame is its own window: none is held.
    unsmoothed = ThermalNormalizer(smoothing=0.0)
    unsmoothed(counts)
    np.testing.assert_array_equal(unsmoothed(eight_bit), out)
    assert unsmoothed.outliers == 0


def test_minmax_is_per_frame_and_fixed_is_fixed(msrs_pair, counts):
    out = ThermalNormalizer(mode='minmax')(counts)
    assert out.min() == 0.0 and out.max() == 1.0
    ir = msrs_pair[0]
    expected = (ir.astype(np.float32) - ir.min()) / (float(ir.max()) - ir.min())
    np.testing.assert_allclose(ThermalNormalizer(mode='minmax', smoothing=0.9)(ir), expected,
                               atol=1e-6)
    fixed = ThermalNormalizer(mode='fixed', fixed_range=(0.0, 255.0))
    np.testing.assert_allclose(fixed(ir), ir / 255.0, atol=1e-6)
    np.testing.assert_allclose(fixed(ir.astype(np.float32) + 300.0), 1.0)


def test_non_finite_pixels_are_ignored_and_map_to_zero(counts):
    clean = ThermalNormalizer(smoothing=0.0)
    expected = clean(counts)
    dirty = counts.copy()
    dirty[::7, ::5] = np.nan
    dirty[3, :] = np.inf
    dirty[4, :] = -np.inf
    for mode in ('percentile', 'minmax'):
        out = ThermalNormalizer(mode=mode, smoothing=0.0)(dirty)
        assert np.isfinite(out).all() and (out[~np.isfinite(dirty)] == 0).all()
    out = ThermalNormalizer(smoothing=0.0)(dirty)
    keep = np.isfinite(dirty)
    np.testing.assert_allclose(out[keep], expected[keep], atol=0.02)


@pytest.mark.parametrize('mode', ['percentile', 'minmax', 'fixed'])
def test_empty_and_flat_frames_give_zeros_without_warnings(mode):
    norm = ThermalNormalizer(mode=mode, fixed_range=(5.0, 5.5))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for frame in (np.full((48, 64), np.nan, np.float32), np.full((48, 64), 7.0, np.float32)):
            out = norm(frame)
            assert out.dtype == np.float32 and out.shape == (48, 64)
            assert np.isfinite(out).all()
            if mode != 'fixed' or np.isnan(frame).all():
                assert (out == 0).all()


def test_a_hot_target_on_a_uniform_background_stays_visible():
    # A simulated thermal camera: ambient everywhere but a person on 0.5% of the pixels, so both
    # percentiles are the ambient value.
    frame = np.full((100, 100), 293.0, np.float32)
    frame[:5, :10] = 309.0
    frame[0, 0] = 301.0
    for mode in ('percentile', 'minmax'):
        out = ThermalNormalizer(mode=mode, smoothing=0.0)(frame)
        assert out[0, 0] == 0.5 and (out[1:5, :10] == 1).all() and out.sum() == 49.5, mode
    # Uniform frames a count apart (a lens cap, a noise-free simulation) stay black: the flat
    # window maps each frame's own extremes, not a step about the window.
    norm = ThermalNormalizer()
    for value in (7500.0, 7501.0, 7500.0, 7501.0, 7502.0):
        assert not norm(np.full((48, 64), value, np.float32)).any()


def test_a_few_finite_pixels_off_the_sample_grid_still_set_the_window():
    # Above SAMPLE_PIXELS the percentiles come from every third pixel here; where no finite
    # pixel lies on that grid, from the finite ones, not from an empty sample.
    frame = np.full((480, 640), np.nan, np.float32)
    frame[1, 1], frame[1, 2], frame[2, 1] = 10.0, 20.0, 30.0
    norm = ThermalNormalizer()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        out = norm(frame)
    assert norm.range == pytest.approx((10.2, 29.8))
    assert out[1, 2] == pytest.approx(0.5) and out[2, 1] == 1.0 and out.sum() == pytest.approx(1.5)


def test_raw_counts_are_16_bit_frames_spanning_less_than_14_bits():
    fourteen_bit = np.arange(1 << 14, dtype=np.uint16).reshape(128, 128)  # 0 to 16383
    assert looks_like_raw_counts(fourteen_bit)
    fifteen_bit = fourteen_bit.copy()
    fifteen_bit[-1, -1] = 1 << 14  # spans 16384: not less
    assert not looks_like_raw_counts(fifteen_bit)
    assert not looks_like_raw_counts((fourteen_bit >> 6).astype(np.uint8))  # 8-bit: a picture
    assert not looks_like_raw_counts(fourteen_bit * np.uint16(4))  # stretched to 16 bits


def test_all_nan_frame_leaves_the_smoothed_range_alone(counts):
    norm = ThermalNormalizer()
    norm(counts)
    before = norm.range
    norm(np.full(counts.shape, np.nan, np.float32))
    assert norm.range == before


@settings(max_examples=150, deadline=None)
@given(frame=hnp.arrays(np.float32, st.tuples(st.integers(1, 40), st.integers(1, 40)),
                        elements=st.floats(width=32)),
       mode=st.sampled_from(['percentile', 'minmax', 'fixed']),
       smoothing=st.sampled_from([0.0, 0.8]))
@example(frame=np.array([[7.45e-43, 0.0, 0.0]], np.float32), mode='percentile', smoothing=0.0)
@example(frame=np.array([[-3e38, 3e38, 1.0]], np.float32), mode='minmax', smoothing=0.0)
def test_any_frame_gives_finite_unit_output(frame, mode, smoothing):
    norm = ThermalNormalizer(mode=mode, smoothing=smoothing)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for _ in range(2):
            out = norm(frame)
            assert out.dtype == np.float32 and out.shape == frame.shape
            assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
            assert (out[~np.isfinite(frame)] == 0).all()


def test_configure_validates_and_applies_atomically(counts):
    norm = ThermalNormalizer()
    norm(counts)
    norm.configure(smoothing=0.5)
    assert norm.range is not None  # the same window, smoothed otherwise from now on
    norm.configure(smoothing=0.8, low_percentile=5.0, high_percentile=95.0)
    assert (norm.settings.low_percentile, norm.settings.high_percentile) == (5.0, 95.0)
    # Another window: the next frame starts it (kept, it read as frames far outside it).
    assert norm.range is None
    norm(counts)
    norm(counts)
    assert norm.outliers == 0
    for changes, reason in [(dict(low_percentile=95.0), 'low < high'),
                            (dict(high_percentile=101.0), 'high <= 100'),
                            (dict(smoothing=1.0), 'smoothing must be in'),
                            (dict(smoothing=-0.1), 'smoothing must be in'),
                            (dict(mode='log'), 'mode must be one of'),
                            (dict(fixed_range=(5.0, 5.0)), 'low < high'),
                            (dict(fixed_range=(0.0, float('inf'))), 'finite'),
                            (dict(fixed_range=(1.0,)), r'\(low, high\)'),
                            (dict(mode='fixed', gain=2.0), 'unknown normalizer setting')]:
        with pytest.raises(ValueError, match=reason):
            norm.configure(**changes)
        assert norm.settings == NormalizerSettings(low_percentile=5.0, high_percentile=95.0)
    norm.configure(mode='fixed', fixed_range=[10.0, 20.0])
    assert norm.settings.fixed_range == (10.0, 20.0) and norm.range is None
    with pytest.raises(ValueError, match='mode must be one of'):
        ThermalNormalizer(mode='auto')
    with pytest.raises(ValueError, match=r'\(H, W\)'):
        norm(np.zeros((2, 3, 3), np.float32))
