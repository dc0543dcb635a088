"""The saliency map's defining properties (README "Saliency"), on real MSRS images."""

import cv2
import numpy as np
import pytest

from s4fusion_ros.saliency import saliency_map, thermal_background


@pytest.fixture(scope='module')
def sources(msrs_pair):
    ir, vi = msrs_pair
    vi_y = cv2.cvtColor(vi, cv2.COLOR_BGR2YCrCb)[..., 0]
    return ir.astype(np.float32) / 255, vi_y.astype(np.float32) / 255


def test_in_unit_range_and_float32(sources):
    ir, vi = sources
    fused = np.maximum(ir, vi)
    saliency = saliency_map(ir, vi, fused)
    assert saliency.dtype == np.float32 and saliency.shape == ir.shape
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0
    assert saliency.max() == 1.0, 'a night MSRS scene has thermal targets far above the visible'


def test_zero_where_fusion_keeps_only_the_visible_image(sources):
    ir, vi = sources
    assert not saliency_map(ir, vi, vi.copy()).any()


def test_zero_where_thermal_is_not_brighter_than_visible_or_its_background(sources):
    ir, vi = sources
    saliency = saliency_map(ir, vi, np.maximum(ir, vi))
    excess = ir - thermal_background(ir)
    assert not saliency[ir <= vi].any()
    assert not saliency[excess <= 0].any()
    assert saliency[(ir - vi >= 0.2) & (excess >= 0.2)].min() == 1.0


def test_a_uniformly_warm_region_is_not_a_target():
    # A large warm plateau (a sunlit wall) with one small hot spot (a person) in front of it.
    thermal = np.full((240, 320), 0.2, np.float32)
    thermal[40:200, 40:280] = 0.6
    thermal[100:130, 150:160] = 0.95
    visible = np.full_like(thermal, 0.2)
    saliency = saliency_map(thermal, visible, thermal.copy())
    assert saliency[100:130, 150:160].min() == 1.0
    assert saliency[85:155, 185:235].max() < 0.02, 'the plateau interior is warm, not salient'


def test_never_credits_more_than_the_thermal_excess(sources):
    ir, vi = sources
    # A fused image brighter than both sources must not look more salient than the thermal allows.
    over = saliency_map(ir, vi, np.ones_like(ir), contrast=1.0)
    expected = np.clip(np.minimum(ir - vi, ir - thermal_background(ir)), 0, 1)
    np.testing.assert_allclose(over, expected, atol=1e-6)


def test_background_is_a_smooth_local_mean(sources):
    ir, _ = sources
    background = thermal_background(ir)
    assert background.shape == ir.shape and background.dtype == np.float32
    assert abs(float(background.mean()) - float(ir.mean())) < 0.01
    assert np.abs(np.diff(background, axis=1)).max() < 0.05
    assert cv2.Laplacian(background, cv2.CV_32F).std() < 0.1 * cv2.Laplacian(ir, cv2.CV_32F).std()


@pytest.mark.parametrize('size', [(480, 640), (60, 80), (7, 13)])
def test_background_is_its_definition_at_any_size(sources, size):
    # A Gaussian blur with sigma = 1/16 of the shorter side, as documented: blurred at 1/8 of a
    # small image, it was 0.4 off at 7x13.
    ir = cv2.resize(sources[0], size[::-1], interpolation=cv2.INTER_AREA)
    defined = cv2.GaussianBlur(ir, (0, 0), sigmaX=min(size) / 16, borderType=cv2.BORDER_REFLECT)
    assert np.abs(thermal_background(ir) - defined).max() < 0.01


def test_monotone_in_how_much_thermal_the_fusion_carries(sources):
    ir, vi = sources
    maps = [saliency_map(ir, vi, vi + alpha * (ir - vi)) for alpha in (0.0, 0.25, 0.5, 1.0)]
    for weaker, stronger in zip(maps, maps[1:]):
        assert np.all(stronger >= weaker)
    assert maps[-1].sum() > maps[1].sum() > 0


def test_threshold_zeroes_weak_saliency(sources):
    ir, vi = sources
    fused = vi + 0.5 * (ir - vi)
    raw = saliency_map(ir, vi, fused)
    cut = saliency_map(ir, vi, fused, threshold=0.5)
    assert not cut[raw < 0.5].any()
    np.testing.assert_array_equal(cut[raw >= 0.5], raw[raw >= 0.5])
