"""Classical fusion baselines on gray images: average, per-pixel maximum, Laplacian pyramid.

Same shape as the learned fusers (`seafusion.SeAFusion.fuse`): ``fuse_<name>(ir, vi)`` takes
two gray (H, W) images, uint8 or float in [0, 1], and returns float32 (H, W) in [0, 1].
Multiply by 255 for `metrics` (0-255 scale).
"""

import cv2
import numpy as np


def _as_unit_pair(ir, vi):
    """Both images as float32 in [0, 1], checking they are gray and of the same shape."""
    pair = []
    for img, name in ((ir, 'ir'), (vi, 'vi')):
        arr = np.asarray(img)
        if arr.ndim != 2:
            raise ValueError(f'{name} must be a gray (H, W) image, got shape {arr.shape}')
        pair.append(arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0))
    if pair[0].shape != pair[1].shape:
        raise ValueError(f'IR {pair[0].shape} and VI {pair[1].shape} differ in shape')
    return pair


def fuse_average(ir, vi):
    """Pixel-wise mean of IR and VI."""
    a, b = _as_unit_pair(ir, vi)
    return (a + b) / 2.0


def fuse_max(ir, vi):
    """Pixel-wise maximum of IR and VI (keeps hot targets and bright visible detail)."""
    a, b = _as_unit_pair(ir, vi)
    return np.maximum(a, b)


def _laplacian_pyramid(img, levels):
    """[L_0, ..., L_{levels-1}, G_levels]: band-pass details, then the low-pass base."""
    pyramid = []
    for _ in range(levels):
        down = cv2.pyrDown(img)
        pyramid.append(img - cv2.pyrUp(down, dstsize=img.shape[::-1]))
        img = down
    pyramid.append(img)
    return pyramid


def fuse_laplacian(ir, vi, levels=4):
    """Laplacian-pyramid fusion: max-abs selection on the detail levels, mean of the bases.

    ``levels`` is capped so that the base keeps at least 8 pixels on its short side.
    """
    a, b = _as_unit_pair(ir, vi)
    levels = max(0, min(levels, int(np.log2(min(a.shape) / 8.0))))
    pa, pb = _laplacian_pyramid(a, levels), _laplacian_pyramid(b, levels)
    fused = (pa[-1] + pb[-1]) / 2.0
    for la, lb in zip(reversed(pa[:-1]), reversed(pb[:-1])):
        detail = np.where(np.abs(la) >= np.abs(lb), la, lb)
        fused = cv2.pyrUp(fused, dstsize=detail.shape[::-1]) + detail
    return np.clip(fused, 0.0, 1.0)
