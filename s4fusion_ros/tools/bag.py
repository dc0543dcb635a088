"""s4fusion-bag: fuse the thermal and visible topics of a rosbag2 offline into a new bag.

Messages go through the node's own FusionPipeline and FusionEngine, built from the same parameter
file (`--params`, the node's --params-file format), in recorded order, with each message's log time
as its arrival time: sync.timeout decides on those as the live node's timer decides on its clock
(to within the timer's 50 ms period), so a topic recorded later than the timeout after its stamps
loses the pairs it would lose live.
(The log time is when the recorder got the message: where the recorder itself stalled, behind a
slow disk or a network, frames look later than the node saw them and can lose pairs it made;
a larger sync.timeout in --params undoes that.) Unlike the live node nothing is dropped for lack
of compute time: every decided pair is fused. As live, a bad message is skipped and counted, and
a pair whose inference fails (out of memory on an odd huge frame) is dropped and counted, not the
run.

With --start-offset / --playback-duration (seconds from the bag's first message, as ros2 bag play
counts them) only the messages the bag logged in that window are read, and fused as the node fed
that window by `s4fusion-play` with the same options fuses them: a frame whose partner lies
outside the window stays unpaired, and the messages outside are neither read nor counted. The
visible camera's calibration is state, not a stream: its newest camera_info before the window is
in effect from the window's start. The first line and the summary name the window.

The output bag has the node's output topics (sensor_msgs/Image with the visible header; under
/s4fusion_node/ unless --fused-topic / --saliency-topic name others, whatever namespace the
parameter file is for; with --transport compressed or both, their compressed transports as the
node publishes them, TOPIC/compressed) and, where the bag holds the visible topic's camera_info
sibling, the node's camera_info beside the outputs (one in each folder where they lie apart;
as the node chooses and stamps it: camera_info.py), offered with the QoS of qos.output.*, logged
at the time the pair was decided (the log time of the message that completed it, or of the last
message for the pairs decided at the end of the bag or window), on the input's timeline, and with
--include-inputs the input topics as recorded (in the window). It is written under a temporary
name and renamed when complete: an interrupted or failed run, or one that fused no pair, leaves
nothing under the output name.
"""

import argparse
import contextlib
import dataclasses
import pathlib
import re
import sys
import time

from .. import settings
from ..bagio import (IMAGE, STORAGES, WRITE_ERRORS, BagError, LogWindow, bag_size,
                     check_output, create_bag, image_topics, log_span, log_window, open_bag,
                     output_qos_of, pick_topics, storage_of, sweep_staging)
from ..camera_info import camera_info_topic
from ..cli import (add_window_options, file_path, output_path, run_command, stop_on_signals,
                   time_window)
from ..diagnostics import Key, thermal_frames_lost, unpaired_hint
from ..engine import FusionEngine, fusion_settings, output_compression, pipeline_from_params
from ..files import check_writable_folder, opencv_path, resolved
from ..model import CheckpointError
from ..replay import (TRANSPORTS, BagFuser, camera_info_topics, remove_earlier_export,
                      transport_topics)
from ..runtime import model_from_params
from ..video import VIDEO_SUFFIXES, SideBySideVideo, frame_rate

PROG = 's4fusion-bag'
DEFAULT_FUSED_TOPIC, DEFAULT_SALIENCY_TOPIC = settings.OUTPUT_TOPICS
# What rmw's full topic name validation takes (a bag holds resolved names).
FULL_TOPIC_NAME = re.compile(r'(/[A-Za-z_][A-Za-z0-9_]*)+')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument('input', type=pathlib.Path,
                        help='rosbag2 directory (sqlite3 or MCAP) or a .db3 / .mcap file')
    parser.add_argument('output', type=output_path, help='bag directory to create')
    parser.add_argument('--thermal-topic', help='thermal image topic (default: detected from '
                        'the encodings: mono16/16UC1/32FC1, or mono8 on a thermal-named topic; '
                        "never a depth or disparity topic, a depth camera's near-infrared "
                        "'ir' beside one, nor the fusion node's recorded outputs)")
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
    parser.add_argument('--transport', choices=TRANSPORTS, default='raw',
                        help='how the fused images and saliency maps are written: raw '
                        "(sensor_msgs/Image, default), compressed (image_transport's compressed "
                        'transport as the node publishes it, TOPIC/compressed, with the --params '
                        'file\'s fused.compressed.* and saliency.compressed.*; JPEG quality 95 '
                        'by default) or both')
    parser.add_argument('--include-inputs', action='store_true',
                        help='copy the thermal and visible topics into the output bag, each '
                        'connection with its recorded QoS')
    parser.add_argument('--storage', choices=STORAGES,
                        help='output storage format (default: that of the input)')
    parser.add_argument('--export-png', type=output_path, metavar='DIR',
                        help='also write fused and saliency PNGs of every Nth pair to DIR')
    parser.add_argument('--export-every', type=int, default=1, metavar='N',
                        help='with --export-png: every Nth pair (default: %(default)s)')
    parser.add_argument('--export-video', type=file_path, metavar='FILE.mp4',
                        help='also write a side-by-side MP4 (visible | thermal | fused | '
                        'saliency, with stamps) of every pair, at the rate the thermal topic '
                        'was recorded at; .mov, .mkv or .avi give that container')
    add_window_options(parser, 'fuse')
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


@dataclasses.dataclass(frozen=True)
class OutputTopic:
    """A topic the fused pairs are written on, and the option that named it."""

    flag: str  # --fused-topic or --saliency-topic
    given: str  # that option's topic
    what: str  # what of it goes here: '' (its images), 'compressed transport', 'camera_info'
    topic: str

    def describe(self) -> str:
        return (f'{self.flag} {self.given}' if not self.what else
                f'{self.flag} {self.given} puts its {self.what} on {self.topic}')

    def label(self) -> str:
        return f'the {self.what or "images"} of {self.flag} {self.given}'


def output_topics(args: argparse.Namespace, info_outputs: list[str]) -> list[OutputTopic]:
    """The topics the output bag gets with --transport, and the camera_info's, if any (each
    named after the option whose folder it lies in: the fused topic's where both share one)."""
    flags = {args.fused_topic: '--fused-topic', args.saliency_topic: '--saliency-topic'}
    topics = []
    for given, flag in flags.items():
        for topic, msgtype in transport_topics((given,), args.transport):
            topics.append(OutputTopic(flag, given, '' if msgtype == IMAGE else
                                      'compressed transport', topic))
    named = {}  # camera_info topic -> the output topic and option it lies beside
    for given, flag in flags.items():
        named.setdefault(camera_info_topic(given), (flag, given))
    topics += [OutputTopic(*named[info], 'camera_info', info) for info in info_outputs]
    return topics


def check_output_topics(topics: list[OutputTopic], copied: set[str]) -> None:
    """Refuse two streams merged under one name: an output on an input topic that
    --include-inputs copies, or on another output's."""
    for index, output in enumerate(topics):
        if output.topic in copied:
            raise BagError(output.describe() + (', an' if output.what else ' is an')
                           + ' input topic copied by --include-inputs; name another')
        for other in topics[:index]:
            if other.topic == output.topic:
                raise BagError(f'{output.topic} would carry {other.label()} and '
                               f'{output.label()}; name another')


def load_values(args: argparse.Namespace) -> dict:
    """Node parameter values: defaults, the parameter file, then the command-line overrides."""
    values = settings.load_offline_params(args.params)
    for name, value in (('device', args.device), ('model.weights', args.weights)):
        if value is not None:
            values[name] = value
    return values


@dataclasses.dataclass
class Outcome:
    """What a run left, for the message of one that fails or is interrupted (`untouched`)."""

    existed: bool  # an output there before it, which --overwrite was to replace
    written: bool = False  # the output bag finished (the video and the summary come after)
    video_written: bool = False


def run(args: argparse.Namespace, outcome: Outcome) -> int:
    """Fuse args.input into args.output; raises with a message naming the file on failure.
    Returns 1 where damaged chunks of the bag were skipped (the output holds what was read),
    else 0."""
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
    # Found now, not once the model has loaded and fusing has begun (the bag's own write
    # failure said a partial output had been removed), each named by its option.
    # The output bag is made in its parent (an existing one replaced from beside it).
    for flag, folder in (('', args.output), ('', args.output.parent),
                         ('--export-png: ', args.export_png),
                         ('--export-video: ', args.export_video and args.export_video.parent)):
        try:
            if folder:
                check_writable_folder(folder)
        except OSError as error:
            raise BagError(f'{flag}{error}') from None
    if args.export_video:
        try:
            opencv_path(args.export_video)
        except ValueError as error:
            raise BagError(f'--export-video: {error}') from None
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
        window = log_window(reader, args.input, time_window(args))
        thermal, visible = pick_topics(image_topics(reader, args.input), args.input,
                                       args.thermal_topic, args.visible_topic, values)
        info_topic, info_outputs = camera_info_topics(reader, visible,
                                                      (args.fused_topic, args.saliency_topic))
        copied = ({thermal.topic, visible.topic, info_topic} - {None} if args.include_inputs
                  else set())
        check_output_topics(output_topics(args, info_outputs), copied)
        storage = args.storage or storage_of(args.input)
        loaded = model_from_params(values)
        infos = f'; {info_topic} -> {", ".join(info_outputs)}' if info_topic else ''
        only = f'; only the messages{logged_in(window)}' if not window.whole else ''
        print(f'{PROG}: {thermal.describe()} + {visible.describe()} -> {args.output} '
              f'({storage}) with {loaded.name} on {loaded.device}{infos}{only}', file=sys.stderr)
        if args.export_png:
            args.export_png.mkdir(parents=True, exist_ok=True)
        video = None
        if args.export_video:  # at the thermal camera's recorded rate: one frame per pair
            rate = frame_rate(*log_span(reader, args.input, thermal.topic, window.start,
                                        window.stop))
            video = SideBySideVideo(args.export_video, rate)
        engine = FusionEngine(loaded, fusion_settings(values))
        fuser = BagFuser(PROG, pipeline_from_params(values), engine, args.export_png,
                         args.export_every, video)
        # The bag is finished (or removed) first, then the video named (or discarded).
        bag = create_bag(args.output, storage, overwrite=args.overwrite)
        with video or contextlib.nullcontext():
            with bag as writer:
                fuser.run(reader, args.input, thermal, visible, writer,
                          (args.fused_topic, args.saliency_topic), args.include_inputs,
                          qos=output_qos_of(values), transport=args.transport,
                          compression=output_compression(values), window=window)
                if not fuser.counts.fused:  # a failed run for a script too: nothing is written
                    print_summary(args, fuser, window, time.monotonic() - started)
                    raise BagError(f'no pair was fused (the counts above say why); '
                                   f'{args.output} was not written')
            outcome.written = True
        outcome.video_written = video is not None
    print_summary(args, fuser, window, time.monotonic() - started)
    if args.export_png and args.overwrite:  # replaced once this run's are all written
        removed = remove_earlier_export(args.export_png, fuser.exported)
        if removed:
            print(f'{PROG}: removed {removed} PNGs of an earlier export from {args.export_png}',
                  file=sys.stderr)
    # A partial read, as s4fusion-play's of a bag failing midway: written, and exit 1.
    return 1 if fuser.counts.lost else 0


def logged_in(window: LogWindow) -> str:
    """The window where one is given: what the counts of messages read cover."""
    return '' if window.whole else f' logged {window.describe()}'


def print_summary(args: argparse.Namespace, fuser: BagFuser, window: LogWindow,
                  seconds: float) -> None:
    """One paragraph: what was read (in the window, where one is given), paired, fused and
    (when a pair was) written."""
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
    failed = f'; {counts.failed} pairs failed in inference' if counts.failed else ''
    lost = (f'; lost: {counts.lost} messages of the damaged chunks skipped (exit 1)'
            if counts.lost else '')
    print(f'{PROG}: fused {counts.fused} pairs from {counts.read["thermal"]} thermal + '
          f'{counts.read["visible"]} visible messages{logged_in(window)} in {seconds:.1f} s '
          f'({counts.fused / max(seconds, 1e-9):.2f} pairs/s){failed}; unpaired: '
          f'{stats.thermal_unpaired} thermal, {stats.visible_unpaired} visible; dropped: '
          f'{fuser.dropped()}{why if reasons else ""}{lost}' + written, file=sys.stderr)
    sync = fuser.pipeline.synchronizer
    lost = {Key.THERMAL_UNPAIRED: stats.thermal_unpaired,
            Key.THERMAL_OVERFLOW: stats.thermal_overflow}
    # Arrival: the recorder's log times.
    hint = thermal_frames_lost(lost) and unpaired_hint(
        fuser.pipeline.stamp_skew, sync.slop, sync.thermal_offset, sync.timeout, live=False)
    if hint:
        print(f'{PROG}: {hint} (set it in --params)', file=sys.stderr)
    for role in ('thermal', 'visible'):
        unstamped = getattr(stats, f'{role}_bad_stamp')
        if unstamped:
            print(f'{PROG}: warning: {unstamped} {role} messages stamped 0 or less were dropped: '
                  'pairing is by header stamp, which their driver left unset', file=sys.stderr)


def untouched(args: argparse.Namespace, outcome: Outcome) -> str:
    """What a failed or interrupted run leaves: nothing new under OUTPUT (an output there before,
    which --overwrite was to replace, as it was) unless the bag was finished, then no video;
    exported PNGs, each one complete (written atomically), stay."""
    if outcome.written and args.export_video:
        text = (f'{args.output} and {args.export_video} were written' if outcome.video_written
                else f'{args.output} was written, {args.export_video} was not')
    elif outcome.written:
        text = f'{args.output} was written'
    else:
        text = f'the partial output was removed and {args.output} was not written'
        if outcome.existed:
            text += ' (the one there before is kept as it was)'
    if args.export_png and args.export_png.is_dir() and any(args.export_png.glob('*.png')):
        text += f' (the PNGs in {args.export_png} stay)'
    return text


def main(argv: list[str] | None = None) -> int:
    """Console entry point; exit code 0 on success, 1 on an error or when no pair was fused (no
    bag written) or when damaged chunks were skipped (the bag written of the others), 130 when
    interrupted."""
    args = parse_args(argv)
    stop_on_signals()
    outcome = Outcome(existed=args.output.exists())

    def describe(error: Exception) -> str:
        if isinstance(error, (BagError, settings.SettingsError)):
            return str(error)
        if isinstance(error, WRITE_ERRORS):  # the video's, once the bag is written
            target = args.export_video if outcome.written and args.export_video else args.output
            return f'writing {target} failed: {error}; {untouched(args, outcome)}'
        # Weights, device or a setting that cannot work.
        return f'{error}; {untouched(args, outcome)}'

    return run_command(PROG, lambda: run(args, outcome),
                       (BagError, settings.SettingsError, *WRITE_ERRORS, ValueError,
                        CheckpointError),
                       lambda _: f'interrupted; {untouched(args, outcome)}', describe)


if __name__ == '__main__':  # python -m, set up by its package's __init__
    from ..entry_points import run_tool
    sys.exit(run_tool(main))
