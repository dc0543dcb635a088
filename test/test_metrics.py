"""Fusion metrics: defining properties, and agreement with the published MATLAB reference values.

The reference (``tno/reference/matlab_per_image_metrics.csv``) holds Tang et al.'s MATLAB values
for DenseFuse's fused TNO images. Six varied images run by default, S4FUSION_ALL_TNO=1 all 42.
"""

import math

import cv2
import numpy as np
import pytest

from s4fusion_ros.evaluation import metrics as M
from support import read_gray, read_reference, REFERENCE_METRICS, TNO_IMAGES

Q_IDENTITY = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))


@pytest.fixture(scope='module')
def densefuse_reference(ivif_dir):
    return read_reference(ivif_dir, 'DenseFuse')


@pytest.mark.parametrize('name', TNO_IMAGES)
def test_matches_matlab_reference_on_densefuse(ivif_dir, densefuse_reference, name):
    """matlab_compat reproduces every reference value; standard mode differs only as documented."""
    tno = ivif_dir / 'tno'
    fused, ir, vi = (read_gray(tno / sub / name) for sub in ('fused/DenseFuse', 'ir', 'vi'))
    ref = densefuse_reference[name]

    compat = M.evaluate_all(fused, ir, vi, matlab_compat=True)
    for key in REFERENCE_METRICS:
        assert compat[key] == pytest.approx(ref[key], rel=1e-6), key

    ours = M.evaluate_all(fused, ir, vi)
    # Same convention: exact agreement.
    for key in ('EN', 'AG', 'CC', 'SCD'):
        assert ours[key] == pytest.approx(ref[key], rel=1e-9), key
    # Known unit conversions: the reference works on [0, 1] for SF and MSE, and its PSNR uses peak
    # 255 with that [0, 1] MSE, i.e. +20 log10(255) dB.
    assert ours['SF'] / 255 == pytest.approx(ref['SF'], rel=1e-9)
    assert ours['MSE'] / 255 ** 2 == pytest.approx(ref['MSE'], rel=1e-9)
    assert ours['PSNR'] + 20 * math.log10(255) == pytest.approx(ref['PSNR'], abs=1e-9)
    # The reference merges grey level 255 into 254 in the joint histograms: MI can only grow.
    assert ref['MI'] * (1 - 0.02) <= ours['MI'] <= ref['MI'] * (1 + 1e-9)
    # Qabf: only the reference's rounding-driven orientations and its G = gF quirk differ.
    assert ours['Qabf'] == pytest.approx(ref['Qabf'], rel=0.015)
    # SD and VIF: the reference's uint8 saturation changes them beyond any fixed conversion.


def test_standard_mode_on_densefuse_matches_an_independent_port(ivif_dir):
    """The metrics whose default mode the MATLAB reference checks only loosely or not at all,
    against values independent NumPy ports of their definitions gave on TNO 01: population SD;
    Sheikh & Bovik's vifp_mscale and Wang et al.'s ssim_index (11x11 Gaussian), each summed over
    the sources; MI from exact 256x256 joint histograms; Qabf with G = 1 where gS == gF (the
    toolkit's G = gF would give 0.41358885)."""
    tno = ivif_dir / 'tno'
    fused, ir, vi = (read_gray(tno / sub / '01.png') for sub in ('fused/DenseFuse', 'ir', 'vi'))
    ours = M.evaluate_all(fused, ir, vi)
    for key, value in (('SD', 27.746373), ('VIF', 0.53640685), ('SSIM', 1.5820025),
                       ('MI', 2.1372308), ('Qabf', 0.41358832)):
        assert ours[key] == pytest.approx(value, rel=1e-7), key


def test_evaluate_all_returns_every_metric():
    rng = np.random.default_rng(0)
    f, a, b = (rng.integers(0, 256, (32, 40), dtype=np.uint8) for _ in range(3))
    for compat in (False, True):
        values = M.evaluate_all(f, a, b, matlab_compat=compat)
        assert tuple(values) == M.METRICS
        assert all(np.isfinite(v) for v in values.values())


def test_float_and_uint8_inputs_agree():
    rng = np.random.default_rng(1)
    f, a, b = (rng.integers(0, 256, (40, 48), dtype=np.uint8) for _ in range(3))
    as_uint8 = M.evaluate_all(f, a, b)
    as_float = M.evaluate_all(*(x.astype(np.float32) for x in (f, a, b)))
    for key in M.METRICS:
        assert as_float[key] == pytest.approx(as_uint8[key], rel=1e-9), key


def test_rejects_colour_and_mismatched_shapes():
    gray = np.zeros((16, 16), np.uint8)
    with pytest.raises(ValueError, match='gray'):
        M.evaluate_all(np.zeros((16, 16, 3), np.uint8), gray, gray)
    with pytest.raises(ValueError, match='shapes differ'):
        M.evaluate_all(gray, gray, np.zeros((16, 17), np.uint8))


def test_entropy_bounds():
    assert M.entropy(np.full((20, 20), 77, np.uint8)) == 0.0
    every_level = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert M.entropy(every_level) == pytest.approx(8.0)
    two_levels = np.array([[0, 255]] * 8, np.uint8)
    assert M.entropy(two_levels) == pytest.approx(1.0)


def test_gradient_metrics_of_a_ramp():
    h, w = 30, 50
    ramp = np.tile(np.arange(w, dtype=np.float64), (h, 1))  # +1 grey level per column
    assert M.spatial_frequency(ramp) == pytest.approx(1.0)
    # Gx = 1 everywhere (central and one-sided differences alike), Gy = 0.
    assert M.average_gradient(ramp) == pytest.approx(h * w * math.sqrt(0.5) / ((h - 1) * (w - 1)))
    flat = np.full((h, w), 100.0)
    assert M.spatial_frequency(flat) == M.average_gradient(flat) == M.std_dev(flat) == 0.0


def test_sd_matlab_compat_saturates():
    # mean 100: deviations +-100; uint8 keeps only the positive half, capped at 255 once squared.
    img = np.array([[0, 200]] * 10, np.uint8)
    assert M.std_dev(img) == pytest.approx(100.0)
    assert M.std_dev(img, matlab_compat=True) == pytest.approx(math.sqrt(255 / 2))


def test_mutual_information_properties():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 255, (64, 64), dtype=np.uint8)  # no 255: both modes agree
    y = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    en = M.entropy(x)
    assert M.mutual_information(x, x, x) == pytest.approx(2 * en)  # MI(X, X) = H(X)
    assert M.mutual_information(x, x, x, matlab_compat=True) == pytest.approx(2 * en)
    assert M.mutual_information(x, y, x) == pytest.approx(M.mutual_information(x, x, y))
    # Symmetric: MI(Y, X) = MI(X, Y).
    assert M.mutual_information(y, x, x) == pytest.approx(M.mutual_information(x, y, y))
    # Independent images: only the small finite-sample bias (few levels, many pixels).
    u, v = (rng.integers(0, 4, (256, 256), dtype=np.uint8) for _ in range(2))
    assert M.mutual_information(u, u, u) == pytest.approx(4.0, abs=1e-3)  # 2 bits each
    assert 0.0 < M.mutual_information(u, v, v) < 1e-2
    # With grey level 255 present, the reference's merged bin loses joint entropy: MI grows.
    z = x.copy()
    z[:8] = 255
    assert M.mutual_information(z, z, z, matlab_compat=True) > M.mutual_information(z, z, z)


def test_correlation_metrics():
    rng = np.random.default_rng(3)
    a = rng.normal(100, 20, (32, 32))
    b = rng.normal(100, 20, (32, 32))
    assert M.correlation_coefficient(2 * a + 3, a, a) == pytest.approx(1.0)
    assert M.scd(a + b, a, b) == pytest.approx(2.0)  # F - VI = IR and F - IR = VI
    assert math.isnan(M.correlation_coefficient(np.full_like(a, 5.0), a, b))


def test_mse_and_psnr():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 200, (16, 16)).astype(np.float64)
    assert M.mse(a + 10, a, a) == pytest.approx(100.0)
    assert M.psnr(a + 10, a, a) == pytest.approx(10 * math.log10(255 ** 2 / 100))
    assert M.psnr(a, a, a) == math.inf


def test_ssim_properties():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (40, 40)).astype(np.float64)
    b = cv2.GaussianBlur(a, (5, 5), 2.0)
    assert M.ssim(a, a, a) == pytest.approx(2.0)
    assert M.ssim(a, b, b) == pytest.approx(M.ssim(b, a, a))
    assert M.ssim(a, b, b) < 2.0
    # Flat images: no variance, so SSIM is the luminance term (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    c1 = (0.01 * 255) ** 2
    flat_f, flat_s = np.full((20, 20), 50.0), np.full((20, 20), 150.0)
    expected = (2 * 50 * 150 + c1) / (50 ** 2 + 150 ** 2 + c1)
    assert M.ssim(flat_f, flat_s, flat_s) == pytest.approx(2 * expected)
    with pytest.raises(ValueError, match='11x11'):
        M.ssim(a[:10], a[:10], a[:10])


def test_vif_properties():
    rng = np.random.default_rng(6)
    a = cv2.GaussianBlur(rng.integers(0, 256, (96, 96)).astype(np.float64), (3, 3), 1.0)
    assert M.vif(a, a, a) == pytest.approx(2.0)  # VIFp(x, x) = 1
    assert M.vif(np.full_like(a, 128.0), a, a) == pytest.approx(0.0)  # no information left
    noisy = a + rng.normal(0, 20, a.shape)
    assert 0.0 < M.vif(noisy, a, a) < M.vif(a, a, a)
    assert M.vif(a[:25, :25], a[:25, :25], a[:25, :25]) > 0.0  # the smallest it scores
    with pytest.raises(ValueError, match='25x25'):  # not OpenCV's assertion on an empty array
        M.vif(a[:24], a[:24], a[:24])


def test_qabf_when_fused_is_the_source():
    yy, xx = np.mgrid[-32:32, -32:32]
    blob = 60.0 * np.exp(-(xx ** 2 + yy ** 2) / 200.0)  # smooth, ~0 at the zero-padded border
    other = np.roll(blob, 20, axis=1)  # the same blob elsewhere: equal total edge strength
    # Perfect edge transfer scores the product of both sigmoids at 1 (below 1 by design).
    assert M.qabf(blob, blob, blob) == pytest.approx(Q_IDENTITY, rel=1e-12)
    # Copying one source transfers its edges perfectly, about half of all; a flat F none.
    assert 0.4 * Q_IDENTITY < M.qabf(blob, blob, other) < 0.6 * Q_IDENTITY
    assert M.qabf(np.zeros_like(blob), blob, other) == pytest.approx(0.0, abs=1e-3)
    # The reference sets G = gF (not 1) where gS == gF; on its [0, 1] scale a smooth copied source
    # then scores almost nothing: it penalises fusions that copy source pixels exactly.
    assert M.qabf(blob, blob, blob, matlab_compat=True) < 0.01
