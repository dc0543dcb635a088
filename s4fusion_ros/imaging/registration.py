"""Map thermal pixels into the visible camera's geometry with a homography.

The homography H maps thermal pixel coordinates to visible pixel coordinates
(``[u_v, v_v, 1]^T ~ H [u_t, v_t, 1]^T``), as cv2.findHomography(thermal_pts, visible_pts) returns.
"""

from typing import Optional, Sequence, Union

import cv2
import numpy as np

Homography = Union[np.ndarray, Sequence[float], Sequence[Sequence[float]]]

# Largest condition number accepted: beyond it the inverse warp is numerically meaningless.
MAX_CONDITION = 1e12


def validate_homography(homography: Homography) -> np.ndarray:
    """Return a finite, invertible float64 3x3 homography scaled to H[2, 2] = 1 where possible.

    Accepts a 3x3 array or the 9 row-major values of a ROS double-array parameter; raises
    ValueError saying what is wrong.
    """
    try:
        matrix = np.array(homography, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f'homography must be numbers: {exc}') from None
    if matrix.shape not in ((3, 3), (9,)):
        raise ValueError(f'homography must be 3x3 or 9 values, got shape {matrix.shape}')
    matrix = matrix.reshape(3, 3)
    if not np.isfinite(matrix).all():
        raise ValueError(f'homography has non-finite values: {matrix.tolist()}')
    if np.linalg.cond(matrix) > MAX_CONDITION:
        raise ValueError(f'homography is singular (not invertible): {matrix.tolist()}')
    if abs(matrix[2, 2]) > 1e-12:
        matrix /= matrix[2, 2]
    return matrix


def _size(visible_size: Sequence[int]) -> tuple[int, int]:
    """Validate a (width, height) pair."""
    if len(visible_size) != 2 or min(visible_size) <= 0:
        raise ValueError(f'visible size must be positive (width, height), got {visible_size}')
    return int(visible_size[0]), int(visible_size[1])


class ThermalRegistration:
    """Warp float32 (H_t, W_t) thermal frames into the visible geometry (H, W).

    With the identity homography a frame of the visible size passes through untouched (same
    object, no copy) and a frame of another size is resized (a larger one by area: a pixel is the
    mean of those it covers, where bilinear would sample some and alias thin hot detail; a
    smaller one bilinearly): ``needs_resize`` tells the caller so that it can warn once that no
    registration is configured for cameras of different geometry. Pixels that fall outside the
    thermal frame get ``border_value``, or the caller's ``outside`` values.
    """

    def __init__(self, homography: Optional[Homography] = None,
                 border_value: float = 0.0) -> None:
        """Validate the homography (None = identity; ValueError if invalid) and keep it."""
        self.homography = validate_homography(np.eye(3) if homography is None else homography)
        self.is_identity = bool(np.allclose(self.homography, np.eye(3), rtol=0.0, atol=1e-12))
        self.border_value = float(border_value)
        self._unseen_mask = None  # ((thermal shape, visible size), mask) of the last call

    def needs_resize(self, thermal_shape: Sequence[int], visible_size: Sequence[int]) -> bool:
        """Whether an identity registration has to resize a frame of this shape."""
        return self.is_identity and tuple(thermal_shape[:2]) != _size(visible_size)[::-1]

    def __call__(self, thermal: np.ndarray, visible_size: Sequence[int],
                 outside: Optional[np.ndarray] = None) -> np.ndarray:
        """Return the thermal frame in the visible geometry, visible_size = (width, height).

        `outside` (H, W), if given, fills the pixels the thermal camera does not see (whose
        centre falls outside every thermal pixel), instead of ``border_value``.
        """
        width, height = _size(visible_size)
        if not self.is_identity:
            # The camera sees its edge pixels' whole footprint, half a pixel past the outermost
            # samples: there the edge is replicated, as the identity's resize does. A constant
            # border (or a NaN marking the unseen) blended into every pixel within a pixel of the
            # edge, so a homography equal to that resize (a 160x120 camera, scale 4) gave the
            # model the visible luminance in a 2-pixel frame around the image (up to 100 grey
            # levels off in the fused image there).
            warped = cv2.warpPerspective(thermal, self.homography, (width, height),
                                         flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            unseen = self._unseen(thermal.shape[:2], (width, height))
            warped[unseen] = self.border_value if outside is None else outside[unseen]
            return warped
        if thermal.shape[:2] == (height, width):
            return thermal
        shrinking = width * height < thermal.shape[0] * thermal.shape[1]
        return cv2.resize(thermal, (width, height),
                          interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)

    def _unseen(self, thermal_shape: tuple[int, int], visible_size: tuple[int, int]) -> np.ndarray:
        """Visible pixels whose centre maps outside every thermal pixel: the nearest thermal
        pixel of the inverse warp does not exist. Kept for the last sizes (they rarely change)."""
        key = (tuple(thermal_shape), visible_size)
        if self._unseen_mask is None or self._unseen_mask[0] != key:
            seen = cv2.warpPerspective(np.ones(thermal_shape, np.uint8), self.homography,
                                       visible_size, flags=cv2.INTER_NEAREST,
                                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            self._unseen_mask = (key, seen == 0)
        return self._unseen_mask[1]
