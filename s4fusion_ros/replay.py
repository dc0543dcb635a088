"""Fusing a recorded bag as the live node fuses its topics, for s4fusion-bag and s4fusion-batch
(no ROS): the node's FusionPipeline and FusionEngine on the messages in recorded order, each
arriving at its log time, and the outputs written as the node publishes them (tools/bag.py's
docstring says what that means for timing and drops).
"""

import contextlib
import pathlib
import re
import sys
from dataclasses import dataclass, field

import cv2
import numpy as np
from rosbags.interfaces import Qos
from tqdm import tqdm

from .bagio import (COMPRESSED_IMAGE, IMAGE, RELIABLE_QOS, BagError, ImageTopic, LogWindow,
                    add_topic, camera_info_cdr, compressed_image_cdr, copy_connections, cut_files,
                    damaged_files, deserialize, image_cdr, log_span, log_window, lost_messages,
                    newest_before, read_messages, topic_types)
from .camera_info import (CAMERA_INFO, CameraInfoCache, calibration_fault, camera_info_topic,
                          output_info_topics)
from .cli import TimeWindow
from .diagnostics import stamp_lead, stamped_ahead_message
from .engine import FusionEngine, FusionPipeline, FusionResult, clock_jump_message
from .files import write_png
from .imaging.encodings import ImageDecodeError, compress_transport
from .messages import stamp_to_ns
from .settings import OUTPUT_NAMES
from .video import SideBySideVideo, panel_row


@dataclass
class Counts:
    """What happened to the input messages."""

    read: dict = field(default_factory=lambda: {'thermal': 0, 'visible': 0})
    undecodable: dict = field(default_factory=lambda: {'thermal': 0, 'visible': 0})
    fused: int = 0
    failed: int = 0  # pairs whose inference raised: dropped, as the node drops them
    lost: int = 0  # messages (of every topic) in the damaged chunks skipped: a partial read


@dataclass(frozen=True)
class Span:
    """A part of a run to fuse, in log time (ns): how s4fusion-batch splits a long bag. A run is
    the bag, or the window of it that BagFuser.run is given, read as if the bag held the
    window's messages alone.

    Messages are read from `read_from` (None, or a time before the run's start: the run's start).
    Those before `own_from` only bring the pipeline's state (synchronizer, thermal smoothing) to
    where a run from its start would have it: their pairs are prepared but not fused or written.
    By `own_from`, at least `warm_pairs` pairs must have been prepared from messages at or after
    `count_from`, and the last message before `own_from` must lie in the second half of
    [read_from, count_from) or later (a gap in the recording can leave a frame pending), unless
    reading began at the start of the run; otherwise WarmUpTooShort. Reading stops before
    `stop`, and only the span that reaches the end of the run (`stop` None) flushes the pairs
    still pending.
    """

    read_from: int | None = None
    own_from: int | None = None
    count_from: int | None = None
    warm_pairs: int = 0
    stop: int | None = None


WHOLE = Span()


TRANSPORTS = ('raw', 'compressed', 'both')  # how the outputs are written (--transport)


def transport_topics(topics: tuple[str, str], transport: str) -> list[tuple[str, str]]:
    """(topic, message type) of the outputs written on the (fused, saliency) `topics` in
    `transport`: raw sensor_msgs/Image, image_transport's compressed transport (TOPIC/compressed,
    as the node publishes it) or both."""
    written = []
    if transport != 'compressed':
        written += [(topic, IMAGE) for topic in topics]
    if transport != 'raw':
        written += [(f'{topic}/compressed', COMPRESSED_IMAGE) for topic in topics]
    return written


@dataclass(frozen=True)
class Outputs:
    """The output bag's connections of the fused and saliency images: raw, compressed (each
    with its compression settings), either list empty where not written."""

    raw: list
    compressed: list
    compression: list


class WarmUpTooShort(Exception):
    """A span's warm-up prepared too few pairs to settle the pipeline's state."""


class BagFuser:
    """Feeds one bag's messages through the pipeline and writes what the node would publish."""

    def __init__(self, prog: str, pipeline: FusionPipeline, engine: FusionEngine,
                 export: pathlib.Path | None, export_every: int,
                 video: SideBySideVideo | None = None, warnings: list[str] | None = None):
        """`prog` names the command in the warnings printed on stderr; with a `warnings` list
        they are added to it instead, each once (s4fusion-batch prints a bag's once, from the
        warnings of all its parts)."""
        self.prog = prog
        self.warnings = warnings
        self.pipeline = pipeline
        self.engine = engine
        self.export = export
        self.export_every = export_every
        self.video = video
        self.counts = Counts()
        self.exported = set()  # the PNGs written (export)
        self.warned = set()
        self.notices_shown = 0
        self.resets_shown = 0
        self.baseline = self.tally()  # at the first owned message of a span
        self.camera_infos = CameraInfoCache()
        self.camera_info_outputs = []  # the output bag's camera_info connections, if any
        self.calibration_warned = False  # a camera_info not fitting its images, said once
        # Frames stamped ahead of their log time: a camera clock ahead of the recorder's.
        self.stamp_lead = stamp_lead(pipeline.synchronizer.queue_size)

    def run(self, reader, path: pathlib.Path, thermal: ImageTopic, visible: ImageTopic,
            writer, topics: tuple[str, str], include_inputs: bool, span: Span = WHOLE,
            progress=None, qos: Qos = RELIABLE_QOS, transport: str = 'raw',
            compression: list = (), window: LogWindow | None = None) -> None:
        """Fuse every pair of the bag (or of its `window`, bagio.log_window; or `span` of either)
        into `writer` on the (fused, saliency) `topics`, offered with `qos` (the node's
        qos.output.*), in `transport` (transport_topics), the compressed transport with
        `compression` (engine.output_compression).

        Only the messages of the window are read, as the node fed it by s4fusion-play with the
        same window receives them (a frame whose partner lies outside stays unpaired), but for
        the visible camera's calibration: its newest camera_info before the reading's start is
        taken as in effect there.

        `progress` (update(n), set_postfix(**values)) replaces the progress bar on stderr.
        """
        window = window or log_window(reader, path, TimeWindow())
        read_from = window.start if span.read_from is None else max(span.read_from, window.start)
        # A span read from after the run's start has a warm-up to check.
        warmed_from = read_from if read_from > window.start else None
        for cut in cut_files(reader):
            self._warn(f'{path}: {cut}')
        written = [(add_topic(writer, topic, qos, msgtype), msgtype)
                   for topic, msgtype in transport_topics(topics, transport)]
        outputs = Outputs([c for c, msgtype in written if msgtype == IMAGE],
                          [c for c, msgtype in written if msgtype == COMPRESSED_IMAGE],
                          list(compression))
        roles = {thermal.topic: 'thermal', visible.topic: 'visible'}
        types = {thermal.topic: thermal.msgtype, visible.topic: visible.msgtype}
        info_topic, info_outputs = camera_info_topics(reader, visible, topics)
        if info_topic:  # written beside the outputs as the node publishes it
            types[info_topic] = CAMERA_INFO
            self.camera_info_outputs = [add_topic(writer, topic, qos, CAMERA_INFO)
                                        for topic in info_outputs]
            for connection, _, raw in newest_before(reader, path, [info_topic], read_from):
                self._add_camera_info(path, connection, raw)
        copies = (copy_connections(writer, [c for c in reader.connections
                                            if types.get(c.topic) == c.msgtype])
                  if include_inputs else {})  # as read_messages reads them
        owned, warm = span.own_from is None, 0
        if progress:
            bar = contextlib.nullcontext(progress)
        else:  # at most a pair per thermal frame: the bag's, or those the window holds, counted
            # (its share of the bag's span says little of them: a camera started late, a gap)
            total = (thermal.count if window.whole else
                     log_span(reader, path, thermal.topic, window.start, window.stop)[0])
            bar = tqdm(total=total, unit='pair', desc='fusing', file=sys.stderr,
                       dynamic_ncols=True)
        previous = None  # the log time of the message read before
        stop = window.stop if span.stop is None else span.stop
        with bar as progress:
            for connection, log_time, raw in read_messages(reader, path, types, read_from, stop):
                if not owned and log_time >= span.own_from:
                    owned = self._own(path, span, warm, previous, warmed_from)
                previous = log_time
                if include_inputs and owned:
                    writer.write(copies[connection.id], log_time, raw)
                if connection.topic == info_topic:
                    self._add_camera_info(path, connection, raw)
                    continue
                # The timer's decisions before the message came (at its log time, not on the
                # node's 50 ms ticks: a partner arriving within a tick of its timeout can differ).
                arrived = log_time / 1e9
                prepared = self.pipeline.expire(arrived)
                prepared += self._add(roles[connection.topic], path, connection, raw, arrived)
                self._note_pairs(prepared)
                self._show_notices(path)
                if owned:
                    self._fuse(prepared, path, writer, outputs, progress, log_time)
                elif span.count_from is None or log_time >= span.count_from:
                    warm += len(prepared)
            if span.stop is not None and not owned:  # no message of its own: it counts none
                self.baseline = self.tally()
            if span.stop is None:
                if not owned:
                    owned = self._own(path, span, warm, previous, warmed_from)
                prepared = self.pipeline.flush()
                self._note_pairs(prepared)
                self._show_notices(path)
                self._fuse(prepared, path, writer, outputs, progress,
                           reader.end_time if previous is None else previous)
                self._show_counts(progress)  # the flush's unpaired frames, as the summary
                self._show_stamped_ahead(path)
        # Found as the chunks were read, by this run or by what read the bag before it; of
        # those, the ones within what this run reads.
        for damaged in damaged_files(reader, read_from, stop):
            self._warn(f'{path}: {damaged}')
        self.counts.lost = lost_messages(reader, read_from, stop)

    def _own(self, path: pathlib.Path, span: Span, warm: int, last_read: int | None,
             warmed_from: int | None) -> bool:
        """Start fusing a span: check its warm-up, read from `warmed_from` (None: from the run's
        start, nothing to check), and note the counts it starts from.

        Frames are decided when messages arrive, so a frame read before a gap in the recording
        can still be pending at the cut: the last message before the cut (`last_read`) must have
        come at least slop + timeout + |offset| (count_from - read_from, halved) after
        `read_from`, by when every frame read before `read_from` was decided; else the warm-up
        may start after a pending frame.
        """
        if warmed_from is not None:
            if warm < span.warm_pairs:
                raise WarmUpTooShort(f'{path}: {warm} of {span.warm_pairs} warm-up pairs')
            if span.count_from is not None and (
                    last_read is None or last_read < (warmed_from + span.count_from) // 2):
                raise WarmUpTooShort(f'{path}: a gap in the recording before the warm-up ends')
        self.baseline = self.tally()
        return True

    def tally(self) -> dict:
        """Counts so far: messages read (and thermal frames among them), thermal/visible pairs,
        unpaired and dropped messages, pairs whose inference failed."""
        stats = self.pipeline.synchronizer.stats
        return {'read': sum(self.counts.read.values()),
                'thermal_read': self.counts.read['thermal'], 'pairs': stats.pairs,
                'unpaired': stats.thermal_unpaired + stats.visible_unpaired,
                'dropped': self.dropped(), 'failed': self.counts.failed}

    def _add(self, role: str, path: pathlib.Path, connection, raw: bytes, arrived: float) -> list:
        self.counts.read[role] += 1
        try:
            message = deserialize(path, connection, raw)
            # As the node notes it: before decoding, on the clock the recorder logged it by.
            self.stamp_lead.add(role, stamp_to_ns(message.header.stamp), arrived,
                                self.pipeline.synchronizer.thermal_offset)
            return self.pipeline.add_message(role, message, arrived)
        # A message whose bytes are not its type (the middleware drops such a one live), an
        # ImageDecodeError or bad geometry (the node drops these): skipped and counted.
        except (BagError, ValueError) as error:
            self.counts.undecodable[role] += 1
            if connection.topic not in self.warned:
                self.warned.add(connection.topic)
                kind = ('undecodable' if isinstance(error, (BagError, ImageDecodeError))
                        else 'unusable')
                self._warn(f'{path}: {connection.topic}: skipping {kind} messages (first: '
                           f'{error})')
            return []

    def _add_camera_info(self, path: pathlib.Path, connection, raw: bytes) -> None:
        try:
            self.camera_infos.add(deserialize(path, connection, raw))
        except BagError as error:  # the images go on without it, as live
            if connection.topic not in self.warned:
                self.warned.add(connection.topic)
                self._warn(f'{error}; skipping such camera_info messages')

    def _note_pairs(self, prepared: list) -> None:
        offset = self.pipeline.synchronizer.thermal_offset
        for pair in prepared:
            self.stamp_lead.pair(pair.thermal_stamp_ns, pair.visible_stamp_ns, offset)

    def _show_stamped_ahead(self, path: pathlib.Path) -> None:
        """Warn where the run's last pairs joined frames captured apart, as the node warns while
        they do (StampLead.fault): a camera clock ahead of the recorder's."""
        fault = self.stamp_lead.fault()
        if fault is not None:
            self._warn(f'{path}: ' + stamped_ahead_message(
                *fault, self.pipeline.synchronizer.thermal_offset, live=False))

    def _show_notices(self, path: pathlib.Path) -> None:
        """Warn of the pipeline's one-time notices about the inputs and of clock jumps, as the
        node logs them."""
        for notice in self.pipeline.notices[self.notices_shown:]:
            self._warn(f'{path}: {notice}')
        self.notices_shown = len(self.pipeline.notices)
        resets = self.pipeline.synchronizer.stats.resets
        if resets > self.resets_shown:
            self.resets_shown = resets
            # Collected from a bag's parts (s4fusion-batch), each counting its own: said once.
            count = None if self.warnings is not None else resets
            self._warn(f'{path}: {clock_jump_message(count)}')

    def _warn(self, text: str) -> None:
        if self.warnings is None:
            tqdm.write(f'{self.prog}: {text}', file=sys.stderr)
        elif text not in self.warnings:
            self.warnings.append(text)

    def _fuse(self, prepared: list, path: pathlib.Path, writer, outputs: Outputs,
              progress: tqdm, log_time: int) -> None:
        """Fuse the pairs decided at `log_time` (ns) and write them logged at that time."""
        for pair in prepared:
            try:
                result = self.engine.infer(pair)
            except Exception as error:  # noqa: BLE001 - as the node: one pair lost, not the bag
                self.counts.failed += 1
                if self.counts.failed == 1:
                    self._warn(f'{path}: inference failed on the pair stamped '
                               f'{pair.visible_stamp_ns}, dropped (the summary counts more): '
                               f'{error!r}')
                continue
            for connection, raw in zip(outputs.raw, result.packed()):
                writer.write(connection, log_time,
                             image_cdr(raw, pair.visible_stamp_ns, pair.frame_id))
            for name, connection, compression in zip(OUTPUT_NAMES, outputs.compressed,
                                                     outputs.compression):
                fmt, data = compress_transport(*result.transported(name), *compression)
                writer.write(connection, log_time,
                             compressed_image_cdr(data, fmt, pair.visible_stamp_ns, pair.frame_id))
            info = self.camera_infos.for_image(pair.visible_stamp_ns)
            if info is not None and self.camera_info_outputs:
                fault = calibration_fault(info, *pair.visible_bgr.shape[1::-1])
                if fault and not self.calibration_warned:
                    self.calibration_warned = True
                    self._warn(f'{path}: the visible camera_info: {fault}; written beside the '
                               'outputs as it came (said once)')
                raw_info = camera_info_cdr(info, pair.visible_stamp_ns, pair.frame_id)
                for connection in self.camera_info_outputs:
                    writer.write(connection, log_time, raw_info)
            if self.export is not None and self.counts.fused % self.export_every == 0:
                self.exported.update(export_png(self.export, self.counts.fused, result))
            if self.video is not None:
                self.video.add(panel_row(pair.visible_bgr, pair.thermal, bgr_image(result),
                                         result.saliency, pair.visible_stamp_ns))
            self.counts.fused += 1
            progress.update(1)
            self._show_counts(progress)

    def _show_counts(self, progress) -> None:
        stats = self.pipeline.synchronizer.stats
        # Apart, as in the summary: a faster visible camera leaves most of its frames unpaired
        # by design, where unpaired thermal frames are lost pairs.
        progress.set_postfix(thermal_unpaired=stats.thermal_unpaired,
                             visible_unpaired=stats.visible_unpaired, dropped=self.dropped(),
                             refresh=False)

    def dropped_by_reason(self) -> dict[str, int]:
        """Messages neither paired nor unpaired, by why: {reason: count}."""
        stats = self.pipeline.synchronizer.stats
        return {'undecodable': sum(self.counts.undecodable.values()),
                'late': stats.thermal_late + stats.visible_late,
                'overflowed': stats.thermal_overflow + stats.visible_overflow,
                'unstamped': stats.thermal_bad_stamp + stats.visible_bad_stamp}

    def dropped(self) -> int:
        """Messages neither paired nor unpaired: undecodable, late, overflowed or unstamped."""
        return sum(self.dropped_by_reason().values())


def camera_info_topics(reader, visible: ImageTopic,
                       topics: tuple[str, str]) -> tuple[str | None, list[str]]:
    """(the visible camera's camera_info topic in the bag, the outputs' beside the (fused,
    saliency) `topics`), as the node reads and publishes them (camera_info.py); (None, []) where
    the bag has none."""
    topic = camera_info_topic(visible.topic, transport=visible.msgtype == COMPRESSED_IMAGE)
    if topic_types(reader).get(topic) != CAMERA_INFO:
        return None, []
    return topic, output_info_topics(topics)


def bgr_image(result: FusionResult) -> np.ndarray:
    """The fused image in OpenCV's channel order (BGR, or gray for mono8)."""
    if result.fused_encoding == 'rgb8':
        return cv2.cvtColor(result.fused, cv2.COLOR_RGB2BGR)
    return result.fused


# The names export_png gives: pair index, visible stamp (ns), image.
EXPORTED_PNG = re.compile(r'\d{6,}_\d+_(fused|saliency)\.png')


def export_png(directory: pathlib.Path, index: int, result: FusionResult) -> list[pathlib.Path]:
    """Write one pair's fused image and saliency map as PNG (8-bit, BGR or gray); returns the
    paths written."""
    fused = bgr_image(result)
    saliency, _ = result.transported('saliency')
    stem = f'{index:06d}_{result.pair.visible_stamp_ns}'
    paths = []
    for suffix, image in (('fused', fused), ('saliency', saliency)):
        paths.append(directory / f'{stem}_{suffix}.png')
        write_png(paths[-1], image)
    return paths


def remove_earlier_export(directory: pathlib.Path, kept: set[pathlib.Path]) -> int:
    """Remove the PNGs an earlier export wrote into `directory` (by export_png's names) that
    this run did not write again (`kept`); returns how many. Other files stay."""
    stale = [path for path in directory.iterdir()
             if EXPORTED_PNG.fullmatch(path.name) and path not in kept]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
