"""Infrared/visible training pairs: folder and video reading, random 12k+1 crops, the ivif splits.

Images are fused on luminance: a colour image becomes the Y of YCrCb (Y = 0.299R + 0.587G +
0.114B, OpenCV's weights), a gray image (also one stored as RGB with three equal channels, as TNO's
PNGs are) stays itself. Pixels stay uint8/uint16 in memory and become float32 in [0, 1] per crop.
"""

import collections
import csv
import dataclasses
import os
import pathlib
import re

import cv2
import numpy as np
import torch

from ..files import opencv_path
from ..imaging.encodings import check_whole_jpeg
from ..imaging.limits import MAX_PIXELS, MAX_SIDE, over_opencv_limits
from ..imaging.normalization import looks_like_raw_counts

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
DEPTHS = (np.uint8, np.uint16)  # the pixel types read: those training scales to [0, 1]
IVIF_DATASET_FOLDERS = ('roadscene', 'tno', 'msrs', 'm3svd', 'm3fd')  # README, "Data and licences"

# The pairs in ivif/msrs that belong to the MSRS train split (its SOURCES.md); the other 22 are
# MSRS test-split images.
MSRS_TRAIN_NAMES = ('00556D.png', '00633D.png', '00881N.png', '01023N.png')
# M3SVD clips held out for choosing weights and settings (whole clips: consecutive frames are
# near duplicates): a street at dusk with cars and pedestrians, a crowd at night.
M3SVD_VALIDATION_CLIPS = ('0111_1753', '0115_1834')
# Every n-th RoadScene training pair by name validates instead (20 of 154): S4Fusion's 67 test
# pairs are drawn across the whole FLIR drive, so a contiguous stretch would be no further from
# them; it scores the daytime road scenes that the M3SVD clips do not show.
ROADSCENE_VALIDATION_STRIDE = 8
# RoadScene's pairs are frames of FLIR drives, numbered in drive order in two series (FLIR_ and
# FLIR_video_). A split's frames whose numbers lie within this many of the previous one of their
# series are taken as one clip of a drive, for statistics that resample clips: the test frames
# that a review found to show the scene of a nearby training frame lay 2 to 29 frames from it.
ROADSCENE_CLIP_GAP = 30
# Every n-th frame of the M3SVD videos trains; neighbouring frames add little but decode time.
VIDEO_FRAME_STEP = 10
# The clips of M3SVD's Video/test (Linfeng-Tang/M3SVD), the ivif layout's m3svd/videos.
M3SVD_TEST_VIDEO_CLIPS = ('0111_1716', '0113_1714', '0117_1605', '0117_1620', '1230_1202')
# S4Fusion's RoadScene test split in the ivif data folder; it also marks a folder as that layout.
ROADSCENE_TEST67 = pathlib.Path('roadscene', 'splits', 's4fusion_test67.csv')


@dataclasses.dataclass(frozen=True)
class Pair:
    """One registered infrared/visible pair; ``name`` is the IR file name (the visible file has
    the same name, or the same stem: ``match_pairs``)."""

    name: str
    ir_path: pathlib.Path
    vi_path: pathlib.Path
    frame: int | None = None  # None: image files; else the frame index in the videos at the paths

    @property
    def dataset(self):
        """The folder holding ``ir/`` and ``vi/``: the dataset this pair belongs to."""
        return self.ir_path.parent.parent

    @property
    def label(self):
        """``dataset/name``, as the training metadata records it: the folder's own name however
        it was given (``--data .`` names no folder; links are not followed)."""
        return f'{pathlib.Path(os.path.abspath(self.dataset)).name}/{self.name}'


@dataclasses.dataclass(frozen=True)
class IvifSplits:
    """The training pairs, the named validation and test splits built from the ivif folder."""

    train: tuple
    validation: dict
    tests: dict
    # split name -> the clip of each of its pairs, for a split of frames of clips (frames of one
    # clip are not independent draws, so statistics over the split resample clips)
    clips: dict


def read_image(path, depths=DEPTHS):
    """Read an image file of one of ``depths`` (8 or 16 bit), gray (H, W) or BGR (H, W, 3)
    (alpha dropped), turned upright as its EXIF orientation says (as image viewers show it);
    ValueError names the file."""
    try:
        # Read by Python, decoded by OpenCV: cv2.imread crashes the process on a file name that
        # is not UTF-8 (an old archive's Latin-1 name).
        data = np.fromfile(path, np.uint8)
    except OSError as error:
        raise ValueError(f'{path}: cannot read it ({error.strerror})') from error
    if not data.size:
        raise ValueError(f'{path}: an empty file')
    check_whole_jpeg(data, str(path))
    try:
        # Depth and channels as stored, but not IMREAD_UNCHANGED: that alone skips the EXIF
        # orientation (a phone's visible photo would fuse on its side against the IR image).
        image = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as error:
        if over_opencv_limits(error):
            raise ValueError(f'{path}: cannot read it (larger than the limit of {MAX_SIDE} '
                             f'pixels a side or {MAX_PIXELS} pixels)') from error
        raise ValueError(f'{path}: cannot read it ({error.err})') from error
    if image is None:
        raise ValueError(f'{path}: not a readable image')
    _check_depth(image, path, depths)
    if image.ndim == 2 or image.shape[2] == 3:
        return image
    raise ValueError(f'{path}: unsupported image shape {image.shape}')


def _read_luminance(path):
    """Read an image file as (H, W) luminance in its own integer type (8 or 16 bit)."""
    return luminance(read_image(path), path)


def _check_depth(image, path, depths=DEPTHS):
    """``image`` if its pixels are of one of ``depths``; else ValueError naming them."""
    if image.dtype not in depths:
        need = ' or '.join(str(np.dtype(depth).itemsize * 8) for depth in depths)
        raise ValueError(f'{path}: unsupported pixel type {image.dtype} (need {need} bit)')
    return image


def luminance(image, path=''):
    """Gray stays gray; BGR(A) becomes the Y of YCrCb, in the image's own integer type."""
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2YCrCb)[:, :, 0]
    raise ValueError(f'{path}: unsupported image shape {image.shape}')


def _read_video_frames(path, indices):
    """{index: (H, W) luminance} of the given frames of a video, decoded in one pass."""
    capture = cv2.VideoCapture(opencv_path(path))
    frames, index, last = {}, 0, max(indices)
    try:
        while index <= last:
            ok, image = capture.read()
            if not ok:
                break
            if index in indices:
                frames[index] = luminance(image, path)
            index += 1
    finally:
        capture.release()
    missing = sorted(set(indices) - set(frames))
    if missing:
        raise ValueError(f'{path}: frames {missing[:5]} not readable (the video has {index})')
    return frames


def read_pair_images(pairs):
    """Each pair's (IR, VI) luminance in its own integer type; video frames in one pass per
    video. The two images of a pair must have one size."""
    wanted = collections.defaultdict(set)
    for pair in pairs:
        if pair.frame is not None:
            wanted[pair.ir_path].add(pair.frame)
            wanted[pair.vi_path].add(pair.frame)
    frames = {path: _read_video_frames(path, indices) for path, indices in wanted.items()}
    images = []
    for pair in pairs:
        if pair.frame is None:
            ir, vi = _read_luminance(pair.ir_path), _read_luminance(pair.vi_path)
        else:
            ir, vi = frames[pair.ir_path][pair.frame], frames[pair.vi_path][pair.frame]
        if ir.shape != vi.shape:
            raise ValueError(f'{pair.label}: IR {ir.shape} and VI {vi.shape} differ in size')
        images.append((ir, vi))
    return images


def video_pairs(folder, step=1):
    """Every ``step``-th frame pair of the videos in ``folder/ir`` and ``folder/vi`` matched by
    file name (synchronized clips of equal length), sorted by clip and frame."""
    folder = pathlib.Path(folder)
    # Each video needs its partner, either way: none may be left out unsaid.
    ir_names, vi_names = ({p.name for p in (folder / side).glob('*.mp4')} for side in ('ir', 'vi'))
    if alone := sorted(ir_names ^ vi_names):
        raise FileNotFoundError(f'{folder}: videos without a partner in ir/ or vi/: {alone[:10]}')
    pairs = []
    for name in sorted(ir_names):
        ir_path, vi_path = folder / 'ir' / name, folder / 'vi' / name
        counts = []
        for path in (ir_path, vi_path):
            capture = cv2.VideoCapture(opencv_path(path))
            counts.append(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
            capture.release()
        if counts[0] != counts[1] or not counts[0]:
            raise ValueError(f'{ir_path.name}: IR and VI videos have {counts[0]} and {counts[1]} '
                             f'frames; expected synchronized clips of equal length')
        pairs += [Pair(f'{ir_path.stem}_{i:04d}', ir_path, vi_path, i)
                  for i in range(0, counts[0], step)]
    return tuple(pairs)


def _to_unit_float(image, path):
    return _check_depth(image, path).astype(np.float32) / np.iinfo(image.dtype).max


def pairs_in_folder(folder, names=None):
    """The pairs in ``folder/ir`` and ``folder/vi`` matched by file name, sorted by name.

    ``names`` restricts the result to those file names (each must exist in both folders). Without
    it, every image must have a partner: an unpaired file is an error, not silently dropped data.
    """
    folder = pathlib.Path(folder)
    pairs, unpaired = match_pairs(folder / 'ir', folder / 'vi',
                                  missing=f'missing (expected ir/ and vi/ in {folder})')
    if names is None:
        if unpaired:
            raise ValueError(f'{folder}: images without a partner in ir/ or vi/: {unpaired[:10]}')
        return tuple(pairs)
    by_name = {pair.name: pair for pair in pairs}
    missing = sorted(set(names) - set(by_name))
    if missing:
        raise FileNotFoundError(f'{folder}: pairs not in both ir/ and vi/: {missing[:10]}')
    return tuple(by_name[name] for name in sorted(names))


def match_pairs(ir_dir, vi_dir, missing='not a directory'):
    """Pairs with the same file name in both folders, or else the same name but for the
    extension (``ir/0001.png`` with ``vi/0001.jpg``, as some public benchmarks store them; only
    where that stem names one file on each side), sorted by IR file name, and the files found in
    one only (noted where their stem is ambiguous); a folder that is not there raises
    FileNotFoundError '<folder>: <missing>'."""
    found = []
    for directory in (ir_dir, vi_dir):
        if not directory.is_dir():
            raise FileNotFoundError(f'{directory}: {missing}')
        # Hidden files are no images of the set: macOS puts an AppleDouble `._NAME.png` beside
        # each image of an archive made on a Mac.
        # A broken link counts, to be named where it is read: left out, it went unreported.
        found.append({p.name for p in directory.iterdir()
                      if (p.is_file() or p.is_symlink() and not p.exists())
                      and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith('.')})
    ir_names, vi_names = found
    partners = {name: name for name in ir_names & vi_names}
    ir_by_stem, vi_by_stem = (by_stem(names - set(partners)) for names in found)
    for stem, ir_alone in ir_by_stem.items():
        if len(ir_alone) == 1 and len(vi_by_stem[stem]) == 1:
            partners[ir_alone[0]] = vi_by_stem[stem][0]
    pairs = [Pair(name, ir_dir / name, vi_dir / partners[name]) for name in sorted(partners)]
    ambiguous = {stem for stem in ir_by_stem.keys() & vi_by_stem.keys()
                 if ir_by_stem[stem] and vi_by_stem[stem]
                 and len(ir_by_stem[stem]) + len(vi_by_stem[stem]) > 2}

    def unmatched(directory, names):
        return [f'{directory / n}' + (' (several files share its name but for the extension)'
                                      if pathlib.Path(n).stem in ambiguous else '')
                for n in sorted(names)]

    return pairs, (unmatched(ir_dir, ir_names - set(partners))
                   + unmatched(vi_dir, vi_names - set(partners.values())))


def by_stem(names):
    """{stem: [file names]} of a set of file names."""
    grouped = collections.defaultdict(list)
    for name in sorted(names):
        grouped[pathlib.Path(name).stem].append(name)
    return grouped


def shared_stems(pairs):
    """{stem: the pair names} of the stems that several of ``pairs`` share (``a.png`` and
    ``a.jpg``, which match_pairs pairs by their exact names): a file named by that stem could be
    either pair's."""
    return {stem: names for stem, names in by_stem(pair.name for pair in pairs).items()
            if len(names) > 1}


def roadscene_test67_names(root):
    """RoadScene file names of S4Fusion's 67 test pairs (five are ``FLIR_video_*`` here)."""
    path = pathlib.Path(root) / ROADSCENE_TEST67
    with open(path, newline='') as f:
        names = [row['name_here'] for row in csv.DictReader(f)]
    if len(names) != 67:
        raise ValueError(f'{path}: lists {len(names)} pairs, expected 67')
    return names


def data_layout(folder):
    """How ``training_pairs`` reads ``folder``: 'pairs' (it holds ir/ and vi/), 'ivif' (the ivif
    layout of the README, "Data and licences", known by its RoadScene test split) or 'datasets'.

    A folder with two or more of the ivif layout's datasets but without that split file is an
    error: read as datasets it would train on the test sets (RoadScene-67, TNO, MSRS) and leave
    out M3SVD. One dataset of your own may take one of their names. A folder inside the ivif
    layout (one of its datasets, say) is an error too: it holds test or validation pairs."""
    folder = pathlib.Path(folder)
    _check_outside_ivif(folder, folder)
    if (folder / 'ir').is_dir():
        return 'pairs'
    if (folder / ROADSCENE_TEST67).is_file():
        return 'ivif'
    # Case-blind: the public datasets are often unpacked as TNO/, MSRS/, RoadScene/.
    ivif_parts = sorted(entry.name for entry in folder.iterdir()
                        if entry.is_dir() and entry.name.casefold() in IVIF_DATASET_FOLDERS)
    if len(ivif_parts) > 1:
        raise FileNotFoundError(
            f'{folder / ROADSCENE_TEST67}: missing, though {folder} has the ivif layout '
            f'({", ".join(ivif_parts)}). It names the 67 RoadScene test pairs, which must not '
            'train, as the TNO and MSRS test pairs must not (README, "Data and licences")')
    return 'datasets'


def _check_outside_ivif(given, folder):
    """ValueError if ``folder`` lies inside the ivif layout (as given first, so that the message
    names the layout as the user does, then with links resolved): it holds test or validation
    pairs, which must not train. ``given``: the --data folder, for the message."""
    for root in (*folder.absolute().parents, *folder.resolve().parents):
        if (root / ROADSCENE_TEST67).is_file():
            raise ValueError(f'{given}: {"" if folder == given else f"{folder} is "}inside the '
                             f'ivif layout {root}, so holding test or validation pairs, which '
                             f'must not train; give --data {root} (its training split) or a '
                             'folder of your own')


# scripts/gpu_train.py pack-data leaves this file in a folder it packs from the ivif layout, so
# that weights trained on the packed copy record the same data as weights trained on the layout.
PACKED_IVIF_MARKER = 'packed-ivif-training-split.txt'
PACKED_FOLDER_SUFFIX = '-train'  # a packed dataset folder: <its path under the layout, '-'>-train
# The ivif layout's datasets in a subfolder, packed under their path: their labels' folder names
PACKED_NESTED_DATASETS = {'m3svd-frames': 'frames', 'm3svd-videos': 'videos'}
IVIF_DATA_NOTE = ('data: RoadScene without S4Fusion\'s 67 test pairs and its validation pairs, 4 '
                  'MSRS train pairs and the M3SVD clips outside the validation split, not the '
                  'authors\' training set')


def pair_key(label):
    """A training label as ``<dataset folder>/<name>``, the same for a pair of the ivif layout
    (``msrs/00556D.png``) and its packed copy (``msrs-train/00556D.jpg``; the frames of
    ``m3svd/frames`` are packed in ``m3svd-frames-train``): an image's name without its
    extension, a video frame's (``videos/<clip>_<frame>``) as it is. The folder is case-folded:
    ``TNO/01.png`` and ``tno/01.png`` are one pair."""
    path = pathlib.PurePosixPath(label)
    folder = path.parent.name.casefold()
    if folder.endswith(PACKED_FOLDER_SUFFIX):
        folder = folder.removesuffix(PACKED_FOLDER_SUFFIX)
        folder = PACKED_NESTED_DATASETS.get(folder, folder)
    name = path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name
    return f'{folder}/{name}'


def training_data_note(folder):
    """What the weights trained on ``folder`` record of their data: IVIF_DATA_NOTE for the ivif
    layout or its packed training split (marked by PACKED_IVIF_MARKER), else ''."""
    folder = pathlib.Path(folder)
    if (folder / PACKED_IVIF_MARKER).is_file():
        return f'{IVIF_DATA_NOTE} ({(folder / PACKED_IVIF_MARKER).read_text().strip()})'
    return IVIF_DATA_NOTE if data_layout(folder) == 'ivif' else ''


def training_pairs(folder):
    """The pairs to train on in ``folder``: its ir/ and vi/ pairs; the training split where it is
    the ivif layout; else the pairs of every subfolder holding ir/ and vi/ (one dataset each, as
    ``dataset_balance`` counts them). See ``data_layout``."""
    folder = pathlib.Path(folder)
    layout = data_layout(folder)
    if layout == 'ivif':
        return ivif_splits(folder).train
    datasets = ([folder] if layout == 'pairs' else
                sorted(p for p in folder.glob('*') if (p / 'ir').is_dir()))
    if not datasets:
        raise FileNotFoundError(f'{folder}: no ir/ and vi/ pairs, no ivif layout and no '
                                f'subfolders with ir/ and vi/')
    pairs = ()
    for dataset in datasets:
        # A link to an ivif dataset or to its ir/ or vi/ folder, named as such before its pairs
        # are read (M3SVD's videos hold none); then links to its image files, by the folders the
        # images really are in.
        for side in ('ir', 'vi'):
            _check_outside_ivif(folder, (dataset / side).resolve())
        found = pairs_in_folder(dataset)
        if not found:  # images a level deeper, or of another type: none would train unnoticed
            raise ValueError(f'{dataset}: no image pairs in its ir/ and vi/ (image files '
                             f'directly in them, {" ".join(IMAGE_SUFFIXES)})')
        for real in sorted({path.resolve().parent for pair in found
                            for path in (pair.ir_path, pair.vi_path)}):
            _check_outside_ivif(folder, real)
        pairs += found
    return pairs


def unread_subfolders(folder):
    """The subfolders ``training_pairs`` leaves out of a folder of datasets (no ir/ in them: a
    misspelt IR/ or a level too deep), so that the trainer can name them; none for the other
    layouts."""
    folder = pathlib.Path(folder)
    if data_layout(folder) != 'datasets':
        return []
    return sorted(p for p in folder.glob('*')
                  if p.is_dir() and not p.name.startswith('.') and not (p / 'ir').is_dir())


def m3svd_clip(pair):
    """The M3SVD clip a pair comes from: its video, or the ``<clip>`` of ``<clip>_<frame>.png``."""
    return pair.ir_path.stem if pair.frame is not None else pair.name.rsplit('_', 1)[0]


def _flir_frame(name):
    """(series, frame number) of a RoadScene file name: ('FLIR_', 4208) for FLIR_04208.jpg,
    ('FLIR_video_', 248) for FLIR_video_00248.jpg; the number is None where the name has none."""
    series, number = re.fullmatch(r'(.*?)(\d*)', pathlib.Path(name).stem).groups()
    return series, int(number) if number else None


def roadscene_clips(pairs):
    """The clip of the drive each of ``pairs`` belongs to, named by its first frame: in frame
    order, a new clip starts where the number is more than ``ROADSCENE_CLIP_GAP`` past the
    previous frame's of the same series (``FLIR_`` and ``FLIR_video_`` are numbered apart). A
    name without a number is a clip of its own."""
    frames = [_flir_frame(pair.name) for pair in pairs]
    clips = [pathlib.Path(pair.name).stem for pair in pairs]
    numbered = sorted((frame, index) for index, frame in enumerate(frames)
                      if frame[1] is not None)
    for ((series, number), index), ((before_series, before), before_index) in zip(
            numbered[1:], numbered):
        if series == before_series and number - before <= ROADSCENE_CLIP_GAP:
            clips[index] = clips[before_index]
    return tuple(clips)


def roadscene_near(pairs, others):
    """The names of ``pairs`` whose frame lies within ``ROADSCENE_CLIP_GAP`` of one of
    ``others`` in the same series: neighbouring frames of the drive, near duplicates."""
    numbered = collections.defaultdict(list)
    for series, number in map(_flir_frame, (pair.name for pair in others)):
        if number is not None:
            numbered[series].append(number)
    near = []
    for pair in pairs:
        series, number = _flir_frame(pair.name)
        if number is not None and any(abs(number - other) <= ROADSCENE_CLIP_GAP
                                      for other in numbered[series]):
            near.append(pair.name)
    return near


def ivif_splits(root):
    """Training, validation and test pairs from the ivif data folder (layout in the README).

    train: RoadScene without S4Fusion's 67 test pairs and the validation pairs (134), the four
    MSRS train-split pairs, the M3SVD frame pairs of the clips not held out (70) and every
    ``VIDEO_FRAME_STEP``-th frame of the M3SVD videos (193 of 1913).
    validation (for choosing weights and settings): 'm3svd_val', the 20 frame pairs of
    ``M3SVD_VALIDATION_CLIPS`` (no video clip is one of them), and 'roadscene_val', every
    ``ROADSCENE_VALIDATION_STRIDE``-th of the other RoadScene pairs by name (20).
    tests: 'roadscene67', 'tno42' and 'msrs22' (the 20 SuperFusion MSRS test pairs, 00537D and
    00858N).
    clips: the clip of each pair of 'm3svd_val' (``m3svd_clip``) and of the RoadScene splits
    (``roadscene_clips``).
    TNO and M3FD never enter training.
    """
    root = pathlib.Path(root)
    roadscene = pairs_in_folder(root / 'roadscene')
    msrs = pairs_in_folder(root / 'msrs')
    m3svd_frames = pairs_in_folder(root / 'm3svd' / 'frames')
    m3svd_videos = video_pairs(root / 'm3svd' / 'videos', VIDEO_FRAME_STEP)
    if {m3svd_clip(p) for p in m3svd_videos} & set(M3SVD_VALIDATION_CLIPS):
        raise ValueError('an M3SVD validation clip is also a video clip: it would train')
    test67 = set(roadscene_test67_names(root))
    tests = {
        'roadscene67': pairs_in_folder(root / 'roadscene', test67),
        'tno42': pairs_in_folder(root / 'tno'),
        'msrs22': tuple(p for p in msrs if p.name not in MSRS_TRAIN_NAMES),
    }
    roadscene_rest = tuple(p for p in roadscene if p.name not in test67)  # sorted by name
    roadscene_val = roadscene_rest[::ROADSCENE_VALIDATION_STRIDE]
    validation = {'m3svd_val': tuple(p for p in m3svd_frames
                                     if m3svd_clip(p) in M3SVD_VALIDATION_CLIPS),
                  'roadscene_val': roadscene_val}
    train = tuple(p for p in roadscene_rest if p not in roadscene_val)
    train += pairs_in_folder(root / 'msrs', MSRS_TRAIN_NAMES)
    train += tuple(p for p in m3svd_frames if m3svd_clip(p) not in M3SVD_VALIDATION_CLIPS)
    train += m3svd_videos
    clips = {'m3svd_val': tuple(m3svd_clip(p) for p in validation['m3svd_val']),
             'roadscene67': roadscene_clips(tests['roadscene67']),
             'roadscene_val': roadscene_clips(roadscene_val)}
    return IvifSplits(train=train, validation=validation, tests=tests, clips=clips)


def check_sampling(crop, min_gain, dataset_balance):
    """ValueError for a crop side, gain augmentation or dataset balance that cannot train."""
    if crop < 13 or crop % 12 != 1:
        raise ValueError(f'crop {crop} must be 12k + 1 (13, 25, ..., 97, 109, 121, ...)')
    if not 0 < min_gain <= 1:
        raise ValueError(f'min_gain {min_gain} must be in (0, 1] (1: no gain augmentation)')
    if not 0 <= dataset_balance <= 1:
        raise ValueError(f'dataset_balance {dataset_balance} must be in [0, 1] '
                         f'(0: pairs drawn alike, 1: datasets drawn alike)')


class PairFolderDataset(torch.utils.data.Dataset):
    """Pairs held in memory; ``dataset[i]`` is the whole pair, ``sample_batch`` draws random crops.

    A crop is a square of side ``crop`` = 12k + 1 (the model's patch-embed grid, so no padding is
    needed inside the network) at the same position in both images, with the same random horizontal
    and vertical flips. An image smaller than the crop is reflect-padded to the crop size rather
    than skipped, so no pair silently drops out of training; the mirrored border keeps local
    statistics (SSIM, gradients) natural where zero padding would add false edges. With the shared
    data and crops up to 157 this never happens (the smallest RoadScene side is 161).

    ``min_gain`` < 1 adds a gain augmentation: each source of a crop, independently and with
    probability 1/2, is multiplied by a gain drawn log-uniformly from [min_gain, 1]. The training
    data is almost all daytime RoadScene, where the thermal image is the brighter source; without
    it the network learns to follow the thermal image everywhere and keeps dim thermal images
    (MSRS night scenes, other cameras' gain settings) dim instead of taking the visible detail.

    ``dataset_balance`` in [0, 1] shifts the draw of pairs from one dataset (the folder above
    ``ir/``) towards another: a dataset of n pairs is drawn with probability proportional to
    n ** (1 - dataset_balance), its pairs uniformly. 0 draws every pair alike (the large dataset
    dominates: 134 RoadScene pairs against 4 MSRS ones), 1 every dataset alike; between, as the
    temperature sampling of multilingual language models.
    """

    def __init__(self, pairs, crop=97, min_gain=1.0, dataset_balance=0.0):
        """Read every pair of ``pairs`` (``Pair`` items); ``crop`` must be 12k + 1 and >= 13."""
        check_sampling(crop, min_gain, dataset_balance)
        if not pairs:
            raise ValueError('no training pairs')
        self.pairs = tuple(pairs)
        self.crop = crop
        self.min_gain = min_gain
        self.dataset_balance = dataset_balance
        self.pair_probabilities = self._pair_probabilities(self.pairs, dataset_balance)
        self._images = read_pair_images(self.pairs)

    def raw_count_pairs(self):
        """The pairs whose IR image looks like raw 16-bit camera counts: scaled by 1 / 65535,
        as every 16-bit image is, they train as nearly black images."""
        return [pair for pair, (ir, _) in zip(self.pairs, self._images)
                if looks_like_raw_counts(ir)]

    def smaller_than_crop(self):
        """{pair: its smaller side} of the pairs a crop is larger than on a side: their crops are
        reflect-padded to it."""
        return {pair: min(ir.shape) for pair, (ir, _) in zip(self.pairs, self._images)
                if min(ir.shape) < self.crop}

    @staticmethod
    def _pair_probabilities(pairs, balance):
        """(N,) probability of drawing each pair; a dataset's pairs share n ** (1 - balance)."""
        datasets = [p.dataset for p in pairs]
        sizes = collections.Counter(datasets)
        weights = np.array([sizes[d] ** (1 - balance) / sizes[d] for d in datasets])
        return weights / weights.sum()

    def __len__(self):
        """Number of pairs."""
        return len(self.pairs)

    def __getitem__(self, index):
        """The whole pair ``index`` as float32 (H, W) IR and VI luminance in [0, 1]."""
        pair = self.pairs[index]
        ir, vi = self._images[index]
        return _to_unit_float(ir, pair.ir_path), _to_unit_float(vi, pair.vi_path)

    def random_crop(self, index, rng):
        """A random ``crop``-sized square of pair ``index``, same place and flips in IR and VI
        (and each its own gain when ``min_gain`` < 1).

        ``rng`` is a ``numpy.random.Generator``; returns two float32 (crop, crop) arrays in [0, 1].
        """
        pair = self.pairs[index]
        ir, vi = self._images[index]
        pad_h, pad_w = max(self.crop - ir.shape[0], 0), max(self.crop - ir.shape[1], 0)
        if pad_h or pad_w:
            pad = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
            ir, vi = np.pad(ir, pad, mode='reflect'), np.pad(vi, pad, mode='reflect')
        top = rng.integers(0, ir.shape[0] - self.crop + 1)
        left = rng.integers(0, ir.shape[1] - self.crop + 1)
        window = (slice(top, top + self.crop), slice(left, left + self.crop))
        ir, vi = ir[window], vi[window]
        for axis in (0, 1):
            if rng.random() < 0.5:
                ir, vi = np.flip(ir, axis), np.flip(vi, axis)
        ir, vi = _to_unit_float(ir, pair.ir_path), _to_unit_float(vi, pair.vi_path)
        if self.min_gain < 1:
            ir, vi = (image * self._random_gain(rng) for image in (ir, vi))
        return ir, vi

    def _random_gain(self, rng):
        """1 with probability 1/2, else log-uniform in [min_gain, 1] (float32)."""
        if rng.random() < 0.5:
            return np.float32(1)
        return np.float32(np.exp(rng.uniform(np.log(self.min_gain), 0.0)))

    def sample_batch(self, batch_size, rng):
        """``batch_size`` crops of drawn pairs as two float32 (B, 1, crop, crop) tensors.

        Drawing from a generator the caller seeds per step makes a batch a pure function of
        (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
        """
        if self.dataset_balance:
            indices = rng.choice(len(self), batch_size, p=self.pair_probabilities)
        else:  # the draw of the runs before dataset_balance existed, so they still reproduce
            indices = rng.integers(0, len(self), batch_size)
        crops = [self.random_crop(i, rng) for i in indices]
        ir = torch.from_numpy(np.stack([c[0] for c in crops]))[:, None]
        vi = torch.from_numpy(np.stack([c[1] for c in crops]))[:, None]
        return ir, vi
