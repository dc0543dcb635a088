"""Raw thermal values (counts or temperature) -> [0, 1], steady from frame to frame.

cv_bridge's fixed 16->8 bit scaling leaves 14-bit thermal nearly black and per-frame min/max
flickers (docs/node.md, "Processing"), so the default maps a percentile window that is
smoothed over time with an exponential moving average.
"""

import dataclasses
import math
from typing import Optional

import numpy as np

MODES = ('percentile', 'minmax', 'fixed')
# Percentiles are taken on a strided subsample of about this many pixels (cheap at 30 Hz).
SAMPLE_PIXELS = 1 << 16
# In percentile mode with smoothing, a frame whose percentiles lie more than OUTLIER_WIDTHS widths
# away from the smoothed window, by the narrower of the two (a corrupt frame, a burst of dead
# pixels, a shutter's flat frame; or good frames after a corrupt first one), is scaled by the
# window and leaves it as it was, up to HELD_FRAMES - 1 frames in a row; the next such frame (a
# new scene, or a camera that changed its output) starts the window afresh from its own. One
# frame of garbage floats (+-1e36) moved the window that far and took 40 s at 9 Hz to decay.
# A frame far outside a window so started, but not outside the one it replaced, resumes that
# one: a shutter closed for HELD_FRAMES frames or more (a flat-field correction of 0.3 s at
# 9 Hz) started a window a few counts of noise wide, and the scene coming back was held out of
# it, HELD_FRAMES - 1 frames of nearly all black and white. Only within RESUME_FRAMES frames of
# the start (a shutter closes for under a second, 60 frames at 60 Hz): a window kept longer (a
# shutter's after the scene moved while it was closed, a corrupt first frame's) made the next
# shutter frame resume it instead of being held, and the scene after it black and white.
OUTLIER_WIDTHS = 4.0
HELD_FRAMES = 3
RESUME_FRAMES = 60
# A window narrower than this share of its magnitude is flat (a uniform background): two flat
# windows are never far apart, as a flat one maps the frame's own extremes whatever its level.
MIN_RELATIVE_WIDTH = 1e-3
# A 16-bit IR image whose values span less than this is likely raw counts (14-bit cameras give a
# few thousand), not a picture stretched over 0-65535: scaled by 1 / 65535 it is nearly black.
RAW_COUNTS_SPAN = 1 << 14


def looks_like_raw_counts(image: np.ndarray) -> bool:
    """Whether a thermal image is 16-bit raw camera counts rather than a stretched picture."""
    return image.dtype == np.uint16 and int(np.ptp(image)) < RAW_COUNTS_SPAN


def raw_counts_warning(count: int, total: int, first, effect: str, where: str = '') -> str:
    """What the offline tools say of `count` of `total` IR images that look like raw counts
    (`first` names one, `where` where they are): read as value / 65535 they `effect`."""
    return (f'{count} of {total} IR images{where} are 16-bit but span less than '
            f'{RAW_COUNTS_SPAN} of 0-65535 (raw camera counts?), so they {effect}; stretch them '
            f'to the full range first ({first}, ...)')


@dataclasses.dataclass(frozen=True)
class NormalizerSettings:
    """Validated settings of ThermalNormalizer; invalid values raise ValueError with a reason.

    mode: 'percentile' (smoothed window between two percentiles), 'minmax' (this frame's finite
    minimum and maximum, not smoothed) or 'fixed' (``fixed_range``, e.g. a temperature window).
    smoothing: weight of the previous range in the moving average of percentile mode (0 = none).
    """

    mode: str = 'percentile'
    low_percentile: float = 1.0
    high_percentile: float = 99.0
    smoothing: float = 0.8
    fixed_range: tuple[float, float] = (0.0, 65535.0)

    def __post_init__(self) -> None:
        """Check every field, so that no invalid combination can be applied."""
        if self.mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {self.mode!r}')
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise ValueError('percentiles must satisfy 0 <= low < high <= 100, got '
                             f'{self.low_percentile}, {self.high_percentile}')
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f'smoothing must be in [0, 1), got {self.smoothing}')
        if len(self.fixed_range) != 2:
            raise ValueError(f'fixed_range must be (low, high), got {self.fixed_range!r}')
        low, high = (float(value) for value in self.fixed_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f'fixed_range must be finite with low < high, got {self.fixed_range}')
        object.__setattr__(self, 'fixed_range', (low, high))


class ThermalNormalizer:
    """Map float32 (H, W) raw thermal frames to float32 (H, W) in [0, 1].

    Non-finite pixels are left out of the statistics and map to 0; a frame without finite pixels
    maps to zeros (and leaves the smoothed range alone). A flat window maps the frame's own finite
    extremes instead: a hot target on fewer than 1% of the pixels of a noiseless uniform
    background (a simulated camera) is outside both percentiles and keeps its contrast, and a
    uniform frame maps to zeros (a background with noise is a window as wide as its noise, which
    is stretched and the target clipped: minmax or fixed mode suits such a camera). A frame far
    outside the smoothed window is held out of it (OUTLIER_WIDTHS; counted in ``outliers``), or
    resumes the window a lasting change replaced (a shutter that opened).
    """

    def __init__(self, **settings) -> None:
        """Take NormalizerSettings' fields by name, its defaults for the rest; validate them
        (ValueError with a reason) and start without history."""
        self._settings = NormalizerSettings()
        self.configure(**settings)
        self._range: Optional[tuple[float, float]] = None
        self._outlier_run = 0  # frames in a row held out of the smoothed window
        self._left = None  # the window the last run of far frames replaced, to resume
        self._left_age = 0  # frames since that run started a window
        self.outliers = 0  # frames held out of it, in all

    @property
    def settings(self) -> NormalizerSettings:
        """The settings in force."""
        return self._settings

    @property
    def range(self) -> Optional[tuple[float, float]]:
        """The (low, high) window of the last frame (smoothed in percentile mode), None before
        any; a flat one mapped the frame's extremes instead."""
        return self._range

    def configure(self, **changes: object) -> None:
        """Change settings at run time; all or nothing, ValueError with a reason if invalid."""
        try:
            settings = dataclasses.replace(self._settings, **changes)
        except TypeError as exc:
            raise ValueError(f'unknown normalizer setting: {exc}') from None
        if (settings.mode, settings.low_percentile, settings.high_percentile) != (
                self._settings.mode, self._settings.low_percentile,
                self._settings.high_percentile):
            self.reset()  # another window: the one smoothed so far is not what it would be
        self._settings = settings

    def reset(self) -> None:
        """Forget the smoothed range (e.g. after a clock jump or a camera restart)."""
        self._range = None
        self._outlier_run = 0
        self._left = None

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Normalize one frame."""
        raw = np.asarray(raw, dtype=np.float32)
        if raw.ndim != 2:
            raise ValueError(f'thermal frame must be (H, W), got shape {raw.shape}')
        finite = np.isfinite(raw)
        all_finite = bool(finite.all())
        bounds = self._bounds(raw, None if all_finite else finite)
        if bounds is None:
            return np.zeros(raw.shape, np.float32)
        self._range = bounds
        if not bounds[1] > bounds[0]:
            values = raw if all_finite else raw[finite]
            bounds = float(values.min()), float(values.max())
        out = _rescale(raw, *bounds)
        np.clip(out, 0.0, 1.0, out=out)
        if not all_finite:
            out[~finite] = 0.0
        return out

    def _bounds(self, raw: np.ndarray,
                finite: Optional[np.ndarray]) -> Optional[tuple[float, float]]:
        """Return this frame's (low, high), or None when it has no finite pixel."""
        settings = self._settings
        if settings.mode == 'fixed':
            return settings.fixed_range
        values = raw if finite is None else raw[finite]
        if values.size == 0:
            return None
        if settings.mode == 'minmax':
            return float(values.min()), float(values.max())
        current = _percentiles(raw, values, settings.low_percentile, settings.high_percentile)
        if self._range is None or settings.smoothing == 0.0:
            return current
        smoothed = self._range
        self._left_age += 1
        if self._left_age > RESUME_FRAMES:
            self._left = None
        if _far_outside(current, smoothed):
            if self._left is not None and not _far_outside(current, self._left):
                # Back to the window the run left (the shutter opened): smoothed on from it.
                smoothed, self._left = self._left, None
            else:
                self._outlier_run += 1
                if self._outlier_run < HELD_FRAMES:
                    self.outliers += 1
                    return self._range
                self._outlier_run = 0
                self._left, self._left_age = self._range, 0
                return current
        self._outlier_run = 0
        weight = settings.smoothing
        return (weight * smoothed[0] + (1.0 - weight) * current[0],
                weight * smoothed[1] + (1.0 - weight) * current[1])


def _far_outside(window: tuple[float, float], smoothed: tuple[float, float]) -> bool:
    """Whether a frame's (low, high) lies more than OUTLIER_WIDTHS widths of the narrower of it
    and the smoothed window away from the smoothed window; never for two flat ones."""
    widths = [_width(window), _width(smoothed)]
    if all(measured <= floor for measured, floor in widths):
        return False
    width = min(max(measured, floor) for measured, floor in widths)
    low, high = smoothed
    return max(abs(window[0] - low), abs(window[1] - high)) > OUTLIER_WIDTHS * width


def _width(window: tuple[float, float]) -> tuple[float, float]:
    """A window's (width, the width under which it is flat)."""
    low, high = window
    return high - low, max(MIN_RELATIVE_WIDTH * max(abs(low), abs(high)),
                           float(np.finfo(np.float32).tiny))


def _percentiles(raw: np.ndarray, finite_values: np.ndarray, low: float,
                 high: float) -> tuple[float, float]:
    """Two percentiles of the finite pixels, from a strided subsample when the frame is large."""
    sample = finite_values
    stride = math.ceil(math.sqrt(raw.size / SAMPLE_PIXELS))
    if stride > 1:
        strided = raw[::stride, ::stride]
        strided = strided[np.isfinite(strided)]
        if strided.size:  # else the few finite pixels all fall between the sample points
            sample = strided
    result = np.percentile(sample.astype(np.float64), [low, high])
    return float(result[0]), float(result[1])


def _rescale(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """Return (raw - low) / (high - low) as float32; a flat range gives zeros."""
    span = high - low
    if not span > 0:
        return np.zeros(raw.shape, np.float32)
    with np.errstate(over='ignore', invalid='ignore'):
        low32, scale32 = np.float32(low), np.float32(1.0 / span)
        if np.isfinite(low32) and np.isfinite(scale32) and scale32 > 0:
            return (raw - low32) * scale32
        # A subnormal or huge range that float32 cannot hold: rare, so float64 is fine.
        return ((raw.astype(np.float64) - low) / span).astype(np.float32)
