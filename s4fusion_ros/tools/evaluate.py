"""s4fusion-eval: the fusion-quality report (docs/quality.md) on the ivif splits or your pairs.

Methods: ours (every shipped configuration, or the --weights checkpoints), the classical baselines
(average, max, Laplacian pyramid, guided-filtering fusion), SeAFusion with its published weights,
and stored outputs of other methods (``fused/<METHOD>/`` beside a split's ``ir/`` and ``vi/``, as
the DenseFuse outputs stored with the TNO data). Each output becomes the image a saved PNG would
hold (see ImageFuser and `saved_image`), and the metrics are computed on its luminance by one code
path for all methods.

Examples:
  s4fusion-eval --data IVIF_DIR                   # the full report into docs/
  s4fusion-eval --data IVIF_DIR --limit 3 --out /tmp/q.md --grid /tmp/q.png
  s4fusion-eval --data IVIF_DIR --weights runs/compact/s4fusion_compact.safetensors \
      --datasets msrs22
  s4fusion-eval --folder my_pairs --out my_pairs.md   # my_pairs/{ir,vi}/, my_pairs/fused/U2Fusion/
  s4fusion-eval --flicker IVIF_DIR/m3svd/videos    # only the flicker section of docs/quality.md
"""

import argparse
import collections
import csv
import dataclasses
import datetime
import functools
import io
import os
import pathlib
import pickle
import re
import shlex
import sys
import time
import urllib.parse
from typing import Callable

import cv2
import numpy as np
import torch
from tqdm import tqdm

from .. import settings
from ..cli import file_path, one_line_reason, output_path, run_command, stop_on_signals
from ..engine import FusionEngine, compose_output, fusion_settings
from ..evaluation import baselines, metrics, report, temporal
from ..evaluation.seafusion import SeAFusion, published_image
from ..files import (check_writable_folder, png_bytes, resolved, text_bytes, write_png,
                     write_text_atomically, write_together)
from ..imaging.color import as_uint8, bgr_to_ycrcb
from ..imaging.normalization import looks_like_raw_counts, raw_counts_warning
from ..model import CheckpointError, S4Fusion, shipped_weights
from ..model.checkpoint import file_sha256, read_config
from ..runtime import (DeviceError, LoadedModel, default_preset, load_fusion_model,
                       resolve_device, set_threads)
from ..training.data import (IMAGE_SUFFIXES, M3SVD_TEST_VIDEO_CLIPS, M3SVD_VALIDATION_CLIPS,
                             ROADSCENE_CLIP_GAP, ROADSCENE_VALIDATION_STRIDE, IvifSplits, Pair,
                             ivif_splits, luminance, match_pairs, pair_key, pairs_in_folder,
                             read_image, roadscene_near, shared_stems)
from .fuse import FusedImages, ImageFuser, SourcePair, read_pair
from .train import add_data_argument

PROG = 's4fusion-eval'
REPO = pathlib.Path(__file__).resolve().parents[2]
METHODS = ('ours', 'average', 'max', 'laplacian', 'base', 'gff', 'seafusion', 'stored',
           'published')
IVIF_DATASETS = ['roadscene67', 'tno42', 'msrs22', 'm3svd_val', 'roadscene_val']
SHIPPED_PRESETS = ('authors', 'compact')
DEFAULT_REPORT = pathlib.Path('docs/quality.md')
BASELINES = {'average': ('Average', baselines.fuse_average),
             'max': ('Max', baselines.fuse_max),
             'laplacian': ('Laplacian pyramid', baselines.fuse_laplacian),
             'gff': ('GFF', baselines.fuse_gff)}
BASE_NOTE = ("A row \"Laplacian pyramid G/C (X's base)\" is the pyramid X's network refines, "
             'alone: details times G (detail gain), the low-pass base stretched by C about its '
             "mean (base contrast), as `model.pyramid` makes it for the network; X against it "
             "is what X's network adds to its base.")
STORED_DIR = 'fused'  # beside a split's ir/ and vi/: one folder of outputs per method
SAVED_CLIPS = 'clips.csv'  # --save-outputs: beside a split of clips' frames, each pair's clip
SEAFUSION_WEIGHTS = pathlib.Path('weights') / 'seafusion' / 'SeAFusion.pth'  # in IVIF_DIR
# Beside a split's ir/ and vi/ (TNO's): the per-image values the MATLAB toolkit of Tang et al.
# gave other methods' outputs, as rows image,method,metric,value.
PUBLISHED_TABLE = pathlib.Path('reference') / 'matlab_per_image_metrics.csv'


@dataclasses.dataclass(frozen=True)
class OursConfig:
    """One configuration of ours: a checkpoint and the size the model runs at."""

    label: str
    weights: pathlib.Path
    inference_size: tuple = (0, 0)


@dataclasses.dataclass(frozen=True)
class Method:
    """A fusion method: ``fuse(source, pair)`` -> the images a saved PNG would hold."""

    name: str
    fuse: Callable
    ours: bool = False
    stored: bool = False  # outputs read from files: not timed
    note: str = ''  # what the report's notes say of it, once, where it is scored


class StoredOutputs:
    """The outputs of one method that another group (or you) saved for a split:
    ``<split>/fused/<METHOD>/``, one image per pair, named as its IR file or with another image
    extension (the IR file ``01.png``, the output ``01.jpg``) where no other pair of the split
    has that stem (``a.png`` beside ``a.jpg``): one file is never the output of two pairs."""

    def __init__(self, folder: pathlib.Path, pairs: list):
        self.folder = folder
        self.shared = shared_stems(pairs)

    def path(self, pair: Pair) -> pathlib.Path | None:
        """The stored output of ``pair``, or None where there is none or several, or only one
        named by a stem that other pairs share."""
        exact = self.folder / pair.name
        if exact.is_file():
            return exact
        stem = pathlib.Path(pair.name).stem  # a whole stem, as match_pairs pairs the sources
        if stem in self.shared:  # a file of that stem could be another pair's
            return None
        found = self._of_stem(stem)[1]
        return found[0] if len(found) == 1 else None

    def _of_stem(self, stem: str) -> tuple[list, list]:
        """(the files of `stem` in the folder, those of them of an extension read), by name."""
        named = sorted(path for path in self.folder.iterdir()
                       if path.stem == stem and path.is_file())
        return named, [path for path in named if path.suffix.lower() in IMAGE_SUFFIXES]

    def read(self, pair: Pair, size: tuple[int, int]) -> np.ndarray:
        """The stored output of ``pair`` as saved; ValueError says why the metrics cannot score
        it against sources of ``size`` (height, width)."""
        path = self.path(pair)
        if path is None:
            raise ValueError(self.why_none(pair))
        image = read_image(path, depths=(np.uint8,))  # scored as saved, on the 0-255 scale
        if image.shape[:2] != size:
            raise ValueError(f'{path} is {image.shape[1]}x{image.shape[0]}, its pair '
                             f'{size[1]}x{size[0]}')
        return image

    def why_none(self, pair: Pair) -> str:
        """Why `path` finds no output of ``pair``, naming the files of its stem it passed over."""
        stem = pathlib.Path(pair.name).stem
        if shared := self.shared.get(stem):
            return (f'{pair.name}: no output of that exact name in {self.folder} (the pairs '
                    f'{", ".join(shared)} share a stem, so each needs an output of its own exact '
                    'name)')
        named, readable = self._of_stem(stem)
        if len(readable) > 1:
            return (f'{pair.name}: several outputs in {self.folder} '
                    f'({", ".join(path.name for path in readable)}), so none is taken for it')
        if named:
            return (f'{pair.name}: no output in {self.folder} of an extension read '
                    f'({" ".join(IMAGE_SUFFIXES)}): {", ".join(path.name for path in named)} '
                    'is none')
        return f'{pair.name}: no output in {self.folder}'

    def __call__(self, source: SourcePair, pair: Pair) -> FusedImages:
        """The stored image as saved."""
        return FusedImages(self.read(pair, source.visible_bgr.shape[:2]), None, 0.0)


def stored_methods(name: str, pairs: list, own_folder: bool) -> tuple[list, list]:
    """(a Method per folder of stored outputs of the split ``name``, by folder name; lines for
    what was left out). A folder with an output missing or unusable is left out whole (scored on
    fewer pairs, its means would not compare), checked before any scoring; ``own_folder``: a
    --folder split, where finding nothing is said too."""
    methods, skipped = [], []
    root = pairs[0].dataset / STORED_DIR
    # A hidden folder holds no method's outputs (Jupyter's .ipynb_checkpoints), as hidden files
    # are no pairs' images (match_pairs).
    folders = sorted(path for path in root.iterdir() if path.is_dir()
                     and not path.name.startswith('.')) if root.is_dir() else []
    sizes = [read_image(pair.vi_path).shape[:2] for pair in pairs] if folders else []
    # Every pair of the folder, not only those --limit keeps: a stem that pairs share is no
    # output's name even where one of them is left out (a.png's output is never a.jpg's).
    every_pair = (match_pairs(pairs[0].dataset / 'ir', pairs[0].dataset / 'vi')[0] if folders
                  else [])
    if own_folder and not folders:
        loose = root.is_dir() and any(path.suffix.lower() in IMAGE_SUFFIXES
                                      for path in root.iterdir())
        skipped.append(f'stored outputs on {name}: no {root}/<METHOD>/ folder'
                       + (' (images directly in it belong in a folder named by their method)'
                          if loose else '') + '.')
    for folder in folders:
        outputs, problems = StoredOutputs(folder, every_pair), []
        for pair, size in zip(pairs, sizes):
            try:
                outputs.read(pair, size)
            except ValueError as error:
                problems.append(str(error))
        if problems:
            skipped.append(f'{folder.name} (stored outputs) on {name}: {len(problems)} of the '
                           f'{len(pairs)} outputs cannot be scored, so no row for it; the first: '
                           f'{problems[0]}.')
        else:
            methods.append(Method(f'{folder.name} (stored outputs)', outputs, stored=True))
    return methods, skipped


def saved_image(fused_y: np.ndarray, source: SourcePair) -> np.ndarray:
    """A fused luminance in [0, 1] as a saved PNG holds it, composed as the node composes it."""
    if not source.visible_is_color:
        return compose_output(fused_y, None, None, 'mono8')
    _, cr, cb = bgr_to_ycrcb(source.visible_bgr)
    return compose_output(fused_y, cr, cb, 'bgr8')


def gray_method(fuse: Callable) -> Callable:
    """Wrap ``fuse(ir, vi) -> float (H, W) in [0, 1]`` on luminance into a method, timed."""
    def run(source: SourcePair, pair: Pair) -> FusedImages:
        vi_y = luminance(source.visible_bgr)
        started = time.perf_counter()
        fused_y = fuse(source.thermal, vi_y)
        seconds = time.perf_counter() - started
        return FusedImages(saved_image(fused_y, source), None, seconds)
    return run


def seafusion_method(model: SeAFusion) -> Callable:
    """SeAFusion as its authors' test script runs it: on the visible image's float luminance,
    saved the authors' way (`seafusion.published_image`), timed."""
    def run(source: SourcePair, pair: Pair) -> FusedImages:
        vi_y, cr, cb = bgr_to_ycrcb(source.visible_bgr)
        started = time.perf_counter()
        fused_y = model.fuse(source.thermal, vi_y)
        seconds = time.perf_counter() - started
        chroma = (cr, cb) if source.visible_is_color else None
        return FusedImages(published_image(fused_y, chroma), None, seconds)
    return run


def ours_method(config: OursConfig, loaded: LoadedModel) -> Method:
    """A loaded checkpoint in the node's engine, run through s4fusion-fuse's ImageFuser."""
    fuser = ImageFuser(loaded, config.inference_size)
    return Method(config.label, lambda source, pair: fuser.fuse(source), ours=True)


def base_baselines(ours: list[tuple[OursConfig, LoadedModel]]) -> dict[str, Callable]:
    """{label: fuse} of the enhanced Laplacian base that each of ours refines (compact's: detail
    gain and base contrast above 1), alone: its row against the network's is what the network
    adds to it. One per enhancement (the CPU-defaults row shares its weights' base)."""
    bases, seen = {}, set()
    for config, loaded in ours:
        network = loaded.model.config
        gain, contrast = network.detail_gain, network.base_contrast
        if network.base != 'laplacian' or (gain, contrast) in seen | {(1.0, 1.0)}:
            continue
        seen.add((gain, contrast))
        bases[f"Laplacian pyramid {gain:g}/{contrast:g} ({config.label}'s base)"] = (
            functools.partial(baselines.fuse_laplacian, detail_gain=gain,
                              base_contrast=contrast))
    return bases


def baseline_fuses(chosen: set, ours: list[tuple[OursConfig, LoadedModel]]
                   ) -> dict[str, tuple[Callable, str]]:
    """{label: (fuse, note)} of the classical methods among `chosen`, in report order, with the
    enhanced bases of `ours` ('base': base_baselines, noted by BASE_NOTE) after the plain pyramid
    they enhance."""
    bases = base_baselines(ours) if 'base' in chosen else {}
    fuses = {}
    for key, (label, fuse) in BASELINES.items():
        if key in chosen:
            fuses[label] = fuse, ''
        if key == 'laplacian':
            fuses.update({base: (fuse, BASE_NOTE) for base, fuse in bases.items()})
    return fuses


def loaded_ours(configs: list, device: str) -> list[tuple[OursConfig, LoadedModel]]:
    """Each configuration of ours with its model loaded, once for its row and its base."""
    return [(config, load_fusion_model(str(config.weights), 'auto', device))
            for config in configs]


def short_names(weights: list) -> list[str]:
    """Each checkpoint as its folder and stem, with as many folders above as tell them apart
    (runs/a/checkpoints/x-step000500 beside runs/b/checkpoints/x-step000500: a/checkpoints/...);
    ValueError for a file named twice."""
    paths = [pathlib.Path(os.path.abspath(path)).with_suffix('') for path in weights]
    if len(set(paths)) < len(paths):
        raise ValueError(f'--weights names a checkpoint twice: {[str(p) for p in weights]}')
    depth = 2
    while len({path.parts[-depth:] for path in paths}) < len(paths):
        depth += 1
    return ['/'.join(path.parts[-depth:]) for path in paths]


def ours_configs(weights: list, shipped: Callable = shipped_weights) -> tuple[list, list, list]:
    """(configurations, skipped lines, notes) of ours.

    Explicit ``weights`` replace the shipped configurations. Otherwise each preset's shipped
    weights are evaluated where present, plus the node's CPU defaults when they run the model at
    a reduced size (at full resolution they are the CPU preset's row).
    """
    if weights:
        labels = [f'S4Fusion ({name})' for name in short_names(weights)]
        return [OursConfig(label, path) for label, path in zip(labels, weights)], [], []
    configs, skipped = [], []
    for preset in SHIPPED_PRESETS:
        path = shipped(preset)
        if path.is_file():
            configs.append(OursConfig(f'S4Fusion {preset}', path))
        else:
            skipped.append(f'S4Fusion {preset}: no shipped weights ({display_path(path)} is '
                           'missing), so no row for it.')
    cpu_preset = default_preset(torch.device('cpu'))  # one of SHIPPED_PRESETS
    cpu_weights = shipped(cpu_preset)
    size = tuple(settings.SPECS['inference_size'].default)
    if not cpu_weights.is_file():
        return configs, skipped, []
    if not all(size):
        return configs, skipped, [f"The node's CPU defaults (preset {cpu_preset}, "
                                  'inference_size [0, 0] = full resolution) are the '
                                  f'S4Fusion {cpu_preset} row.']
    configs.append(OursConfig(f'S4Fusion {cpu_preset}, CPU defaults ({size[0]}x{size[1]})',
                              cpu_weights, size))
    return configs, skipped, []


def build_methods(args: argparse.Namespace, configs: list) -> tuple[list, list]:
    """The methods selected by --methods, in report order, and lines for what was skipped."""
    chosen = set(args.methods)
    ours = loaded_ours(configs, args.device) if chosen & {'ours', 'base'} else []
    methods = [ours_method(c, loaded) for c, loaded in ours] if 'ours' in chosen else []
    methods += [Method(label, gray_method(fuse), note=note)
                for label, (fuse, note) in baseline_fuses(chosen, ours).items()]
    skipped = []
    if 'base' in chosen and not any(method.note == BASE_NOTE for method in methods):
        skipped.append('base: none of the weights refines an enhanced Laplacian base '
                       '(detail gain or base contrast above 1), so no row for it.')
    if 'seafusion' in chosen:
        path = args.seafusion_weights
        if path is not None and path.is_file():
            try:
                model = SeAFusion.from_published(path, device=resolve_device(args.device))
            except EOFError as error:  # its message is empty: the file ends too early
                raise ValueError(f"{path}: empty or cut short, not SeAFusion's published "
                                 'weights in full (download them again)') from error
            except (RuntimeError, KeyError, pickle.UnpicklingError) as error:
                raise ValueError(f"{path}: not SeAFusion's published weights "
                                 f'({one_line_reason(error)})') from error
            methods.append(Method('SeAFusion', seafusion_method(model)))
        else:
            skipped.append(f'SeAFusion: {path} is missing.' if path is not None else
                           f'SeAFusion: no weights (--seafusion-weights, or --data IVIF_DIR '
                           f'holding {SEAFUSION_WEIGHTS}).')
    return methods, skipped


def eight_bit(source: SourcePair) -> SourcePair:
    """A pair as every method fuses it and is scored against it: 8-bit, as the metrics' 0-255
    convention has it. A 16-bit IR image, which s4fusion-fuse and training read as value / 65535,
    becomes that value in 0-255 (rounded half up), the same for every method."""
    return dataclasses.replace(source, thermal=as_uint8(source.thermal))


def sources_luminance(source: SourcePair, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """IR and visible luminance (uint8, same size) that every method is scored against."""
    if source.thermal.dtype != np.uint8:
        raise ValueError(f'{pair.ir_path}: the metrics need 8- or 16-bit images, got '
                         f'{source.thermal.dtype}')
    vi_y = luminance(source.visible_bgr)
    if source.thermal.shape != vi_y.shape:
        raise ValueError(f'{pair.name}: IR {source.thermal.shape} and visible {vi_y.shape} '
                         'differ in size')
    if min(vi_y.shape) < metrics.MIN_SIDE:
        raise ValueError(f'{pair.name}: {vi_y.shape[1]}x{vi_y.shape[0]} is smaller than the '
                         f'{metrics.MIN_SIDE}x{metrics.MIN_SIDE} the metrics need')
    return source.thermal, vi_y


def method_folder(method: str) -> str:
    """A method's name as a folder name: what a file name cannot hold (or would make awkward
    on a command line) as '_' ("Laplacian pyramid 1.1/1.4 (S4Fusion compact's base)":
    Laplacian_pyramid_1.1_1.4_S4Fusion_compact_s_base)."""
    return re.sub(r'[^A-Za-z0-9.+-]+', '_', method).strip('_')


def saved_name(pair: Pair) -> str:
    """The file --save-outputs writes a pair's images to: its stem as a PNG, so that --folder
    matches the saved split's images as this split's (check_save_outputs refuses stems that
    two pairs share)."""
    return f'{pathlib.Path(pair.name).stem}.png'


def save_clips(path: pathlib.Path, pairs: list, clips: tuple) -> None:
    """The clip of each saved pair (pair,clip rows, the pair by its saved name), for a scorer of
    the saved images to resample whole clips as the report does."""
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator='\n')
    writer.writerow(['pair', 'clip'])
    writer.writerows((saved_name(pair), clip)
                     for pair, clip in zip(pairs, clips, strict=True))
    write_text_atomically(path, rows.getvalue())


def evaluate_dataset(name: str, pairs: list, methods: list, examples: dict,
                     validation: bool = False, compat: dict | None = None,
                     clips: tuple | None = None,
                     save_outputs: pathlib.Path | None = None) -> report.DatasetScores:
    """Score every method on every pair; the first pair's ours images go to examples.

    ``validation`` marks a split that weights and settings are chosen on. ``compat``: where
    given, ours' images are also scored as the MATLAB toolkit scores them (``matlab_compat``),
    into ``compat[method name]``, for the published values of other methods. ``clips``: the
    clip of each pair, for a split of clips' frames (``DatasetScores.pair_clips``).
    ``save_outputs``: where given, the pairs as scored (``ir/``, 8-bit, and ``vi/``) and every
    image scored but stored outputs, which are files already (``fused/METHOD/``, by
    ``method_folder``), are written there as PNGs named by the pair's stem: a folder that
    ``--folder`` scores again, the outputs as stored outputs."""
    scores = {m.name: report.MethodScores(m.name, m.ours, seconds=None if m.stored else 0.0)
              for m in methods}
    for index, pair in enumerate(tqdm(pairs, unit='pair', desc=name, file=sys.stderr,
                                      dynamic_ncols=True)):
        source = eight_bit(read_pair(pair))
        ir_y, vi_y = sources_luminance(source, pair)
        if save_outputs is not None:
            write_png(save_outputs / 'ir' / saved_name(pair), source.thermal)
            write_png(save_outputs / 'vi' / saved_name(pair), source.visible_bgr)
        for method in methods:
            if index == 0 and not method.stored:
                method.fuse(source, pair)  # warm-up (lazy initialisation, JIT), not timed
            images = method.fuse(source, pair)
            if save_outputs is not None and not method.stored:
                write_png(save_outputs / STORED_DIR / method_folder(method.name)
                          / saved_name(pair), images.fused)
            entry = scores[method.name]
            fused_y = luminance(images.fused)
            entry.scores.append(metrics.evaluate_all(fused_y, ir_y, vi_y))
            if compat is not None and method.ours:
                compat.setdefault(method.name, []).append(
                    metrics.evaluate_all(fused_y, ir_y, vi_y, matlab_compat=True))
            if not method.stored:
                entry.seconds += images.seconds
            if index == 0 and method.ours and name not in examples:
                examples[name] = (source, images)
    return report.DatasetScores(name, tuple(pair.name for pair in pairs), list(scores.values()),
                                validation, pair_clips=clips)


def published_dataset(name: str, pairs: list, compat: dict, table: pathlib.Path
                      ) -> tuple[report.DatasetScores, list]:
    """(ours as the MATLAB toolkit scores them against the values it published for other
    methods on the split's pairs, compared on the metrics the table has; lines for the
    methods left out because the table lacks one of the pairs)."""
    published = {}  # method -> image -> metric -> value
    with open(table, newline='') as rows:
        for row in csv.DictReader(rows):
            published.setdefault(row['method'], {}).setdefault(row['image'], {})[
                row['metric']] = float(row['value'])
    names = [pair.name for pair in pairs]
    rows, skipped = [], []
    for method, images in published.items():
        absent = [image for image in names if image not in images]
        if absent:
            skipped.append(f'{method} (published values) on {name}: {table} has no values for '
                           f'{len(absent)} of the {len(names)} pairs ({", ".join(absent[:3])}).')
        else:
            rows.append(report.MethodScores(f'{method} (published values)', False,
                                            [images[image] for image in names], seconds=None))
    compared = set.intersection(*(set(score) for row in rows for score in row.scores)) if rows \
        else set()
    description = (
        f'The {name} pairs as the MATLAB toolkit of Tang et al. scores them (its 2022 version, '
        'behind SeAFusion\'s and many published tables: `matlab_compat`, with SD, MI and VIF on '
        'uint8, Qabf with MATLAB\'s rounding on [0, 1] data, SF and MSE on [0, 1] and PSNR of '
        'peak 255 over that MSE): ours on the outputs scored above, the other rows the '
        'per-image values its authors published for other methods\' outputs on these pairs '
        f'(`{PUBLISHED_TABLE}` beside `ir/`), not run here. The table has no SSIM.')
    dataset = report.DatasetScores(
        f'{name}, published values (MATLAB toolkit)', tuple(names),
        [report.MethodScores(label, True, scores, seconds=None)
         for label, scores in compat.items()] + rows,
        metrics=tuple(metric for metric in metrics.METRICS if metric in compared),
        description=description, per_pair=False)
    return dataset, skipped


def display_path(path: pathlib.Path) -> str:
    """A path relative to the repository when inside it."""
    path = pathlib.Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def describe_weights(config: OursConfig) -> str:
    """The checkpoint of a configuration and the training information its JSON records."""
    meta, model_config = read_config(config.weights)
    # The base's settings live in the JSON, not in the hashed weights: one file can run at
    # several of them.
    gain = (f', detail gain {model_config.detail_gain:g}, base contrast '
            f'{model_config.base_contrast:g}' if model_config.base == 'laplacian' else '')
    parameters = S4Fusion(model_config, device='meta').num_parameters()
    line = (f'{config.label}: `{display_path(config.weights)}` (sha256 {_digest(config)}, '
            f'{model_config.describe()}, {parameters} parameters{gain})')
    training = meta.get('training')
    if not isinstance(training, dict):
        return line + '; its JSON holds no training information'
    return line + '; training: ' + '; '.join(
        f'{key} {_lineage(value) if key == "initialised_from" else _brief(value)}'
        for key, value in training.items())


def _lineage(start) -> str:
    """The weights a run started from, in a few words: the report would otherwise repeat every
    earlier run's whole record, nested (the weights' JSON keeps them)."""
    if not isinstance(start, dict):
        return _brief(start)
    runs, earlier = 0, start
    while isinstance(earlier, dict) and isinstance(earlier.get('training'), dict):
        runs += 1
        earlier = earlier['training'].get('initialised_from')
    # The chain ends at a run that started afresh (None), or at weights whose training is not
    # recorded (a dict without a training record, or any other value).
    if runs == 0:
        what = 'its training unrecorded'
    else:
        what = (f'{runs} earlier training run{"" if runs == 1 else "s"} recorded in the weights\' '
                'JSON' + ('' if earlier is None else ', the training before them unrecorded'))
    return f'{start.get("file", "?")} (sha256 {str(start.get("sha256", "?"))[:16]}; {what})'


def weights_identity(config: OursConfig) -> str:
    """The checkpoint of a configuration in one line: path and hash (training: see the report)."""
    return f'{config.label}: `{display_path(config.weights)}` (sha256 {_digest(config)})'


def _digest(config: OursConfig) -> str:
    return file_sha256(config.weights)[:16]


def _brief(value) -> str:
    """A JSON value in a few words: lists by their length, dicts inline (nested ones too)."""
    if isinstance(value, list):
        return f'({len(value)} items)'
    if isinstance(value, dict):
        return '{' + ', '.join(f'{key}: {_brief(item)}' for key, item in value.items()) + '}'
    return str(value)


def environment(device: str) -> str:
    """Device, threads and library versions, for the timing column: the GPU the networks ran on
    (``device``, the --device given), else the CPU."""
    try:
        resolved = resolve_device(device)
    except DeviceError:  # no network ran (one would have refused it): the baselines' CPU
        resolved = torch.device('cpu')
    # Not every CUDA machine's GPU: a run with --device cpu there timed the CPU.
    device = (torch.cuda.get_device_name(resolved) if resolved.type == 'cuda'
              else f'CPU ({os.cpu_count()} cores)')
    return (f'{device}, torch {torch.__version__} with {torch.get_num_threads()} thread(s), '
            f'numpy {np.__version__}, OpenCV {cv2.__version__} with {cv2.getNumThreads()} '
            'thread(s)')


def data_notes(args: argparse.Namespace, datasets: list, ivif: IvifSplits | None,
               methods: list) -> list:
    """Factual notes on the data and the peers (``ivif``: the splits of --data, None without
    --datasets; ``methods``: those run, with their notes)."""
    notes = []
    if set(args.datasets) & set(IVIF_DATASETS):
        validation = ', '.join(M3SVD_VALIDATION_CLIPS)
        notes.append("Splits (training/data.py `ivif_splits`): roadscene67 = S4Fusion's 67 "
                     'RoadScene test pairs, tno42 = the 42 TNO pairs, msrs22 = the MSRS '
                     'test-split pairs; validation splits (left out of the training split; the '
                     'evaluated pairs a weights file did train on, through the weights it was '
                     'fine-tuned from, are noted per weights above): m3svd_val = the 20 frame '
                     f'pairs of the M3SVD clips {validation}, roadscene_val = every '
                     f'{ROADSCENE_VALIDATION_STRIDE}th of the other RoadScene pairs by name (20). '
                     "RoadScene's pairs are frames of FLIR drives: some test and validation "
                     'pairs show the scene of a training frame nearby in the drive, and the '
                     "paired tables take a split's frames numbered within "
                     f'{ROADSCENE_CLIP_GAP} of the one before as one clip of a drive. '
                     'Provenance of the data: the README ("Data and licences").')
        if not args.weights:
            notes.append("The shipped weights' last stages were chosen on the validation "
                         "splits; the authors weights' stages before 2026-12-02 on wins "
                         'summed over the test sets (docs/training-history.md).')
    if 'roadscene_val' in args.datasets:
        # Of the whole splits, whatever --limit and --datasets chose to score.
        validation, tests = ivif.validation['roadscene_val'], ivif.tests['roadscene67']
        near = roadscene_near(validation, tests)
        notes.append(f'{len(near)} of the {len(validation)} roadscene_val pairs lie within '
                     f'{ROADSCENE_CLIP_GAP} frames of one of the {len(tests)} roadscene67 test '
                     'pairs'
                     + (f' ({", ".join(near)}): choices made on roadscene_val may have seen '
                        'scenes of that test set' if near else '') + '.')
    if args.folder:
        notes.append('Splits of --folder, each named by its folder: '
                     + ', '.join(f'{folder.resolve().name} = the pairs of `{folder}`'
                                 for folder in args.folder)
                     + ('. Their pairs count as training pairs in the notes above where the '
                        'folder name (in any case) and the file name without its extension are '
                        'those a training record lists: a copy of a training pair under '
                        'another folder name is not recognised.' if 'ours' in args.methods
                        else '.'))
    scored = {method.name: method for dataset in datasets for method in dataset.methods}
    peers = {'GFF': 'GFF is guided-filtering fusion (Li, Kang and Hu, IEEE TIP 2013) with the '
                    "paper's settings as `evaluation/baselines.py` implements it, not the "
                    "authors' MATLAB code.",
             'SeAFusion': "SeAFusion runs with its authors' published weights as their test "
                          'script runs them (Linfeng-Tang/SeAFusion `test.py`, '
                          '`seafusion.published_image`): on the float luminance of the visible '
                          'image, its output joined with the visible chrominance, clamped in '
                          'RGB, min-max stretched over the three channels together and truncated '
                          'to uint8; colour outputs are then scored on their luminance like '
                          "every method's. Their script stretches over a batch of images; here "
                          'each image is its own batch, which changes nothing on MSRS, where '
                          "each image's clamped RGB spans the full range."}
    notes += [note for label, note in peers.items() if label in scored]
    notes += list(dict.fromkeys(method.note for method in methods
                                if method.note and method.name in scored))
    if any(dataset.name == 'tno42' and 'DenseFuse (stored outputs)' in
           {method.name for method in dataset.methods} for dataset in datasets):
        notes.append("tno42's DenseFuse outputs are those stored with the TNO data "
                     '(Linfeng-Tang/Evaluation-for-Image-Fusion).')
    if any(method.seconds is None for method in scored.values()):
        notes.append(f'Rows marked "(stored outputs)" score the images in '
                     f'`{STORED_DIR}/<METHOD>/` beside a split\'s `ir/` and `vi/` as saved; they '
                     'were not run here.')
    if args.limit:
        sizes = ', '.join(f'{d.name} {d.pairs}' for d in datasets)
        notes.append(f'Only the first {args.limit} pairs (by name) of each split were evaluated '
                     f'({sizes}): these means are not the split means.')
    return notes


def recorded_training_labels(training) -> set | None:
    """The training pairs a JSON training record lists, through the weights it was fine-tuned
    from (``initialised_from``); None where some part of the chain does not list them."""
    if not isinstance(training, dict) or not isinstance(training.get('data'), list):
        return None
    pairs = set(training['data'])
    if 'initialised_from' in training:
        earlier = recorded_training_labels((training['initialised_from'] or {}).get('training'))
        if earlier is None:
            return None
        pairs |= earlier
    return pairs


def training_overlap(config: OursConfig, labels: list, what: str = 'evaluated pairs',
                     key: Callable | None = None, verb: str = 'are among') -> str:
    """How many of `labels` the checkpoint's JSON lists among its training data; `verb` joins
    them in the sentence. Each training pair counts once, as ``pair_key`` names it (a pair of
    the ivif layout and its packed copy are one). `labels` are pair labels, compared by their
    ``pair_key``, unless `key` is given: then they are compared as they are with `key` of each
    training pair's ``pair_key``."""
    trained_on = recorded_training_labels(read_config(config.weights)[0].get('training'))
    if trained_on is None:
        return f'{config.label}: its JSON does not list all its training pairs.'
    trained_on = {pair_key(label) for label in trained_on}
    if key is None:
        seen = sorted(label for label in set(labels) if pair_key(label) in trained_on)
    else:
        trained_keys = {key(label) for label in trained_on}
        seen = sorted(label for label in set(labels) if label in trained_keys)
    listed = f' ({", ".join(seen[:5])}{", ..." if len(seen) > 5 else ""})' if seen else ''
    return (f'{config.label}: {len(seen)} of the {len(labels)} {what} {verb} its '
            f'{len(trained_on)} training pairs{listed}.')


def frame_of_clip(label: str) -> str:
    """``<clip>_<frame>`` of a training label ``<folder>/<clip>_<frame>[.png]``."""
    return pathlib.PurePosixPath(label).stem


def clip_of_frame(label: str) -> str:
    """``<clip>`` of a training label ``<folder>/<clip>_<frame>[.png]``."""
    return frame_of_clip(label).rsplit('_', 1)[0]


def grid_png(path: pathlib.Path, examples: dict, label: str) -> bytes:
    """IR / visible / fused / saliency of one pair per dataset, as the PNG for `path`."""
    rows = [(f'{name}: {source.name}', [source.thermal, source.visible_bgr, images.fused,
                                        images.saliency])
            for name, (source, images) in examples.items()]
    titles = ['IR', 'visible', f'fused ({label})', 'saliency']
    return png_bytes(path, report.make_grid(rows, titles))


def parse_args(argv: list | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_data_argument(parser, 'the ivif folder (layout in the README, "Data and licences"); '
                              'required for --datasets', required=False)
    parser.add_argument('--datasets', type=_names, default=None,
                        help='comma-separated splits of --data (default: the three test '
                             f'splits and the two validation splits, {IVIF_DATASETS}; none '
                             'with --folder)')
    parser.add_argument('--folder', type=pathlib.Path, action='append', default=[],
                        metavar='DIR',
                        help='a split of your own: the pairs of DIR/ir and DIR/vi (matched by '
                             'name), named by DIR; the outputs of other methods in '
                             f'DIR/{STORED_DIR}/METHOD/ are scored as stored outputs '
                             '(repeatable; with --folder the ivif splits are scored only where '
                             '--datasets names them)')
    parser.add_argument('--limit', type=int, default=0,
                        help='evaluate only the first N pairs of each split (0 = all; '
                        'default: %(default)s)')
    parser.add_argument('--methods', type=_names, default=list(METHODS),
                        help=f'comma-separated subset of {",".join(METHODS)} (default: all)')
    parser.add_argument('--weights', type=pathlib.Path, nargs='+', default=[],
                        help='evaluate these checkpoints as ours (and base) instead of the '
                             'shipped weights')
    parser.add_argument('--seafusion-weights', type=pathlib.Path, default=None,
                        help="SeAFusion's published weights (default: IVIF_DIR/"
                             f'{SEAFUSION_WEIGHTS})')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    parser.add_argument('--threads', type=int, default=None,
                        help="CPU threads for torch and OpenCV (default: their choice)")
    parser.add_argument('--out', type=file_path, default=None,
                        help=f'the report (default: {DEFAULT_REPORT}, for a run of everything '
                             'with the shipped weights; a partial run must name its own)')
    parser.add_argument('--grid', type=file_path, default=None,
                        help='the example images (default: beside --out, its name + _grid.png)')
    parser.add_argument('--flicker', type=pathlib.Path, metavar='VIDEO_DIR',
                        help='instead of the report, measure the flicker of ours and the '
                        'baselines among --methods on the clips of VIDEO_DIR (ir/<clip>.mp4, '
                        'vi/<clip>.mp4, as the M3SVD test videos are) and replace only the '
                        'flicker section of --out')
    parser.add_argument('--flicker-frames', type=int, default=60, metavar='N',
                        help='with --flicker: the first N frames of each clip, which every '
                        'clip must have (default: %(default)s)')
    parser.add_argument('--pairs-csv', type=file_path, default=None,
                        help='per-pair metric values of every method (default: beside --out, '
                             'its name + _pairs.csv)')
    parser.add_argument('--save-outputs', type=output_path, default=None, metavar='DIR',
                        help='also write the pairs and every image the report scores (but '
                             'stored outputs) as PNGs: DIR/<split>/ir/, vi/ and '
                             f'{STORED_DIR}/<METHOD>/ (and {SAVED_CLIPS}, the clip of each '
                             "pair of a split of clips' frames), for other toolkits or a "
                             'detector to score the same images (and --folder DIR/<split> to '
                             'score them again)')
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f'unknown methods {unknown}: choose from {", ".join(METHODS)}')
    if args.limit < 0:
        parser.error('--limit must be >= 0')
    if args.flicker_frames < 2:
        parser.error('--flicker-frames must be >= 2')
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be >= 1')
    default_datasets = [] if args.folder else list(IVIF_DATASETS)
    if args.datasets is None:
        args.datasets = default_datasets
    if not (args.datasets or args.folder or args.flicker):
        parser.error('nothing to evaluate: name splits with --datasets or pairs with --folder')
    if args.datasets and args.data is None and not args.flicker:
        parser.error('the report needs --data (or $S4FUSION_IVIF_DATA): the ivif folder, or '
                     '--folder with pairs of your own')
    if args.folder and args.flicker:
        parser.error('--folder and --flicker: the flicker runs on VIDEO_DIR alone')
    if args.save_outputs and args.flicker:
        parser.error('--save-outputs and --flicker: the flicker saves no images')
    if args.weights and not {'ours', 'base'} & set(args.methods):  # else never loaded
        parser.error('--weights: neither ours nor base is among --methods')
    if args.seafusion_weights is not None:
        if 'seafusion' not in args.methods:
            parser.error('--seafusion-weights: seafusion is not among --methods')
        if not args.seafusion_weights.is_file():
            parser.error(f'--seafusion-weights {args.seafusion_weights}: not a file')
    if args.out is None:
        def chosen(value):  # lists as sets: the same splits or methods in another order
            return set(value) if isinstance(value, list) else value
        defaults = {'datasets': default_datasets}
        partial = [f'--{name.replace("_", "-")}' for name in (
            'limit', 'datasets', 'folder', 'methods', 'weights', 'seafusion_weights',
            'flicker_frames')
            if chosen(getattr(args, name)) != chosen(defaults.get(name,
                                                                  parser.get_default(name)))]
        if partial:  # it would replace the shipped report with part of one
            parser.error(f'{", ".join(partial)}: a partial run needs its own --out (the default '
                         f'{DEFAULT_REPORT} is the whole report)')
        args.out = DEFAULT_REPORT
    if args.seafusion_weights is None and args.data is not None:
        args.seafusion_weights = args.data / SEAFUSION_WEIGHTS
    if args.pairs_csv is None:
        args.pairs_csv = args.out.with_name(f'{args.out.stem}_pairs.csv')
    if args.grid is None:  # a report written elsewhere must not replace docs/quality_grid.png
        args.grid = args.out.with_name(f'{args.out.stem}_grid.png')
    return args


def _names(text: str) -> list:
    return [name.strip() for name in text.split(',') if name.strip()]


def link_target(relative: str) -> str:
    """A path relative to the report as a Markdown link's target: percent-encoded, as a space
    would end the link and a '#' start its fragment (of a name that is not UTF-8, the bytes the
    file system holds)."""
    return urllib.parse.quote(os.fsencode(relative))


def recorded_command(args: argparse.Namespace, argv: list) -> str:
    """The command line as the report records it: the data folders by their placeholder names,
    since the report names the datasets, not this machine's paths to them."""
    placeholders = {pathlib.Path(path): name for path, name in
                    ((args.data, 'IVIF_DIR'), (args.flicker, 'VIDEO_DIR')) if path is not None}

    def recorded(token: str) -> str:
        option, equals, value = (token.rpartition('=') if token.startswith('--')
                                 else ('', '', token))
        return option + equals + placeholders.get(pathlib.Path(value), value) if value else token

    return shlex.join([PROG, *map(recorded, argv)])


def evaluation_splits(args: argparse.Namespace,
                      ivif: IvifSplits | None) -> tuple[dict, set, dict]:
    """({split name: pairs} of --datasets (from ``ivif``, the splits of --data) and --folder,
    in that order, each cut to --limit; the validation splits; {split name: the clip of each
    pair} of the splits of clips' frames).
    """
    splits, validation, clips = {}, set(), {}
    if args.datasets:
        known = {**ivif.tests, **ivif.validation}
        missing = sorted(set(args.datasets) - set(known))
        if missing:
            raise ValueError(f'unknown datasets {missing}: choose from {", ".join(known)}')
        splits = {name: known[name][:args.limit or None] for name in args.datasets}
        validation = set(ivif.validation)
        clips = {name: ivif.clips[name][:args.limit or None] for name in splits
                 if name in ivif.clips}
    for folder in args.folder:
        folder = folder.resolve()  # its name names the split and its pairs' labels
        if folder.name in IVIF_DATASETS or folder.name in splits:
            taken = 'an ivif split' if folder.name in IVIF_DATASETS else 'already evaluated'
            raise ValueError(f'--folder {folder}: a split named {folder.name} is {taken}; each '
                             'split is named by its folder, so rename it')
        splits[folder.name] = pairs_in_folder(folder)[:args.limit or None]
        if not splits[folder.name]:
            raise ValueError(f'--folder {folder}: no image pairs in its ir/ and vi/')
        check_scorable(folder, splits[folder.name])
    return splits, validation, clips


def check_scorable(folder: pathlib.Path, pairs: list) -> None:
    """ValueError naming the pairs of a --folder split the metrics cannot use (unreadable, IR
    neither 8- nor 16-bit, too small, or IR and visible of different sizes), found before any
    scoring, not at the first of them minutes into it; a warning for 16-bit IR in raw camera
    counts. The ivif splits are known to be usable."""
    problems, raw_counts = [], []
    for pair in pairs:
        try:
            source = read_pair(pair)
            if looks_like_raw_counts(source.thermal):
                raw_counts.append(pair.ir_path)
            sources_luminance(eight_bit(source), pair)
        except ValueError as error:
            problems.append(str(error))
    if raw_counts:
        print(f'{PROG}: warning: ' + raw_counts_warning(
            len(raw_counts), len(pairs), raw_counts[0], 'are scored as nearly black images',
            f' in --folder {folder}'), file=sys.stderr)
    if problems:
        more = '; ...' if len(problems) > 3 else ''
        raise ValueError(f'--folder {folder}: {len(problems)} of its {len(pairs)} pairs cannot '
                         f'be scored: {"; ".join(problems[:3])}{more}')


def check_save_outputs(folder: pathlib.Path, splits: dict, methods: list) -> None:
    """ValueError where --save-outputs would overwrite images: a split's own folder (its ir/
    and vi/, 16-bit IR replaced by 8-bit, and its stored outputs), one method's outputs with
    another's (names that differ only where method_folder writes '_'), or one pair's with
    another's (names that differ only in the extension)."""
    folders = collections.Counter(method_folder(method.name) for method in methods)
    if twice := [name for name, count in folders.items() if count > 1]:
        raise ValueError(f'--save-outputs: methods whose names differ only in punctuation '
                         f'would share the folder {twice[0]}: label the checkpoints apart')
    for name, pairs in splits.items():
        # Saved by stem, so that --folder scores the saved split again as this one: two pairs of
        # one stem would be saved as one file, the later overwriting the earlier.
        if shared := shared_stems(pairs):
            stem, names = next(iter(shared.items()))
            raise ValueError(f'--save-outputs: the pairs {", ".join(names)} of the split {name} '
                             f'would be saved as one file, {stem}.png: rename them apart')
        target = resolved(folder / name)
        if any(resolved(path).parent.parent == target
               for pair in pairs for path in (pair.ir_path, pair.vi_path)):
            raise ValueError(f'--save-outputs {folder}: {folder / name} holds the pairs of the '
                             f'split {name}, which it would overwrite; name another folder')


def run(args: argparse.Namespace, argv: list, saving: list) -> list:
    """Evaluate, write the report and the grid; returns the DatasetScores. ``saving`` holds the
    --save-outputs folder of the split being written while it is, for the message on Ctrl-C."""
    ivif = ivif_splits(args.data) if args.datasets else None
    splits, validation, clips = evaluation_splits(args, ivif)
    ivif_names = set(args.datasets)
    ours = 'ours' in args.methods
    # 'base' alone needs ours' configurations too: each base is the one its weights refine.
    configs, skipped, notes = (ours_configs(args.weights) if {'ours', 'base'} & set(args.methods)
                               else ([], [], []))
    methods, skipped_methods = build_methods(args, configs)
    if args.save_outputs:
        check_save_outputs(args.save_outputs, splits, methods)
    examples, datasets, evaluated = {}, [], []
    for name, pairs in splits.items():
        pairs = list(pairs)
        stored, skipped_stored = (stored_methods(name, pairs, name not in ivif_names)
                                  if 'stored' in args.methods else ([], []))
        skipped_methods += skipped_stored
        if not methods + stored:
            raise ValueError(f'{name}: no method to score ({"; ".join(skipped_methods)})')
        evaluated += pairs
        table = pairs[0].dataset / PUBLISHED_TABLE
        published_asked = 'published' in args.methods and table.is_file()
        compat = {} if published_asked and any(method.ours for method in methods) else None
        if published_asked and compat is None:
            skipped_methods.append(f'published values on {name}: they are compared with ours '
                                   'alone, and no configuration of ours was evaluated.')
        started = time.monotonic()
        saved = args.save_outputs / name if args.save_outputs else None
        if saved:
            saving.append(saved)  # until its last file is written
        datasets.append(evaluate_dataset(
            name, pairs, methods + stored, examples, validation=name in validation,
            compat=compat, clips=clips.get(name), save_outputs=saved))
        if saved and clips.get(name):  # frames of one clip are not independent
            save_clips(saved / SAVED_CLIPS, pairs, clips[name])
        saving.clear()
        if compat is not None:
            published, skipped_published = published_dataset(name, pairs, compat, table)
            datasets.append(published)
            skipped_methods += skipped_published
        print(f'{PROG}: {name}: {len(pairs)} pairs in {time.monotonic() - started:.0f} s',
              file=sys.stderr)
    grid, writes = '', {}
    if examples:
        writes[args.grid] = grid_png(args.grid, examples, configs[0].label)
        grid = link_target(os.path.relpath(args.grid.resolve(), args.out.resolve().parent))
    elif ours:
        skipped_methods.append('the example grid: no configuration of ours was evaluated.')
    pairs_csv = os.path.relpath(args.pairs_csv.resolve(), args.out.resolve().parent)
    context = report.ReportContext(
        command=recorded_command(args, argv),
        date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        environment=environment(args.device), weights=[describe_weights(c) for c in configs],
        skipped=skipped + skipped_methods, grid=grid,
        notes=(notes + [training_overlap(c, [pair.label for pair in evaluated])
                        for c in configs] if ours else [])
        + data_notes(args, datasets, ivif, methods)
        + [f'Every method\'s metrics on every pair: [{pairs_csv}]({link_target(pairs_csv)}).'])
    writes[args.pairs_csv] = text_bytes(report.per_pair_csv(datasets))
    # What an earlier report has below its reading marker (the flicker section, measured on
    # its own with --flicker, and the maintainers' reading) stays; else its flicker section.
    earlier = earlier_report(args.out)
    text = report.render(datasets, context)
    below = report.below_reading_marker(earlier)
    if below is not None:  # as it was: render ends with the marker line, `below` after its -->
        text = text.removesuffix('\n') + below
    elif flicker := temporal.section_of(earlier):
        text = temporal.replace_section(text, flicker)
    # All or none (a full disk): a report beside another run's grid and table would mislead.
    writes[args.out] = text_bytes(text)
    for path in writes:
        path.parent.mkdir(parents=True, exist_ok=True)
    write_together({path: lambda file, data=data: file.write(data)
                    for path, data in writes.items()})
    print(f'{PROG}: wrote {args.out}, {args.pairs_csv}' + (f' and {args.grid}' if grid else ''),
          file=sys.stderr)
    return datasets


def earlier_report(path: pathlib.Path) -> str:
    """The text of an existing --out ('' where there is none) as its bytes are, so that what a
    run keeps of it is written back byte for byte (write_text_atomically): line ends as they
    are (read_text made CRLF LF) and bytes that are not UTF-8 as surrogates."""
    return path.read_bytes().decode('utf-8', 'surrogateescape') if path.is_file() else ''


def run_flicker(args: argparse.Namespace, argv: list) -> dict:
    """Measure flicker of ours and the baselines on every clip; rewrite the section of --out."""
    clips = temporal.clip_names(args.flicker)
    if short := temporal.short_clips(args.flicker, clips, args.flicker_frames):
        raise ValueError(f'--flicker-frames {args.flicker_frames}: {args.flicker} has clips of '
                         'fewer frames (those both their videos have): '
                         + ', '.join(f'{clip} {length}' for clip, length in short.items())
                         + '; measure at most as many as the shortest has')
    chosen = set(args.methods)
    configs, skipped, _ = (ours_configs(args.weights) if chosen & {'ours', 'base'}
                           else ([], [], []))
    ours = loaded_ours(configs, args.device)
    values = settings.defaults()
    engines = {config.label: FusionEngine(
        loaded, fusion_settings({**values, 'inference_size': list(config.inference_size)}))
        for config, loaded in ours if 'ours' in chosen}
    engines.update({label: temporal.BaselineEngine(fuse, fusion_settings(values))
                    for label, (fuse, _) in baseline_fuses(chosen, ours).items()})
    if not engines:
        raise ValueError('--flicker needs ours or a baseline among --methods')

    def progress(pairs, label):
        return tqdm(pairs, desc=label, unit='frame', file=sys.stderr, leave=False)

    scores = temporal.measure_clips(args.flicker, clips, args.flicker_frames, engines, progress)
    command = recorded_command(args, argv)
    # A frame as training records name it, <clip>_<frame> (training/data.py video_pairs), is
    # compared without the folder and extension: whatever VIDEO_DIR is called here, and a still
    # <clip>_<frame>.png of a frame clip is that frame (M3SVD's frame clips share a clip with
    # its test videos).
    frames = [f'{clip}_{index:04d}' for clip in clips for index in range(args.flicker_frames)]
    m3svd = set(clips) <= set(M3SVD_TEST_VIDEO_CLIPS)  # else videos of the user's own
    source = ('the M3SVD test videos (Linfeng-Tang/M3SVD, `Video/test/infrared` and `visible` '
              'as `ir/` and `vi/`)' if m3svd else f'`{args.flicker}`')
    notes = ([f'VIDEO_DIR: {source}; clips: {", ".join(clips)}.',
              f'Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; '
              f'{environment(args.device)}.'] + [weights_identity(c) for c in configs]
             + [training_overlap(c, frames, 'measured frames (as video or still frames, by '
                                 'clip and frame number)', frame_of_clip) for c in configs]
             + [training_overlap(c, clips, 'measured clips', clip_of_frame,
                                 'have frames (near duplicates of the others) among')
                for c in configs]
             + skipped)
    section = temporal.render_section(scores, args.flicker_frames, command, notes,
                                      'M3SVD video' if m3svd else 'video')
    text = earlier_report(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out, temporal.replace_section(text, section))
    print(f'{PROG}: wrote the flicker section of {args.out}', file=sys.stderr)
    return scores


def check_outputs(args: argparse.Namespace) -> None:
    """OSError or ValueError naming a file the run could not write, checked before any
    scoring: a folder, an unwritable folder, one file named for two outputs (the later would
    overwrite the earlier, the report and the reading below its marker with it), or a report
    whose text would be lost (check_report_replaceable)."""
    written = {'--out': args.out}
    if not args.flicker:
        written.update({'--pairs-csv': args.pairs_csv, '--grid': args.grid})
    for option, path in written.items():
        if path.is_dir():
            raise IsADirectoryError(f'{option} {path} is a folder: name the file')
        check_writable_folder(path.parent)
    if args.save_outputs is not None:
        check_writable_folder(args.save_outputs)
    named = {}
    for option, path in written.items():
        if (earlier := named.setdefault(resolved(path), option)) != option:
            raise ValueError(f'{earlier} and {option} both name {path}: give each its own file')
    if not args.flicker:  # which replaces only its section
        check_report_replaceable(args.out)


def check_report_replaceable(path: pathlib.Path) -> None:
    """ValueError where the report would replace text of an existing ``path`` that it keeps
    nowhere: anything besides a flicker section, in a file without the reading marker (below
    which it keeps everything), as a report whose marker line was deleted, or another file
    named by mistake."""
    earlier = earlier_report(path)
    if (report.below_reading_marker(earlier) is None
            and earlier.replace(temporal.section_of(earlier), '', 1).strip()):
        raise ValueError(f'--out {path} holds text and no reading marker, so the report would '
                         'replace it: if it is a report, put the marker line back above what '
                         f'is to stay ({report.READING_MARKER_LINE}); else name another --out')


def main(argv: list | None = None) -> int:
    """Console entry point; exit code 0 on success, 1 on an error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    stop_on_signals()  # a kill or a supervisor's SIGTERM ends it as Ctrl-C does: no temporaries
    if args.threads is not None:
        set_threads(args.threads)  # OpenCV's too: GFF's filters and the pyramid are timed

    saving = []  # the --save-outputs folder being written

    def evaluate() -> int:
        check_outputs(args)  # not after the scoring, which takes minutes
        if args.flicker:
            run_flicker(args, argv)
        else:
            run(args, argv, saving)
        return 0

    def interrupted(_) -> str:
        return f'interrupted; {args.out} was not written' + ''.join(
            f"; {folder} is incomplete: it has this run's images of only the pairs scored "
            'before it was stopped' for folder in saving)
    return run_command(PROG, evaluate, (OSError, ValueError, CheckpointError), interrupted)


if __name__ == '__main__':  # python -m, set up by its package's __init__
    from ..entry_points import run_tool
    sys.exit(run_tool(main))
