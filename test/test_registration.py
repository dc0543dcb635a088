"""Thermal -> visible registration with known homographies on a real MSRS thermal frame."""

import cv2
import numpy as np
import pytest

from s4fusion_ros.imaging.registration import ThermalRegistration, validate_homography


@pytest.fixture(scope='module')
def thermal(msrs_pair):
    """Normalize the MSRS thermal frame to float32 [0, 1], 640x480."""
    return msrs_pair[0].astype(np.float32) / 255.0


def test_identity_of_the_same_size_passes_through_uncopied(thermal):
    registration = ThermalRegistration()
    assert not registration.needs_resize(thermal.shape, (640, 480))
    assert registration(thermal, (640, 480)) is thermal
    assert ThermalRegistration(3.0 * np.eye(3))(thermal, (640, 480)) is thermal  # scale-free


def test_identity_of_another_size_resizes_and_says_so(thermal):
    registration = ThermalRegistration(None)
    assert registration.needs_resize(thermal.shape, (1280, 720))
    out = registration(thermal, (1280, 720))
    assert out.shape == (720, 1280) and out.dtype == np.float32
    np.testing.assert_allclose(out, cv2.resize(thermal, (1280, 720)), atol=1e-6)
    # Shrunk by area: each pixel the mean of those it covers. Bilinear gives the same at 2x but
    # at 4x samples 2 of each 4 rows and columns, and thin hot detail flickers in and out.
    for factor in (2, 4):
        small = registration(thermal, (640 // factor, 480 // factor))
        np.testing.assert_allclose(small, thermal.reshape(480 // factor, factor, 640 // factor,
                                                          factor).mean(axis=(1, 3)), atol=1e-5)
    assert not ThermalRegistration(np.diag([1.0, 1.0, 1.0]) + 0.1).needs_resize(
        thermal.shape, (1280, 720))


def test_translation_moves_pixels_by_known_offsets(thermal):
    dx, dy = 17, -9
    homography = [1, 0, dx, 0, 1, dy, 0, 0, 1]  # a ROS double-array parameter, row-major
    out = ThermalRegistration(homography)(thermal, (640, 480))
    assert out.shape == thermal.shape and out.dtype == np.float32
    np.testing.assert_allclose(out[0:480 + dy, dx:], thermal[-dy:, :640 - dx], atol=1e-6)
    assert (out[:, :dx] == 0).all() and (out[480 + dy:, :] == 0).all()  # outside: border


def test_pixels_outside_the_thermal_view_take_the_callers_values(thermal):
    dx, dy = 17, -9
    outside = np.full((480, 640), 0.25, np.float32)
    out = ThermalRegistration([1, 0, dx, 0, 1, dy, 0, 0, 1])(thermal, (640, 480), outside)
    np.testing.assert_allclose(out[0:480 + dy - 1, dx + 1:], thermal[-dy:-1, 1:640 - dx],
                               atol=1e-6)
    assert (out[:, :dx] == 0.25).all() and (out[480 + dy:, :] == 0.25).all()
    assert not np.isnan(out).any()


@pytest.mark.parametrize('outside', [None, np.full((480, 640), 0.25, np.float32)])
def test_a_smaller_camera_scaled_to_the_visible_frame_is_seen_to_its_edges(thermal, outside):
    # A 160x120 thermal camera with the visible one's view: the homography that maps its pixel
    # centres where the identity's resize puts them. Its edge pixels cover the frame's edges, but
    # a 2-pixel frame around the image (within a thermal pixel of its edge) used to get the
    # border or the visible luminance: up to 100 grey levels off in the fused image there.
    small = cv2.resize(thermal, (160, 120), interpolation=cv2.INTER_AREA)
    scale = [[4.0, 0.0, 1.5], [0.0, 4.0, 1.5], [0.0, 0.0, 1.0]]
    out = ThermalRegistration(scale)(small, (640, 480), outside)
    resized = ThermalRegistration()(small, (640, 480))
    np.testing.assert_allclose(out, resized, atol=0.01)
    # Half a thermal pixel further, the camera sees nothing: its view ends where its pixels do.
    shifted = ThermalRegistration([[4.0, 0.0, 3.5], [0.0, 4.0, 1.5], [0.0, 0.0, 1.0]])
    out = shifted(small, (640, 480), outside)
    border = 0.0 if outside is None else 0.25
    assert (out[:, :2] == border).all() and (out[:, 2:] != border).all()


def test_homography_from_point_pairs_registers_into_a_larger_visible_frame(thermal):
    """Thermal 640x480 seen by a 800x600 visible camera, scaled, rotated and shifted."""
    angle = np.deg2rad(3.0)
    true = np.array([[1.2 * np.cos(angle), -1.2 * np.sin(angle), 30.0],
                     [1.2 * np.sin(angle), 1.2 * np.cos(angle), 10.0],
                     [0.0, 0.0, 1.0]])
    corners = np.float32([[0, 0], [639, 0], [639, 479], [0, 479]])
    seen = cv2.perspectiveTransform(corners[None], true)[0]
    estimated, _ = cv2.findHomography(corners, seen)
    out = ThermalRegistration(estimated, border_value=-1.0)(thermal, (800, 600))
    assert out.shape == (600, 800)
    # Reference: sample the thermal frame where the inverse of the true homography points.
    v, u = np.mgrid[0:600, 0:800]
    back = np.dstack([u, v, np.ones_like(u)]) @ np.linalg.inv(true).T
    map_x = np.float32(back[:, :, 0] / back[:, :, 2])
    map_y = np.float32(back[:, :, 1] / back[:, :, 2])
    expected = cv2.remap(thermal, map_x, map_y, cv2.INTER_LINEAR)
    inside = (map_x >= 0) & (map_x <= 638) & (map_y >= 0) & (map_y <= 478)
    assert 0.5 < inside.mean() < 0.95
    error = np.abs(out[inside] - expected[inside])
    assert error.max() < 0.03 and error.mean() < 0.002
    assert (out[(map_x < -1) | (map_y < -1)] == -1.0).all()  # outside the thermal view


@pytest.mark.parametrize('homography, message', [
    (np.eye(2), 'must be 3x3 or 9 values'),
    ([1, 0, 0, 0, 1, 0, 0, 0], 'must be 3x3 or 9 values'),
    ('identity', 'must be numbers'),
    ([[1, 0, 0], [0, np.nan, 0], [0, 0, 1]], 'non-finite'),
    ([[1, 2, 3], [2, 4, 6], [0, 0, 1]], 'singular'),
    (np.zeros((3, 3)), 'singular'),
])
def test_invalid_homographies_are_refused(homography, message):
    with pytest.raises(ValueError, match=message):
        validate_homography(homography)
    with pytest.raises(ValueError, match=message):
        ThermalRegistration(homography)


def test_validate_normalizes_scale():
    matrix = validate_homography(2.0 * np.array([[1.0, 0.1, 5.0], [0.0, 1.0, 3.0], [0, 0, 1]]))
    assert matrix[2, 2] == 1.0 and matrix[0, 2] == 5.0
    # Any scale, a negative one too (findHomography's result times -1 is the same mapping).
    matrix = validate_homography(-2.0 * np.array([[1.0, 0.1, 5.0], [0.0, 1.0, 3.0], [0, 0, 1]]))
    assert matrix[2, 2] == 1.0 and matrix[0, 2] == 5.0
    assert ThermalRegistration(-np.eye(3)).is_identity
    # H[2, 2] = 0 is a valid homography (it maps the thermal origin to infinity): kept as it
    # is, not divided by zero.
    swap = [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    np.testing.assert_array_equal(validate_homography(swap), swap)


def test_a_homography_near_the_identity_is_warped_not_passed_through(thermal):
    # A perspective term of 1e-4 (a 6% scale across a 640-pixel frame) is no identity.
    tilt = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1e-4, 0.0, 1.0]]
    registration = ThermalRegistration(tilt)
    assert not registration.is_identity
    out = registration(thermal, (640, 480))
    expected = cv2.warpPerspective(thermal, np.array(tilt), (640, 480), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE)
    np.testing.assert_allclose(out[:440, :600], expected[:440, :600], atol=1e-6)  # all seen
    assert np.abs(out - thermal).max() > 0.5


def test_the_unseen_pixels_follow_each_calls_sizes(thermal):
    # One registration given frames of two sizes (a camera that changed its mode): each call's
    # border is that of its own sizes, not of the sizes it saw first.
    registration = ThermalRegistration([1, 0, 17, 0, 1, 0, 0, 0, 1])
    registration(thermal, (640, 480))
    half = registration(thermal[:, :320], (640, 480))
    assert (half[:, :17] == 0).all() and (half[:, 17 + 320:] == 0).all()
    np.testing.assert_allclose(half[:, 18:17 + 319], thermal[:, 1:319], atol=1e-6)
    wider = registration(thermal, (700, 480))
    assert (wider[:, 17 + 640:] == 0).all() and (wider[:, 17:17 + 640] == thermal).all()


@pytest.mark.parametrize('size', [(0, 480), (640, -1), (640,), (640, 480, 3)])
def test_invalid_visible_size_is_refused(thermal, size):
    with pytest.raises(ValueError, match='visible size'):
        ThermalRegistration()(thermal, size)
