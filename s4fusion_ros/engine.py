"""The fusion path shared by the live node and the offline bag tool.

FusionPipeline turns incoming thermal and visible messages into prepared pairs: decode on arrival
(a bad message is refused before it can take a partner), pair by header stamp, then normalize and
register the thermal frame of each pair. It is stateful (synchronizer, temporal smoothing of the
thermal range) and runs on every message in arrival order, so live and replay produce the same
pairs and pixels even when the live node later drops pairs it has no time to fuse.

FusionEngine runs the model on one prepared pair, or on a pair of image files, and builds the
published images: both encodings and their packing come from its FusionSettings.

The factories at the end build both from the node's parameter values (settings.py).
"""

import contextlib
import time
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch

from .diagnostics import Key
from .imaging.color import bgr_to_gray, bgr_to_ycrcb, to_uint8, ycrcb_to_bgr
from .imaging.encodings import (ImageDecodeError, RawImage, decode_thermal_info, decode_visible,
                                encode_image)
from .imaging.limits import MAX_PIXELS
from .imaging.normalization import HELD_FRAMES, ThermalNormalizer
from .imaging.registration import ThermalRegistration
from .messages import stamp_to_ns
from .runtime import LoadedModel
from .saliency import saliency_map
from .settings import OUTPUT_ENCODINGS, OUTPUT_NAMES, SALIENCY_ENCODINGS
from .sync import Pair, PairSynchronizer, StampSkew


@dataclass(frozen=True)
class Frame:
    """A decoded image with the header fields the outputs carry through."""

    stamp_ns: int
    frame_id: str
    image: np.ndarray


@dataclass(frozen=True)
class PreparedPair:
    """A synchronized pair, ready for the model, in the visible camera's geometry."""

    thermal_stamp_ns: int
    visible_stamp_ns: int
    frame_id: str
    thermal: np.ndarray  # float32 (H, W) in [0, 1], registered into the visible image
    visible_bgr: np.ndarray  # uint8 (H, W, 3)


@dataclass(frozen=True)
class FusionResult:
    """What the node publishes for one pair, and the saliency map it shows."""

    pair: PreparedPair | None  # None from FusionEngine.fuse_images: image files have no header
    fused: np.ndarray  # uint8 (H, W, 3) in `fused_encoding` channel order, or (H, W) for mono8
    fused_encoding: str
    saliency: np.ndarray  # float32 (H, W) in [0, 1]
    saliency_image: np.ndarray  # `saliency` as published in `saliency_encoding`
    saliency_encoding: str
    inference_seconds: float

    def packed(self) -> tuple[RawImage, RawImage]:
        """The fused and saliency images as published (sensor_msgs/Image fields, header aside)."""
        return (encode_image(self.fused, self.fused_encoding),
                encode_image(self.saliency_image, self.saliency_encoding))

    def transported(self, output: str) -> tuple[np.ndarray, str]:
        """The 8-bit (image, encoding) of `output` ('fused' or 'saliency') in its compressed
        transport and PNG export: the saliency map as mono8 whatever it is published as (the
        transport carries 8- and 16-bit images, not 32FC1); made only when asked for."""
        if output == 'fused':
            return self.fused, self.fused_encoding
        if self.saliency_encoding == 'mono8':
            return self.saliency_image, 'mono8'
        return encode_saliency(self.saliency, 'mono8'), 'mono8'


def clock_jump_message(resets: int | None) -> str:
    """What the node and the bag tools say when the input stamps jumped back (`resets` times
    so far: the synchronizer's resets; None where that count is not the whole stream's)."""
    count = '' if resets is None else f' ({resets} time(s) so far)'
    return ('the input stamps jumped back (a looping bag, a restarted camera or clock): pairing '
            f'restarted on the new timeline{count}')


# Logged once, when the normalizer first holds a thermal frame out of its window.
OUTLIER_NOTICE = ('a thermal frame\'s values lay far outside the normalization window of the '
                  'frames before (a corrupt frame, dead pixels?): it was scaled by that window '
                  f'and left it as it was; values that stay so {HELD_FRAMES} frames in a row '
                  f'start a new window (diagnostics: "{Key.THERMAL_OUTLIERS}")')

# Image sizes named in notices, each once: cameras whose sizes change with every frame (a buggy
# driver, a hostile publisher) would otherwise log a line per frame and keep every text.
SIZES_NAMED = 8
SIZES_KEEP_CHANGING = (f'the cameras\' image sizes keep changing ({SIZES_NAMED} combinations '
                       'named above): further sizes are not named')


class FusionPipeline:
    """Decode, synchronize, normalize and register: everything before the model."""

    def __init__(self, synchronizer: PairSynchronizer, normalizer: ThermalNormalizer,
                 registration: ThermalRegistration, max_pixels: int = MAX_PIXELS):
        self.synchronizer = synchronizer
        self.normalizer = normalizer
        self.registration = registration
        self.max_pixels = max_pixels  # larger inputs are refused: model memory grows with size
        self.notices: list[str] = []  # one-time warnings about the inputs, for the caller to log
        # (role, stamp ns, arrival s) of the latest frame the synchronizer took
        self._latest: tuple[str, int, float] | None = None
        self.stamp_skew = StampSkew()  # cameras on clocks that differ: the node's hint
        self._timeline = 0  # Pair.timeline of the pairs the thermal range was taken over
        self._sizes = None  # ((width, height) thermal, visible) of the last pair prepared
        self._size_notices = 0  # notices naming image sizes (SIZES_NAMED at most)

    def add_thermal(self, message, stamp_ns: int, frame_id: str, arrived: float | None = None,
                    received: float | None = None) -> list[PreparedPair]:
        """Add a thermal Image/CompressedImage (RawImage fields); ImageDecodeError if bad.

        `arrived` (s): when it arrived, on the clock `expire` is given: None for now (live,
        time.monotonic()); a recording's log time, the recorder's arrival time, offline (call
        `expire` at it first, as the node's timer would have before the message came).
        `received` (s, any clock both topics share): when the middleware received it, where
        known (live, rclpy's MessageInfo), for the stamps' skew (StampSkew); else `arrived`.
        """
        frame = self.thermal_frame(message, stamp_ns, frame_id)
        return self._add('thermal', stamp_ns, frame, arrived, received)

    def add_visible(self, message, stamp_ns: int, frame_id: str, arrived: float | None = None,
                    received: float | None = None) -> list[PreparedPair]:
        """Add a visible Image/CompressedImage (RawImage fields); ImageDecodeError if bad.

        `arrived` and `received` as for add_thermal.
        """
        frame = self.visible_frame(message, stamp_ns, frame_id)
        return self._add('visible', stamp_ns, frame, arrived, received)

    def add_message(self, role: str, message, arrived: float | None = None,
                    received: float | None = None) -> list[PreparedPair]:
        """Add a sensor_msgs Image/CompressedImage (rclpy's, live, or rosbags', from a bag) of
        `role` ('thermal' or 'visible') at its header's stamp and frame; `arrived` and
        `received` as for add_thermal. ImageDecodeError (a ValueError) if bad."""
        add = self.add_thermal if role == 'thermal' else self.add_visible
        return add(message, stamp_to_ns(message.header.stamp), message.header.frame_id, arrived,
                   received)

    def add_pair(self, thermal: Frame, visible: Frame) -> list[PreparedPair]:
        """Prepare a pair matched elsewhere (the node's message_filters backend)."""
        return self._prepare([Pair(thermal.stamp_ns, visible.stamp_ns, thermal, visible)])

    def thermal_frame(self, message, stamp_ns: int, frame_id: str) -> Frame:
        """Decode a thermal Image/CompressedImage; ImageDecodeError if bad."""
        decoded = decode_thermal_info(message, self.max_pixels)
        if not np.isfinite(decoded.raw).any():
            # NaN/inf pixels are allowed, but a frame of only those carries no temperature.
            raise ImageDecodeError(f'{decoded.name} image: every pixel is NaN or inf')
        if decoded.from_color:
            self._notice('a colour image arrived on the thermal topic: it is converted to its '
                         'luminance (publish mono8/mono16/32FC1 thermal images to avoid this)')
        return Frame(stamp_ns, frame_id, decoded.raw)

    def visible_frame(self, message, stamp_ns: int, frame_id: str) -> Frame:
        """Decode a visible Image/CompressedImage; ImageDecodeError if bad."""
        return Frame(stamp_ns, frame_id, decode_visible(message, self.max_pixels))

    def expire(self, now: float) -> list[PreparedPair]:
        """Decide thermal frames whose visible partner is overdue; `now` in seconds on the
        arrival clock: time.monotonic() live, a recording's log time offline.

        The synchronizer's timeout runs on the stamps' clock, offsets applied. Extrapolating
        that clock from the latest frame it took keeps the timeout right whether stamps are live,
        simulated, or from an old bag replayed without /clock (where the node's clock is far
        from the stamps). The anchor is the offset stamp: a thermal camera stamping ahead of
        the visible one by more than `sync.timeout` would otherwise expire every thermal frame
        before its partner came.
        """
        if self._latest is None:
            return []
        role, stamp_ns, arrived = self._latest
        sync = self.synchronizer
        # Keyed now, not when it arrived: sync.thermal_offset may have changed since.
        key_ns = sync.thermal_key(stamp_ns) if role == 'thermal' else sync.visible_key(stamp_ns)
        return self._prepare(sync.expire(key_ns + int((now - arrived) * 1e9)))

    def flush(self) -> list[PreparedPair]:
        """Decide everything still pending (end of a bag)."""
        return self._prepare(self.synchronizer.flush())

    def _add(self, role: str, stamp_ns: int, frame: Frame, arrived: float | None,
             received: float | None) -> list[PreparedPair]:
        """Add a frame of `role` to the synchronizer and prepare what it pairs."""
        arrived = time.monotonic() if arrived is None else arrived
        sync = self.synchronizer
        add = sync.add_thermal if role == 'thermal' else sync.add_visible
        before = sync.stats
        prepared = self._prepare(add(stamp_ns, frame))
        after = sync.stats
        if after.resets != before.resets:  # a new timeline: the old one's lateness tells nothing
            self.stamp_skew.clear()
            # Nor its clock: the frame that bore the jump out may stand alone far ahead of the
            # held one (a pause) and anchor nothing, and expiry on the old clock would prune
            # the new timeline's frames.
            self._latest = None
        self.stamp_skew.add(role, stamp_ns, arrived if received is None else received)
        # Only a frame the synchronizer took anchors the stamps' clock: not a late one (a
        # repeated stamp, too), one still of the timeline before a clock jump, nor one whose
        # timeline is not known yet (far behind or alone far ahead of its topic: a jump, or a
        # glitched stamp that would move the clock seconds away).
        if sync.took_last:
            self._latest = (role, stamp_ns, arrived)
        return prepared

    def _notice(self, text: str) -> None:
        if text not in self.notices:
            self.notices.append(text)

    def _size_notice(self, text: str) -> None:
        """A notice that names image sizes: each once, up to SIZES_NAMED of them, then one
        that says they keep changing, and no more."""
        if text in self.notices or self._size_notices > SIZES_NAMED:
            return
        self._size_notices += 1
        self._notice(text if self._size_notices <= SIZES_NAMED else SIZES_KEEP_CHANGING)

    def _prepare(self, pairs) -> list[PreparedPair]:
        prepared = []
        for pair in pairs:
            if pair.timeline != self._timeline:
                # A backwards clock jump (a looping bag, a restarted camera): the new
                # timeline's first frames must not be scaled by the old scene's range.
                self._timeline = pair.timeline
                self.normalizer.reset()
            thermal, visible = pair.thermal, pair.visible
            normalized = self.normalizer(thermal.image)
            if self.normalizer.outliers:
                self._notice(OUTLIER_NOTICE)
            height, width = visible.image.shape[:2]
            sizes = ((normalized.shape[1], normalized.shape[0]), (width, height))
            if self.registration.needs_resize(normalized.shape, (width, height)):
                self._size_notice(resize_notice(*sizes))
            elif not self.registration.is_identity and self._sizes not in (None, sizes):
                self._size_notice(size_change_notice(self._sizes, sizes))
            self._sizes = sizes
            # Where the thermal camera does not see, the model gets the visible luminance: a
            # constant there would read as cold or hot, and the fused image would change
            # brightness with a hard seam at the edge of the thermal view.
            outside = None if self.registration.is_identity else bgr_to_gray(visible.image)
            registered = self.registration(normalized, (width, height), outside)
            prepared.append(PreparedPair(thermal.stamp_ns, visible.stamp_ns, visible.frame_id,
                                         registered, visible.image))
        return prepared


@dataclass
class FusionSettings:
    """Output settings that may change while running (validated by the caller)."""

    output_encoding: str = 'bgr8'
    saliency_encoding: str = 'mono8'
    saliency_contrast: float = 0.2
    saliency_threshold: float = 0.0
    inference_size: tuple[int, int] = (0, 0)  # (width, height); (0, 0) runs at full resolution


class FusionEngine:
    """Runs S4Fusion on pairs and builds the fused and saliency images as published."""

    def __init__(self, loaded: LoadedModel, settings: FusionSettings | None = None):
        self.loaded = loaded
        self.settings = settings or FusionSettings()

    @property
    def detail_gain(self) -> float:
        """Gain on the sources' detail restored above a reduced inference size: the model's."""
        return self.loaded.model.config.detail_gain

    def infer(self, pair: PreparedPair, settings: FusionSettings | None = None
              ) -> FusionResult:
        """Fuse one prepared pair (from messages) into the images published for it, with
        `settings` (the engine's own where None).

        The node and the bag tools drop a pair that raises (a CUDA out-of-memory on an odd
        large frame, say) and go on: the CUDA cache is released first, so the next pair finds
        the memory this one left cached."""
        try:
            return self._fuse(pair.thermal, pair.visible_bgr, settings or self.settings, pair)
        except Exception:
            if self.loaded.device.type == 'cuda':
                with contextlib.suppress(RuntimeError):  # a sticky CUDA error raises again
                    torch.cuda.empty_cache()
            raise

    def fuse_images(self, thermal: np.ndarray, visible_bgr: np.ndarray,
                    output_encoding: str = '', stretch_thermal: bool = False) -> FusionResult:
        """Fuse a pair of images read from files; `output_encoding` overrides the settings'.

        `thermal` is the infrared image as stored (uint8 or uint16 luminance, any size). A
        dataset's thermal image is already a display-normalized picture and training reads it as
        value / type maximum: the node's percentile stretch would change it, so the fixed
        full-type range gives the model the pixels it was trained on. Raw camera counts (a 14-bit
        radiometric file) fill a sliver of that range: `stretch_thermal` maps them as the node
        does, by this image's percentile window.
        """
        if stretch_thermal:
            normalizer = ThermalNormalizer(smoothing=0.0)  # one image: nothing to smooth over
        else:
            full_range = (0.0, float(np.iinfo(thermal.dtype).max))
            normalizer = ThermalNormalizer(mode='fixed', fixed_range=full_range)
        normalized = normalizer(thermal)
        height, width = visible_bgr.shape[:2]
        # The identity registration resizes a thermal image of another size.
        registered = ThermalRegistration()(normalized, (width, height))
        settings = self.settings
        if output_encoding:
            settings = replace(settings, output_encoding=output_encoding)
        return self._fuse(registered, visible_bgr, settings)

    def _fuse(self, thermal: np.ndarray, visible_bgr: np.ndarray, settings: FusionSettings,
              pair: PreparedPair | None = None) -> FusionResult:
        """Luminance through the model, colour from the visible image, outputs encoded."""
        started = time.perf_counter()
        visible_y, visible_cr, visible_cb = bgr_to_ycrcb(visible_bgr)
        height, width = visible_y.shape
        model_size = model_input_size(settings.inference_size, width, height)
        if model_size == (width, height):
            fused_y = self._run_model(thermal, visible_y)
        else:
            thermal_small = cv2.resize(thermal, model_size, interpolation=cv2.INTER_AREA)
            visible_small = cv2.resize(visible_y, model_size, interpolation=cv2.INTER_AREA)
            fused_small = self._run_model(thermal_small, visible_small)
            fused_y = restore_detail(fused_small, thermal, visible_y, self.detail_gain)
        saliency = saliency_map(thermal, visible_y, fused_y,
                                settings.saliency_contrast, settings.saliency_threshold)
        fused = compose_output(fused_y, visible_cr, visible_cb, settings.output_encoding)
        return FusionResult(pair, fused, settings.output_encoding, saliency,
                            encode_saliency(saliency, settings.saliency_encoding),
                            settings.saliency_encoding, time.perf_counter() - started)

    def warm_up(self) -> float:
        """Run the model once on a small blank pair; returns the seconds it took.

        The first forward pass compiles the numba scan (or loads it from its cache) and allocates
        buffers; doing it at start-up keeps that cost out of the first real pair's latency.
        """
        started = time.perf_counter()
        blank = np.zeros((49, 49), np.float32)
        self._run_model(blank, blank)
        return time.perf_counter() - started

    def _run_model(self, thermal: np.ndarray, visible_y: np.ndarray) -> np.ndarray:
        """(H, W) float32 pair -> fused (H, W) float32 in [0, 1]."""
        ir = torch.from_numpy(np.ascontiguousarray(thermal))[None, None]
        vi = torch.from_numpy(np.ascontiguousarray(visible_y))[None, None]
        fused = self.loaded.model.infer(ir, vi, torch.float16 if self.loaded.half else None)
        return fused[0, 0].clamp(0.0, 1.0).cpu().numpy()


def model_input_size(inference_size: tuple[int, int], width: int, height: int
                     ) -> tuple[int, int]:
    """The (width, height) the model runs at for an image of this size: ``inference_size``
    capped at the image's size per side (a larger side would only upsample, and could outgrow the
    memory ``max_input_pixels`` keeps the image within); (0, 0): the image's size."""
    model_width, model_height = inference_size
    if not (model_width and model_height):
        return width, height
    return min(model_width, width), min(model_height, height)


def restore_detail(fused_small: np.ndarray, thermal: np.ndarray,
                   visible_y: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Upsample a fused image made at a reduced size and put back the detail the reduction removed.

    The detail of each source is what its own down-and-up resampling loses; per pixel the stronger
    of the two is added (the max-absolute rule of multi-scale fusion), times ``gain`` (the model's
    detail gain, so restored and modelled detail match), so edges of both cameras return at full
    resolution while the model decides the low frequencies.
    """
    height, width = visible_y.shape
    small_size = fused_small.shape[::-1]

    def lost_detail(image):
        small = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)
        return image - cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)

    thermal_detail, visible_detail = lost_detail(thermal), lost_detail(visible_y)
    detail = np.where(np.abs(thermal_detail) > np.abs(visible_detail), thermal_detail,
                      visible_detail)
    fused = cv2.resize(fused_small, (width, height), interpolation=cv2.INTER_LINEAR)
    fused += gain * detail
    return np.clip(fused, 0.0, 1.0, out=fused)


def compose_output(fused_y: np.ndarray, visible_cr: np.ndarray, visible_cb: np.ndarray,
                   encoding: str) -> np.ndarray:
    """Fused luminance + visible chroma -> uint8 image in the requested encoding."""
    if encoding == 'mono8':
        return to_uint8(fused_y)
    bgr = ycrcb_to_bgr(fused_y, visible_cr, visible_cb)
    if encoding == 'bgr8':
        return bgr
    if encoding == 'rgb8':
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    raise ValueError(f"output encoding '{encoding}' is not one of {', '.join(OUTPUT_ENCODINGS)}")


def encode_saliency(saliency: np.ndarray, encoding: str) -> np.ndarray:
    """A saliency map in [0, 1] as published: mono8 is 0-255, 32FC1 the map itself."""
    if encoding == 'mono8':
        return to_uint8(saliency)
    if encoding == '32FC1':
        return saliency
    raise ValueError(f"saliency encoding '{encoding}' is not one of "
                     f"{', '.join(SALIENCY_ENCODINGS)}")


# Factories: the node's parameter values (settings.py) -> the pipeline and the engine's settings --

def normalizer_settings(values: dict) -> dict:
    """Map the `normalization.*` parameters to ThermalNormalizer keyword arguments."""
    return {'mode': values['normalization.mode'],
            'low_percentile': values['normalization.low_percentile'],
            'high_percentile': values['normalization.high_percentile'],
            'smoothing': values['normalization.smoothing'],
            'fixed_range': (values['normalization.fixed_min'], values['normalization.fixed_max'])}


def _sizes_text(thermal: tuple[int, int], visible: tuple[int, int]) -> str:
    (tw, th), (vw, vh) = thermal, visible
    return f'thermal {tw}x{th}, visible {vw}x{vh}'


def resize_notice(thermal: tuple[int, int], visible: tuple[int, int]) -> str:
    """The notice for thermal frames resized to the visible geometry (identity homography)."""
    (tw, th), (vw, vh) = thermal, visible
    stretched = (', another aspect ratio: stretched' if abs(tw * vh - th * vw) > 0.01 * tw * vh
                 else '')
    return (f'thermal and visible images differ in size ({_sizes_text(thermal, visible)}'
            f'{stretched}) and registration.homography is the identity: the thermal image is '
            'resized to the visible geometry; set a homography to register them')


def size_change_notice(before: tuple, after: tuple) -> str:
    """The notice for cameras whose image sizes changed under a homography, which maps the
    pixels of one thermal size to one visible size: the thermal image is then misregistered."""
    return (f'the cameras changed image size ({_sizes_text(*before)}; now '
            f'{_sizes_text(*after)}), but registration.homography maps the pixels of the sizes '
            'it was found for: the thermal image is misregistered until it is set for these')


def pipeline_from_params(values: dict) -> FusionPipeline:
    """Build the synchronizer, normalizer and registration from their parameters.

    `sync.timeout` lives in the synchronizer: callers pass their clock's now to `expire`.
    """
    synchronizer = PairSynchronizer(
        slop=values['sync.slop'], queue_size=values['sync.queue_size'],
        thermal_offset=values['sync.thermal_offset'], timeout=values['sync.timeout'],
        reset_threshold=values['sync.clock_jump'])
    normalizer = ThermalNormalizer(**normalizer_settings(values))
    registration = ThermalRegistration(np.reshape(values['registration.homography'], (3, 3)))
    return FusionPipeline(synchronizer, normalizer, registration, values['max_input_pixels'])


def output_compression(values: dict) -> list[tuple[str, int, int]]:
    """The codec, JPEG quality and PNG level of each output's (fused, saliency) compressed
    transport (encodings.compress_transport)."""
    return [tuple(values[f'{output}.compressed.{name}']
                  for name in ('format', 'jpeg_quality', 'png_level'))
            for output in OUTPUT_NAMES]


def fusion_settings(values: dict) -> FusionSettings:
    """Map the output parameters to FusionEngine settings."""
    return FusionSettings(output_encoding=values['output_encoding'],
                          saliency_encoding=values['saliency.encoding'],
                          saliency_contrast=values['saliency.contrast'],
                          saliency_threshold=values['saliency.threshold'],
                          inference_size=tuple(values['inference_size']))
