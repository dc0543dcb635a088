"""Temporal stability of a fused stream: flicker on consecutive frames where the scene is still.

Flicker of a sequence (thermal I and visible luminance V as the model got them, fused luminance F
as published, all in [0, 1]): over every pair of consecutive frames and every *static* pixel,

    flicker = mean |F_t - F_t-1| / max(mean max(|I_t - I_t-1|, |V_t - V_t-1|), FLOOR)

A pixel is static when neither source changes there: the Gaussian-smoothed frame difference of
each source (which averages sensor and codec noise away) stays under STATIC_LEVEL, and so does the
smoothed absolute difference under MOVING_LEVEL (texture that moves, as under a panning camera,
changes both ways and would cancel in the first; white sensor noise up to about 4 gray levels
stays under it). So flicker is
how much the fused image changes where the scene does not, relative to how much the more restless
source changes there. Plain averaging and per-pixel max give at most 1 (their change never exceeds
the larger source change); above 1 the fusion adds changes of its own. FLOOR keeps a perfectly
still scene (no source change at all) finite: any fused change then reads as large.

`measure_clips` runs M3SVD-style clips (``ir/<clip>.mp4`` and ``vi/<clip>.mp4``) through the
node's own FusionPipeline (pairing, percentile normalization with its temporal smoothing) and
FusionEngine (model, colour, uint8 output), so the numbers are those of the published stream.
"""

import dataclasses
import pathlib
import re
from typing import Callable, Iterator

import cv2
import numpy as np

from .. import settings
from ..engine import FusionEngine, FusionSettings, PreparedPair, pipeline_from_params
from ..files import opencv_path
from ..imaging.color import bgr_to_ycrcb
from ..imaging.encodings import encode_image

STATIC_LEVEL = 3.0 / 255.0  # smoothed source change below this: the scene is still there
MOVING_LEVEL = 6.0 / 255.0  # smoothed absolute source change at or above this: moving texture
STATIC_SIGMA = 2.0  # pixels; smoothing of the source differences that decides static pixels
FLOOR = 0.5 / 255.0  # smallest source change the fused change is divided by
CLIP_EPOCH_NS = 10**9  # stamps start here: a zero stamp means 'unstamped' to the synchronizer
SECTION_BEGIN = '<!-- flicker: begin'
SECTION_END = '<!-- flicker: end -->'


@dataclasses.dataclass(frozen=True)
class Flicker:
    """Flicker of one sequence and the changes it is made of (in gray levels of 255)."""

    flicker: float
    fused_change: float  # mean |F_t - F_t-1| on static pixels
    source_change: float  # mean max(|I_t - I_t-1|, |V_t - V_t-1|) on static pixels
    static_fraction: float  # share of the compared pixels that were static


class FlickerMeter:
    """Accumulates the flicker of a sequence frame by frame (constant memory)."""

    def __init__(self):
        """Start without a previous frame."""
        self._previous = None
        self._fused = self._source = 0.0
        self._static = self._pixels = 0

    def add(self, thermal: np.ndarray, visible_y: np.ndarray, fused_y: np.ndarray) -> None:
        """Add the next frame: three float (H, W) images in [0, 1] of the same shape."""
        frame = tuple(np.asarray(image, np.float32) for image in (thermal, visible_y, fused_y))
        if len({image.shape for image in frame}) != 1 or frame[0].ndim != 2:
            raise ValueError(f'expected three (H, W) images of one shape, got '
                             f'{[image.shape for image in frame]}')
        previous = self._previous
        if previous is not None and previous[0].shape != frame[0].shape:
            # Refused, and not kept: the next frame is measured against the last one added.
            raise ValueError(f'frame size changed from {previous[0].shape} to {frame[0].shape}')
        self._previous = frame
        if previous is None:
            return
        thermal_d, visible_d, fused_d = (now - before for now, before in zip(frame, previous))
        moving = np.zeros(thermal_d.shape, bool)
        for difference in (thermal_d, visible_d):
            smooth = cv2.GaussianBlur(difference, (0, 0), STATIC_SIGMA)
            moving |= np.abs(smooth) >= STATIC_LEVEL
            # Texture that moves changes both ways, which the signed smoothing cancels.
            moving |= cv2.GaussianBlur(np.abs(difference), (0, 0), STATIC_SIGMA) >= MOVING_LEVEL
        static = ~moving
        source_d = np.maximum(np.abs(thermal_d), np.abs(visible_d))
        self._fused += float(np.abs(fused_d)[static].sum(dtype=np.float64))
        self._source += float(source_d[static].sum(dtype=np.float64))
        self._static += int(static.sum())
        self._pixels += static.size

    def result(self) -> Flicker:
        """The flicker so far (NaN before two frames, or when no pixel was static)."""
        if not self._static:
            return Flicker(float('nan'), float('nan'), float('nan'),
                           0.0 if self._pixels else float('nan'))
        fused, source = self._fused / self._static, self._source / self._static
        return Flicker(fused / max(source, FLOOR), fused * 255.0, source * 255.0,
                       self._static / self._pixels)


def flicker(frames) -> Flicker:
    """Flicker of an iterable of (thermal, visible_y, fused_y) frames."""
    meter = FlickerMeter()
    for thermal, visible_y, fused_y in frames:
        meter.add(thermal, visible_y, fused_y)
    return meter.result()


def read_clip(video_dir: pathlib.Path, clip: str,
              frames: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(stamp ns on the clip's timing, thermal uint8 (H, W), visible BGR) of the first frames."""
    captures = [cv2.VideoCapture(opencv_path(video_dir / kind / f'{clip}.mp4'))
                for kind in ('ir', 'vi')]
    try:
        for capture, kind in zip(captures, ('ir', 'vi')):
            if not capture.isOpened():
                raise OSError(f'cannot read {video_dir / kind / clip}.mp4 '
                              '(OPENCV_LOG_LEVEL=WARNING shows OpenCV\'s reason)')
        for _ in range(frames):
            read = [capture.read() for capture in captures]
            if not all(ok for ok, _ in read):
                return
            stamp_ns = CLIP_EPOCH_NS + round(captures[1].get(cv2.CAP_PROP_POS_MSEC) * 1e6)
            yield stamp_ns, cv2.cvtColor(read[0][1], cv2.COLOR_BGR2GRAY), read[1][1]
    finally:
        for capture in captures:
            capture.release()


def clip_names(video_dir: pathlib.Path) -> list[str]:
    """Clips with both ``ir/<clip>.mp4`` and ``vi/<clip>.mp4``, sorted."""
    names = sorted(path.stem for path in (video_dir / 'ir').glob('*.mp4')
                   if (video_dir / 'vi' / path.name).is_file())
    if not names:
        raise OSError(f'{video_dir}: no clip with both ir/<clip>.mp4 and vi/<clip>.mp4')
    return names


def short_clips(video_dir: pathlib.Path, clips: list[str], frames: int) -> dict[str, int]:
    """{clip: the frames both its videos have} of the clips with fewer than `frames`: measured
    on those, a clip's flicker would not be that of the first `frames` as the section says."""
    lengths = {clip: sum(1 for _ in read_clip(video_dir, clip, frames)) for clip in clips}
    return {clip: length for clip, length in lengths.items() if length < frames}


def prepared_pairs(video_dir: pathlib.Path, clip: str, frames: int) -> list[PreparedPair]:
    """A clip's first frames as the node prepares them (default parameters, mono8 thermal)."""
    pipeline = pipeline_from_params(settings.defaults())
    pairs = []
    for stamp_ns, thermal, visible in read_clip(video_dir, clip, frames):
        pairs += pipeline.add_thermal(encode_image(thermal, 'mono8'), stamp_ns, clip)
        pairs += pipeline.add_visible(encode_image(visible, 'bgr8'), stamp_ns, clip)
    return pairs + pipeline.flush()


class BaselineEngine(FusionEngine):
    """The node's engine with a classical ``fuse(ir, vi) -> float (H, W)`` instead of the model."""

    detail_gain = 1.0  # above a reduced inference size, the sources' detail as it is

    def __init__(self, fuse: Callable, fusion_settings: FusionSettings | None = None):
        """Fuse with ``fuse``; colour, saliency and output as the node builds them."""
        super().__init__(None, fusion_settings)
        self.fuse = fuse

    def _run_model(self, thermal: np.ndarray, visible_y: np.ndarray) -> np.ndarray:
        return self.fuse(thermal, visible_y)


def measure_clips(video_dir: pathlib.Path, clips: list[str], frames: int, engines: dict,
                  progress: Callable = lambda items, label: items) -> dict:
    """{clip: {method: Flicker}} of each engine's bgr8 output on each clip's first frames.

    ``progress(pairs, label)`` may wrap each run in a progress bar.
    """
    scores = {}
    for clip in clips:
        pairs = prepared_pairs(video_dir, clip, frames)
        scores[clip] = {}
        for name, engine in engines.items():
            meter = FlickerMeter()
            for pair in progress(pairs, f'{clip} {name}'):
                result = engine.infer(pair)
                meter.add(pair.thermal, bgr_to_ycrcb(pair.visible_bgr)[0],
                          bgr_to_ycrcb(result.fused)[0])
            scores[clip][name] = meter.result()
    return scores


def render_section(scores: dict, frames: int, command: str, notes: list[str],
                   videos: str = 'video') -> str:
    """The flicker section of docs/quality.md, between markers that `replace_section` finds;
    `videos` names the clips in its title."""
    methods = list(next(iter(scores.values())))
    clips = list(scores)

    def cell(value: float) -> str:
        return 'n/a' if np.isnan(value) else f'{value:.3f}'

    rows = [f'| {clip} | ' + ' | '.join(cell(scores[clip][m].flicker) for m in methods) + ' |'
            for clip in clips]
    means = {m: float(np.nanmean([scores[c][m].flicker for c in clips])) for m in methods}
    rows.append('| **mean** | ' + ' | '.join(f'**{cell(means[m])}**' for m in methods) + ' |')
    changes = [f'| {m} | ' + ' | '.join(
        f'{scores[c][m].fused_change:.2f} / {scores[c][m].source_change:.2f}' for c in clips)
        + ' |' for m in methods]
    static = ', '.join(f'{clip} {100 * next(iter(scores[clip].values())).static_fraction:.0f}%'
                       for clip in clips)
    lines = [f'{SECTION_BEGIN} (regenerate with the command below; s4fusion-eval keeps it) -->',
             f'## Temporal stability (flicker on {videos})', '',
             f'- Command: `{command}`',
             f'- Frames: the first {frames} of each clip ({frames - 1} consecutive frame pairs '
             'per clip) at the clips\' size, through the node\'s pipeline with its default '
             'parameters: thermal (mono8) normalized by the smoothed percentile window, model '
             'on luminance, colour from the visible image, bgr8 output.',
             f'- Static pixels (neither source\'s smoothed frame difference reaches '
             f'{STATIC_LEVEL * 255:g} gray levels, nor its smoothed absolute difference '
             f'{MOVING_LEVEL * 255:g}): {static}.',
             *[f'- {note}' for note in notes], '',
             'Flicker = mean fused change / mean larger source change on static pixels '
             '(`s4fusion_ros/evaluation/temporal.py`); lower is steadier, the plain average and '
             'per-pixel max cannot exceed 1 but for the rounding and clipping of their 8-bit '
             'output.', '',
             '| clip | ' + ' | '.join(methods) + ' |',
             '|---|' + '---:|' * len(methods), *rows, '',
             'Mean fused change / mean larger source change on static pixels, gray levels:', '',
             '| method | ' + ' | '.join(clips) + ' |', '|---|' + '---:|' * len(clips), *changes,
             '', SECTION_END]
    return '\n'.join(lines)


_SECTION = re.compile(re.escape(SECTION_BEGIN) + r'.*?' + re.escape(SECTION_END), re.S)


def replace_section(text: str, section: str) -> str:
    """``text`` with its flicker section replaced by ``section`` (appended when it has none)."""
    if _SECTION.search(text):
        return _SECTION.sub(lambda _: section, text, count=1)
    return text.rstrip('\n') + '\n\n' + section + '\n'


def section_of(text: str) -> str:
    """The flicker section of ``text`` ('' when it has none)."""
    match = _SECTION.search(text)
    return match.group(0) if match else ''
