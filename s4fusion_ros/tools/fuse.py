"""s4fusion-fuse: fuse folders of infrared/visible image pairs with the node's fusion engine.

Pairs are matched by file name in --ir and --vi (or by the name without its extension where that
is unambiguous: ir/0001.png with vi/0001.jpg). For each pair NAME.ext the tool writes
OUT/fused/NAME.png (colour when the visible image is colour, else gray; with --gray always the
luminance s4fusion-eval scores: the same pixels for an 8-bit IR image, while a 16-bit one is
fused here at its full depth and there at 8 bits, as every method gets it) and
OUT/saliency/NAME.png (mono, 0-255) with the node's FusionEngine. The IR image is scaled as
the public datasets store it (value / type maximum); --stretch-thermal maps it as the node maps
camera frames (its default percentile window), for raw 16-bit counts. OUT/s4fusion-fuse.json
records the weights and options the outputs there were made with, and the source files of each
pair, and no run leaves outputs of other settings beside its own: existing outputs are replaced
only with --overwrite (and never an input folder), and --skip-existing resumes a run that was
cut short only when its options match that record, keeping the outputs of the same files. The
exit code is 1 when a pair failed or a file had no partner.

Example:
  s4fusion-fuse --ir data/ir --vi data/vi --out fused --device cpu --inference-size 320x240
"""

import argparse
import collections
import dataclasses
import json
import pathlib
import sys

import cv2
import numpy as np
from tqdm import tqdm

from .. import settings
from ..cli import one_line_reason, output_path, parse_size, run_command, stop_on_signals
from ..engine import FusionEngine, fusion_settings
from ..files import check_writable_folder, resolved, write_png, write_text_atomically
from ..imaging.normalization import looks_like_raw_counts
from ..imaging.registration import ThermalRegistration
from ..model import CheckpointError
from ..model.checkpoint import file_sha256
from ..runtime import LoadedModel, load_fusion_model
from ..training.data import Pair, luminance, match_pairs, read_image, shared_stems

PROG = 's4fusion-fuse'
# In --out: what the outputs there were made with, so that --skip-existing never mixes runs.
RUN_RECORD = 's4fusion-fuse.json'
SOURCES_KEY = 'sources'  # in RUN_RECORD: source_fingerprints of the pairs under --out


@dataclasses.dataclass(frozen=True)
class SourcePair:
    """One pair as read from its files."""

    name: str
    thermal: np.ndarray  # (H_t, W_t) luminance in the file's type, uint8 or uint16
    visible_bgr: np.ndarray  # uint8 (H, W, 3)
    visible_is_color: bool  # False for gray files and for RGB files with three equal channels
    thermal_is_color: bool = False  # the IR file had unequal channels (a false-colour view?)


@dataclasses.dataclass(frozen=True)
class FusedImages:
    """The images written for one pair and the engine's time for them."""

    fused: np.ndarray  # uint8 (H, W, 3) BGR when the visible image is colour, else (H, W)
    saliency: np.ndarray | None  # uint8 (H, W), 0-255; None from methods without one (eval)
    seconds: float


def is_color(image: np.ndarray) -> bool:
    """Whether an image read by read_image has three channels that are not all equal."""
    return image.ndim == 3 and not (np.array_equal(image[..., 0], image[..., 1])
                                    and np.array_equal(image[..., 1], image[..., 2]))


def read_pair(pair: Pair) -> SourcePair:
    """Read both files of a pair; ValueError names a file that cannot be used."""
    ir = read_image(pair.ir_path)
    thermal = luminance(ir)
    visible = read_image(pair.vi_path)
    if visible.dtype != np.uint8:
        raise ValueError(f'{pair.vi_path}: the visible image must be 8-bit, got {visible.dtype}')
    if visible.ndim == 2:
        visible = cv2.cvtColor(visible, cv2.COLOR_GRAY2BGR)
    return SourcePair(pair.name, thermal, np.ascontiguousarray(visible), is_color(visible),
                      is_color(ir))


def input_warnings(pair: Pair, source: SourcePair, stretch_thermal: bool) -> dict[str, str]:
    """{kind: warning} for what the tool does with this pair that its user may not expect; the
    kind completes 'N pair(s) ...' in the summary."""
    warnings = {}
    if not stretch_thermal and looks_like_raw_counts(source.thermal):
        warnings['with IR in raw camera counts'] = (
            f'{pair.ir_path} is 16-bit but spans only {source.thermal.min()}-'
            f'{source.thermal.max()} of 0-65535 (raw camera counts?), so it fuses nearly black; '
            '--stretch-thermal maps it as the node does')
    if source.thermal_is_color:
        warnings['with a colour IR image'] = (
            f'{pair.ir_path} is a colour image: it fuses as its luminance, which a false-colour '
            "(palette) view does not order by temperature; use the camera's gray or 16-bit output")
    (ir_height, ir_width), (height, width) = source.thermal.shape, source.visible_bgr.shape[:2]
    if ThermalRegistration().needs_resize(source.thermal.shape, (width, height)):
        warnings['with the IR resized to the visible size'] = (
            f'{pair.ir_path} is {ir_width}x{ir_height} and {pair.vi_path} {width}x{height}: the '
            'IR image is resized to the visible one, not registered (the node has '
            'registration.homography for that)')
    return warnings


class ImageFuser:
    """The node's FusionEngine, with its default output settings, applied to image files."""

    def __init__(self, loaded: LoadedModel, inference_size: tuple[int, int] = (0, 0),
                 stretch_thermal: bool = False):
        """Run `loaded` at `inference_size` (width, height; (0, 0) = full resolution);
        `stretch_thermal`: see FusionEngine.fuse_images."""
        # PNG files hold the saliency as 0-255: mono8, whatever the node's default.
        values = {**settings.defaults(), 'inference_size': list(inference_size),
                  'saliency.encoding': 'mono8'}
        self.engine = FusionEngine(loaded, fusion_settings(values))
        self.stretch_thermal = stretch_thermal

    def fuse(self, source: SourcePair) -> FusedImages:
        """Fuse one pair into the images the node would publish (mono8 saliency)."""
        encoding = 'bgr8' if source.visible_is_color else 'mono8'
        result = self.engine.fuse_images(source.thermal, source.visible_bgr, encoding,
                                         self.stretch_thermal)
        return FusedImages(result.fused, result.saliency_image, result.inference_seconds)


def parse_inference_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H); '0x0' means full resolution."""
    width, height = parse_size(text, minimum=0)
    reason = settings.check({'inference_size': [width, height]})
    if reason:
        raise argparse.ArgumentTypeError(reason)
    return width, height


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument('--ir', type=pathlib.Path, required=True, help='folder of IR images')
    parser.add_argument('--vi', type=pathlib.Path, required=True,
                        help='folder of visible images (the file names of --ir, extensions '
                             'may differ)')
    parser.add_argument('--out', type=output_path, required=True,
                        help='output folder: fused/NAME.png and saliency/NAME.png')
    parser.add_argument('--weights', default='',
                        help='checkpoint (.safetensors with its .json); default: shipped weights')
    parser.add_argument('--preset', default='auto', choices=settings.SPECS['model.preset'].choices,
                        help='model preset for the shipped weights (default: %(default)s)')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    parser.add_argument('--detail-gain', type=float, default=0.0,
                        help=settings.SPECS['model.detail_gain'].description
                        + ' (default: %(default)s)')
    parser.add_argument('--inference-size', type=parse_inference_size, default=(0, 0),
                        metavar='WxH',
                        help='size the model runs at (at most the image\'s), detail restored '
                             'at full resolution (default: 0x0 = full resolution)')
    parser.add_argument('--stretch-thermal', action='store_true',
                        help='map each IR image\'s 1st-99th percentile window to the full '
                             'range, as the node does with camera frames: for raw 16-bit '
                             'radiometric counts (default: value / type maximum, as the public '
                             'datasets are stored and the model was trained)')
    parser.add_argument('--gray', action='store_true',
                        help='write the fused image as gray: the luminance (Y of YCrCb, '
                             'within 1 level of OpenCV BGR2GRAY and MATLAB rgb2gray) of the '
                             'colour output, which s4fusion-eval scores (for 8-bit IR: it fuses '
                             '16-bit IR at 8 bits); for toolkits that read '
                             'fused images as gray (another conversion, e.g. a PNG decoder\'s '
                             'own, moves the metrics)')
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument('--overwrite', action='store_true',
                          help='replace the PNGs an earlier run wrote under --out for these '
                               'pairs (removed before the run starts)')
    existing.add_argument('--skip-existing', action='store_true',
                          help='resume a run that was cut short: leave the pairs whose fused '
                               'and saliency PNGs are both under --out, made from the same '
                               'source files (size and modification time), fuse the others; '
                               f'refused unless --out/{RUN_RECORD} shows the same weights and '
                               'options')
    args = parser.parse_args(argv)
    try:
        same = resolved(args.ir) == resolved(args.vi)
    except OSError as error:  # a symlink loop
        parser.error(str(error))
    if same:  # each image would be fused with itself
        parser.error(f'--ir and --vi are one folder ({args.ir}): name the infrared and the '
                     'visible images\' folders')
    error = settings.check({'model.detail_gain': args.detail_gain})
    if error:
        parser.error(f'--detail-gain: {error}')
    return args


def output_paths(args: argparse.Namespace,
                 pairs: list[Pair]) -> dict[str, tuple[pathlib.Path, ...]]:
    """name -> (fused path, saliency path); ValueError if two inputs map to one output, an
    output folder is an input folder, or outputs exist without --overwrite or --skip-existing."""
    if shared := shared_stems(pairs):
        stem, names = next(iter(shared.items()))
        raise ValueError(f'the pairs {", ".join(names)} would write the same outputs, '
                         f'{stem}.png: rename them apart')
    stems = [pathlib.Path(pair.name).stem for pair in pairs]
    inputs = {resolved(args.ir), resolved(args.vi)}
    for kind in ('fused', 'saliency'):
        if resolved(args.out / kind) in inputs:
            raise ValueError(f'{args.out / kind} is an input folder: choose another --out')
    outputs = {pair.name: (args.out / 'fused' / f'{stem}.png',
                           args.out / 'saliency' / f'{stem}.png')
               for pair, stem in zip(pairs, stems)}
    existing = [path for paths in outputs.values() for path in paths if path.is_file()]
    if existing and not (args.overwrite or args.skip_existing):
        raise ValueError(f'{len(existing)} output(s) exist ({existing[0]}, ...); pass '
                         '--overwrite to replace them, or --skip-existing to fuse only the '
                         'pairs without them')
    return outputs


def run_record(args: argparse.Namespace, loaded: LoadedModel) -> dict:
    """What the pixels of a run's outputs depend on. Not the device: CPU and CUDA differ in
    float rounding only."""
    weights = loaded.weights
    record = {'weights_sha256': (file_sha256(weights)
                                 if weights is not None and loaded.trained else None),
              'model': dataclasses.asdict(loaded.model.config),
              'inference_size': args.inference_size,
              'stretch_thermal': args.stretch_thermal, 'gray': args.gray}
    return json.loads(json.dumps(record))  # as read back from the file: tuples become lists


def source_fingerprints(pairs: list[Pair]) -> dict:
    """name -> [size, mtime_ns] of each pair's IR and visible files (as read back from JSON):
    what a pair's outputs were made from, so that --skip-existing never keeps them for other
    pictures of the same name (another dataset numbered alike, an image replaced in place)."""
    def fingerprint(pair: Pair) -> list[int] | None:
        try:
            stats = [path.stat() for path in (pair.ir_path, pair.vi_path)]
        except OSError:  # a broken link: the pair fails when it is read, naming it
            return None
        return [value for stat in stats for value in (stat.st_size, stat.st_mtime_ns)]
    return {pair.name: fingerprint(pair) for pair in pairs}


def prepare_output(args: argparse.Namespace, outputs: dict, record: dict,
                   sources: dict) -> tuple[set[str], int]:
    """Make --out ready for a run; return the names of the pairs it need not fuse and how many
    pairs' whole earlier outputs --skip-existing fuses again, not made from these source files.

    The outputs under --out are always those of the run its record describes. The record goes
    in before any output; --overwrite removes the earlier outputs of its pairs first (so a run
    cut short can be resumed), --skip-existing keeps them only under the same record and
    `sources` (`source_fingerprints`), and a run with other settings is refused where other
    pairs' outputs would stay beside its own.
    """
    check_writable_folder(args.out)
    path = args.out / RUN_RECORD
    earlier, unreadable = _read_record(path)
    made_from = earlier.pop(SOURCES_KEY, None) if earlier is not None else None
    made_from = made_from if isinstance(made_from, dict) else {}
    changed = (_changed(earlier, record) if earlier is not None
               else [f'{path.name} {unreadable}'])
    ours = {output for paths in outputs.values() for output in paths}
    foreign = sorted(png for kind in ('fused', 'saliency')
                     for png in (args.out / kind).glob('*.png') if png not in ours)
    if changed and foreign:
        raise ValueError(f'{args.out} holds {len(foreign)} output(s) of other pairs '
                         f'({foreign[0].name}, ...) not made with these settings '
                         f'({"; ".join(changed)}): fuse into another --out, or remove them')
    existing = {name for name, paths in outputs.items() if any(p.is_file() for p in paths)}
    if args.skip_existing and existing and changed:
        raise ValueError(f'--skip-existing: the outputs under {args.out} were not made with '
                         f'these settings ({"; ".join(changed)}); give the options of that '
                         'run, or pass --overwrite to fuse them again')
    whole = {name for name in existing if all(p.is_file() for p in outputs[name])}
    done = ({name for name in whole if sources[name] and made_from.get(name) == sources[name]}
            if args.skip_existing else set())
    # The rest (all with --overwrite; a pair cut between its two writes, or made from other
    # files, with --skip-existing) go before the record names these sources, so that a run
    # cut short never leaves them to be kept.
    stale = existing - done
    if stale and path.is_dir():  # the record could not be written
        raise ValueError(f'{path} is a folder: it must be free for the run record')
    for name in stale:
        for output in outputs[name]:
            output.unlink(missing_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    # The other pairs' outputs kept beside these (same settings) keep their sources.
    record = {**record, SOURCES_KEY: {**made_from, **sources}}
    write_text_atomically(path, json.dumps(record, indent=2, sort_keys=True) + '\n')
    return done, len((whole - done) if args.skip_existing else ())


def _read_record(path: pathlib.Path) -> tuple[dict | None, str]:
    """(the record at ``path``, '') or (None, why there is none)."""
    if not path.exists():
        return None, 'is missing'
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:
        return None, f'is unreadable ({error})'
    return (record, '') if isinstance(record, dict) else (None, 'is not a run record')


def _changed(earlier: dict, record: dict, prefix: str = '') -> list[str]:
    """'key: earlier -> now' for every setting that differs between two records."""
    if isinstance(earlier, dict) and isinstance(record, dict):
        return [line for key in sorted(set(earlier) | set(record))
                for line in _changed(earlier.get(key), record.get(key), f'{prefix}{key}.')]
    return [] if earlier == record else [f'{prefix[:-1]}: {earlier} -> {record}']


def fuse_folders(args: argparse.Namespace) -> tuple[int, int]:
    """Fuse every matched pair; returns the number of pairs that failed and of files without a
    partner."""
    pairs, unmatched = match_pairs(args.ir, args.vi)
    for entry in unmatched:
        print(f'{PROG}: no partner for {entry}: skipped', file=sys.stderr)
    if not pairs:
        raise ValueError(f'no pairs with the same file name (or the same name with another '
                         f'extension) in {args.ir} and {args.vi}')
    outputs = output_paths(args, pairs)
    loaded = load_fusion_model(args.weights, args.preset, args.device,
                               detail_gain=args.detail_gain)
    done, changed = prepare_output(args, outputs, run_record(args, loaded),
                                   source_fingerprints(pairs))
    todo = [pair for pair in pairs if pair.name not in done]
    skipped = (f'; {len(done)} already under {args.out} skipped' if done else '') + (
        f'; {changed} fused again, their outputs not made from these source files'
        if changed else '')
    if not todo:
        print(f'{PROG}: all {len(pairs)} pairs are fused under {args.out}', file=sys.stderr)
        return 0, len(unmatched)
    print(f'{PROG}: {len(todo)} pairs with {loaded.name} on {loaded.device} -> {args.out}'
          + skipped, file=sys.stderr)
    fuser = ImageFuser(loaded, args.inference_size, args.stretch_thermal)
    failed, written, warned = 0, 0, collections.Counter()
    for pair in tqdm(todo, unit='pair', desc='fusing', file=sys.stderr, dynamic_ncols=True):
        try:
            source = read_pair(pair)
            for kind, warning in input_warnings(pair, source, args.stretch_thermal).items():
                if not warned[kind]:  # once per kind, the first file; the summary counts them
                    tqdm.write(f'{PROG}: {warning}', file=sys.stderr)
                warned[kind] += 1
            images = fuser.fuse(source)
        except (ValueError, MemoryError, RuntimeError, cv2.error) as error:
            # One pair lost, not the run, as in the node. A ValueError names a file that cannot
            # be used; the others failed in the fusion, as the allocations for a pair too large
            # for the memory do (numba's MemoryError, torch's RuntimeError or OpenCV's error,
            # whichever allocates first). Not Exception: a Ctrl-C in numba's loading of its
            # kernels comes as a SystemError, which must stop the run.
            reason = (str(error) if isinstance(error, ValueError)
                      else f'{pair.ir_path}: fusing its pair failed: {one_line_reason(error)}')
            tqdm.write(f'{PROG}: {reason}', file=sys.stderr)
            failed += 1
            for stale in outputs[pair.name]:  # the half of this pair a cut run may have left
                stale.unlink(missing_ok=True)
            continue
        fused = luminance(images.fused) if args.gray else images.fused
        try:
            for path, image in zip(outputs[pair.name], (fused, images.saliency)):
                write_png(path, image)
        except OSError as error:  # a full disk, say: the pairs written stay, and can be resumed
            raise OSError(f'{error}; {written} of the {len(todo)} pairs were written before it '
                          '(--skip-existing fuses the rest)') from error
        written += 1
    print(f'{PROG}: fused {len(todo) - failed} of {len(todo)} pairs into {args.out}' + skipped
          + ''.join(f'; {count} pair(s) {kind}' for kind, count in warned.items())
          + (f'; {len(unmatched)} file(s) without a partner skipped' if unmatched else ''),
          file=sys.stderr)
    return failed, len(unmatched)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; exit code 0 when every file was fused, 1 otherwise."""
    args = parse_args(argv)
    stop_on_signals()
    return run_command(PROG, lambda: _report(*fuse_folders(args)),
                       (OSError, ValueError, CheckpointError))


def _report(failed: int, unmatched: int) -> int:
    """Exit code 1 where an input was not fused: a script counting on one output per file
    must not go on with fewer."""
    if failed:
        print(f'{PROG}: {failed} pair(s) failed (see above)', file=sys.stderr)
    if unmatched:
        print(f'{PROG}: {unmatched} file(s) without a partner (see above)', file=sys.stderr)
    return 1 if failed or unmatched else 0


if __name__ == '__main__':  # python -m, set up by its package's __init__
    from ..entry_points import run_tool
    sys.exit(run_tool(main))
