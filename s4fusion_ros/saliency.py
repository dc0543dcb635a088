"""The published saliency map: where the fused image carries salient thermal targets.

Definition (per pixel, on luminance in [0, 1] in the visible geometry; I = registered thermal,
V = visible Y, F = fused Y from the same forward pass):

    S = clip(min(F - V, I - V) / contrast, 0, 1), then S = 0 where S < threshold

- I - V > 0 is the thermal excess: the thermal image shows something brighter (hotter, in white-hot
  polarity) than the visible image does there; min(F - V, I - V) is the part of that excess the fused
  image actually carries, never more than the thermal image offered.
- `contrast` (in luminance units) is the carried excess that counts as fully salient (S = 1).
- S = 0 wherever the thermal image is not brighter than the visible one, and wherever the fused image
  is not brighter than the visible one (the fusion dropped the thermal target).
- S is non-decreasing in F (up to I) and in I (up to F).
No second model run: S is a function of the model's inputs and its output.
"""

import numpy as np


def saliency_map(thermal: np.ndarray, visible_y: np.ndarray, fused_y: np.ndarray,
                 contrast: float = 0.2, threshold: float = 0.0) -> np.ndarray:
    """Saliency in [0, 1], float32 (H, W), from three float images (H, W) in [0, 1]."""
    carried = np.minimum(fused_y - visible_y, thermal - visible_y)
    saliency = np.clip(carried * np.float32(1.0 / contrast), 0.0, 1.0).astype(np.float32, copy=False)
    if threshold > 0.0:
        saliency[saliency < threshold] = 0.0
    return saliency
