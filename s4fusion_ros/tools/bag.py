"""s4fusion-bag: fuse the thermal and visible topics of a rosbag2 offline into a new bag.

Messages go through the node's own FusionPipeline and FusionEngine, built from the same parameter
file (`--params`, the node's --params-file format), in recorded order, with each message's log time
as its arrival time: sync.timeout decides on those as the live node's timer decides on its clock
(to within the timer's 50 ms period), so a topic recorded later than the timeout after its stamps
loses the pairs it would lose live.
(The log time is when the recorder got the message: where the recorder itself stalled, behind a
slow disk or a network, frames look later than the node saw them and can lose pairs it made;
a larger sync.timeout in --params undoes that.) Unlike the live node nothing is dropped for lack
of compute time: every decided pair is fused.

The output bag has the node's output topics (sensor_msgs/Image with the visible header; under
/s4fusion_node/ unless --fused-topic / --saliency-topic name others, whatever namespace the
parameter file is for), offered with the QoS of qos.output.*, logged at
the time the pair was decided (the log time of the message that completed it, or of the last
message for the pairs decided at the end of the bag), on the input's timeline, and with
--include-inputs the input topics as recorded. It is written under a temporary name and renamed
when complete: an interrupted or failed run, or one that fused no pair, leaves nothing under the
output name.
"""

import argparse
import contextlib
import pathlib
import re
import sys
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
from rosbags.interfaces import Qos
from tqdm import tqdm

from .. import settings
from ..bagio import (RELIABLE_QOS, STORAGES, WRITE_ERRORS, BagError, ImageTopic, add_image_topic,
                     bag_size, check_output, copy_connections, create_bag, deserialize,
                     image_cdr, image_topics, open_bag, output_qos_of, pick_topics,
                     read_messages, storage_of, sweep_staging)
from ..cli import run_command, stop_on_signals
from ..diagnostics import clock_skew_hint
from ..engine import (FusionEngine, FusionPipeline, FusionResult, encode_saliency, fusion_settings,
                      pipeline_from_params)
from ..files import resolved, write_png
from ..imaging.encodings import ImageDecodeError
from ..model import CheckpointError
from ..runtime import model_from_params
from ..video import VIDEO_SUFFIXES, SideBySideVideo, frame_rate, panel_row

PROG = 's4fusion-bag'
DEFAULT_FUSED_TOPIC, DEFAULT_SALIENCY_TOPIC = settings.OUTPUT_TOPICS
# What rmw's full topic name validation takes (a bag holds resolved names).
FULL_TOPIC_NAME = re.compile(r'(/[A-Za-z_][A-Za-z0-9_]*)+')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument('input', type=pathlib.Path,
                        help='rosbag2 directory (sqlite3 or MCAP) or a .db3 / .mcap file')
    parser.add_argument('output', type=pathlib.Path, help='bag directory to create')
    parser.add_argument('--thermal-topic', help='thermal image topic (default: detected from '
                        'the encodings: mono16/16UC1/32FC1, or mono8 on a thermal-named topic; '
                        "never the fusion node's recorded outputs)")
    parser.add_argument('--visible-topic', help='visible image topic (default: the bgr8/rgb8 one; '
                        'of one recorded raw and /compressed, the transport --params names)')
    parser.add_argument('--params', type=pathlib.Path,
                        help="the node's parameter file (e.g. config/s4fusion.yaml)")
    parser.add_argument('--device', help='override the device parameter (auto, cpu, cuda:N)')
    parser.add_argument('--weights', help='override model.weights (a .safetensors checkpoint)')
    parser.add_argument('--fused-topic', default=DEFAULT_FUSED_TOPIC,
                        help='output topic of the fused images (default: %(default)s)')
    parser.add_argument('--saliency-topic', default=DEFAULT_SALIENCY_TOPIC,
                        help='output topic of the saliency maps (default: %(default)s)')
    parser.add_argument('--include-inputs', action='store_true',
                        help='copy the thermal and visible topics into the output bag, each '
                        'connection with its recorded QoS')
    parser.add_argument('--storage', choices=STORAGES,
                        help='output storage format (default: that of the input)')
    parser.add_argument('--export-png', type=pathlib.Path, metavar='DIR',
                        help='also write fused and saliency PNGs of every Nth pair to DIR')
    parser.add_argument('--export-every', type=int, default=1, metavar='N',
                        help='with --export-png: every Nth pair (default: %(default)s)')
    parser.add_argument('--export-video', type=pathlib.Path, metavar='FILE.mp4',
                        help='also write a side-by-side MP4 (visible | thermal | fused | '
                        'saliency, with stamps) of every pair; .mov, .mkv or .avi give that '
                        'container')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace OUTPUT if it is an existing bag (and an existing '
                        '--export-video file, and the PNGs an earlier export wrote into '
                        '--export-png DIR, once this run has written its own)')
    args = parser.parse_args(argv)
    if args.export_every < 1:
        parser.error('--export-every must be >= 1')
    for flag, topic in (('--fused-topic', args.fused_topic),
                        ('--saliency-topic', args.saliency_topic)):
        if not FULL_TOPIC_NAME.fullmatch(topic):
            parser.error(f'{flag} {topic!r} is not a fully qualified ROS topic name '
                         f'(/name/of/topic: letters, digits and _, no token starting with a '
                         f'digit)')
    if args.fused_topic == args.saliency_topic:
        parser.error(f'--fused-topic and --saliency-topic are both {args.fused_topic}')
    return args


def load_values(args: argparse.Namespace) -> dict:
    """Node parameter values: defaults, the parameter file, then the command-line overrides."""
    values = settings.load_offline_params(args.params)
    for name, value in (('device', args.device), ('model.weights', args.weights)):
        if value is not None:
            values[name] = value
    return values


@dataclass
class Counts:
    """What happened to the input messages."""

    read: dict = field(default_factory=lambda: {'thermal': 0, 'visible': 0})
    undecodable: dict = field(default_factory=lambda: {'thermal': 0, 'visible': 0})
    fused: int = 0


@dataclass(frozen=True)
class Span:
    """A part of a bag to fuse, in log time (ns): how s4fusion-batch splits a long bag.

    Messages are read from `read_from` (None: the start). Those before `own_from` only bring the
    pipeline's state (synchronizer, thermal smoothing) to where a run from the start would have
    it: their pairs are prepared but not fused or written. By `own_from`, at least `warm_pairs`
    pairs must have been prepared from messages at or after `count_from`, and the last message
    before `own_from` must lie in the second half of [read_from, count_from) or later (a gap in
    the recording can leave a frame pending), unless reading began at the start of the bag;
    otherwise WarmUpTooShort. Reading stops before `stop`, and only the
    span that reaches the end of the bag (`stop` None) flushes the pairs still pending.
    """

    read_from: int | None = None
    own_from: int | None = None
    count_from: int | None = None
    warm_pairs: int = 0
    stop: int | None = None


WHOLE = Span()


class WarmUpTooShort(Exception):
    """A span's warm-up prepared too few pairs to settle the pipeline's state."""


class BagFuser:
    """Feeds one bag's messages through the pipeline and writes what the node would publish."""

    def __init__(self, pipeline: FusionPipeline, engine: FusionEngine,
                 export: pathlib.Path | None, export_every: int,
                 video: SideBySideVideo | None = None):
        self.pipeline = pipeline
        self.engine = engine
        self.export = export
        self.export_every = export_every
        self.video = video
        self.counts = Counts()
        self.exported = set()  # the PNGs written (export)
        self.warned = set()
        self.notices_shown = 0
        self.baseline = self.tally()  # at the first owned message of a span

    def run(self, reader, path: pathlib.Path, thermal: ImageTopic, visible: ImageTopic,
            writer, topics: tuple[str, str], include_inputs: bool, span: Span = WHOLE,
            progress=None, qos: Qos = RELIABLE_QOS) -> None:
        """Fuse every pair of the bag (or `span`) into `writer` on the (fused, saliency) `topics`,
        offered with `qos` (the node's qos.output.*).

        `progress` (update(n), set_postfix(**values)) replaces the progress bar on stderr.
        """
        outputs = [add_image_topic(writer, topic, qos) for topic in topics]
        roles = {thermal.topic: 'thermal', visible.topic: 'visible'}
        copies = (copy_connections(writer, [c for c in reader.connections if c.topic in roles])
                  if include_inputs else {})
        owned, warm = span.own_from is None, 0
        bar = contextlib.nullcontext(progress) if progress else tqdm(
            total=thermal.count, unit='pair', desc='fusing', file=sys.stderr, dynamic_ncols=True)
        previous = None  # the log time of the message read before
        with bar as progress:
            for connection, log_time, raw in read_messages(reader, path, roles, span.read_from,
                                                           span.stop):
                if not owned and log_time >= span.own_from:
                    owned = self._own(reader, path, span, warm, previous)
                previous = log_time
                if include_inputs and owned:
                    writer.write(copies[connection.id], log_time, raw)
                # The timer's decisions before the message came (at its log time, not on the
                # node's 50 ms ticks: a partner arriving within a tick of its timeout can differ).
                arrived = log_time / 1e9
                prepared = self.pipeline.expire(arrived)
                prepared += self._add(roles[connection.topic], path, connection, raw, arrived)
                self._show_notices(path)
                if owned:
                    self._fuse(prepared, writer, outputs, progress, log_time)
                elif span.count_from is None or log_time >= span.count_from:
                    warm += len(prepared)
            if span.stop is not None and not owned:  # no message of its own: it counts none
                self.baseline = self.tally()
            if span.stop is None:
                if not owned:
                    owned = self._own(reader, path, span, warm, previous)
                prepared = self.pipeline.flush()
                self._show_notices(path)
                self._fuse(prepared, writer, outputs, progress,
                           reader.end_time if previous is None else previous)

    def _own(self, reader, path: pathlib.Path, span: Span, warm: int,
             last_read: int | None) -> bool:
        """Start fusing a span: check its warm-up and note the counts it starts from.

        Frames are decided when messages arrive, so a frame read before a gap in the recording
        can still be pending at the cut: the last message before the cut (`last_read`) must have
        come at least slop + timeout + |offset| (count_from - read_from, halved) after
        `read_from`, by when every frame read before `read_from` was decided; else the warm-up
        may start after a pending frame.
        """
        if span.read_from is not None and span.read_from > reader.start_time:
            if warm < span.warm_pairs:
                raise WarmUpTooShort(f'{path}: {warm} of {span.warm_pairs} warm-up pairs')
            if span.count_from is not None and (
                    last_read is None or last_read < (span.read_from + span.count_from) // 2):
                raise WarmUpTooShort(f'{path}: a gap in the recording before the warm-up ends')
        self.baseline = self.tally()
        return True

    def tally(self) -> dict:
        """Counts so far: messages read, thermal/visible pairs, unpaired and dropped messages."""
        stats = self.pipeline.synchronizer.stats
        return {'read': sum(self.counts.read.values()), 'pairs': stats.pairs,
                'unpaired': stats.thermal_unpaired + stats.visible_unpaired,
                'dropped': self.dropped()}

    def _add(self, role: str, path: pathlib.Path, connection, raw: bytes, arrived: float) -> list:
        self.counts.read[role] += 1
        try:
            return self.pipeline.add_message(role, deserialize(path, connection, raw), arrived)
        # A message whose bytes are not its type (the middleware drops such a one live), an
        # ImageDecodeError or bad geometry (the node drops these): skipped and counted.
        except (BagError, ValueError) as error:
            self.counts.undecodable[role] += 1
            if connection.topic not in self.warned:
                self.warned.add(connection.topic)
                kind = ('undecodable' if isinstance(error, (BagError, ImageDecodeError))
                        else 'unusable')
                tqdm.write(f'{PROG}: {path}: {connection.topic}: skipping {kind} messages '
                           f'(first: {error})', file=sys.stderr)
            return []

    def _show_notices(self, path: pathlib.Path) -> None:
        """Print the pipeline's one-time warnings about the inputs, as the node logs them."""
        for notice in self.pipeline.notices[self.notices_shown:]:
            tqdm.write(f'{PROG}: {path}: {notice}', file=sys.stderr)
        self.notices_shown = len(self.pipeline.notices)

    def _fuse(self, prepared: list, writer, outputs: list, progress: tqdm, log_time: int) -> None:
        """Fuse the pairs decided at `log_time` (ns) and write them logged at that time."""
        for pair in prepared:
            result = self.engine.infer(pair)
            for connection, raw in zip(outputs, result.packed()):
                writer.write(connection, log_time,
                             image_cdr(raw, pair.visible_stamp_ns, pair.frame_id))
            if self.export is not None and self.counts.fused % self.export_every == 0:
                self.exported.update(export_png(self.export, self.counts.fused, result))
            if self.video is not None:
                self.video.add(panel_row(pair.visible_bgr, pair.thermal, bgr_image(result),
                                         result.saliency, pair.visible_stamp_ns))
            self.counts.fused += 1
            stats = self.pipeline.synchronizer.stats
            progress.update(1)
            progress.set_postfix(unpaired=stats.thermal_unpaired + stats.visible_unpaired,
                                 dropped=self.dropped(), refresh=False)

    def dropped_by_reason(self) -> dict[str, int]:
        """Messages neither paired nor unpaired, by why: {reason: count}."""
        stats = self.pipeline.synchronizer.stats
        return {'undecodable': sum(self.counts.undecodable.values()),
                'late': stats.thermal_late + stats.visible_late,
                'overflowed': stats.thermal_overflow + stats.visible_overflow,
                'unstamped': stats.thermal_rejected + stats.visible_rejected}

    def dropped(self) -> int:
        """Messages neither paired nor unpaired: undecodable, late, overflowed or unstamped."""
        return sum(self.dropped_by_reason().values())


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
    saliency = encode_saliency(result.saliency, 'mono8')
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


def run(args: argparse.Namespace) -> None:
    """Fuse args.input into args.output; raises with a message naming the file on failure."""
    try:
        output, source = resolved(args.output), resolved(args.input)
        exports = [(flag, export, resolved(export)) for flag, export in (
            ('--export-video', args.export_video), ('--export-png', args.export_png)) if export]
    except OSError as error:
        raise BagError(str(error)) from None
    # --overwrite replaces the output folder whole: an input inside it would go with it.
    if source.is_relative_to(output) or output.is_relative_to(source):
        raise BagError(f'{args.output}: the output cannot be the input bag, hold it or lie '
                       f'inside it')
    # A killed run's partial bag goes (an overwrite killed between its renames gets its bag
    # back), then an existing output is refused: before minutes of work, not after.
    sweep_staging(args.output)
    check_output(args.output, args.overwrite)
    for flag, export, place in exports:
        # Made early, its folder inside the output would stop the bag's rename at the end.
        for what, bag in (('output', output), ('input', source)):
            if place.is_relative_to(bag):
                raise BagError(f'{flag} {export}: inside the {what} bag {bag}; write it elsewhere')
    if args.export_video and args.export_video.is_dir():
        raise BagError(f'--export-video {args.export_video} is a folder: name the .mp4 file')
    if args.export_video and args.export_video.suffix.lower() not in VIDEO_SUFFIXES:
        raise BagError(f'--export-video {args.export_video}: name a file ending in '
                       f'{", ".join(VIDEO_SUFFIXES)} (the container OpenCV writes is chosen by '
                       f'the suffix)')
    if args.export_video and args.export_video.exists() and not args.overwrite:
        raise BagError(f'{args.export_video} exists; pass --overwrite to replace it')
    # An earlier export's PNGs would be replaced one by one, or mixed with this run's.
    if args.export_png and not args.overwrite and any(args.export_png.glob('*.png')):
        raise BagError(f'--export-png {args.export_png} holds PNGs already; pass --overwrite to '
                       f'replace those of an earlier export')
    values = load_values(args)
    started = time.monotonic()
    with open_bag(args.input) as reader:
        thermal, visible = pick_topics(image_topics(reader, args.input), args.input,
                                       args.thermal_topic, args.visible_topic, values)
        copied = {thermal.topic, visible.topic} if args.include_inputs else set()
        for flag, topic in (('--fused-topic', args.fused_topic),
                            ('--saliency-topic', args.saliency_topic)):
            if topic in copied:  # two streams would be merged under one name
                raise BagError(f'{flag} {topic} is an input topic copied by --include-inputs; '
                               f'name another')
        storage = args.storage or storage_of(args.input)
        loaded = model_from_params(values)
        print(f'{PROG}: {thermal.describe()} + {visible.describe()} -> {args.output} '
              f'({storage}) with {loaded.name} on {loaded.device}', file=sys.stderr)
        if args.export_png:
            args.export_png.mkdir(parents=True, exist_ok=True)
        # The video plays at the thermal camera's recorded rate: one frame per pair.
        span = (reader.end_time - reader.start_time) / 1e9
        video = (SideBySideVideo(args.export_video, frame_rate(thermal.count, span))
                 if args.export_video else None)
        engine = FusionEngine(loaded, fusion_settings(values))
        fuser = BagFuser(pipeline_from_params(values), engine, args.export_png, args.export_every,
                         video)
        # The bag is finished (or removed) first, then the video named (or discarded).
        bag = create_bag(args.output, storage, overwrite=args.overwrite)
        with video or contextlib.nullcontext(), bag as writer:
            fuser.run(reader, args.input, thermal, visible, writer,
                      (args.fused_topic, args.saliency_topic), args.include_inputs,
                      qos=output_qos_of(values))
            if not fuser.counts.fused:  # a failed run for a script too: nothing is written
                print_summary(args, fuser, time.monotonic() - started)
                raise BagError(f'no pair was fused (the counts above say why); {args.output} '
                               f'was not written')
    print_summary(args, fuser, time.monotonic() - started)
    if args.export_png and args.overwrite:  # replaced once this run's are all written
        removed = remove_earlier_export(args.export_png, fuser.exported)
        if removed:
            print(f'{PROG}: removed {removed} PNGs of an earlier export from {args.export_png}',
                  file=sys.stderr)


def print_summary(args: argparse.Namespace, fuser: BagFuser, seconds: float) -> None:
    """One paragraph: what was read, paired, fused and (when a pair was) written."""
    counts, stats, video = fuser.counts, fuser.pipeline.synchronizer.stats, fuser.video
    if not counts.fused:
        written = ''
    elif video is None:
        written = f'; wrote {args.output} ({bag_size(args.output) / 1e6:.1f} MB)'
    else:
        written = (f'; wrote {args.output} ({bag_size(args.output) / 1e6:.1f} MB) and '
                   f'{args.export_video} ({video.frames} frames at {video.fps:.1f} frames/s)')
    reasons = {reason: count for reason, count in fuser.dropped_by_reason().items() if count}
    why = f' ({", ".join(f"{count} {reason}" for reason, count in reasons.items())})'
    print(f'{PROG}: fused {counts.fused} pairs from {counts.read["thermal"]} thermal + '
          f'{counts.read["visible"]} visible messages in {seconds:.1f} s '
          f'({counts.fused / max(seconds, 1e-9):.2f} pairs/s); unpaired: '
          f'{stats.thermal_unpaired} thermal, {stats.visible_unpaired} visible; dropped: '
          f'{fuser.dropped()}{why if reasons else ""}' + written, file=sys.stderr)
    sync = fuser.pipeline.synchronizer
    hint = clock_skew_hint(fuser.pipeline.stamp_skew.seconds(), sync.slop, sync.thermal_offset)
    if stats.thermal_unpaired and hint:  # arrival: the recorder's log times
        print(f'{PROG}: {hint} (set it in --params)', file=sys.stderr)
    for role in ('thermal', 'visible'):
        unstamped = getattr(stats, f'{role}_rejected')
        if unstamped:
            print(f'{PROG}: warning: {unstamped} {role} messages stamped 0 or less were dropped: '
                  'pairing is by header stamp, which their driver left unset', file=sys.stderr)


def untouched(args: argparse.Namespace) -> str:
    """What a failed or interrupted run leaves: nothing under OUTPUT; exported PNGs, each one
    complete (written atomically), stay."""
    text = f'the partial output was removed and {args.output} was not written'
    if args.export_png and args.export_png.is_dir() and any(args.export_png.glob('*.png')):
        text += f' (the PNGs in {args.export_png} stay)'
    return text


def main(argv: list[str] | None = None) -> int:
    """Console entry point; exit code 0 on success, 1 on an error or when no pair was fused, 130
    when interrupted."""
    args = parse_args(argv)
    stop_on_signals()

    def describe(error: Exception) -> str:
        if isinstance(error, (BagError, settings.SettingsError)):
            return str(error)
        if isinstance(error, WRITE_ERRORS):
            return f'writing {args.output} failed: {error}; {untouched(args)}'
        return f'{error}; {untouched(args)}'  # weights, device or a setting that cannot work

    return run_command(PROG, lambda: run(args) or 0,
                       (BagError, settings.SettingsError, *WRITE_ERRORS, ValueError,
                        CheckpointError),
                       lambda _: f'interrupted; {untouched(args)}', describe)


if __name__ == '__main__':
    sys.exit(main())
