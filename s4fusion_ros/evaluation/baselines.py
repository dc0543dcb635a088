"""Classical fusion baselines on gray images: average, per-pixel maximum, Laplacian pyramid.

Same shape as the learned fusers (`seafusion.SeAFusion.fuse`): ``fuse_<name>(ir, vi)`` takes
two gray (H, W) images, uint8 or float in [0, 1], and returns float32 (H, W) in [0, 1].
Multiply by 255 for `metrics` (0-255 scale).
"""

import numpy as np
import torch

from ..model.pyramid import LEVELS, laplacian_fuse


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


def fuse_laplacian(ir, vi, levels=LEVELS):
    """Laplacian-pyramid fusion: max-abs selection on the detail levels, mean of the bases.

    The same function (``model.pyramid.laplacian_fuse``) is the base the CPU default network
    refines. ``levels`` is capped so that the base keeps at least 8 pixels on its short side.
    """
    a, b = _as_unit_pair(ir, vi)
    fused = laplacian_fuse(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None],
                           levels)
    return fused[0, 0].clamp_(0.0, 1.0).numpy()
