"""Fusion-quality metrics for a gray fused image F given gray sources IR (A) and VI (B).

All images are (H, W), uint8 or float on the 0-255 scale (colour fused images: the caller passes
Y). Histogram metrics (EN, MI) quantise float input to uint8 by rounding, as saving a PNG does.
Higher is better for all but MSE. NaN where a metric is undefined (e.g. CC of a flat image, SCD
when F equals a source, so that F - A or F - B is flat).

The reference is the MATLAB code of Tang et al. as of 2022 (SeAFusion repo ``Evaluation/``, run
by Linfeng-Tang/Evaluation-for-Image-Fusion at 5d6c43a to make ``Metric_TNO.xlsx``, our reference
CSV). It reads 8-bit PNGs; some of its functions work on ``im2double`` ([0, 1]) data and some on
uint8, whose saturating arithmetic changes SD, MI and VIF. ``matlab_compat=True`` reproduces its
numbers exactly (checked on 42 TNO images: agreement to 1e-6 or better for all 11 metrics). The
toolkit's version of March 2023 (7849642) passes ``im2double * 255`` to SF, SD, VIF, AG, CC, SCD
and Qabf, which then agree with this module's default, but for Qabf's G = gF where gS == gF (at
most about 0.05 % on 0-255 data, most for fusions that copy source pixels); EN and MI stay on
uint8 (MI with the saturation below), and MSE and PSNR on [0, 1] as in the right column. Its
Qabf, like the 2022 one and this module's, takes |angle difference| / (pi / 2) without wrapping
the angles mod pi, so it changes when all three images are transposed (TNO DenseFuse: by 2 % on
the median image, up to 11 %).

======  ============================================  ============================================
metric  this module (0-255 scale)                     MATLAB reference (``matlab_compat=True``)
======  ============================================  ============================================
EN      entropy of F's 256-bin histogram, bits        same
SD      population standard deviation of F            uint8 arithmetic: sqrt(mean(min(round(max(
                                                      F - mean, 0))^2, 255))): pixels below the
                                                      mean count 0, each term caps at 255 (< 16)
SF      sqrt(mean(dy^2) + mean(dx^2)), forward        on [0, 1]: ours / 255
        differences
AG      sum(sqrt((Gx^2 + Gy^2) / 2)) / ((H-1)(W-1)),  same
        central differences (one-sided at edges)
MI      MI(F, A) + MI(F, B), bits, 256x256 joint      joint histogram indexed by uint8 ``x + 1``,
        histograms                                    which saturates: level 255 joins 254
                                                      (marginals exact); up to +1.5 % on TNO
CC      (corr(A, F) + corr(B, F)) / 2, Pearson        same
SCD     corr(F - B, A) + corr(F - A, B)               same
VIF     VIFp(A, F) + VIFp(B, F): Sheikh & Bovik's     scale 1 squares/products ref*ref, dist*dist,
        4-scale pixel-domain VIF, sigma_n^2 = 2,      ref*dist in uint8, so capped at 255: on
        Gaussian windows N = 17, 9, 5, 3, sigma N/5   average ~25 % higher (TNO DenseFuse mean
                                                      0.82 vs 0.66; per image -9 % to +53 %)
Qabf    Xydeas & Petrovic: Sobel on zero-padded       on [0, 1]: where the exact Sobel x response
        images, angle atan(Sy / Sx) (pi/2 where       is 0, conv2 rounding leaves +-1e-17, so the
        Sx = 0), G = min(gS, gF) / max(gS, gF),       angle flips to +-pi/2 at random; and G = gF
        Tg 0.9994, kg -15, Dg 0.5, Ta 0.9879,         (not 1) where gS == gF, which sinks fusions
        ka -22, Da 0.8, weights gA and gB             that copy source pixels (max: 0.24 vs 0.60).
                                                      DenseFuse TNO: within 0.8 %
SSIM    SSIM(F, A) + SSIM(F, B), Wang et al. 2004:    not in the reference (the 2022 toolkit's is
        Gaussian window 11, sigma 1.5, K1 0.01,       mef_ssim, another metric). Since 7849642
        K2 0.03, L 255, mean over the valid region    (run with easy = 0; easy = 1 writes 1)
                                                      0.5 SSIM(F, A) + 0.5 SSIM(F, B) by MATLAB's
                                                      ssim, a mean: about ours / 2 (its constants
                                                      for 0-255 doubles are 255^2 times smaller).
                                                      Summed like MI and VIF, and as in CDDFuse's
                                                      evaluator (which uses skimage's 7x7 uniform
                                                      window: values differ)
MSE     (MSE(F, A) + MSE(F, B)) / 2                   on [0, 1]: ours / 255^2
PSNR    10 log10(255^2 / MSE), dB                     20 log10(255 / sqrt(MSE on [0, 1])), i.e.
                                                      ours + 20 log10(255) = ours + 48.13 dB
======  ============================================  ============================================

Tables made with CDDFuse's ``utils/Evaluator.py`` (and the codebases that copied it) use other
conventions: MI in nats (ours x ln 2), AG over H W rather than (H-1)(W-1), PSNR with max(F) as
its peak, VIF 1 where it is NaN, and SSIM by skimage: a 7x7 uniform window, sample covariances
and, for its float input, data range 2 (skimage before 0.20; later ones refuse float input
without one), so constants about 16,000 times smaller than ours. Compare their numbers with
these only after converting (their SSIM cannot be). The VIFB toolbox (Zhang et al. 2020) has
this module's EN, SD, AG and SSIM and the 2023 toolkit's Qabf, but SF with both sums over H W
(not over the number of differences: a little below ours), MI in nats after stretching each
image to 0-255, PSNR from sqrt(sum of squared errors) / (H W) in place of the MSE, and colour
images scored per RGB channel, averaged.
"""

import math

import cv2
import numpy as np

from ..imaging.color import round_half_up
from ..imaging.filters import SOBEL_X, SOBEL_Y, ssim_map, ssim_window

METRICS = ('EN', 'SD', 'SF', 'AG', 'MI', 'CC', 'SCD', 'VIF', 'Qabf', 'SSIM', 'MSE', 'PSNR')

PSNR_OFFSET_DB = 20.0 * math.log10(255.0)  # the MATLAB reference's PSNR minus ours


def _as_gray(img, name):
    """Return a (H, W) image as float64, checking its shape."""
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f'{name} must be a gray (H, W) image, got shape {arr.shape}')
    return arr.astype(np.float64)


def _as_triple(fused, ir, vi):
    f, a, b = (_as_gray(x, n) for x, n in ((fused, 'fused'), (ir, 'ir'), (vi, 'vi')))
    if not f.shape == a.shape == b.shape:
        raise ValueError(f'shapes differ: fused {f.shape}, ir {a.shape}, vi {b.shape}')
    return f, a, b


def _as_uint8(img):
    """Round and clip to uint8, as writing an 8-bit image would."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr
    return round_half_up(np.clip(arr, 0, 255)).astype(np.uint8)  # as MATLAB's uint8()


def _entropy_bits(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: a flat image gives 0, not -0


def entropy(fused):
    """EN: entropy in bits of the 256-bin grey-level histogram."""
    f = _as_uint8(_as_gray(fused, 'fused'))
    return _entropy_bits(np.bincount(f.ravel(), minlength=256))


def std_dev(fused, matlab_compat=False):
    """SD: population standard deviation; ``matlab_compat``: the reference's uint8 version."""
    f = _as_gray(fused, 'fused')
    if not matlab_compat:
        return float(f.std())
    f = _as_uint8(f).astype(np.float64)
    # uint8 - double -> uint8 (round half away, clip at 0); .^2 on uint8 caps at 255
    dev = np.floor(np.maximum(f - f.mean(), 0.0) + 0.5)
    return float(np.sqrt(np.minimum(dev * dev, 255.0).sum() / f.size))


def spatial_frequency(fused):
    """SF: sqrt of the mean squared row difference plus the mean squared column difference."""
    f = _as_gray(fused, 'fused')
    return float(np.sqrt(np.mean(np.diff(f, axis=0) ** 2) + np.mean(np.diff(f, axis=1) ** 2)))


def average_gradient(fused):
    """AG: sum of sqrt((Gx^2 + Gy^2) / 2) over all pixels, divided by (H - 1)(W - 1)."""
    f = _as_gray(fused, 'fused')
    gy, gx = np.gradient(f)
    return float(np.sqrt((gx * gx + gy * gy) / 2.0).sum() / ((f.shape[0] - 1) * (f.shape[1] - 1)))


def _mutual_information(x, y, matlab_compat):
    """MI(x, y) in bits from uint8 images; ``matlab_compat`` merges level 255 into 254 (joint)."""
    hx = np.bincount(x.ravel(), minlength=256)
    hy = np.bincount(y.ravel(), minlength=256)
    if matlab_compat:
        x, y = np.minimum(x, 254), np.minimum(y, 254)
    joint = np.bincount(x.ravel().astype(np.int64) * 256 + y.ravel(), minlength=256 * 256)
    return _entropy_bits(hx) + _entropy_bits(hy) - _entropy_bits(joint)


def mutual_information(fused, ir, vi, matlab_compat=False):
    """MI: MI(F, IR) + MI(F, VI) in bits, from 256x256 joint histograms of the uint8 images."""
    f, a, b = (_as_uint8(x) for x in _as_triple(fused, ir, vi))
    return _mutual_information(f, a, matlab_compat) + _mutual_information(f, b, matlab_compat)


def _corr(x, y):
    x = x - x.mean()
    y = y - y.mean()
    with np.errstate(invalid='ignore', divide='ignore'):
        return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def correlation_coefficient(fused, ir, vi):
    """CC: mean of the Pearson correlations of F with IR and with VI."""
    f, a, b = _as_triple(fused, ir, vi)
    return (_corr(a, f) + _corr(b, f)) / 2.0


def scd(fused, ir, vi):
    """SCD: sum of the correlations of differences, corr(F - VI, IR) + corr(F - IR, VI)."""
    f, a, b = _as_triple(fused, ir, vi)
    return _corr(f - b, a) + _corr(f - a, b)


def _filter_valid(img, kernel_1d):
    """Separable correlation keeping only fully overlapped pixels (MATLAB filter2 'valid')."""
    k = kernel_1d.size // 2
    out = cv2.sepFilter2D(img, cv2.CV_64F, kernel_1d, kernel_1d)
    return out[k:img.shape[0] - k, k:img.shape[1] - k]


def _vifp(ref, dist, matlab_compat):
    """Sheikh & Bovik's multiscale pixel-domain VIF of ``dist`` against ``ref`` (0-255)."""
    sigma_nsq, eps = 2.0, 1e-10
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        win = cv2.getGaussianKernel(n, n / 5.0, cv2.CV_64F)
        if scale > 1:
            ref = _filter_valid(ref, win)[::2, ::2]
            dist = _filter_valid(dist, win)[::2, ::2]
        mu1, mu2 = _filter_valid(ref, win), _filter_valid(dist, win)
        rr, dd, rd = ref * ref, dist * dist, ref * dist
        if matlab_compat and scale == 1:  # uint8 products saturate
            rr, dd, rd = (np.minimum(p, 255.0) for p in (rr, dd, rd))
        s1 = np.maximum(_filter_valid(rr, win) - mu1 * mu1, 0.0)
        s2 = np.maximum(_filter_valid(dd, win) - mu2 * mu2, 0.0)
        s12 = _filter_valid(rd, win) - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        flat_ref = s1 < eps
        g[flat_ref] = 0.0
        sv[flat_ref] = s2[flat_ref]
        s1[flat_ref] = 0.0
        flat_dist = s2 < eps
        g[flat_dist] = 0.0
        sv[flat_dist] = 0.0
        negative = g < 0
        sv[negative] = s2[negative]
        g[negative] = 0.0
        sv = np.maximum(sv, eps)
        num += np.log10(1.0 + g * g * s1 / (sv + sigma_nsq)).sum()
        den += np.log10(1.0 + s1 / sigma_nsq).sum()
    with np.errstate(invalid='ignore', divide='ignore'):
        return float(num / den)


# The smallest side every metric scores: VIF's second scale needs a valid region.
MIN_SIDE = 25


def vif(fused, ir, vi, matlab_compat=False):
    """VIF: VIFp(IR, F) + VIFp(VI, F), multiscale pixel-domain VIF (Sheikh & Bovik)."""
    f, a, b = _as_triple(fused, ir, vi)
    # The second scale's 9x9 window needs a valid region. The coarser scales have none below
    # 33 px (scales 3 and 4) and 41 px (scale 4): they add nothing, as with MATLAB's filter2
    # 'valid', which gives them nothing to sum.
    if min(f.shape) < MIN_SIDE:
        raise ValueError(f'VIF needs images of at least {MIN_SIDE}x{MIN_SIDE}, got {f.shape}')
    if matlab_compat:
        f, a, b = (_as_uint8(x).astype(np.float64) for x in (f, a, b))
    return _vifp(a, f, matlab_compat) + _vifp(b, f, matlab_compat)


def _sobel_matlab(img):
    """conv2(img, h, 'same') for both Sobel kernels, taps summed in MATLAB's column-major order."""
    h, w = img.shape
    pad = np.pad(img, 1)
    sx = np.zeros_like(img)
    sy = np.zeros_like(img)
    for j in range(3):
        for i in range(3):
            window = pad[2 - i:2 - i + h, 2 - j:2 - j + w]  # convolution: flipped offsets
            sx = sx + SOBEL_X[i, j] * window
            sy = sy + SOBEL_Y[i, j] * window
    return sx, sy


def _edges(img, matlab_compat):
    """Sobel strength and orientation atan(Sy / Sx) (pi / 2 where Sx == 0), zero padding."""
    if matlab_compat:
        sx, sy = _sobel_matlab(img / 255.0)
    else:
        # Correlating with the kernels instead of convolving flips both signs: same g and angle.
        sx = cv2.filter2D(img, cv2.CV_64F, SOBEL_X, borderType=cv2.BORDER_CONSTANT)
        sy = cv2.filter2D(img, cv2.CV_64F, SOBEL_Y, borderType=cv2.BORDER_CONSTANT)
    zero = sx == 0
    angle = np.where(zero, np.pi / 2, np.arctan(sy / np.where(zero, 1.0, sx)))
    return np.sqrt(sx * sx + sy * sy), angle


def _edge_preservation(g_s, a_s, g_f, a_f, matlab_compat):
    """Q^{SF}: the sigmoid-weighted strength and orientation preservation of source S in F."""
    big = np.maximum(g_s, g_f)
    ratio = np.minimum(g_s, g_f) / np.where(big > 0, big, 1.0)
    equal = g_s == g_f
    ratio[equal] = g_f[equal] if matlab_compat else 1.0
    orient = 1.0 - np.abs(a_s - a_f) / (np.pi / 2)
    q_g = 0.9994 / (1.0 + np.exp(-15.0 * (ratio - 0.5)))
    q_a = 0.9879 / (1.0 + np.exp(-22.0 * (orient - 0.8)))
    return q_g * q_a


def qabf(fused, ir, vi, matlab_compat=False):
    """Qabf: Xydeas & Petrovic's gradient-based edge preservation, weighted by source strength."""
    f, a, b = _as_triple(fused, ir, vi)
    if matlab_compat:
        f, a, b = (_as_uint8(x).astype(np.float64) for x in (f, a, b))
    g_f, a_f = _edges(f, matlab_compat)
    num = den = 0.0
    for src in (a, b):
        g_s, a_s = _edges(src, matlab_compat)
        num += (_edge_preservation(g_s, a_s, g_f, a_f, matlab_compat) * g_s).sum()
        den += g_s.sum()
    with np.errstate(invalid='ignore', divide='ignore'):
        return float(num / den)


def _ssim(x, y):
    """Mean SSIM (Wang et al. 2004) over the valid region of an 11x11, sigma 1.5 Gaussian."""
    window = ssim_window()
    return float(ssim_map(x, y, lambda a: _filter_valid(a, window), 255.0).mean())


def ssim(fused, ir, vi):
    """SSIM: SSIM(F, IR) + SSIM(F, VI) (so at most 2)."""
    f, a, b = _as_triple(fused, ir, vi)
    if min(f.shape) < 11:
        raise ValueError(f'SSIM needs images of at least 11x11, got {f.shape}')
    return _ssim(f, a) + _ssim(f, b)


def mse(fused, ir, vi):
    """MSE: mean of MSE(F, IR) and MSE(F, VI), 0-255 scale."""
    f, a, b = _as_triple(fused, ir, vi)
    return float((np.mean((f - a) ** 2) + np.mean((f - b) ** 2)) / 2.0)


def _psnr(err):
    return math.inf if err == 0 else 10.0 * math.log10(255.0 ** 2 / err)


def psnr(fused, ir, vi):
    """PSNR in dB with peak 255 against the two-source MSE (inf where F equals both)."""
    return _psnr(mse(fused, ir, vi))


def evaluate_all(fused, ir, vi, matlab_compat=False):
    """Return every metric of `METRICS`, in that order, as a dict.

    ``matlab_compat=True`` gives the numbers of the MATLAB reference (see the module table):
    inputs are rounded to uint8 first, SF and MSE are on the [0, 1] scale, PSNR is offset by
    `PSNR_OFFSET_DB`, and SD, MI, VIF and Qabf follow its uint8 / rounding behaviour. SSIM has
    no counterpart there and is the same in both modes.
    """
    f, a, b = _as_triple(fused, ir, vi)
    if matlab_compat:
        f, a, b = (_as_uint8(x).astype(np.float64) for x in (f, a, b))
    scale = 255.0 if matlab_compat else 1.0
    err = mse(f, a, b)
    return {
        'EN': entropy(f),
        'SD': std_dev(f, matlab_compat),
        'SF': spatial_frequency(f) / scale,
        'AG': average_gradient(f),
        'MI': mutual_information(f, a, b, matlab_compat),
        'CC': correlation_coefficient(f, a, b),
        'SCD': scd(f, a, b),
        'VIF': vif(f, a, b, matlab_compat),
        'Qabf': qabf(f, a, b, matlab_compat),
        'SSIM': ssim(f, a, b),
        'MSE': err / scale ** 2,
        'PSNR': _psnr(err) + (PSNR_OFFSET_DB if matlab_compat else 0.0),
    }
