"""Classical fusion baselines on gray images: average, per-pixel maximum, Laplacian pyramid,
guided-filtering fusion (GFF).

Same shape as the learned fusers (`seafusion.SeAFusion.fuse`): ``fuse_<name>(ir, vi)`` takes
two gray (H, W) images, uint8 or float in [0, 1], and returns float32 (H, W) in [0, 1].
Multiply by 255 for `metrics` (0-255 scale).
"""

import cv2
import numpy as np
import torch

from ..imaging.color import unit_gray_pair
from ..model.pyramid import laplacian_fuse


def fuse_average(ir, vi):
    """Pixel-wise mean of IR and VI."""
    a, b = unit_gray_pair(ir, vi)
    return (a + b) / 2.0


def fuse_max(ir, vi):
    """Pixel-wise maximum of IR and VI (keeps hot targets and bright visible detail)."""
    a, b = unit_gray_pair(ir, vi)
    return np.maximum(a, b)


def fuse_laplacian(ir, vi, detail_gain=1.0, base_contrast=1.0):
    """Laplacian-pyramid fusion: max-abs selection on the detail levels, mean of the bases.

    The same function (``model.pyramid.laplacian_fuse``) is the base the CPU default network
    refines, there with its ``detail_gain`` and ``base_contrast`` (1, 1: the classical fusion).
    It takes ``pyramid.LEVELS`` levels, fewer where the base would keep under 8 pixels on its
    short side (``pyramid_levels``).
    """
    a, b = unit_gray_pair(ir, vi)
    fused = laplacian_fuse(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None],
                           detail_gain=detail_gain, base_contrast=base_contrast)
    return fused[0, 0].clamp_(0.0, 1.0).numpy()


def _window_mean(radius, like):
    """The mean over (2 radius + 1)^2 windows for images of ``like``'s shape and dtype, clipped at
    the border (a window counts only pixels inside the image, as He et al.'s reference guided
    filter does). The count of those pixels is made once, for every mean the filter takes."""
    size = (2 * radius + 1,) * 2
    inside = cv2.blur(np.ones_like(like), size, borderType=cv2.BORDER_CONSTANT)
    return lambda image: cv2.blur(image, size, borderType=cv2.BORDER_CONSTANT) / inside


def guided_filter(guide, image, radius, eps):
    """He et al.'s guided filter (TPAMI 2013) of ``image`` under a gray ``guide``, float32.

    Written here because OpenCV ships it only in the contrib build (``cv2.ximgproc``), which
    replaces the headless build the package depends on.
    """
    window_mean = _window_mean(radius, guide)
    mean_guide, mean_image = window_mean(guide), window_mean(image)
    covariance = window_mean(guide * image) - mean_guide * mean_image
    variance = window_mean(guide * guide) - mean_guide * mean_guide
    slope = covariance / (variance + eps)
    offset = mean_image - slope * mean_guide
    return window_mean(slope) * guide + window_mean(offset)


def fuse_gff(ir, vi):
    """Guided-filtering fusion (Li, Kang and Hu, IEEE TIP 2013) with the paper's settings.

    Each source splits into a base (31x31 mean) and a detail layer. A pixel's binary weight goes
    to the source whose Gaussian-smoothed (11x11, sigma 5) absolute Laplacian is larger (to both
    on a tie); guided by each source, the weights are smoothed broadly for the bases (radius 45,
    eps 0.3) and finely for the details (radius 7, eps 1e-6), normalised to sum to 1, and the
    weighted bases and details are added.
    """
    sources = unit_gray_pair(ir, vi)
    bases = [cv2.blur(s, (31, 31), borderType=cv2.BORDER_REPLICATE) for s in sources]
    saliency = [cv2.GaussianBlur(np.abs(cv2.Laplacian(s, cv2.CV_32F,
                                                      borderType=cv2.BORDER_REPLICATE)),
                                 (11, 11), 5, borderType=cv2.BORDER_REPLICATE)
                for s in sources]
    # Eq. 11: 1 for each source at the maximum, so a tie (both flat, as a saturated sky over a
    # cold one) is shared, not handed to either source.
    larger = np.maximum(*saliency)
    chosen = [(s == larger).astype(np.float32) for s in saliency]
    fused = np.zeros_like(sources[0])
    for layers, radius, eps in ((bases, 45, 0.3),
                                ([s - b for s, b in zip(sources, bases)], 7, 1e-6)):
        weights = [guided_filter(s, p, radius, eps) for s, p in zip(sources, chosen)]
        total = weights[0] + weights[1]
        # Only a guard: the detail weights overshoot [0, 1] at edges, so their sum dips to about
        # 0.01 (the paper divides by it; the authors' MATLAB first clips each weight to [0, 1]).
        total[np.abs(total) < 1e-6] = 1e-6
        fused += sum(w * layer for w, layer in zip(weights, layers)) / total
    return np.clip(fused, 0.0, 1.0)
