"""Laplacian-pyramid fusion in PyTorch: the classical baseline and the base a network may refine.

The pyramid follows OpenCV's pyrDown / pyrUp: the 5-tap binomial kernel [1, 4, 6, 4, 1] / 16 in
each direction, mirrored borders (reflect-101), every second pixel kept, and on the way up what
zeros inserted and the kernel times 4 give. It is written in torch rather than called from OpenCV
so the same code runs inside a network, batched and on its device; the evaluation's baseline calls
it too.
"""

import math

import torch
import torch.nn.functional as F

LEVELS = 4
MIN_BASE_SIDE = 8  # the coarsest level keeps at least this many pixels on its short side


def _binomial_kernel(dtype, device):
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=dtype, device=device) / 16
    return torch.outer(taps, taps)[None, None]  # (1, 1, 5, 5)


def pyr_down(x):
    """Blur and halve: ``(B, 1, H, W) -> (B, 1, ceil(H / 2), ceil(W / 2))``."""
    kernel = _binomial_kernel(x.dtype, x.device)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode='reflect'), kernel, stride=2)


def _double(x, dim):
    """Twice as many samples along ``dim``, as zero insertion and the kernel times 2 give them.

    Written by phases (even outputs (x[i-1] + 6 x[i] + x[i+1]) / 8, odd ones (x[i] + x[i+1]) / 2)
    rather than as a convolution of the zero-filled signal, which does four times the work. The
    borders are the zero-filled signal's mirrored ones: x[-1] = x[1], x[n] = x[n-1].
    """
    n = x.shape[dim]
    before = torch.cat([x.narrow(dim, min(1, n - 1), 1), x.narrow(dim, 0, n - 1)], dim)
    after = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
    even = (before + 6 * x + after) / 8
    odd = (x + after) / 2
    return torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)


def pyr_up(x, size):
    """Double and blur to ``size = (H, W)``, each within one pixel of twice x's size."""
    return _double(_double(x, 2), 3)[..., :size[0], :size[1]]


def pyramid_levels(height, width, levels=LEVELS):
    """How many detail levels fit: at most ``levels``, the base at least MIN_BASE_SIDE pixels."""
    return max(0, min(levels, int(math.log2(min(height, width) / MIN_BASE_SIDE))))


def laplacian_pyramid(x, levels):
    """``[L_0, ..., L_{levels-1}, G_levels]``: band-pass details, then the low-pass base."""
    pyramid = []
    for _ in range(levels):
        down = pyr_down(x)
        pyramid.append(x - pyr_up(down, x.shape[-2:]))
        x = down
    pyramid.append(x)
    return pyramid


def laplacian_fuse(ir, vi, levels=LEVELS, detail_gain=1.0, base_contrast=1.0):
    """Laplacian-pyramid fusion of ``(B, 1, H, W)`` images: the larger-magnitude detail of the two
    at every level and pixel, the mean of the bases. Not clamped.

    ``levels`` is capped by ``pyramid_levels``. ``detail_gain`` multiplies the chosen details
    (1: the classical fusion; above 1: the classical detail enhancement). ``base_contrast``
    stretches the fused base about its own mean (each image's, within a few thousandths: the
    coarsest level weighs border pixels a little differently): averaging two low-pass images
    flattens a region that is bright in one source only, and above 1 gives part of that
    contrast back. Ties of detail magnitude go to ``ir``.
    """
    levels = pyramid_levels(*ir.shape[-2:], levels)
    pyramid_ir, pyramid_vi = laplacian_pyramid(ir, levels), laplacian_pyramid(vi, levels)
    fused = (pyramid_ir[-1] + pyramid_vi[-1]) / 2
    if base_contrast != 1.0:
        mean = fused.mean(dim=(-2, -1), keepdim=True)  # (B, 1, 1, 1)
        fused = mean + base_contrast * (fused - mean)
    for detail_ir, detail_vi in zip(reversed(pyramid_ir[:-1]), reversed(pyramid_vi[:-1])):
        detail = torch.where(detail_ir.abs() >= detail_vi.abs(), detail_ir, detail_vi)
        if detail_gain != 1.0:
            detail = detail * detail_gain
        fused = pyr_up(fused, detail.shape[-2:]) + detail
    return fused
