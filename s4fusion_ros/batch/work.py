"""The units of work of s4fusion-batch and what runs them, without Ray.

A bag is one unit, or, when it is longer than a segment, one unit per segment of log time. Each
unit runs s4fusion-bag's BagFuser on its Span and writes a bag of its own; a segmented bag's parts
are then joined by `commit`. Everything a worker needs travels as paths, topic names, times and
parameter values (rosbags readers, writers and type stores do not pickle once opened).

Output layout, for an input bag whose path relative to its input folder is REL:

- ``OUT_DIR/REL``: the fused bag, renamed into place only when complete (bagio.create_bag);
- ``OUT_DIR/.REL.s4batch/``: while a bag is in progress, the counts of a finished unsegmented
  bag (result.json), or a segmented bag's plan (plan.json) and finished parts (part-NNNNN bags,
  each with part-NNNNN.json holding its counts);
- ``.NAME.XXXXXXXX.partial`` beside either: the staging directory of a bag being written
  (bagio.create_bag); one left behind belongs to a dead attempt and is swept when a run starts.

Ray runs a task again when its node is lost before the result arrives, possibly after the task
finished: a unit whose counts are recorded returns them, and every bag a run writes replaces what
it finds under its name. That is safe because nothing there is anyone else's: a run starts only
when its outputs do not exist or it was told to replace them (--resume, --overwrite), holds its
output folder alone, and empties a bag's staging folder when it plans the bag.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import socket
import time

from .. import settings
from ..bagio import (BAG_SUFFIXES, WRITE_ERRORS, BagError, LogWindow, add_topic, create_bag,
                     image_topics, is_unindexed_recording, log_window, open_bag, output_qos_of,
                     pick_topics, storage_of, sweep_staging)
from ..cli import TimeWindow
from ..engine import FusionEngine, fusion_settings, output_compression, pipeline_from_params
from ..files import write_text_atomically
from ..runtime import MODEL_PARAMETERS, model_from_params
from ..replay import BagFuser, Span, WarmUpTooShort, transport_topics

PART_STORAGE = 'mcap'
MANIFEST = 's4fusion-batch-manifest.json'  # in an output folder: its run's report
STAGING_SUFFIX = '.s4batch'
# The thermal range's moving average forgets its start geometrically; after WARM_BITS halvings of
# the start's weight a float64 average no longer remembers it. Rounding can keep two runs one ulp
# apart for a while longer: in 2000 random runs at smoothing 0.8 the worst needed 208 pairs
# against 165 for 53 halvings, so the warm-up takes twice that.
WARM_BITS = 2 * 53


class BatchError(Exception):
    """A run that cannot start: no bags, clashing outputs, existing outputs without a flag."""


@dataclasses.dataclass(frozen=True)
class WarmUp:
    """What a segment must replay before its first message to match a run from the bag's start.

    `sync_ns`: log time that settles the synchronizer (pairs, drops, the floor of late frames).
    `pairs`: pairs the thermal normalizer must see after that for its smoothing to converge.
    """

    sync_ns: int
    pairs: int


def warm_up(values: dict) -> WarmUp:
    """Derive the segment warm-up from the node parameters.

    A thermal frame pairs with a visible frame within `sync.slop` of its stamp (moved by
    `sync.thermal_offset`), and a frame is taken to arrive within `sync.timeout` of its stamp,
    so messages logged more than slop + offset + timeout before a cut no longer change pairing
    after it; twice that leaves room for the first decisions of a fresh synchronizer. The
    percentile normalizer's range is an exponential moving average with weight `smoothing`: the
    start's weight falls by that factor per pair (see WARM_BITS); other modes have no memory.
    """
    span = values['sync.slop'] + values['sync.timeout'] + abs(values['sync.thermal_offset'])
    smoothing = values['normalization.smoothing']
    pairs = 0
    if values['normalization.mode'] == 'percentile' and smoothing > 0:
        pairs = math.ceil(WARM_BITS * math.log(2) / -math.log(smoothing))
    return WarmUp(round(2 * span * 1e9), pairs)


# Finding the bags ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BagJob:
    """An input bag and where its output goes."""

    input: pathlib.Path
    output: pathlib.Path

    @property
    def staging(self) -> pathlib.Path:
        """Where a bag's counts, or a segmented bag's plan and finished parts, live until it is
        done."""
        return staging_of(self.output)


def staging_of(output: pathlib.Path) -> pathlib.Path:
    """The staging folder of the bag written to `output`."""
    return output.parent / f'.{output.name}{STAGING_SUFFIX}'


def is_bag(path: pathlib.Path) -> bool:
    """A rosbag2 directory or a bare .mcap / .db3 file.

    A directory without its metadata.yaml that holds a recording still running or cut off
    (bagio.is_unindexed_recording) is a bag, which then fails as s4fusion-bag fails on it, not a
    folder whose files are fused one by one."""
    if path.is_dir():
        try:
            return (path / 'metadata.yaml').is_file() or is_unindexed_recording(path)
        except PermissionError:  # a folder this user may not enter or list: as a bag it fails
            return True  # as unreadable and is counted, where passed over it would be unseen
    return path.is_file() and path.suffix in BAG_SUFFIXES


def find_bags(inputs: list[pathlib.Path], out_dir: pathlib.Path) -> list[BagJob]:
    """Bags named or found in folders, each with an output mirroring its relative path.

    A bag named directly goes to OUT_DIR/its name; a folder is searched (not inside bags, nor
    OUT_DIR) and each bag goes to OUT_DIR/its path below that folder. A bare file's output is a
    bag directory named after its stem.
    """
    jobs, resolved_out = [], out_dir.resolve()
    for root in map(pathlib.Path, inputs):
        if is_bag(root):
            named = root.resolve()  # '.' has no name of its own
            found = [(root, pathlib.Path(named.stem if root.is_file() else named.name))]
        elif root.is_dir():
            found = [(path, path.relative_to(root))
                     for path in _search(root, resolved_out, {_target(root)})]
            found = [(path, rel.with_suffix('') if path.is_file() else rel)
                     for path, rel in found]
        else:
            raise BatchError(f'{root}: no such bag or folder')
        jobs += [BagJob(path, out_dir / rel) for path, rel in found]
    if not jobs:
        raise BatchError(f'no bags in {", ".join(map(str, inputs))}')
    seen = {}
    for job in jobs:
        if job.output in seen:
            raise BatchError(f'{seen[job.output].input} and {job.input} would both be written '
                             f'to {job.output}')
        seen[job.output] = job
    for job in jobs:
        if job.input.resolve().is_relative_to(resolved_out):
            raise BatchError(f'{job.input} is inside the output folder {out_dir}')
    return jobs


def _search(folder: pathlib.Path, out_dir: pathlib.Path, reached: set) -> list[pathlib.Path]:
    """The bags in `folder` and below, in name order. `reached`: the folders and bags met so far,
    as what their symlinks lead to, so that one met again through a link (a `latest` link, a link
    back up the archive, which would repeat the search down to the kernel's link limit) is
    neither searched nor fused twice."""
    bags = []
    for entry in sorted(folder.iterdir()):
        target = _target(entry)
        if entry.name.startswith('.') or target == out_dir or target in reached:
            continue  # staging and partial directories of a run, and its outputs
        if _earlier_outputs(entry):
            continue
        reached.add(target)
        if is_bag(entry):
            bags.append(entry)
        elif entry.is_dir():  # not a link looping on itself, which leads nowhere
            bags += _search(entry, out_dir, reached)
    return bags


def _earlier_outputs(folder: pathlib.Path) -> bool:
    """Whether `folder` holds an earlier run's outputs (bags/fused_v1 beside this run's
    fused_v2); not one this user may not enter, which is_bag takes for a bag."""
    try:
        return (folder / MANIFEST).is_file()
    except PermissionError:
        return False


def _target(path: pathlib.Path) -> pathlib.Path:
    """What `path` leads to through its symlinks; a link looping on itself (which
    Path.resolve raises RuntimeError for in Python 3.11) resolves to a path that is nothing."""
    return pathlib.Path(os.path.realpath(path))


# Planning ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Unit:
    """One task: fuse `span` of a bag's `window` (bagio.log_window) into `output` (the final bag,
    or a part of a segmented one).

    Plain data, so it pickles to any worker; the bag is opened there.
    """

    input: pathlib.Path
    output: pathlib.Path
    storage: str
    topics: tuple[str, str]  # thermal, visible
    values: dict
    span: Span
    index: int
    count: int  # units of the bag
    warm_pairs: int
    thermal_count: int  # of the thermal topic's messages, those in the window (an estimate)
    window: LogWindow
    transport: str = 'raw'  # how the outputs are written (replay.transport_topics)

    @property
    def label(self) -> str:
        """The bag, and the segment when there are several."""
        return str(self.input) + (f' [{self.index + 1}/{self.count}]' if self.count > 1 else '')

    @property
    def record(self) -> pathlib.Path:
        """Where the counts of the finished unit are kept: beside a part, in the staging folder
        of a whole bag."""
        if self.count > 1:
            return self.output.with_suffix('.json')
        return staging_of(self.output) / 'result.json'


def plan_bag(job: BagJob, values: dict, segment_ns: int, topics: tuple = (None, None),
             transport: str = 'raw', window: TimeWindow = TimeWindow()) -> list[Unit]:
    """Open the bag, choose its topics (``topics``: (thermal, visible), None to detect) and cut
    its `window` into units writing the outputs in `transport`; BagError if it cannot be read
    or the window lies past its end."""
    with open_bag(job.input) as reader:
        placed = log_window(reader, job.input, window)
        thermal, visible = pick_topics(image_topics(reader, job.input), job.input, *topics,
                                       values=values)
        start = placed.start
        end = reader.end_time if placed.stop is None else min(placed.stop, reader.end_time)
        # The thermal rate over the bag's span: over a window's, the whole bag's frames would
        # make it seem many times faster and the warm-up as many times too short.
        thermal_rate = thermal.count / max(reader.end_time - reader.start_time, 1) * 1e9
        storage = storage_of(job.input)
        # rosbags unpacks a file-compressed bag whole at each open: parts fused in parallel
        # would each unpack all of it, in time and in temporary disk, so it stays one unit.
        segmented = segment_ns > 0 and reader.compression_mode != 'file'
    count = max(1, math.ceil((end - start) / segment_ns)) if segmented else 1
    base = dict(input=job.input, storage=storage, topics=(thermal.topic, visible.topic),
                values=values, count=count, thermal_count=round(thermal.count * placed.share()),
                window=placed, transport=transport)
    if count == 1:
        return [Unit(output=job.output, span=Span(), index=0, warm_pairs=0, **base)]
    warm = warm_up(values)
    # Pairs come at most at the thermal rate; a quarter more covers gaps (and too little is
    # caught by the worker, which then doubles the warm-up).
    warm_ns = warm.sync_ns + round(1.25 * warm.pairs / max(thermal_rate, 1e-9) * 1e9)
    units = []
    for index in range(count):
        own_from = start + index * segment_ns
        stop = own_from + segment_ns if index < count - 1 else None
        span = (Span(stop=stop) if index == 0 else
                Span(own_from - warm_ns, own_from, own_from - warm_ns + warm.sync_ns, warm.pairs,
                     stop))
        units.append(Unit(output=part_path(job, index), span=span, index=index,
                          warm_pairs=warm.pairs, **base))
    return units


def part_path(job: BagJob, index: int) -> pathlib.Path:
    """The bag of one segment."""
    return job.staging / f'part-{index:05d}'


def input_identity(bag: pathlib.Path) -> list[list]:
    """A bag's files as [name, size, modification time ns]: what tells that it was recorded or
    copied again since (JSON-ready, so that a manifest's copy compares equal)."""
    files = [bag] if bag.is_file() else sorted(bag.iterdir())
    return [[str(path.relative_to(bag)) if bag.is_dir() else path.name,
             path.stat().st_size, path.stat().st_mtime_ns] for path in files]


def plan_fingerprint(units: list[Unit]) -> str:
    """What a segmented bag's parts depend on: input file sizes and times, window, spans,
    parameters, transport."""
    first = units[0]
    described = {'files': input_identity(first.input), 'topics': first.topics,
                 'values': first.values, 'transport': first.transport,
                 'window': dataclasses.astuple(first.window),
                 'spans': [dataclasses.astuple(unit.span) for unit in units]}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def prepare_staging(job: BagJob, units: list[Unit], resume: bool) -> list[Unit]:
    """Set up a segmented bag's staging folder; return the units still to run.

    With `resume`, parts finished under the same plan are kept; otherwise (or when the input or
    parameters changed) the folder starts empty.
    """
    plan = job.staging / 'plan.json'
    fingerprint = plan_fingerprint(units)
    if resume and plan.is_file() and json.loads(plan.read_text()) == fingerprint:
        return [unit for unit in units if unit_result(unit) is None]
    shutil.rmtree(job.staging, ignore_errors=True)
    job.staging.mkdir(parents=True)
    write_text_atomically(plan, json.dumps(fingerprint))
    return units


def unit_result(unit: Unit) -> dict | None:
    """The counts of a finished unit, None when it has to be (re)done."""
    if not (unit.record.is_file() and (unit.output / 'metadata.yaml').is_file()):
        return None
    return json.loads(unit.record.read_text())


def sweep_partials(job: BagJob) -> list[pathlib.Path]:
    """Remove the staging directories that dead attempts left for this bag and its parts (an
    overwrite killed between its renames gets its old bag back)."""
    stale = sweep_staging(job.output)
    if job.staging.is_dir():
        parts = [*job.staging.glob('.part-*.partial'), *job.staging.glob('.*.tmp')]
        for path in parts:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        stale += parts
    return stale


# Running a unit (in a worker) ----------------------------------------------------------------

# A worker process keeps its models loaded between units, with the warnings loading gave.
_MODELS = {}


def engine_for(values: dict, warnings: list[str]) -> FusionEngine:
    """A FusionEngine with the model of these parameters, loaded once per process; the
    loading's warnings (no trained weights, ...) are added to `warnings` for every unit."""
    key = tuple(values[name] for name in MODEL_PARAMETERS)
    if key not in _MODELS:
        loaded = []
        _MODELS[key] = model_from_params(values, warn=loaded.append), loaded
    model, loaded = _MODELS[key]
    warnings.extend(warning for warning in loaded if warning not in warnings)
    return FusionEngine(model, fusion_settings(values))


def run_unit(unit: Unit, progress=None) -> dict:
    """Fuse one unit into its output bag (atomically) and return its counts.

    A bag that cannot be read is a result with an `error`, not an exception: it is not worth a
    retry. A warm-up that found too few pairs (a gap in the recording) is doubled and rerun. A
    unit that an earlier attempt finished (Ray retries a task whose node was lost before its
    result arrived) returns that attempt's counts: planning removed the records of other runs.
    """
    if (finished := unit_result(unit)) is not None:
        return finished
    started = time.monotonic()
    # The driver prints each of a bag's warnings once, whichever of its parts found it, those
    # of a part that failed too.
    result = {'label': unit.label, 'index': unit.index, 'node': socket.gethostname(),
              'ip': _node_ip(), 'error': '', 'warnings': []}
    span = unit.span
    try:
        while True:
            try:
                counts = _fuse(unit, span, progress, result['warnings'])
                break
            except WarmUpTooShort:
                longer = 2 * (span.own_from - span.read_from)
                span = dataclasses.replace(span, read_from=span.own_from - longer,
                                           count_from=span.own_from - longer
                                           + (span.count_from - span.read_from))
    except (BagError, settings.SettingsError, ValueError, *WRITE_ERRORS) as error:
        result['error'] = str(error)
        return result
    result.update(counts, seconds=time.monotonic() - started)
    unit.record.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(unit.record, json.dumps(result))
    return result


def _fuse(unit: Unit, span: Span, progress, warnings: list[str]) -> dict:
    engine = engine_for(unit.values, warnings)
    fuser = BagFuser('s4fusion-batch', pipeline_from_params(unit.values), engine, None, 1,
                     warnings=warnings)
    storage = PART_STORAGE if unit.count > 1 else unit.storage
    with open_bag(unit.input) as reader:
        thermal, visible = pick_topics(image_topics(reader, unit.input), unit.input,
                                       *unit.topics)
        # Replaces an attempt's bag that Ray lost between its rename and its record (module
        # docstring).
        with create_bag(unit.output, storage, overwrite=True) as writer:
            fuser.run(reader, unit.input, thermal, visible, writer,
                      settings.OUTPUT_TOPICS, False, span, progress,
                      output_qos_of(unit.values), unit.transport,
                      output_compression(unit.values), unit.window)
            if fuser.counts.lost:
                # A batch keeps no partial bag (its manifest knows done or failed): the bag
                # fails, open_bag naming the damage.
                raise BagError(f'{unit.input}: not fused, as a batch keeps no partial bag '
                               '(s4fusion-bag fuses what reads of it)')
    end, start = fuser.tally(), fuser.baseline
    counts = {name: end[name] - start[name] for name in end}
    counts['fused'] = fuser.counts.fused
    return counts


def _node_ip() -> str:
    with contextlib.suppress(Exception):
        import ray
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    return ''


def commit(job: BagJob, units: list[Unit]) -> None:
    """Join a segmented bag's parts, in order, into its output bag and drop the staging folder.

    A commit that Ray runs again after an attempt removed the plan (the bag was joined) has
    nothing left to do; one that finds the plan joins the parts again.
    """
    if not (job.staging / 'plan.json').is_file() and (job.output / 'metadata.yaml').is_file():
        return
    first = units[0]
    with create_bag(job.output, first.storage, overwrite=True) as writer:
        qos = output_qos_of(first.values)
        outputs = {topic: add_topic(writer, topic, qos, msgtype) for topic, msgtype
                   in transport_topics(settings.OUTPUT_TOPICS, first.transport)}
        for unit in units:
            with open_bag(unit.output) as reader:
                for connection, log_time, raw in reader.messages():
                    if connection.topic not in outputs:  # the camera_info, where one came
                        outputs[connection.topic] = add_topic(writer, connection.topic, qos,
                                                              connection.msgtype)
                    writer.write(outputs[connection.topic], log_time, raw)
    (job.staging / 'plan.json').unlink()  # first: a plan there means the parts are all there
    shutil.rmtree(job.staging, ignore_errors=True)
