"""Colour helpers: fuse on luminance, keep the visible chrominance.

All conversions are cv2's YCrCb (Y = 0.299 R + 0.587 G + 0.114 B, chroma offset 0.5) done in
float32, so that no precision is lost between uint8 BGR and the [0, 1] values the model uses.
"""

import cv2
import numpy as np


def to_float(image: np.ndarray) -> np.ndarray:
    """Convert uint8 to float32 in [0, 1]."""
    return image.astype(np.float32) * np.float32(1.0 / 255.0)


def unit_gray_pair(ir, vi) -> tuple[np.ndarray, np.ndarray]:
    """Gray (H, W) IR and VI images of one shape (uint8, or float in [0, 1]) as float32 in
    [0, 1]: the inputs of the classical and published fusion methods the report compares."""
    pair = []
    for image, name in ((ir, 'ir'), (vi, 'vi')):
        array = np.asarray(image)
        if array.ndim != 2:
            raise ValueError(f'{name} must be a gray (H, W) image, got shape {array.shape}')
        pair.append(array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0))
    if pair[0].shape != pair[1].shape:
        raise ValueError(f'IR {pair[0].shape} and VI {pair[1].shape} differ in shape')
    return pair[0], pair[1]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert float in [0, 1] to uint8, rounded half up as MATLAB's uint8() rounds (values
    outside are clamped, NaN -> 0). Not np.rint, which rounds half to even: the average of two
    8-bit images lands on .5 at half its pixels, and its histogram became a comb of even values
    (its entropy 0.16 bits lower on TNO-42)."""
    scaled = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32) * np.float32(255.0)),
                     0.0, 255.0)
    return round_half_up(scaled).astype(np.uint8)


def round_half_up(values: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, halves up. Not floor(x + 0.5): in float32 the sum rounds
    0.49999997 up to 1."""
    whole = np.floor(values)
    return whole + (values - whole >= 0.5)


def as_uint8(image: np.ndarray) -> np.ndarray:
    """An 8- or 16-bit image as 8-bit: a 16-bit one as value / 65535 (as training and
    s4fusion-fuse read it) in 0-255, rounded half up; an 8-bit one as it is."""
    if image.dtype == np.uint16:
        return to_uint8(image / np.float32(np.iinfo(np.uint16).max))
    return image


def bgr_to_ycrcb(bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split uint8 (H, W, 3) BGR into (Y, Cr, Cb), each float32 (H, W) in [0, 1]."""
    y, cr, cb = cv2.split(cv2.cvtColor(to_float(bgr), cv2.COLOR_BGR2YCrCb))
    return y, cr, cb


def ycrcb_to_bgr(y: np.ndarray, cr: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Join float (H, W) Y, Cr, Cb in [0, 1] into uint8 (H, W, 3) BGR; Y is clamped first."""
    luminance = np.clip(np.asarray(y, dtype=np.float32), 0.0, 1.0)
    ycrcb = cv2.merge([luminance, np.asarray(cr, np.float32), np.asarray(cb, np.float32)])
    return to_uint8(cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2BGR))


def bgr_to_gray(bgr: np.ndarray) -> np.ndarray:
    """Return the luminance Y of uint8 (H, W, 3) BGR as float32 (H, W) in [0, 1]."""
    return cv2.cvtColor(to_float(bgr), cv2.COLOR_BGR2GRAY)
