"""The saliency map's defining properties (README "Saliency"), on real MSRS images."""

import numpy as np
import pytest

from s4fusion_ros.saliency import saliency_map


@pytest.fixture(scope='module')
def sources(msrs_pair):
    ir, vi = msrs_pair
    import cv2
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


def test_zero_where_thermal_is_not_brighter_than_visible(sources):
    ir, vi = sources
    saliency = saliency_map(ir, vi, np.maximum(ir, vi))
    assert not saliency[ir <= vi].any()
    assert saliency[ir - vi >= 0.2].min() == 1.0


def test_never_credits_more_than_the_thermal_excess(sources):
    ir, vi = sources
    # A fused image brighter than both sources must not look more salient than the thermal allows.
    over = saliency_map(ir, vi, np.ones_like(ir), contrast=1.0)
    np.testing.assert_allclose(over, np.clip(ir - vi, 0, 1), atol=1e-6)


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
