"""The published saliency map: where the fused image carries salient thermal targets.

Definition (per pixel, on luminance in [0, 1] in the visible geometry; I = registered thermal,
V = visible Y, F = fused Y from the same forward pass, B = local thermal background, a Gaussian
blur of I with sigma = 1/16 of the shorter image side):

    S = clip(min(F - V, I - V, I - B) / contrast, 0, 1), then S = 0 where S < threshold

- I - B > 0: the thermal pixel is hotter (brighter, white-hot polarity) than its surroundings, a
  target rather than a uniformly warm region such as a sunlit wall.
- I - V > 0: the thermal image shows it brighter than the visible image does, so the visible camera
  alone would not show it as well.
- F - V: how much of that the fused image actually carries.
- `contrast` (luminance units) is the carried excess that counts as fully salient (S = 1).
So S = 0 wherever the thermal pixel is no brighter than its background or than the visible image,
and wherever the fused image dropped it (F <= V); S is non-decreasing in F and never exceeds what
the thermal image offered. No second model run: S is a function of the model's inputs and output.
"""

import cv2
import numpy as np

BACKGROUND_SIGMA_FRACTION = 1.0 / 16.0
# Blur at up to 1/8 resolution (a wide Gaussian at full size costs ~10x more), keeping at least
# 64 pixels on the shorter side: coarser, the blur drifted from its definition (0.4 at 7x13).
_BACKGROUND_SCALE = 8
_BACKGROUND_MIN_SIDE = 64


def thermal_background(thermal: np.ndarray) -> np.ndarray:
    """Local thermal background B: Gaussian blur, sigma = 1/16 of the shorter side (H, W)."""
    height, width = thermal.shape
    scale = max(1, min(_BACKGROUND_SCALE, min(height, width) // _BACKGROUND_MIN_SIDE))
    small_size = (max(width // scale, 1), max(height // scale, 1))
    small = cv2.resize(thermal, small_size, interpolation=cv2.INTER_AREA)
    sigma = BACKGROUND_SIGMA_FRACTION * min(height, width) / scale
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def saliency_map(thermal: np.ndarray, visible_y: np.ndarray, fused_y: np.ndarray,
                 contrast: float = 0.2, threshold: float = 0.0) -> np.ndarray:
    """Saliency in [0, 1], float32 (H, W), from three float32 images (H, W) in [0, 1]."""
    carried = np.minimum(fused_y - visible_y, thermal - visible_y)
    np.minimum(carried, thermal - thermal_background(thermal), out=carried)
    saliency = np.clip(carried * np.float32(1.0 / contrast), 0.0, 1.0)
    saliency = saliency.astype(np.float32, copy=False)
    if threshold > 0.0:
        saliency[saliency < threshold] = 0.0
    return saliency
