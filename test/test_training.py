"""Training: data splits and crops, the S4Fusion loss, the training loop and its CLI."""

import errno
import hashlib
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from s4fusion_ros.cli import READER_LEFT
from s4fusion_ros.files import held_folder
from s4fusion_ros.model import CheckpointError, load_checkpoint
from s4fusion_ros.model import S4Fusion, S4FusionConfig
from s4fusion_ros.model.pyramid import laplacian_fuse
from s4fusion_ros.tools.train import build_parser, model_config
from s4fusion_ros.tools import train as train_tool_module
from s4fusion_ros.tools.train import main as train_main
from s4fusion_ros.training import (PairFolderDataset, S4FusionLoss, Trainer, TrainSettings,
                                   ivif_splits, load_exported, pairs_in_folder)
from s4fusion_ros.training.data import (M3SVD_VALIDATION_CLIPS, VIDEO_FRAME_STEP, Pair,
                                        data_layout, m3svd_clip, match_pairs, read_pair_images,
                                        roadscene_clips, roadscene_near, roadscene_test67_names,
                                        training_pairs, video_pairs)
from s4fusion_ros.training import data as data_module
from s4fusion_ros.training import trainer as trainer_module
from s4fusion_ros.training.trainer import check_new_run, lr_factor
from support import (exit_with_stderr_unread, exited, file_size_limit, reading,
                     stop_once_logged, wait_while_running)


class SmallCNN(nn.Module):
    """A randomly initialised stand-in for a pretrained network: two stages and a 5-class head."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Conv2d(1, 4, 3, padding=1)
        self.stage2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        a = torch.relu(self.stage1(x))
        b = torch.relu(self.stage2(a))
        return [a, b], self.head(b.mean((2, 3)))


class Features(nn.Module):
    """The stage features of a SmallCNN, times ``scale``."""

    def __init__(self, net, scale=1.0):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x):
        return [f * self.scale for f in self.net(x)[0]]


class Logits(nn.Module):
    """The class logits of a SmallCNN."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[1]


def export(module, path):
    """Save ``module`` as the CLI's --pretrained-* options expect (dynamic batch and size)."""
    dims = {0: torch.export.Dim('b', min=1, max=64), 2: torch.export.Dim('h', min=8, max=512),
            3: torch.export.Dim('w', min=8, max=512)}
    program = torch.export.export(module.eval(), (torch.rand(2, 1, 25, 25),),
                                  dynamic_shapes=(dims,))
    torch.export.save(program, str(path))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Run single-threaded: on the shared 2-core machine torch's 2 threads spin against other
    processes and small steps get 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def splits(ivif_dir):
    return ivif_splits(ivif_dir)


@pytest.fixture(scope='module')
def crops(splits):
    """16 real 97-pixel training crops (IR, VI), each (16, 1, 97, 97)."""
    return PairFolderDataset(splits.train, 97).sample_batch(16, np.random.default_rng(1))


# --- data ---------------------------------------------------------------------------------------

def test_split_sizes(splits):
    # RoadScene less validation, MSRS train split, 7 M3SVD frame clips of 10, every 10th of 1913
    # video frames
    assert len(splits.train) == 134 + 4 + 70 + 193
    assert {k: len(v) for k, v in splits.tests.items()} == {
        'roadscene67': 67, 'tno42': 42, 'msrs22': 22}
    assert {k: len(v) for k, v in splits.validation.items()} == {
        'm3svd_val': 20, 'roadscene_val': 20}
    msrs_train = {p.name for p in splits.train if p.label.startswith('msrs/')}
    assert msrs_train == {'00556D.png', '00633D.png', '00881N.png', '01023N.png'}
    assert {'00537D.png', '00858N.png'} <= {p.name for p in splits.tests['msrs22']}


def test_m3svd_is_split_by_clip(splits):
    """Whole clips train or validate, never frames of one clip on both sides."""
    train_clips = {m3svd_clip(p) for p in splits.train if p.dataset.parent.name == 'm3svd'}
    val_clips = {m3svd_clip(p) for p in splits.validation['m3svd_val']}
    assert val_clips == set(M3SVD_VALIDATION_CLIPS) and len(val_clips) >= 2
    assert not train_clips & val_clips
    assert len(train_clips) == 7 + 4  # 0111_1716 is a frame clip and a video
    videos = [p for p in splits.train if p.frame is not None]
    assert {p.frame for p in videos} == set(range(0, 590, VIDEO_FRAME_STEP))
    # The split of clips' frames names each pair's clip, for statistics that resample clips.
    assert splits.clips['m3svd_val'] == tuple(map(m3svd_clip, splits.validation['m3svd_val']))
    assert sorted(set(splits.clips['m3svd_val'])) == sorted(M3SVD_VALIDATION_CLIPS)


def test_roadscene_splits_name_the_clip_of_the_drive_of_each_pair(splits):
    """RoadScene's frames numbered within ROADSCENE_CLIP_GAP of the one before are one clip."""
    test67 = splits.clips['roadscene67']
    assert len(test67) == 67 and len(set(test67)) == 46
    named = dict(zip((p.name for p in splits.tests['roadscene67']), test67))
    # Frames 4208, 4215 and 4229 of the drive are one clip; 4269, 40 frames later, starts one.
    assert named['FLIR_04208.jpg'] == named['FLIR_04215.jpg'] == named['FLIR_04229.jpg'] \
        == 'FLIR_04208' != named['FLIR_04269.jpg'] == 'FLIR_04269'
    # Every 8th training pair by name: no two are as near, so each is its own clip; but nine
    # lie as near to a test frame (the report says which).
    assert splits.clips['roadscene_val'] == roadscene_clips(splits.validation['roadscene_val'])
    assert len(set(splits.clips['roadscene_val'])) == 20
    near = roadscene_near(splits.validation['roadscene_val'], splits.tests['roadscene67'])
    assert len(near) == 9 and 'FLIR_08248.jpg' in near  # 28 frames after test FLIR_08220


def test_roadscene_clips_start_anew_after_a_gap_or_in_another_series():
    names = ['FLIR_00001.jpg', 'FLIR_00031.jpg', 'FLIR_00062.jpg', 'FLIR_video_00063.jpg',
             'FLIR_video_00070.jpg', 'notes.png']
    pairs = [Pair(name, None, None) for name in names]
    assert roadscene_clips(pairs) == ('FLIR_00001', 'FLIR_00001', 'FLIR_00062', 'FLIR_video_00063',
                                      'FLIR_video_00063', 'notes')
    # Numbers compare as numbers, in frame order, whatever the order or padding of the names.
    unpadded = [Pair(name, None, None) for name in ['FLIR_10.jpg', 'FLIR_1000.jpg', 'FLIR_200.jpg',
                                                    'FLIR_30.jpg', 'FLIR_999.jpg']]
    assert roadscene_clips(unpadded) == ('FLIR_10', 'FLIR_999', 'FLIR_200', 'FLIR_10', 'FLIR_999')
    assert roadscene_near(pairs, unpadded[:1]) == ['FLIR_00001.jpg', 'FLIR_00031.jpg']
    # Near as the clips count it: 30 frames apart is one clip, and so near.
    assert roadscene_near(pairs[1:3], pairs[:1]) == ['FLIR_00031.jpg']


def test_a_validation_clip_that_is_also_a_video_is_refused(ivif_dir, monkeypatch):
    # Its frames would validate while every 10th frame of its video trained. 0111_1716 is a
    # frame clip and a video of the layout.
    monkeypatch.setattr(data_module, 'M3SVD_VALIDATION_CLIPS', ('0111_1753', '0111_1716'))
    with pytest.raises(ValueError, match='validation clip is also a video clip'):
        ivif_splits(ivif_dir)


def test_video_frames_read_as_the_video_decodes_them(splits):
    pair = next(p for p in splits.train if p.frame == 20)
    (ir, vi), = read_pair_images([pair])
    capture = cv2.VideoCapture(str(pair.vi_path))
    for _ in range(pair.frame + 1):
        ok, frame = capture.read()
    capture.release()
    assert ok and ir.shape == vi.shape == (480, 640)
    np.testing.assert_array_equal(vi, cv2.cvtColor(frame, cv2.COLOR_BGR2YCrCb)[:, :, 0])
    assert ir.dtype == vi.dtype == np.uint8 and ir.std() > 5


def test_a_video_without_its_partner_is_refused_by_name(tmp_path, ivif_dir):
    # An IR video alone was refused, a visible one alone was left out without a word.
    videos = ivif_dir / 'm3svd' / 'videos'
    for side in ('ir', 'vi'):
        (tmp_path / side).mkdir()
        (tmp_path / side / '1230_1202.mp4').symlink_to(videos / side / '1230_1202.mp4')
    (tmp_path / 'vi' / '0111_1716.mp4').symlink_to(videos / 'vi' / '0111_1716.mp4')
    with pytest.raises(FileNotFoundError, match='0111_1716.mp4'):
        video_pairs(tmp_path)


def test_no_overlap_between_training_and_tests_by_name_and_pixels(splits, ivif_dir):
    train_labels = {p.label for p in splits.train}
    held_out = [*splits.tests.values(), *splits.validation.values()]
    for pairs in held_out:
        assert not train_labels & {p.label for p in pairs}
    # Five S4Fusion test names (FLIR_*) are FLIR_video_* files here; the CSV maps them.
    train_names = {p.name for p in splits.train}
    assert not train_names & set(roadscene_test67_names(ivif_dir))
    assert 'FLIR_video_00248.jpg' not in train_names
    # FLIR_04215 (test) and FLIR_video_04215 (train) are different images, not a renamed copy.
    assert 'FLIR_video_04215.jpg' in train_names

    def hashes(pairs):
        images = (image for pair in read_pair_images(pairs) for image in pair)
        return {hashlib.sha256(im.tobytes() + str(im.shape).encode()).hexdigest() for im in images}

    train = hashes(splits.train)
    assert len(train) == 2 * len(splits.train)
    for pairs in held_out:
        assert not train & hashes(pairs)


def test_luminance_of_gray_rgb_and_colour_images(splits):
    tno = PairFolderDataset(splits.tests['tno42'][:1])
    ir, _ = tno[0]
    gray = cv2.imread(str(tno.pairs[0].ir_path), cv2.IMREAD_GRAYSCALE)
    assert cv2.imread(str(tno.pairs[0].ir_path), cv2.IMREAD_UNCHANGED).ndim == 3
    np.testing.assert_array_equal(ir, gray.astype(np.float32) / 255)

    road = PairFolderDataset(splits.train[:1])
    _, vi = road[0]
    b, g, r = cv2.imread(str(road.pairs[0].vi_path), cv2.IMREAD_COLOR).astype(np.float64).T
    y = (0.299 * r + 0.587 * g + 0.114 * b).T / 255
    assert vi.dtype == np.float32 and vi.shape == y.shape
    assert np.abs(vi - y).max() <= 1 / 255 + 1e-6


def test_crops_share_window_and_flips(tmp_path, ivif_dir):
    # The same image as IR and VI: every crop pair must be identical, and a window of the image.
    for side in ('ir', 'vi'):
        (tmp_path / side).mkdir()
        shutil.copy(ivif_dir / 'msrs' / 'ir' / '00055D.png', tmp_path / side / 'a.png')
    dataset = PairFolderDataset(pairs_in_folder(tmp_path), 25)
    image, _ = dataset[0]
    rng = np.random.default_rng(0)
    flips = set()
    for _ in range(40):
        ir, vi = dataset.random_crop(0, rng)
        np.testing.assert_array_equal(ir, vi)
        assert ir.shape == (25, 25) and ir.dtype == np.float32
        for flip in ((), (0,), (1,), (0, 1)):
            unflipped = np.flip(ir, flip) if flip else ir
            hits = cv2.matchTemplate(image, np.ascontiguousarray(unflipped), cv2.TM_SQDIFF)
            if hits.min() < 1e-3:
                flips.add(flip)
    assert len(flips) == 4  # every flip combination occurs and each crop was found in the image
    ir, vi = dataset.sample_batch(3, rng)
    assert ir.shape == vi.shape == (3, 1, 25, 25) and ir.dtype == torch.float32


def test_crops_reach_every_window_of_a_wide_16_bit_image(tmp_path):
    # Each pixel holds its own position, growing along rows and columns, so a crop's smallest
    # value names its window's top-left corner whatever the flips; 16-bit, scaled by 1 / 65535.
    # Every top row and every left column of a window must occur, the last ones too.
    rows, cols, crop = 40, 60, 25
    image = (np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) + 1) * 20
    for side in ('ir', 'vi'):
        (tmp_path / side).mkdir()
        cv2.imwrite(str(tmp_path / side / 'a.png'), image)
    dataset = PairFolderDataset(pairs_in_folder(tmp_path), crop)
    rng = np.random.default_rng(0)
    corners = set()
    for _ in range(600):
        ir, _ = dataset.random_crop(0, rng)
        assert ir.max() <= 1
        corners.add(divmod(round(float(ir.min()) * 65535 / 20) - 1, cols))
    tops, lefts = map(set, zip(*corners))
    assert tops == set(range(rows - crop + 1)) and lefts == set(range(cols - crop + 1))


def test_gain_augmentation_scales_each_source_on_its_own(tmp_path, ivif_dir):
    # The same image as IR and VI: a crop pair differs only by the ratio of the two gains.
    for side in ('ir', 'vi'):
        (tmp_path / side).mkdir()
        shutil.copy(ivif_dir / 'msrs' / 'vi' / '00055D.png', tmp_path / side / 'a.png')
    dataset = PairFolderDataset(pairs_in_folder(tmp_path), 25, min_gain=0.2)
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(400):
        ir, vi = dataset.random_crop(0, rng)
        assert ir.dtype == vi.dtype == np.float32 and 0 <= min(ir.min(), vi.min())
        ratio = float(vi.sum() / ir.sum())
        np.testing.assert_allclose(vi, ir * ratio, rtol=1e-5, atol=1e-6)
        ratios.append(ratio)
    ratios = np.array(ratios)
    assert 0.2 - 1e-4 <= ratios.min() and ratios.max() <= 5 + 1e-3
    assert (ratios < 0.4).any() and (ratios > 2.5).any()
    assert 0.15 < np.isclose(ratios, 1, rtol=1e-6).mean() < 0.35  # both gains 1: p = 1/4
    # Log-uniform: |log g| is uniform on [0, log 5], mean log(5) / 2 where one source has a gain,
    # and |log g1 - log g2| has mean log(5) / 3 where both have (2 to 1): 0.72 (0.53 for a gain
    # uniform in [0.2, 1]).
    scaled = np.abs(np.log(ratios[~np.isclose(ratios, 1, rtol=1e-6)]))
    assert scaled.mean() == pytest.approx(np.log(5) * (2 / 3 / 2 + 1 / 3 / 3), abs=0.07)
    with pytest.raises(ValueError, match='min_gain'):
        PairFolderDataset(pairs_in_folder(tmp_path), 25, min_gain=0)


def test_dataset_balance_shifts_the_draw_towards_the_small_dataset(tmp_path):
    # Three pairs in 'big', one in 'small'; every image is flat at its own gray level, so a crop
    # tells which pair it came from.
    pairs = []
    for dataset, levels in (('big', (10, 20, 30)), ('small', (40,))):
        for side in ('ir', 'vi'):
            (tmp_path / dataset / side).mkdir(parents=True)
            for level in levels:
                cv2.imwrite(str(tmp_path / dataset / side / f'{level}.png'),
                            np.full((30, 30), level, np.uint8))
        pairs += pairs_in_folder(tmp_path / dataset)
    draws = 4000
    for balance, small_share in ((0.0, 1 / 4), (0.5, 1 / (1 + 3 ** 0.5)), (1.0, 1 / 2)):
        dataset = PairFolderDataset(pairs, 25, dataset_balance=balance)
        assert dataset.pair_probabilities.sum() == pytest.approx(1)
        assert dataset.pair_probabilities[-1] == pytest.approx(small_share)
        ir, _ = dataset.sample_batch(draws, np.random.default_rng(0))
        levels = np.rint(ir[:, 0, 0, 0].numpy() * 255).astype(int)
        big = levels[levels < 40]
        assert abs((levels == 40).mean() - small_share) < 0.03
        assert all(abs((big == level).mean() - 1 / 3) < 0.04 for level in (10, 20, 30))
    for balance in (1.5, -0.5):
        with pytest.raises(ValueError, match='dataset_balance'):
            PairFolderDataset(pairs, 25, dataset_balance=balance)


def test_a_folder_of_datasets_named_like_the_ivif_ones_is_read_as_datasets(tmp_path, ivif_dir):
    for dataset in ('roadscene', 'mine'):
        for side in ('ir', 'vi'):
            (tmp_path / dataset / side).mkdir(parents=True)
            cv2.imwrite(str(tmp_path / dataset / side / f'{dataset}.png'),
                        np.zeros((30, 30), np.uint8))
    assert data_layout(tmp_path) == 'datasets' and data_layout(tmp_path / 'mine') == 'pairs'
    assert [pair.name for pair in training_pairs(tmp_path)] == ['mine.png', 'roadscene.png']
    assert data_layout(ivif_dir) == 'ivif'


def test_subfolders_a_folder_of_datasets_does_not_read_are_named(tmp_path, pair_folder, capsys):
    data = tmp_path / 'data'
    shutil.copytree(pair_folder, data / 'day')
    shutil.copytree(pair_folder / 'ir', data / 'night' / 'IR')  # misspelt: not read
    (data / '.cache').mkdir()
    assert train_main(['--data', str(data), '--out', str(tmp_path / 'run'), '--steps', '1',
                       '--batch-size', '1', '--crop', '25', '--device', 'cpu', '--threads',
                       '1', '--no-progress']) == 0
    assert (f'warning: 1 subfolder(s) of {data} hold no ir/ folder and are not read: night\n'
            in capsys.readouterr().err)


def test_a_dataset_without_images_directly_in_its_ir_and_vi_is_refused_by_name(tmp_path):
    # Before, such a dataset in a folder of datasets trained nothing unnoticed, and a folder of
    # pairs alone failed with 'no training pairs', naming neither the folder nor why.
    data = tmp_path / 'data'
    for side in ('ir', 'vi'):
        for folder in (data / 'day' / side, data / 'night' / side / 'seq1'):
            folder.mkdir(parents=True)
            cv2.imwrite(str(folder / '0001.png'), np.zeros((30, 30), np.uint8))
    for given in (data, data / 'night'):
        with pytest.raises(ValueError, match=re.escape(
                f'{data / "night"}: no image pairs in its ir/ and vi/ (image files directly')):
            training_pairs(given)


def test_small_images_are_reflect_padded(tmp_path, ivif_dir):
    image = cv2.imread(str(ivif_dir / 'msrs' / 'ir' / '00004N.png'), cv2.IMREAD_GRAYSCALE)
    image = image[200:220, 300:330]  # 20 x 30, with structure
    for side in ('ir', 'vi'):
        (tmp_path / side).mkdir()
        cv2.imwrite(str(tmp_path / side / 'small.png'), image)
    crop, _ = PairFolderDataset(pairs_in_folder(tmp_path), 37).random_crop(
        0, np.random.default_rng(3))
    padded = np.pad(image, ((8, 9), (3, 4)), mode='reflect').astype(np.float32) / 255
    assert any(np.array_equal(crop, np.flip(padded, f) if f else padded)
               for f in ((), (0,), (1,), (0, 1)))


def test_bad_crop_and_unpaired_files_are_rejected(tmp_path, splits):
    for crop in (96, 1):  # 1 is 12k + 1 too, but smaller than SSIM's 11-pixel window
        with pytest.raises(ValueError, match='12k'):
            PairFolderDataset(splits.train[:1], crop)
    for side in ('ir', 'vi'):
        (tmp_path / side).mkdir()
    cv2.imwrite(str(tmp_path / 'ir' / 'lonely.png'), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match='lonely.png'):
        pairs_in_folder(tmp_path)


def test_pairs_match_by_name_then_by_stem_where_one_file_each_side_has_it(tmp_path):
    files = {'ir': ['a.png', 'b.png', 'c.png', 'd.png'],
             'vi': ['a.png', 'a.jpg', 'b.jpg', 'c.jpg', 'c.bmp', 'e.png']}
    for side, names in files.items():
        (tmp_path / side).mkdir()
        for name in names:
            cv2.imwrite(str(tmp_path / side / name), np.zeros((4, 4), np.uint8))
    pairs, unmatched = match_pairs(tmp_path / 'ir', tmp_path / 'vi')
    # a: the same name wins over the same stem; c: two visible files could be its partner.
    assert [(p.name, p.vi_path.name) for p in pairs] == [('a.png', 'a.png'), ('b.png', 'b.jpg')]
    ambiguous = ' (several files share its name but for the extension)'
    assert unmatched == [str(tmp_path / 'ir' / 'c.png') + ambiguous, str(tmp_path / 'ir/d.png'),
                         str(tmp_path / 'vi/a.jpg'), str(tmp_path / 'vi/c.bmp') + ambiguous,
                         str(tmp_path / 'vi/c.jpg') + ambiguous, str(tmp_path / 'vi/e.png')]


def test_hidden_files_are_no_pairs(tmp_path):
    # An archive made on a Mac holds an AppleDouble ._NAME.png (not an image) beside each image.
    for side in ('ir', 'vi'):
        (tmp_path / side).mkdir()
        cv2.imwrite(str(tmp_path / side / '00004N.png'), np.zeros((4, 4), np.uint8))
        (tmp_path / side / '._00004N.png').write_bytes(b'\x00\x05\x16\x07')
    (tmp_path / 'vi' / '.hidden.png').write_bytes(b'')
    pairs, unmatched = match_pairs(tmp_path / 'ir', tmp_path / 'vi')
    assert [pair.name for pair in pairs] == ['00004N.png'] and unmatched == []


# --- loss ---------------------------------------------------------------------------------------

def test_ssim_is_one_for_identical_real_crops(crops):
    loss = S4FusionLoss()
    ir, vi = crops
    torch.testing.assert_close(loss.ssim(vi, vi), torch.ones(16), rtol=0, atol=1e-5)
    noisy = vi + 0.05 * torch.randn(vi.shape, generator=torch.Generator().manual_seed(0))
    assert (loss.ssim(vi, noisy) < 0.95).all()
    assert (loss.ssim(ir, vi) < 0.9).all()


def test_ssim_matches_wangs_definition_in_float64(crops):
    # Identical images score 1 whatever the window, padding or constants: this pins them. Wang et
    # al.: 11x11 Gaussian of sigma 1.5, population moments, C1 = (0.01 L)^2, C2 = (0.03 L)^2 with
    # L = 1 for [0, 1] images, averaged over the positions where the window fits the image.
    ir, vi = (c[:4, 0, :40, :40].double().numpy() for c in crops)
    taps = np.exp(-(np.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    window = np.outer(taps, taps) / np.outer(taps, taps).sum()

    def mean(a):
        return (np.lib.stride_tricks.sliding_window_view(a, (11, 11), (1, 2)) * window).sum((3, 4))

    def ssim(x, y):
        mx, my = mean(x), mean(y)
        vx, vy, cov = mean(x * x) - mx ** 2, mean(y * y) - my ** 2, mean(x * y) - mx * my
        return ((2 * mx * my + 1e-4) * (2 * cov + 9e-4)
                / ((mx ** 2 + my ** 2 + 1e-4) * (vx + vy + 9e-4))).mean((1, 2))

    shifted = np.roll(vi, 3, axis=2) * 0.7
    loss = S4FusionLoss()
    for x, y in ((ir, vi), (vi, shifted)):
        expected = torch.from_numpy(ssim(x, y))
        x, y = torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None]
        # float64 holds the definition (the window is stored as float32); float32, as training
        # runs it, loses a few 1e-5 to the variances' cancellation, against constants of 1e-4.
        torch.testing.assert_close(loss.ssim(x, y), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(loss.ssim(x.float(), y.float()), expected.float(), rtol=0,
                                   atol=1e-4)


def test_weights_sum_to_one_and_favour_the_sharper_source(crops):
    loss = S4FusionLoss()
    _, vi = crops
    blurred = torch.from_numpy(np.stack([cv2.GaussianBlur(v[0].numpy(), (0, 0), 2.0)
                                         for v in vi]))[:, None]
    weights = loss.source_weights(blurred, vi)
    assert weights.shape == (16, 2)
    torch.testing.assert_close(weights.sum(1), torch.ones(16))
    assert (weights[:, 1] > weights[:, 0]).all()
    assert (loss.source_weights(vi, blurred)[:, 0] > 0.5).all()
    sharp = S4FusionLoss(temperature=0.25).source_weights(blurred, vi)
    assert (sharp[:, 1] > weights[:, 1]).all()  # lower temperature, firmer choice


def _sobel(image):
    """Sobel d/dx and d/dy of a float64 (H, W) image, replicated border, as OpenCV takes them."""
    return [cv2.Sobel(image, cv2.CV_64F, dx, 1 - dx, borderType=cv2.BORDER_REPLICATE)
            for dx in (1, 0)]


def _halved(image):
    """The mean of each 2x2 block (an odd last row or column dropped)."""
    h, w = image.shape[0] // 2, image.shape[1] // 2
    return image[:2 * h, :2 * w].reshape(h, 2, w, 2).mean((1, 3))


def test_loss_terms_are_the_documented_ones_with_their_weights(crops):
    # total = ssim_weight sum_s w_s (1 - SSIM(F, S)) + l1_weight sum_s w_s |F - S| + grad_weight
    # |Sobel(F) - max(Sobel(IR), Sobel(VI))|, with w_s the softmax (c = 1: proportional) of each
    # source's mean squared Sobel magnitude averaged over three pyramid scales: computed here
    # with OpenCV in float64, on a fused image with edges of its own.
    ir, vi = (c[:4] for c in crops)
    fused = torch.from_numpy(np.stack([cv2.GaussianBlur(i[0].numpy(), (0, 0), 1.5)
                                       for i in ir]))[:, None] * 0.6 + 0.4 * vi

    def energy(image):
        levels = [image, _halved(image), _halved(_halved(image))]
        return np.mean([sum(g ** 2 for g in _sobel(level)).mean() for level in levels])

    def gradient(image):
        return sum(np.abs(g) for g in _sobel(image))

    weights = [(e[0] / sum(e), e[1] / sum(e)) for e in (
        [energy(s[k, 0].double().numpy()) for s in (ir, vi)] for k in range(4))]
    loss = S4FusionLoss(ssim_weight=3.0, l1_weight=5.0, grad_weight=7.0)
    total, terms = loss(fused, ir, vi)
    ssim_ir, ssim_vi = loss.ssim(fused, ir), loss.ssim(fused, vi)  # pinned by Wang's test above
    f, a, b = (x[:, 0].double().numpy() for x in (fused, ir, vi))
    expected = {
        'w_ir': np.mean([w_ir for w_ir, _ in weights]),
        'ssim': np.mean([w_ir * (1 - float(ssim_ir[k])) + w_vi * (1 - float(ssim_vi[k]))
                         for k, (w_ir, w_vi) in enumerate(weights)]),
        'l1': np.mean([w_ir * np.abs(f[k] - a[k]).mean() + w_vi * np.abs(f[k] - b[k]).mean()
                       for k, (w_ir, w_vi) in enumerate(weights)]),
        'grad': np.mean([np.abs(gradient(f[k]) - np.maximum(gradient(a[k]), gradient(b[k])))
                         .mean() for k in range(4)]),
    }
    assert 0.05 < expected['w_ir'] < 0.95
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-4), name
    assert float(total) == pytest.approx(
        3 * expected['ssim'] + 5 * expected['l1'] + 7 * expected['grad'], rel=1e-4)


def test_two_featureless_sources_weigh_alike_and_the_loss_stays_finite(crops):
    # A crop where both sources are flat (a saturated thermal patch over a black visible one at
    # night) has no gradient energy: the log of 0 would make the weights, and the step, NaN.
    _, vi = crops
    black, saturated = torch.zeros_like(vi), torch.ones_like(vi)
    torch.testing.assert_close(S4FusionLoss().source_weights(saturated, black),
                               torch.full((16, 2), 0.5))
    total, _ = S4FusionLoss()(vi, saturated, black)
    assert math.isfinite(float(total))


def test_loss_vanishes_for_identical_sources_and_favours_max_gradient(crops):
    loss = S4FusionLoss()
    ir, vi = crops
    total, terms = loss(vi, vi, vi)
    assert float(total) < 1e-5
    # A flat IR has no gradient energy: the target is then VI itself, which costs (almost) nothing.
    flat = torch.full_like(vi, 0.5)
    total, terms = loss(vi, flat, vi)
    assert terms['grad'] == 0 and float(terms['w_ir']) < 1e-6 and float(total) < 1e-5
    assert float(loss(flat, flat, vi)[0]) > 0.1
    # On real pairs, the elementwise max-gradient target is hit by neither source alone.
    grads = [float(loss(f, ir, vi)[1]['grad']) for f in (ir, vi, (ir + vi) / 2)]
    assert min(grads) > 0.01


def test_gradients_flow_to_the_fused_image(crops):
    ir, vi = crops
    fused = ((ir + vi) / 2).requires_grad_()
    total, terms = S4FusionLoss()(fused, ir, vi)
    total.backward()
    assert torch.isfinite(fused.grad).all() and fused.grad.abs().sum() > 0
    assert set(terms) == {'ssim', 'l1', 'grad', 'w_ir'}
    assert all(not v.requires_grad for v in terms.values())


def test_max_intensity_term_is_off_by_default_and_adds_l1_to_the_brighter_source(crops):
    ir, vi = crops
    fused = (ir + vi) / 2
    plain_total, plain = S4FusionLoss()(fused, ir, vi)
    total, terms = S4FusionLoss(max_intensity_weight=3.0)(fused, ir, vi)
    assert 'max_intensity' not in plain and S4FusionLoss().config()['max_intensity_weight'] == 0
    brighter = torch.maximum(ir, vi)
    torch.testing.assert_close(terms['max_intensity'], (fused - brighter).abs().mean())
    torch.testing.assert_close(total, plain_total + 3.0 * terms['max_intensity'])
    assert float(terms['max_intensity']) > 0.01  # the average is below the brighter source
    assert float(S4FusionLoss(max_intensity_weight=3.0)(brighter, ir, vi)[1]['max_intensity']) == 0


class Average(nn.Module):
    """A fixed fusion network: the mean of the sources."""

    def forward(self, ir, vi):
        return (ir + vi) / 2


def test_teacher_term_pulls_towards_the_teachers_image_and_gradients(crops):
    ir, vi = crops
    taught = (ir + vi) / 2
    plain = S4FusionLoss()
    distilling = S4FusionLoss(teacher=Average(), teacher_weight=4.0)
    fused = ir.clone().requires_grad_()
    total, terms = distilling(fused, ir, vi)
    expected = ((ir - taught).abs().mean()
                + (plain.gradient(ir) - plain.gradient(taught)).abs().mean())
    torch.testing.assert_close(terms['teacher'], expected)
    torch.testing.assert_close(total, plain(ir, ir, vi)[0] + 4.0 * expected)
    total.backward()
    assert fused.grad.abs().sum() > 0
    assert float(distilling(taught, ir, vi)[1]['teacher']) == 0
    assert distilling.config()['teacher_weight'] == 4.0 and 'teacher_weight' not in plain.config()
    # The record names the teacher by its state: another teacher, another record.
    other = S4FusionLoss(teacher=nn.Conv2d(1, 1, 1), teacher_weight=4.0).config()
    assert other['teacher_sha256'] != distilling.config()['teacher_sha256']
    # The same weights at another detail gain are another teacher.
    torch.manual_seed(0)
    teacher = S4Fusion(S4FusionConfig.preset('compact')).eval()
    digests = {S4FusionLoss(teacher=teacher.set_detail_gain(gain), teacher_weight=1.0)
               .config()['teacher_sha256'] for gain in (1.0, 1.15)}
    assert len(digests) == 2
    with pytest.raises(ValueError, match='teacher'):
        S4FusionLoss(teacher_weight=1.0)
    with pytest.raises(ValueError, match='teacher'):
        S4FusionLoss(teacher=Average())
    with pytest.raises(ValueError, match='teacher'):
        S4FusionLoss(teacher=Average(), teacher_weight=-1.0)
    with pytest.raises(ValueError, match='teacher_edges'):
        S4FusionLoss(teacher=Average(), teacher_weight=1.0, teacher_edges='signed')
    with pytest.raises(ValueError, match="teacher_edges 'components' .* there is none"):
        S4FusionLoss(teacher_edges='components')


def test_teacher_edge_components_see_an_edge_the_magnitudes_miss():
    # A vertical step and its mirror image: the same gradient magnitudes everywhere, opposite
    # signs. Comparing magnitudes calls them equal; comparing components does not.
    ramp = torch.zeros(1, 1, 16, 16)
    ramp[..., 8:] = 1.0
    mirrored = 1.0 - ramp
    by_magnitude = S4FusionLoss(teacher=Average(), teacher_weight=1.0)
    by_components = S4FusionLoss(teacher=Average(), teacher_weight=1.0,
                                 teacher_edges='components')
    mirrored_xy, ramp_xy = by_components.sobel_xy(mirrored), by_components.sobel_xy(ramp)
    assert float(by_magnitude.edge_error(mirrored_xy, ramp)) == 0
    sobel_step = 4.0  # |d/dx| of a unit step under the Sobel kernel, on its two edge columns
    torch.testing.assert_close(by_components.edge_error(mirrored_xy, ramp),
                               torch.tensor(2 * sobel_step * 2 / 16))
    assert float(by_components.edge_error(ramp_xy, ramp)) == 0
    assert by_components.config()['teacher_edges'] == 'components'
    assert by_magnitude.config()['teacher_edges'] == 'magnitude'


def test_feature_energy_matches_pyramid_and_is_scale_free(crops):
    ir, vi = crops

    class Pyramid(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, x):
            return [x * self.scale, nn.functional.avg_pool2d(x, 2) * self.scale]

    expected = S4FusionLoss(scales=2).source_weights(ir, vi)
    for scale in (1.0, 1000.0):
        weights = S4FusionLoss(feature_extractor=Pyramid(scale)).source_weights(ir, vi)
        torch.testing.assert_close(weights, expected)


def test_pretrained_terms_with_an_exported_network(tmp_path, crops):
    ir, vi = crops
    torch.manual_seed(0)
    net = SmallCNN()
    features = load_exported(export(Features(net, scale=50.0), tmp_path / 'f.pt2'), 'cpu')
    classifier = load_exported(export(Logits(net), tmp_path / 'c.pt2'), 'cpu')
    loss = S4FusionLoss(feature_extractor=features, classifier=classifier)
    weights = loss.source_weights(ir, vi)
    torch.testing.assert_close(weights, S4FusionLoss(feature_extractor=Features(net))
                               .source_weights(ir, vi))
    fused = ((ir + vi) / 2).requires_grad_()
    total, terms = loss(fused, ir, vi)
    logits = Logits(net)(fused.detach())
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(terms['entropy'], -(p * p.log()).sum(1).mean())
    plain, _ = S4FusionLoss()(fused.detach(), ir, vi)
    assert 0 < float(terms['entropy']) <= math.log(5)
    total.backward()
    assert fused.grad.abs().sum() > 0
    assert all(p.grad is None for p in classifier.parameters())  # frozen
    assert not torch.isclose(total.detach(), plain)  # the entropy term counts
    # The record names the networks, so a resume with other ones is refused as other settings.
    other = load_exported(export(Features(SmallCNN(), scale=50.0), tmp_path / 'g.pt2'), 'cpu')
    recorded = loss.config()
    assert recorded['classifier_sha256'] and recorded['features_sha256'] != \
        S4FusionLoss(feature_extractor=other).config()['features_sha256']


# --- training -----------------------------------------------------------------------------------

def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(s, warmup=4, total=20, min_ratio=0.01) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert math.isclose(factors[-1], 0.01)


def test_the_one_step_after_the_warm_up_is_at_the_cosines_end():
    # --steps 6 --warmup 5: the sixth step ran at the peak lr, not at min_lr_ratio of it.
    factors = [lr_factor(s, warmup=5, total=6, min_ratio=0.01) for s in range(6)]
    assert factors[4] == 1.0 and math.isclose(factors[-1], 0.01)


def make_trainer(pair_folder, out, seed=0):
    settings = TrainSettings(steps=3, batch_size=2, crop=25, lr=1e-3, seed=seed)
    dataset = PairFolderDataset(pairs_in_folder(pair_folder), 25, settings.min_gain)
    return Trainer(S4FusionConfig.preset('compact'), dataset, S4FusionLoss(), out, settings,
                   'cpu', deviation='test run')


def test_a_distillation_from_before_teacher_edges_resumes_as_magnitudes(tmp_path, pair_folder):
    settings = TrainSettings(steps=2, batch_size=2, crop=25, lr=1e-3)
    dataset = PairFolderDataset(pairs_in_folder(pair_folder), 25, settings.min_gain)

    def trainer(edges):
        loss = S4FusionLoss(teacher=Average(), teacher_weight=1.0, teacher_edges=edges)
        return Trainer(S4FusionConfig.preset('compact'), dataset, loss, tmp_path, settings, 'cpu',
                       deviation='test run')

    trainer('magnitude').run(stop_at=1, progress=False)
    state_path = tmp_path / 'train_state.pt'
    state = torch.load(state_path, weights_only=True)
    identity = json.loads(state['identity'])
    del identity['loss']['teacher_edges']  # as such runs wrote it
    torch.save({**state, 'identity': json.dumps(identity)}, state_path)
    with pytest.raises(ValueError, match='loss'):
        trainer('components').resume()
    assert trainer('magnitude').resume() == 1


def test_training_writes_weights_log_and_resumes_exactly(tmp_path, pair_folder):
    full = make_trainer(pair_folder, tmp_path / 'full')
    records = full.run(progress=False)
    assert [r['step'] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r['loss']) and r['loss'] > 0 for r in records)

    weights = tmp_path / 'full' / 's4fusion_compact.safetensors'
    model = load_checkpoint(weights)
    meta = json.loads(weights.with_suffix('.json').read_text())['training']
    assert meta['steps_done'] == 3 and meta['crop'] == 25 and meta['seed'] == 0
    assert meta['data'] == ['pairs/00004N.png', 'pairs/00055D.png']
    assert meta['loss']['ssim_weight'] == 1.0 and meta['deviation'] == 'test run'
    assert meta['cpu_threads'] == torch.get_num_threads()
    log = [json.loads(line) for line in (tmp_path / 'full' / 'train_log.jsonl').open()]
    assert [r['step'] for r in log] == [1, 2, 3]
    assert {'lr', 'loss', 'ssim', 'l1', 'grad', 'w_ir', 'seconds'} <= set(log[0])

    interrupted = make_trainer(pair_folder, tmp_path / 'split')
    assert [r['step'] for r in interrupted.run(stop_at=2, progress=False)] == [1, 2]
    resumed = make_trainer(pair_folder, tmp_path / 'split')
    assert resumed.resume() == 2
    (record,) = resumed.run(progress=False)
    assert record['step'] == 3
    assert record['loss'] == pytest.approx(records[-1]['loss'], rel=1e-6, abs=1e-9)
    for name, tensor in load_checkpoint(tmp_path / 'split' / weights.name).state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=1e-5, atol=1e-7)
    split_log = (tmp_path / 'split' / 'train_log.jsonl').read_text().splitlines()
    assert [json.loads(line)['step'] for line in split_log] == [1, 2, 3]
    # A log whose last line a crash tore (cut short, NUL bytes) still resumes; the log ends there.
    for torn in ('{"step": 3, "lo', '\0' * 16):
        with (tmp_path / 'split' / 'train_log.jsonl').open('a') as f:
            f.write(torn)
        assert make_trainer(pair_folder, tmp_path / 'split').resume() == 3
        split_log = (tmp_path / 'split' / 'train_log.jsonl').read_text().splitlines()
        assert [json.loads(line)['step'] for line in split_log] == [1, 2, 3]

    with pytest.raises(ValueError, match='settings'):
        make_trainer(pair_folder, tmp_path / 'split', seed=1).resume()
    # A state written before a config field existed (so at its default) still resumes.
    older_config = S4FusionConfig.from_dict({**resumed.config.to_dict(), 'detail_gain': 1.0})
    state_path = tmp_path / 'split' / 'train_state.pt'
    state = torch.load(state_path, weights_only=True)
    identity = json.loads(state['identity'])
    identity['model'] = {k: v for k, v in older_config.to_dict().items() if k != 'detail_gain'}
    torch.save({**state, 'identity': json.dumps(identity)}, state_path)
    older = Trainer(older_config, resumed.dataset, S4FusionLoss(), tmp_path / 'split',
                    resumed.settings, 'cpu', deviation='test run')
    assert older.resume() == 3
    with pytest.raises(FileExistsError):
        make_trainer(pair_folder, tmp_path / 'split').run(progress=False)


def test_the_default_warm_up_is_5_percent_of_the_steps_from_1_to_500():
    assert [TrainSettings(steps=steps).warmup_steps for steps in (3, 40, 1000, 20000)] == [
        1, 2, 50, 500]
    assert TrainSettings(steps=5, warmup_steps=5).warmup_steps == 5  # peaks at the last step


def test_a_zero_warm_up_the_weights_dtype_and_the_threads_reach_the_run(tmp_path, pair_folder):
    # --warmup 0 (fine-tuning) is allowed: only a negative one is refused.
    out = tmp_path / 'run'
    assert train_main(['--data', str(pair_folder), '--out', str(out), '--steps', '2',
                       '--batch-size', '1', '--crop', '25', '--device', 'cpu', '--threads', '2',
                       '--no-progress', '--warmup', '0', '--lr', '0.002',
                       '--weights-dtype', 'float16']) == 0
    first = json.loads((out / 'train_log.jsonl').read_text().splitlines()[0])
    assert first['lr'] == pytest.approx(0.002)
    meta = json.loads((out / 's4fusion_compact.json').read_text())
    assert meta['storage_dtype'] == 'float16' and meta['training']['warmup_steps'] == 0
    assert torch.get_num_threads() == 2  # one_thread had set 1


def test_the_logged_learning_rates_follow_the_schedule_across_a_resume(tmp_path, pair_folder):
    # A resume that restarted the schedule (its step counter at 0 again) ran the steps after
    # the first on the rates of the warm-up; a session stopped at a kept step kept it.
    settings = TrainSettings(steps=5, batch_size=1, crop=25, lr=1e-3, warmup_steps=2)
    dataset = PairFolderDataset(pairs_in_folder(pair_folder), 25, settings.min_gain)

    def trainer():
        return Trainer(S4FusionConfig.preset('compact'), dataset, S4FusionLoss(), tmp_path,
                       settings, 'cpu')
    trainer().run(stop_at=2, keep_every=2, progress=False)
    assert (tmp_path / 'checkpoints' / 's4fusion_compact-step000002.safetensors').exists()
    resumed = trainer()
    resumed.resume()
    assert [record['step'] for record in resumed.run(stop_at=9, progress=False)] == [3, 4, 5]
    rates = [json.loads(line)['lr'] for line in (tmp_path / 'train_log.jsonl').open()]
    assert rates == pytest.approx([1e-3 * lr_factor(step, 2, 5, settings.min_lr_ratio)
                                   for step in range(5)], rel=1e-12)
    assert rates[2] == pytest.approx(1e-3) and rates[4] == pytest.approx(1e-5)


def test_a_step_trains_at_the_rate_it_logs(tmp_path, pair_folder):
    # The first step of a 4-step warm-up at lr 1e-3 is the first step at 2.5e-4 without one:
    # the same weights after it, with the log saying 2.5e-4 for both.
    runs = {}
    for lr, warmup in ((1e-3, 4), (2.5e-4, 0)):
        settings = TrainSettings(steps=8, batch_size=1, crop=25, lr=lr, warmup_steps=warmup)
        dataset = PairFolderDataset(pairs_in_folder(pair_folder), 25, settings.min_gain)
        trainer = Trainer(S4FusionConfig.preset('compact'), dataset, S4FusionLoss(),
                          tmp_path / str(warmup), settings, 'cpu')
        before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
        assert trainer.train_step()['lr'] == pytest.approx(2.5e-4, rel=1e-12)
        runs[warmup] = trainer.model.state_dict()
    for name, tensor in runs[0].items():
        torch.testing.assert_close(runs[4][name], tensor, rtol=0, atol=0)
    assert any(not torch.equal(tensor, before[name]) for name, tensor in runs[0].items())


def test_weight_decay_spares_what_the_weights_record_says(tmp_path, pair_folder):
    # 'AdamW (no decay on norms, biases, A_logs, Ds, dt bias)': every other parameter decays.
    trainer = make_trainer(pair_folder, tmp_path)
    decay = {id(param): group['weight_decay'] for group in trainer.optimizer.param_groups
             for param in group['params']}
    for name, param in trainer.model.named_parameters():
        module, _, kind = name.rpartition('.')
        spared = (kind in ('bias', 'A_logs', 'Ds', 'dt_projs_bias')
                  or re.search(r'(^|\.)(ln_\d+|\w*norm)$', module))
        assert decay.pop(id(param)) == (0.0 if spared else 0.01), name
    assert not decay


def test_the_recorded_gradient_clip_bounds_the_step(tmp_path, pair_folder):
    # AdamW divides the gradient by its own size, so a clip far below Adam's eps (1e-8) all but
    # stops the step: the clip the weights' JSON records is applied.
    moved = {}
    for clip in (1.0, 1e-14):
        settings = TrainSettings(steps=2, batch_size=1, crop=25, weight_decay=0.0, grad_clip=clip)
        dataset = PairFolderDataset(pairs_in_folder(pair_folder), 25, settings.min_gain)
        trainer = Trainer(S4FusionConfig.preset('compact'), dataset, S4FusionLoss(),
                          tmp_path / str(clip), settings, 'cpu')
        before = [param.detach().clone() for param in trainer.model.parameters()]
        trainer.train_step()
        moved[clip] = sum(float((param.detach() - old).abs().sum())
                          for param, old in zip(trainer.model.parameters(), before))
    assert moved[1e-14] < 1e-3 * moved[1.0]


def test_each_step_draws_its_own_batch_and_each_seed_its_own_batches(tmp_path, pair_folder):
    batches = {}
    for seed in (0, 1):
        trainer = make_trainer(pair_folder, tmp_path / str(seed), seed=seed)
        drawn, draw = [], trainer.dataset.sample_batch

        def drawing(*args):  # the dataset's own draw, seen
            drawn.append(draw(*args))
            return drawn[-1]
        trainer.dataset.sample_batch = drawing
        trainer.run(progress=False)
        batches[seed] = [torch.cat(batch) for batch in drawn]
    for seed, steps in batches.items():
        assert not any(torch.equal(a, b) for i, a in enumerate(steps) for b in steps[i + 1:])
    assert not any(torch.equal(a, b) for a, b in zip(*batches.values()))


def test_keep_every_keeps_each_such_steps_weights_beside_the_latest(
        tmp_path, pair_folder, capsys):
    out = tmp_path / 'run'
    command = ['--data', str(pair_folder), '--out', str(out), '--steps', '5', '--batch-size',
               '1', '--crop', '25', '--device', 'cpu', '--threads', '1', '--no-progress',
               '--keep-every', '2']
    assert train_main(command) == 0
    kept = sorted((out / 'checkpoints').iterdir())
    assert [path.name for path in kept] == [
        's4fusion_compact-step000002.json', 's4fusion_compact-step000002.safetensors',
        's4fusion_compact-step000004.json', 's4fusion_compact-step000004.safetensors']
    assert [json.loads(path.read_text())['training']['steps_done'] for path in kept[::2]] == [2, 4]
    # Each kept file holds its step's weights: those a run stopped there writes as its latest.
    assert train_main(command[:-2] + ['--out', str(tmp_path / 'short'), '--stop-at', '4']) == 0
    short = load_checkpoint(tmp_path / 'short' / 's4fusion_compact.safetensors').state_dict()
    for name, tensor in load_checkpoint(kept[3]).state_dict().items():
        torch.testing.assert_close(tensor, short[name], rtol=0, atol=0)
    assert json.loads((out / 's4fusion_compact.json').read_text())['training']['steps_done'] == 5
    # A new run into the folder would mix its kept weights with these: refused.
    for path in (out / 'train_state.pt', out / 's4fusion_compact.safetensors',
                 out / 's4fusion_compact.json'):
        path.unlink()
    capsys.readouterr()
    assert train_main(command) == 1
    assert 'checkpoints/s4fusion_compact-step000002.safetensors exists' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train_main(command[:-1] + ['-1'])
    assert exit_info.value.code == 2 and '--keep-every must be >= 0' in capsys.readouterr().err


def test_a_new_run_of_another_network_is_refused_where_an_earlier_runs_weights_are(
        tmp_path, pair_folder):
    # Its weights would have lain beside the earlier run's, and the log would have been replaced.
    earlier = make_trainer(pair_folder, tmp_path / 'run')
    earlier.run(progress=False)
    (tmp_path / 'run' / 'train_state.pt').unlink()  # removed to save space, as the docs allow
    other = S4FusionConfig.from_dict({**earlier.config.to_dict(), 'detail_gain': 1.3})
    new = Trainer(other, earlier.dataset, S4FusionLoss(), tmp_path / 'run', earlier.settings,
                  'cpu', deviation='test run')
    assert new.weights_path.name == 's4fusion_custom.safetensors'
    with pytest.raises(FileExistsError, match='s4fusion_compact.json exists'):
        new.run(progress=False)
    assert len((tmp_path / 'run' / 'train_log.jsonl').read_text().splitlines()) == 3


def test_a_crash_inside_the_last_checkpoint_resumes_to_the_uninterrupted_weights(
        tmp_path, pair_folder, monkeypatch):
    full = make_trainer(pair_folder, tmp_path / 'full')
    full.run(progress=False)
    weights = tmp_path / 'full' / 's4fusion_compact.safetensors'
    crashed = make_trainer(pair_folder, tmp_path / 'crash')
    crashed.run(stop_at=2, progress=False)
    # The last checkpoint writes two files (the weights with their JSON, and the state); the
    # process dies after the first, whichever it is.
    written = []

    def dies_at_the_second(write):
        def wrapped(*args, **kwargs):
            if written:
                raise KeyboardInterrupt('the process dies here')
            written.append(write(*args, **kwargs))
        return wrapped
    for name in ('write_atomically', 'save_checkpoint'):
        write = getattr(trainer_module, name)
        monkeypatch.setattr(trainer_module, name, dies_at_the_second(write))
    with pytest.raises(KeyboardInterrupt):
        crashed.run(progress=False)
    monkeypatch.undo()
    resumed = make_trainer(pair_folder, tmp_path / 'crash')
    resumed.resume()
    resumed.run(progress=False)
    meta = json.loads((tmp_path / 'crash' / weights.with_suffix('.json').name).read_text())
    assert meta['training']['steps_done'] == 3
    expected = load_checkpoint(weights).state_dict()
    for name, tensor in load_checkpoint(tmp_path / 'crash' / weights.name).state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-7)


def test_numba_backward_trains_as_the_chunked_scan_did(tmp_path, pair_folder):
    """The same run with the scan's numba backward and with the chunked PyTorch scan under
    autograd (the trainer's path before the kernel): one loss curve within float32 noise."""
    curves = {}
    for backend in ('torch', 'numba'):
        trainer = make_trainer(pair_folder, tmp_path / backend)
        trainer.model.set_scan_backend(backend)
        for module in trainer.model.modules():
            if hasattr(module, 'scan_backend'):
                assert module.scan_backend == backend
        curves[backend] = [trainer.train_step()['loss'] for _ in range(8)]
    assert curves['numba'] == pytest.approx(curves['torch'], rel=1e-4)
    # Training moved: the curve is not flat, so the comparison is not of untrained outputs.
    assert curves['numba'][0] != pytest.approx(curves['numba'][-1], rel=1e-2)


def test_a_run_from_scratch_with_a_base_starts_at_the_base(tmp_path, pair_folder):
    settings = TrainSettings(steps=1, batch_size=1, crop=25)
    dataset = PairFolderDataset(pairs_in_folder(pair_folder), 25, settings.min_gain)
    config = S4FusionConfig.preset('compact')
    assert config.base == 'laplacian'
    trainer = Trainer(config, dataset, S4FusionLoss(), tmp_path / 'run', settings)
    ir, vi = dataset.sample_batch(2, np.random.default_rng(0))
    with torch.no_grad():
        assert torch.equal(trainer.model(ir, vi),
                           laplacian_fuse(ir, vi, detail_gain=config.detail_gain,
                                          base_contrast=config.base_contrast))


def test_cli_takes_the_base_settings_from_the_preset_unless_given():
    def config(*extra):
        return model_config(build_parser().parse_args(['--data', '.', '--out', 'o', *extra]))
    preset = S4FusionConfig.preset('compact')
    assert config() == preset
    # The shipped compact weights trained on the plain pyramid, with the settings set afterwards.
    plain = config('--detail-gain', '1', '--base-contrast', '1')
    assert (plain.detail_gain, plain.base_contrast, plain.dims) == (1.0, 1.0, preset.dims)
    without_base = config('--base', 'none')
    assert (without_base.base, without_base.detail_gain, without_base.base_contrast) == (
        'none', 1.0, 1.0)
    assert config('--base', 'laplacian', '--base-contrast', '1.3').base_contrast == 1.3


def test_the_help_gives_each_default_but_none_of_none():
    # Where a default is None the option's help says what stands in for it (the preset's).
    text = ' '.join(build_parser().format_help().split())
    assert '(default: the preset\'s)' in text and '(default: 200)' in text
    assert '(default: None)' not in text


def test_the_documented_compact_recipe_has_the_loss_and_sampling_the_shipped_weights_record():
    # The recipe leaves the SSIM and L1 weights, the gain augmentation and the temperature at
    # their defaults: a change of a default would leave it training other weights unsaid.
    repo = pathlib.Path(__file__).resolve().parents[1]
    recipe = re.search(r's4fusion-train (--preset compact .*?[^\\])\n',
                       (repo / 'docs' / 'training.md').read_text(), re.S).group(1)
    args = build_parser().parse_args(shlex.split(recipe.replace('\\\n', ' ')))
    shipped = json.loads((repo / 's4fusion_ros' / 'weights' / 's4fusion_compact.json')
                         .read_text())['training']
    loss = S4FusionLoss(args.ssim_weight, args.l1_weight, args.grad_weight,
                        max_intensity_weight=args.max_intensity_weight)
    assert loss.config() == shipped['loss']
    assert {key: getattr(args, key) for key in ('crop', 'min_gain', 'dataset_balance', 'lr')} \
        == {key: shipped[key] for key in ('crop', 'min_gain', 'dataset_balance', 'lr')}


def test_fine_tuning_starts_from_the_given_weights_and_records_them(tmp_path, pair_folder):
    make_trainer(pair_folder, tmp_path / 'base').run(progress=False)
    base = tmp_path / 'base' / 's4fusion_compact.safetensors'
    settings = TrainSettings(steps=1, batch_size=2, crop=25, lr=1e-4, seed=1, min_gain=1.0)
    dataset = PairFolderDataset(pairs_in_folder(pair_folder), 25)
    tuned = Trainer(S4FusionConfig.preset('compact'), dataset, S4FusionLoss(), tmp_path / 'tuned',
                    settings, 'cpu', init_weights=base)
    for name, tensor in load_checkpoint(base).state_dict().items():
        assert torch.equal(tuned.model.state_dict()[name], tensor)
    tuned.run(progress=False)
    meta = json.loads((tmp_path / 'tuned' / 's4fusion_compact.json').read_text())['training']
    record = meta['initialised_from']
    assert record['sha256'] == hashlib.sha256(base.read_bytes()).hexdigest()
    assert record['training']['steps_done'] == 3 and meta['steps_done'] == 1
    with pytest.raises(ValueError, match='configuration differs'):
        Trainer(S4FusionConfig.preset('authors'), dataset, S4FusionLoss(), tmp_path / 'other',
                settings, 'cpu', init_weights=base)
    # A mistyped path was named as a missing JSON config.
    with pytest.raises(CheckpointError, match='nothere.safetensors: weights file not found'):
        Trainer(S4FusionConfig.preset('compact'), dataset, S4FusionLoss(), tmp_path / 'other',
                settings, 'cpu', init_weights=tmp_path / 'nothere.safetensors')


def test_cli_trains_with_pretrained_networks(tmp_path, pair_folder):
    torch.manual_seed(0)
    net = SmallCNN()
    out = tmp_path / 'cli'
    status = train_main([
        '--data', str(pair_folder), '--out', str(out), '--steps', '1', '--batch-size', '2',
        '--crop', '25', '--device', 'cpu', '--threads', '1', '--no-progress',
        '--pretrained-features', str(export(Features(net), tmp_path / 'f.pt2')),
        '--pretrained-classifier', str(export(Logits(net), tmp_path / 'c.pt2'))])
    assert status == 0
    meta = json.loads((out / 's4fusion_compact.json').read_text())
    assert meta['preset'] == 'compact'
    assert meta['training']['loss']['energy_score'] == 'pretrained features'
    assert meta['training']['loss']['entropy_weight'] > 0
    assert 'entropy' in json.loads((out / 'train_log.jsonl').read_text())
    deviation = meta['training']['deviation']
    assert 'Sobel' not in deviation and 'classifier-entropy' not in deviation


def test_cli_distils_from_a_teacher_checkpoint_and_records_it(tmp_path, pair_folder, capsys):
    make_trainer(pair_folder, tmp_path / 'teacher').run(progress=False)
    teacher = tmp_path / 'teacher' / 's4fusion_compact.safetensors'
    common = ['--data', str(pair_folder), '--steps', '1', '--batch-size', '1', '--crop', '25',
              '--device', 'cpu', '--threads', '1', '--no-progress']
    out = tmp_path / 'student'
    assert train_main([*common, '--out', str(out), '--teacher', str(teacher),
                       '--teacher-weight', '8']) == 0
    training = json.loads((out / 's4fusion_compact.json').read_text())['training']
    assert training['loss']['teacher_weight'] == 8.0
    assert hashlib.sha256(teacher.read_bytes()).hexdigest() in training['deviation']
    # ... and the JSON it ran with, which sets its gain and stretch: the same tensors under
    # another JSON teach another fusion.
    teacher_json = teacher.with_suffix('.json')
    assert (f'run as its {teacher_json.name} says (sha256 '
            f'{hashlib.sha256(teacher_json.read_bytes()).hexdigest()}: preset ') in (
        training['deviation'])
    assert 'teacher' in json.loads((out / 'train_log.jsonl').read_text())
    assert training['loss']['teacher_edges'] == 'magnitude'
    assert 'image Sobel energy' in training['deviation']  # no --pretrained-features
    assert 'no classifier-entropy term' in training['deviation']
    assert train_main([*common, '--out', str(tmp_path / 'signed'), '--teacher', str(teacher),
                       '--teacher-weight', '8', '--teacher-edges', 'components']) == 0
    signed = json.loads((tmp_path / 'signed' / 's4fusion_compact.json').read_text())
    assert signed['training']['loss']['teacher_edges'] == 'components'
    usage_errors = {
        'go together': [['--teacher-weight', '8'],
                        ['--teacher', str(teacher), '--teacher-weight', '-1']],
        'there is none': [['--teacher-edges', 'components']],
        'detail_gain must be finite': [['--detail-gain', 'nan'],
                                       ['--preset', 'authors', '--detail-gain', '1.2'],
                                       ['--base', 'none', '--detail-gain', '1.2']],
        'base_contrast must be finite': [['--base-contrast', '0'],
                                         ['--preset', 'authors', '--base-contrast', '1.2']],
        '--stop-at must be > 0': [['--stop-at', '0']],
        '--time-limit must be > 0': [['--time-limit', 'nan']],
        '--checkpoint-every must be > 0': [['--checkpoint-every', '-1']],
        '--threads must be > 0': [['--threads', '0']],
        '--warmup must be >= 0': [['--warmup', '-5']],
        # These three failed only once the data was read, with exit code 1.
        'must be 12k + 1': [['--crop', '24']],
        'min_gain 0.0 must be in (0, 1]': [['--min-gain', '0']],
        'dataset_balance 2.0 must be in [0, 1]': [['--dataset-balance', '2']],
        # The learning rate stayed in its warm-up: the run trained nothing.
        'warmup_steps 10000 must be at most steps': [['--warmup', '10000']],
        'lr must be positive, lr finite': [['--lr', 'inf'], ['--lr', '0'],  # inf: NaN weights
                                           ['--steps', '0'], ['--batch-size', '0']],
        'seed must be from 0 to 2**32 - 1': [['--seed', '-1'], ['--seed', str(2**32)]]}
    for message, cases in usage_errors.items():
        for bad in cases:
            with pytest.raises(SystemExit) as exit_info:
                train_main([*common, '--out', str(tmp_path / 'x'), *bad])
            assert exit_info.value.code == 2 and message in capsys.readouterr().err, bad
    assert train_main([*common, '--out', str(tmp_path / 'y'), '--teacher',
                       str(tmp_path / 'no.st'), '--teacher-weight', '8']) == 1
    assert 'no.st' in capsys.readouterr().err
    # A second run into a finished run's folder, without --resume: one line, before any data.
    assert train_main([*common, '--data', str(tmp_path / 'absent'), '--out',
                       str(tmp_path / 'signed')]) == 1
    error = capsys.readouterr().err
    assert 'train_state.pt exists: resume it (--resume)' in error and 'Traceback' not in error
    # A data folder without pairs is one line naming it, no traceback.
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert train_main([*common, '--data', str(empty), '--out', str(tmp_path / 'z')]) == 1
    error = capsys.readouterr().err
    assert str(empty) in error and 'Traceback' not in error


def test_cli_stops_on_sigterm_with_a_checkpoint_and_resumes(tmp_path, pair_folder):
    out = tmp_path / 'run'
    command = [sys.executable, '-m', 's4fusion_ros.tools.train', '--data', str(pair_folder),
               '--out', str(out), '--steps', '1000', '--batch-size', '1', '--crop', '25',
               '--device', 'cpu', '--threads', '1', '--no-progress', '--grad-weight', '2.5',
               '--max-intensity-weight', '0.5']
    log = out / 'train_log.jsonl'
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    stderr = stop_once_logged(process, log, 2, 120, 60)
    assert process.returncode == 130, stderr
    assert 'stopped by SIGTERM' in stderr and '--resume' in stderr
    assert 'time limit reached' not in stderr
    done = len(log.read_text().splitlines())
    state = torch.load(out / 'train_state.pt', weights_only=True)
    assert state['step'] == done  # every logged step is in the checkpoint, none half-done
    meta = json.loads((out / 's4fusion_compact.json').read_text())['training']
    assert meta['steps_done'] == done and meta['loss']['grad_weight'] == 2.5
    assert meta['loss']['max_intensity_weight'] == 0.5

    resumed = subprocess.run(command + ['--resume', '--stop-at', str(done + 1)],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(line)['step'] for line in log.read_text().splitlines()] == list(
        range(1, done + 2))


class FakeClock:
    """time.monotonic and time.perf_counter for the trainer and the CLI: a step takes 1 s, a
    checkpoint's weights 0.5 s, whatever the machine's load."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        for module in (trainer_module, train_tool_module):
            monkeypatch.setattr(module, 'time', self)
        monkeypatch.setattr(Trainer, 'train_step', self.taking(Trainer.train_step, 1.0))
        monkeypatch.setattr(trainer_module, 'save_checkpoint',
                            self.taking(trainer_module.save_checkpoint, 0.5))

    def monotonic(self):
        return self.now

    perf_counter = monotonic

    def taking(self, method, seconds):
        def timed(*args, **kwargs):
            result = method(*args, **kwargs)
            self.now += seconds
            return result
        return timed


def test_a_schedule_fitted_to_the_time_limit_ends_in_it_and_resumes_as_fitted(
        tmp_path, pair_folder, monkeypatch, capsys):
    # 60 s for 1000 steps of 1 s: timed on steps 5-25 (after a checkpoint at step 5), the 34.5 s
    # left (less 5 %, the last checkpoint and one every 50 steps) take steps 26-56.
    FakeClock(monkeypatch)

    def arguments(out, steps, minutes=1):
        return ['--data', str(pair_folder), '--out', str(tmp_path / out), '--steps', str(steps),
                '--batch-size', '1', '--crop', '25', '--device', 'cpu', '--no-progress',
                '--checkpoint-every', '50', '--time-limit', str(minutes), '--fit-schedule']

    assert train_main([*arguments('run', 1000), '--stop-at', '40']) == 0
    assert 'fitted to the time limit after step 25: 56 steps of the 1000 asked' in (
        capsys.readouterr().err)
    assert train_main([*arguments('run', 1000), '--resume']) == 0  # its fitted schedule
    assert 'steps 40 -> 56 (fitted from 1000 after step 25)' in capsys.readouterr().err
    training = json.loads((tmp_path / 'run' / 's4fusion_compact.json').read_text())['training']
    assert training['steps_done'] == training['steps'] == 56
    assert training['schedule_fit'] == {  # the warm-up keeps its 5 % of the steps
        'steps_asked': 1000, 'warmup_asked': 50, 'steps': 56, 'warmup_steps': 3,
        'steps_per_s': 1.0, 'at_step': 25}
    log = [json.loads(line) for line in (tmp_path / 'run' / 'train_log.jsonl').open()]
    assert [record['step'] for record in log] == list(range(1, 57))
    assert log[-1]['lr'] == pytest.approx(1e-3 * 0.01)  # the cosine's end at the last step
    # From the step after the fit on, the fitted schedule (the next step's rate set with it).
    assert [record['lr'] for record in log[25:]] == pytest.approx(
        [1e-3 * lr_factor(step, 3, 56, 0.01) for step in range(25, 56)], rel=1e-9)
    # Another --steps is another run.
    assert train_main([*arguments('run', 900), '--resume']) == 1
    assert 'other settings (steps 56, now 900' in capsys.readouterr().err
    # ... and so is another --warmup: the fit was of the warm-up asked too.
    assert train_main([*arguments('run', 1000), '--warmup', '40', '--resume']) == 1
    assert 'warmup_steps 3, now 40' in capsys.readouterr().err
    # Kept checkpoints (1 s: two weights files) every 10 steps leave 49 steps; 51 left room
    # for plain ones alone.
    assert train_main([*arguments('kept', 1000), '--keep-every', '10', '--stop-at', '26']) == 0
    assert 'after step 25: 49 steps of the 1000 asked' in capsys.readouterr().err

    # Time for every step asked: the schedule stays as it was.
    assert train_main(arguments('long', 30, minutes=100)) == 0
    assert '30 steps of the 30 asked (unchanged' in capsys.readouterr().err
    training = json.loads((tmp_path / 'long' / 's4fusion_compact.json').read_text())['training']
    assert training['steps_done'] == training['steps'] == 30
    with pytest.raises(SystemExit):
        train_main([*arguments('x', 30)[:-3], '--fit-schedule'])  # without --time-limit
    assert '--fit-schedule needs --time-limit' in capsys.readouterr().err


def thousand_small_steps(pair_folder: pathlib.Path, out: pathlib.Path) -> list[str]:
    """s4fusion-train's arguments for a run of 1000 steps of one 25-pixel crop on the CPU, no
    progress bar: one that a FakeClock times at 1 s a step."""
    return ['--data', str(pair_folder), '--out', str(out), '--steps', '1000', '--batch-size', '1',
            '--crop', '25', '--device', 'cpu', '--no-progress']


def test_a_schedule_fitted_in_a_resumed_session_is_timed_from_its_fifth_step(
        tmp_path, pair_folder, monkeypatch, capsys):
    # The help says steps 5-25 of this session: a resumed session timed its checkpoint after
    # its first step (the global step was past 5), its slow first steps in the pace.
    FakeClock(monkeypatch)
    command = [*thousand_small_steps(pair_folder, tmp_path / 'run'), '--checkpoint-every', '50']
    assert train_main([*command, '--stop-at', '40']) == 0
    assert train_main([*command, '--resume', '--time-limit', '1', '--fit-schedule',
                       '--stop-at', '66']) == 0
    assert 'fitted to the time limit after step 65:' in capsys.readouterr().err


def test_a_time_limit_alone_stops_the_run_resumably_and_leaves_its_schedule(
        tmp_path, pair_folder, monkeypatch, capsys):
    # Without --fit-schedule the run keeps its 1000 steps and stops after the step past the
    # 6 s (1 s a step); a run that reaches its --stop-at says nothing of a time limit.
    FakeClock(monkeypatch)
    command = [*thousand_small_steps(pair_folder, tmp_path / 'run'), '--time-limit', '0.1']
    assert train_main(command) == 0
    error = capsys.readouterr().err
    assert ('time limit reached after step 7; continue with the same arguments and --resume'
            in error)
    assert 'fitted' not in error and 'step/s' not in error  # nor a progress bar
    training = json.loads((tmp_path / 'run' / 's4fusion_compact.json').read_text())['training']
    assert (training['steps_done'], training['steps']) == (7, 1000)
    assert 'schedule_fit' not in training
    assert train_main([*command, '--resume', '--stop-at', '8']) == 0
    assert 'time limit' not in capsys.readouterr().err


def test_a_resumed_run_already_at_its_end_says_there_is_nothing_to_train(
        tmp_path, pair_folder, capsys):
    # A session's command run again after it ended (or a --stop-at below the step reached)
    # printed 'steps 3 -> 2', trained nothing and said nothing of it.
    out = tmp_path / 'run'
    command = ['--data', str(pair_folder), '--out', str(out), '--steps', '3', '--batch-size', '1',
               '--crop', '25', '--device', 'cpu', '--no-progress']
    assert train_main([*command, '--stop-at', '2']) == 0
    assert train_main([*command, '--resume', '--stop-at', '2']) == 0
    assert (f'nothing to train: the run has reached --stop-at 2 (step 2); its weights: {out}'
            in capsys.readouterr().err)
    assert train_main([*command, '--resume']) == 0
    capsys.readouterr()
    for stop_at, reached in (([], 'the end of its 3 steps'), (['--stop-at', '2'], '--stop-at 2')):
        assert train_main([*command, '--resume', *stop_at]) == 0
        assert (f'nothing to train: the run has reached {reached} (step 3)'
                in capsys.readouterr().err)
    assert len((out / 'train_log.jsonl').read_text().splitlines()) == 3


def test_a_loss_of_no_term_is_a_usage_error(tmp_path, capsys):
    # A distillation recipe copied without its --teacher trained on a loss of 0 at every step.
    with pytest.raises(SystemExit) as exit_info:
        train_main(['--data', str(tmp_path), '--out', str(tmp_path / 'run'), '--ssim-weight',
                    '0', '--l1-weight', '0', '--grad-weight', '0'])
    assert exit_info.value.code == 2
    assert 'every loss term is 0' in capsys.readouterr().err
    assert not (tmp_path / 'run').exists()


def test_a_loss_of_the_teacher_or_the_classifier_alone_trains(tmp_path, pair_folder):
    # Pure distillation, or the entropy term alone: terms beside the four weights.
    make_trainer(pair_folder, tmp_path / 'teacher').run(progress=False)
    teacher = tmp_path / 'teacher' / 's4fusion_compact.safetensors'
    classifier = export(Logits(SmallCNN()), tmp_path / 'c.pt2')
    common = ['--data', str(pair_folder), '--steps', '1', '--batch-size', '1', '--crop', '25',
              '--device', 'cpu', '--threads', '1', '--no-progress', '--ssim-weight', '0',
              '--l1-weight', '0', '--grad-weight', '0']
    for name, only in (('teacher', ['--teacher', str(teacher), '--teacher-weight', '8']),
                       ('entropy', ['--pretrained-classifier', str(classifier)])):
        out = tmp_path / f'{name}_alone'
        assert train_main([*common, '--out', str(out), *only]) == 0
        assert name in json.loads((out / 'train_log.jsonl').read_text())


@pytest.mark.parametrize('device', ['foo', 'gpu0'])
def test_an_unknown_device_is_a_usage_error(device, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(['--data', str(tmp_path), '--out', str(tmp_path / 'run'), '--device', device])
    assert exit_info.value.code == 2
    assert f"unknown device '{device}'" in capsys.readouterr().err


def test_an_ivif_folder_without_its_test_split_file_is_refused(tmp_path, ivif_dir, capsys):
    # Read as a folder of datasets it would train on RoadScene-67, TNO and MSRS and drop M3SVD.
    copy = tmp_path / 'ivif'
    (copy / 'roadscene').mkdir(parents=True)
    for part in ('roadscene/ir', 'roadscene/vi', 'tno', 'msrs', 'm3svd'):
        (copy / part).symlink_to(ivif_dir / part)
    with pytest.raises(FileNotFoundError, match='s4fusion_test67.csv: missing, though'):
        data_layout(copy)
    assert train_main(['--data', str(copy), '--out', str(tmp_path / 'run'), '--steps', '1',
                       '--device', 'cpu']) == 1
    error = capsys.readouterr().err
    assert 'must not train' in error and 'Traceback' not in error
    assert not (tmp_path / 'run').exists()


def test_the_public_datasets_unpacked_in_their_own_case_are_refused_too(tmp_path):
    # TNO/ and MSRS/ as their archives unpack are the test sets as much as tno/ and msrs/.
    for name in ('TNO', 'MSRS', 'mine'):
        (tmp_path / name).mkdir()
    with pytest.raises(FileNotFoundError, match=r'ivif layout \(MSRS, TNO\)'):
        data_layout(tmp_path)


@pytest.mark.parametrize('part', ['msrs', 'roadscene', 'm3svd', 'm3svd/frames'])
def test_a_folder_inside_the_ivif_layout_is_refused(part, tmp_path, ivif_dir, capsys):
    # Read as pairs or datasets, each held test or validation pairs (MSRS-22, RoadScene-67, the
    # M3SVD validation clips), and the weights would not have said so.
    with pytest.raises(ValueError, match=f'inside the ivif layout {re.escape(str(ivif_dir))}'):
        data_layout(ivif_dir / part)
    assert train_main(['--data', str(ivif_dir / part), '--out', str(tmp_path / 'run'),
                       '--steps', '1', '--device', 'cpu']) == 1
    error = capsys.readouterr().err
    assert 'must not train' in error and 'Traceback' not in error
    assert not (tmp_path / 'run').exists()


def test_links_to_ivif_datasets_in_a_folder_of_folders_are_refused(tmp_path, ivif_dir,
                                                                   pair_folder, capsys):
    # Each subfolder is read as a dataset of its own: one linked to TNO (or only its ir/ and vi/
    # linked) would train on test pairs under a name that does not say so.
    whole, sides = tmp_path / 'whole', tmp_path / 'sides'
    for mine in (whole, sides):
        shutil.copytree(pair_folder, mine / 'own')
    (whole / 't').symlink_to(ivif_dir / 'tno')
    (sides / 't').mkdir()
    for side in ('ir', 'vi'):
        (sides / 't' / side).symlink_to(ivif_dir / 'tno' / side)
    for data in (whole, sides):
        assert train_main(['--data', str(data), '--out', str(tmp_path / 'run'), '--steps', '1',
                           '--device', 'cpu']) == 1
        error = capsys.readouterr().err
        assert f'inside the ivif layout {ivif_dir.resolve()}' in error and 'Traceback' not in error
        assert not (tmp_path / 'run').exists()


def test_links_to_ivif_test_images_in_a_folder_of_pairs_are_refused(tmp_path, ivif_dir):
    # Folders of links to single files, as one gathers training data from several sets: the
    # linked TNO pairs would train, recorded as pairs of 'mine', which the report does not know.
    for side in ('ir', 'vi'):
        (tmp_path / 'mine' / side).mkdir(parents=True)
        (tmp_path / 'mine' / side / '01.png').symlink_to(ivif_dir / 'tno' / side / '01.png')
    for data in (tmp_path / 'mine', tmp_path):  # as pairs, and as a folder of datasets
        with pytest.raises(ValueError, match=f'inside the ivif layout {ivif_dir.resolve()}'):
            training_pairs(data)


def test_a_link_to_an_ivif_folder_without_image_pairs_is_refused_as_inside_the_layout(
        tmp_path, ivif_dir):
    # M3SVD's videos: no image pairs to read, so the link was named as a folder of no image
    # files ('image files directly in them'), not as a part of the ivif layout.
    (tmp_path / 'videos').symlink_to(ivif_dir / 'm3svd' / 'videos')
    with pytest.raises(ValueError, match=f'inside the ivif layout {ivif_dir.resolve()}'):
        training_pairs(tmp_path)


def test_a_second_process_training_in_the_same_folder_is_refused(tmp_path, pair_folder, capsys):
    # Before, a --resume of a run still training (or a second new run into its folder) trained
    # beside it: their temporary files collided, the resumed one cut the log the first one
    # appended to, and the checkpoints alternated between the two.
    out = tmp_path / 'run'
    common = ['--data', str(pair_folder), '--out', str(out), '--steps', '1', '--batch-size',
              '1', '--crop', '13', '--device', 'cpu', '--threads', '1', '--no-progress']
    with held_folder(out, RuntimeError('held')):  # as a training process holds it
        for resume in ([], ['--resume']):
            assert train_main(common + resume) == 1
            assert (f'{out}: another s4fusion-train is training in this folder' in
                    capsys.readouterr().err)
        assert list(out.iterdir()) == []
    assert train_main(common) == 0


def test_a_new_run_never_overwrites_an_earlier_runs_weights(tmp_path, pair_folder, capsys):
    common = ['--data', str(pair_folder), '--steps', '1', '--batch-size', '1', '--crop', '25',
              '--device', 'cpu', '--threads', '1', '--no-progress', '--preset', 'compact']
    assert train_main([*common, '--out', str(tmp_path / 'run')]) == 0
    # A run whose state was removed to save space (gpu_train.py unpack leaves states out): its
    # weights, or their JSON alone, are refused and stay as they were.
    for name in ('s4fusion_compact.safetensors', 's4fusion_compact.json'):
        out = tmp_path / name.replace('.', '_')
        out.mkdir()
        shutil.copy(tmp_path / 'run' / name, out / name)
        capsys.readouterr()
        assert train_main([*common, '--out', str(out)]) == 1
        error = capsys.readouterr().err
        assert f'{out / name} exists' in error and 'Traceback' not in error
        assert (out / name).read_bytes() == (tmp_path / 'run' / name).read_bytes()
        assert [path.name for path in out.iterdir()] == [name]


def test_a_run_records_its_data_by_folder_name_however_the_folder_is_given(
        tmp_path, pair_folder, monkeypatch):
    # The labels are the run's data identity: a run started with --data . resumes with the
    # folder's full path, and the weights' JSON names the folder.
    labels = [pair.label for pair in training_pairs(pair_folder)]
    assert labels == ['pairs/00004N.png', 'pairs/00055D.png']
    monkeypatch.chdir(pair_folder / 'ir')
    for spelled in ('..', '../ir/..'):
        assert [pair.label for pair in training_pairs(pathlib.Path(spelled))] == labels


def test_raw_16_bit_thermal_counts_are_warned_of(tmp_path, pair_folder, capsys):
    # Scaled by 1 / 65535, 14-bit counts train as nearly black images (s4fusion-fuse warns too).
    ir = cv2.imread(str(pair_folder / 'ir' / '00004N.png'), cv2.IMREAD_GRAYSCALE)
    assert cv2.imwrite(str(pair_folder / 'ir' / '00004N.png'), 7000 + 8 * ir.astype(np.uint16))
    common = ['--steps', '1', '--batch-size', '1', '--crop', '25', '--device', 'cpu',
              '--threads', '1', '--no-progress']
    assert train_main(['--data', str(pair_folder), '--out', str(tmp_path / 'run'), *common]) == 0
    error = capsys.readouterr().err
    assert ('warning: 1 of 2 IR images are 16-bit but span less than 16384 of 0-65535 (raw '
            f'camera counts?), so they train as nearly black images; stretch them to the full '
            f'range first ({pair_folder / "ir" / "00004N.png"}, ...)') in error


def test_pairs_smaller_than_the_crop_are_warned_of(tmp_path, pair_folder, capsys):
    # Their crops are mostly mirror images of their borders; before, nothing said so.
    for side in ('ir', 'vi'):
        path = pair_folder / side / '00004N.png'
        assert cv2.imwrite(str(path), cv2.imread(str(path))[:20, :30])
    assert train_main(['--data', str(pair_folder), '--out', str(tmp_path / 'run'), '--steps',
                       '1', '--batch-size', '1', '--crop', '25', '--device', 'cpu', '--threads',
                       '1', '--no-progress']) == 0
    assert ('warning: 1 of 2 pairs are smaller than the 25-pixel crop on a side '
            f'({pair_folder / "ir" / "00004N.png"}, ...), so their crops are filled out by '
            'mirroring their borders; --crop 13 or less crops within every pair'
            in capsys.readouterr().err)
    # The suggestion fits the smallest pair (a crop of 13 too); below 13 there is none.
    for side, crop, fitting in ((30, 37, '; --crop 13 or less crops within every pair'),
                                (13, 25, '; --crop 13 or less crops within every pair'),
                                (12, 25, '')):
        for folder in ('ir', 'vi'):
            path = pair_folder / folder / '00055D.png'
            assert cv2.imwrite(str(path), cv2.imread(str(path))[:side, :40])
        assert train_main(['--data', str(pair_folder), '--out', str(tmp_path / f'run{side}'),
                           '--steps', '1', '--batch-size', '1', '--crop', str(crop), '--device',
                           'cpu', '--threads', '1', '--no-progress']) == 0
        assert (f'warning: 2 of 2 pairs are smaller than the {crop}-pixel crop on a side '
                f'({pair_folder / "ir" / "00004N.png"}, ...), so their crops are filled out by '
                f'mirroring their borders{fitting}\n' in capsys.readouterr().err)


def test_a_diverging_loss_ends_with_one_line(tmp_path, pair_folder, capsys):
    assert train_main(['--data', str(pair_folder), '--out', str(tmp_path / 'run'), '--steps',
                       '4', '--batch-size', '1', '--crop', '25', '--device', 'cpu',
                       '--threads', '1', '--no-progress', '--lr', '1e12']) == 1
    error = capsys.readouterr().err
    assert 'loss is nan' in error and 'lower --lr' in error and 'Traceback' not in error


def test_non_finite_weights_are_never_checkpointed(tmp_path, pair_folder):
    # A step can overflow the weights from a finite loss; the loss check sees it a step later,
    # after a checkpoint of that step would have replaced the last usable one.
    out = tmp_path / 'run'
    trainer = make_trainer(pair_folder, out)
    trainer.run(stop_at=1, progress=False)
    files = {path.name: path.read_bytes() for path in out.iterdir()
             if path.name != 'train_log.jsonl'}
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float('inf')
    with pytest.raises(FloatingPointError, match='weights are not finite after step 1.*the last '
                                                 'checkpoint stays as it was'):
        trainer.save(last_loss=0.5)
    assert files == {name: (out / name).read_bytes() for name in files}
    before_any = make_trainer(pair_folder, tmp_path / 'new')
    with torch.no_grad():
        next(before_any.model.parameters())[0] = float('inf')
    with pytest.raises(FloatingPointError, match='nothing was saved'):
        before_any.save(last_loss=0.5)


def test_a_first_checkpoint_cut_short_leaves_the_folder_to_a_new_run(tmp_path, pair_folder,
                                                                     monkeypatch):
    # A full disk as the state was written after the weights: the weights of step 1 stayed
    # without a state, so --resume had nothing to start from and a new run there was refused.
    out = tmp_path / 'run'

    def disk_full(path, write):
        raise OSError(errno.ENOSPC, 'No space left on device', str(path))
    monkeypatch.setattr(trainer_module, 'write_atomically', disk_full)
    with pytest.raises(OSError, match='No space left'):
        make_trainer(pair_folder, out).run(stop_at=1, progress=False)
    monkeypatch.undo()
    assert not list(out.glob('s4fusion_*')), list(out.iterdir())
    with pytest.raises(FileNotFoundError, match='no train_state.pt to resume'):
        make_trainer(pair_folder, out).resume()
    check_new_run(out)
    make_trainer(pair_folder, out).run(stop_at=1, progress=False)
    # The log the cut-short run left is replaced, not continued.
    assert len((out / 'train_log.jsonl').read_text().splitlines()) == 1


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_says_so_in_one_line(
        tmp_path, pair_folder, capsys):
    # torch.save wrote the state into its file: the write's EFBIG/ENOSPC came out as its zip
    # writer's RuntimeError ('unexpected pos'), a traceback instead of the line naming the file.
    out = tmp_path / 'run'
    command = ['--data', str(pair_folder), '--out', str(out), '--steps', '2', '--batch-size',
               '1', '--crop', '25', '--device', 'cpu', '--threads', '1', '--no-progress']
    assert train_main([*command, '--stop-at', '1']) == 0
    state = (out / 'train_state.pt').read_bytes()
    weights_size = (out / 's4fusion_compact.safetensors').stat().st_size
    capsys.readouterr()
    # A real write failure: the weights fit under the file size limit, the state does not.
    limit = (weights_size + len(state)) // 2
    with file_size_limit(limit):
        status = train_main([*command, '--resume'])
    error = capsys.readouterr().err
    assert status == 1, error
    assert 'Traceback' not in error and f"File too large: '{out / 'train_state.pt'}'" in error
    assert (out / 'train_state.pt').read_bytes() == state
    assert not list(out.glob('.*')), list(out.iterdir())
    assert train_main([*command, '--resume']) == 0
    assert [json.loads(line)['step']
            for line in (out / 'train_log.jsonl').read_text().splitlines()] == [1, 2]


def test_weights_a_kill_left_without_their_state_are_named_with_the_way_out(
        tmp_path, pair_folder):
    # Killed while the state of the first checkpoint was written (after the weights): --resume
    # said to start without it, and a new run there said to use another folder.
    out = tmp_path / 'run'
    make_trainer(pair_folder, out).run(stop_at=1, progress=False)
    (out / 'train_state.pt').unlink()
    left = sorted(path.name for path in out.glob('s4fusion_*'))
    with pytest.raises(FileNotFoundError) as resumed:
        make_trainer(pair_folder, out).resume()
    with pytest.raises(FileExistsError) as started:
        check_new_run(out)
    for error in (resumed.value, started.value):
        assert all(name in str(error) for name in left), error
        assert 'remove' in str(error) and 'another output folder' in str(error), error
    for name in left:
        (out / name).unlink()
    check_new_run(out)


def test_set_up_errors_are_one_line_before_training(tmp_path, pair_folder, capsys):
    common = ['--data', str(pair_folder), '--steps', '2', '--batch-size', '1', '--crop', '25',
              '--device', 'cpu', '--threads', '1', '--no-progress']
    a_file = tmp_path / 'a_file'
    a_file.write_text('')
    for out in (a_file, a_file / 'run'):  # no folder can be made there
        assert train_main([*common, '--out', str(out)]) == 1
        error = capsys.readouterr().err
        assert f'{out}: {a_file} is not a folder' in error and 'Traceback' not in error
    # Pixels training cannot scale fail as the data is read, not when a crop first draws them.
    floats = tmp_path / 'floats'
    shutil.copytree(pair_folder, floats)
    assert cv2.imwrite(str(floats / 'ir' / 'float.tiff'), np.ones((40, 40), np.float32))
    assert cv2.imwrite(str(floats / 'vi' / 'float.tiff'), np.ones((40, 40), np.uint8))
    assert train_main([*common, '--data', str(floats), '--out', str(tmp_path / 'f')]) == 1
    error = capsys.readouterr().err
    assert ('float.tiff: unsupported pixel type float32 (need 8 or 16 bit)' in error
            and 'Traceback' not in error)
    assert not (tmp_path / 'f').exists()
    # A file that is no exported network, a torn training state: one line naming the file.
    not_a_network = tmp_path / 'bad.pt2'
    not_a_network.write_text('hello')
    assert train_main([*common, '--out', str(tmp_path / 'g'), '--pretrained-features',
                       str(not_a_network)]) == 1
    assert f'{not_a_network}: not a network saved with torch.export.save' in (
        capsys.readouterr().err)
    # Networks of the wrong shape: refused before training, not at step 1 with a traceback.
    rgb = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    rgb_path = tmp_path / 'rgb.pt2'
    torch.export.save(torch.export.export(rgb, (torch.rand(2, 3, 25, 25),)), str(rgb_path))
    features = export(Features(SmallCNN()), tmp_path / 'f.pt2')
    for option, path, expected in (
            ('--pretrained-features', rgb_path, 'the features network does not take the '
             'training batch (1, 1, 25, 25) (B, 1, crop, crop): Guard failed'),
            ('--pretrained-classifier', features, 'the classifier network must return (B, K) '
             'logits for a batch of 1; it returned [\'list\']')):
        assert train_main([*common, '--out', str(tmp_path / 'k'), option, str(path)]) == 1
        error = capsys.readouterr().err
        assert f'{path}: {expected}' in error and 'Traceback' not in error
        assert not (tmp_path / 'k').exists()
    assert train_main([*common, '--out', str(tmp_path / 'h'), '--stop-at', '1']) == 0
    state = tmp_path / 'h' / 'train_state.pt'
    whole = state.read_bytes()
    # Torn, junk (a KeyError in torch's unpickler), another program's torch file, or one with
    # an identity but nothing else.
    for damaged in (whole[:1000], whole[:10000], b'junk\n', {'x': 1}, {'identity': '{}'}):
        if isinstance(damaged, dict):
            torch.save(damaged, state)
        else:
            state.write_bytes(damaged)
        assert train_main([*common, '--out', str(tmp_path / 'h'), '--resume']) == 1
        error = capsys.readouterr().err
        assert f'{state}: not a readable training state' in error and 'Traceback' not in error


def train_command(pair_folder: pathlib.Path) -> list[str]:
    """s4fusion-train in a process of its own (torch logs to the stderr it found at import)."""
    return [sys.executable, '-m', 's4fusion_ros.tools.train', '--data', str(pair_folder),
            '--steps', '2', '--batch-size', '1', '--crop', '25', '--device', 'cpu',
            '--threads', '1', '--no-progress']


def test_a_training_state_torch_will_not_load_is_named_on_one_line(tmp_path, pair_folder):
    # torch.load's weights-only refusal took six lines, in bold, advising to load the file
    # unsafely, before its fault.
    out = tmp_path / 'run'
    out.mkdir()
    state = out / 'train_state.pt'
    torch.save({'step': np.float64(3)}, state)  # a numpy scalar, which it does not allow
    proc = subprocess.run([*train_command(pair_folder), '--out', str(out), '--resume'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == (
        f's4fusion-train: {state}: not a readable training state (UnpicklingError: Unsupported '
        'global: GLOBAL numpy._core.multiarray.scalar was not an allowed global by default)\n')


def test_a_file_that_is_no_exported_network_is_named_on_one_line(tmp_path, pair_folder):
    # torch.export.load logged a traceback (a warning) before the error line, whose reason was
    # 'File is not a zip file' or 'Please check the warnings above'.
    saved, junk = tmp_path / 'saved.pt', tmp_path / 'junk.pt2'
    torch.save({'x': torch.zeros(1)}, saved)
    junk.write_bytes(b'junk')
    for path, fault in ((saved, 'PytorchStreamReader failed locating file archive_format: file '
                                'not found'),
                        (junk, 'PytorchStreamReader failed reading zip archive: not a ZIP '
                               'archive')):
        proc = subprocess.run([*train_command(pair_folder), '--out', str(tmp_path / 'run'),
                               '--pretrained-features', str(path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr == (
            f's4fusion-train: {path}: not a network saved with torch.export.save ({fault})\n')


def test_usage_errors_for_loss_weights_and_for_starting_from_the_runs_own_weights(
        tmp_path, pair_folder, capsys, monkeypatch):
    common = ['--data', str(pair_folder), '--steps', '2', '--device', 'cpu']
    for option, value in (('--max-intensity-weight', '-1'), ('--grad-weight', 'nan'),
                          ('--ssim-weight', 'inf'), ('--l1-weight', '-0.5')):
        with pytest.raises(SystemExit) as exit_info:  # a negative term would be skipped
            train_main([*common, '--out', str(tmp_path / 'x'), option, value])
        assert exit_info.value.code == 2
        assert f'{option} must be a number >= 0, got {float(value)}' in capsys.readouterr().err
    for value in ('nan', 'inf'):  # a NaN loss at step 1, after the data was read
        with pytest.raises(SystemExit) as exit_info:
            train_main([*common, '--out', str(tmp_path / 'x'), '--teacher', str(pair_folder),
                        '--teacher-weight', value])
        assert exit_info.value.code == 2 and 'go together' in capsys.readouterr().err
    # The first checkpoint would replace the weights it started from (and which its record names).
    run = tmp_path / 'run'
    make_trainer(pair_folder, run).run(progress=False)
    (run / 'train_state.pt').unlink()
    for option in ('--init-weights', '--teacher'):
        for name in ('s4fusion_compact.safetensors', 's4fusion_compact.json'):
            with pytest.raises(SystemExit) as exit_info:
                train_main([*common, '--out', str(run), option, str(run / name),
                            '--teacher-weight', '8' if option == '--teacher' else '0'])
            assert exit_info.value.code == 2
            assert 'this run writes its weights there' in capsys.readouterr().err
    # ... however the two are spelt: --out relative to the current folder, the weights not.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_main([*common, '--out', 'run', '--init-weights',
                    str(run / 's4fusion_compact.safetensors')])
    assert exit_info.value.code == 2
    assert 'this run writes its weights there' in capsys.readouterr().err


def test_a_resume_refused_for_other_settings_names_them(tmp_path, pair_folder, capsys):
    common = ['--data', str(pair_folder), '--steps', '3', '--batch-size', '1', '--device', 'cpu',
              '--threads', '1', '--no-progress', '--out', str(tmp_path / 'run')]
    assert train_main([*common, '--crop', '25', '--stop-at', '1']) == 0
    assert train_main([*common, '--crop', '37', '--resume']) == 1
    assert 'other settings (crop 25, now 37)' in capsys.readouterr().err
    # A run from other weights named no option.
    start = tmp_path / 'run' / 's4fusion_compact.safetensors'
    for name in (start.name, start.with_suffix('.json').name):
        shutil.copy(tmp_path / 'run' / name, tmp_path / name)
    sha256 = hashlib.sha256(start.read_bytes()).hexdigest()
    assert train_main([*common, '--crop', '25', '--resume', '--init-weights',
                       str(tmp_path / start.name)]) == 1
    assert (f'other init (--init-weights: no weights, now weights of sha256 {sha256[:16]})'
            in capsys.readouterr().err)


def test_a_second_stop_signal_waits_for_the_checkpoint_being_written(tmp_path):
    from s4fusion_ros.tools.train import AbortedAfterSaving, GracefulStop
    written, before = [], signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.received == 'SIGINT'
        # Its own kind: the command says the checkpoint was written (it said "without saving").
        with pytest.raises(AbortedAfterSaving):
            with stop.saving():
                signal.raise_signal(signal.SIGTERM)
                written.append('weights and JSON')  # the save goes on to its end
        assert written == ['weights and JSON']
        with pytest.raises(KeyboardInterrupt):  # outside a save: at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_twice_while_a_checkpoint_is_written_ends_once_it_is(
        tmp_path, pair_folder, monkeypatch, capsys):
    # Both signals come as step 1's checkpoint is written: the second waits for its end, and
    # the command says that the checkpoint was written (not "aborted without saving").
    out = tmp_path / 'run'
    save = Trainer.save

    def save_under_two_signals(trainer, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        return save(trainer, *args, **kwargs)
    monkeypatch.setattr(Trainer, 'save', save_under_two_signals)
    assert train_main(['--data', str(pair_folder), '--out', str(out), '--steps', '5',
                       '--batch-size', '1', '--crop', '25', '--device', 'cpu', '--threads', '1',
                       '--no-progress', '--checkpoint-every', '1']) == 130
    assert (f'aborted once the checkpoint of step 1 was written to {out}, which --resume '
            'continues' in capsys.readouterr().err)
    assert torch.load(out / 'train_state.pt', weights_only=True)['step'] == 1
    assert json.loads((out / 's4fusion_compact.json').read_text())['training']['steps_done'] == 1


def test_a_second_ctrl_c_aborts_with_one_line(tmp_path, pair_folder):
    out = tmp_path / 'run'
    process = subprocess.Popen(
        [sys.executable, '-m', 's4fusion_ros.tools.train', '--data', str(pair_folder), '--out',
         str(out), '--steps', '1000', '--batch-size', '1', '--crop', '49', '--device', 'cpu',
         '--threads', '1', '--no-progress'], stderr=subprocess.PIPE, text=True)
    with reading(process, process.stderr, stop=signal.SIGKILL) as said:
        log = out / 'train_log.jsonl'
        wait_while_running(process, lambda: log.exists() and log.stat().st_size, 120, said.text)
        process.send_signal(signal.SIGINT)
        time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        assert exited(process, 60), said.text()
    stderr = said.text()
    assert process.returncode == 130 and 'Traceback' not in stderr, stderr
    # Which line depends on where the second one lands: in a step, in the checkpoint the first
    # one asked for (written whole first), or after the run ended with it.
    assert re.search(r'aborted without saving|aborted once the checkpoint of step \d+ was '
                     r'written|stopped by SIGINT', stderr), stderr


@pytest.mark.parametrize('stop', [signal.SIGTERM, None], ids=['and a stop signal', 'alone'])
def test_a_run_whose_reader_of_stderr_left_stops_with_its_checkpoint(tmp_path, pair_folder, stop):
    # `s4fusion-train ... |& tee log` stopped with Ctrl-C, which ends tee too: the progress bar's
    # next write failed in mid-step and the run ended with exit 1 and no checkpoint of the steps
    # since the last. Without a stop signal it stops as SIGPIPE ends other tools, but checkpoints.
    out = tmp_path / 'run'
    log = out / 'train_log.jsonl'
    process = subprocess.Popen(
        [sys.executable, '-m', 's4fusion_ros.tools.train', '--data', str(pair_folder), '--out',
         str(out), '--steps', '1000', '--batch-size', '1', '--crop', '25', '--device', 'cpu',
         '--threads', '1'], stderr=subprocess.PIPE, text=True)
    code = exit_with_stderr_unread(
        process, stop, lambda: log.exists() and log.read_text().count('\n') >= 2)
    assert code == (130 if stop else READER_LEFT)
    state = torch.load(out / 'train_state.pt', weights_only=True)
    assert state['step'] == len(log.read_text().splitlines())


def test_the_progress_bar_in_a_log_file_is_not_redrawn_every_step(tmp_path, pair_folder):
    # `s4fusion-train ... > train.log 2>&1` (CI, a service's journal): the bar was redrawn at
    # every step, forced by its figures, each redraw kept in the file on one long line. Its
    # figures now wait for the bar's own pace: with a pace no run reaches, it is drawn as it
    # opens and as it closes, not 40 times.
    steps = 40
    log = tmp_path / 'train.err'
    with open(log, 'w') as stderr:
        done = subprocess.run(
            [sys.executable, '-m', 's4fusion_ros.tools.train', '--data', str(pair_folder),
             '--out', str(tmp_path / 'run'), '--steps', str(steps), '--batch-size', '1',
             '--crop', '25', '--device', 'cpu', '--threads', '1'],
            stderr=stderr, env={**os.environ, 'TQDM_MININTERVAL': '3600'}, timeout=300)
    text = log.read_bytes()  # as written: read_text would turn the redraws' '\r' into '\n'
    assert done.returncode == 0, text
    assert f'{steps}/{steps}'.encode() in text  # the bar's last state, as it closes
    assert text.count(b'\r') <= 3, text


@pytest.mark.parametrize('chosen', [None, '0.2'])
def test_progress_bars_redraw_once_a_second_where_stderr_is_no_terminal(tmp_path, chosen):
    # Up to 10 redraws a second stayed in a log file; the user's TQDM_MININTERVAL stands.
    env = {k: v for k, v in os.environ.items() if k != 'TQDM_MININTERVAL'}
    script = ('import os; from s4fusion_ros.entry_points import configure_process; '
              "configure_process(); print(os.environ['TQDM_MININTERVAL'])")
    with open(tmp_path / 'err', 'w') as stderr:
        done = subprocess.run([sys.executable, '-c', script], stdout=subprocess.PIPE,
                              stderr=stderr, text=True, timeout=120,
                              env=env if chosen is None else {**env, 'TQDM_MININTERVAL': chosen})
    assert done.returncode == 0, (tmp_path / 'err').read_text()
    assert done.stdout == f'{chosen or 1}\n'


def test_an_interrupted_atomic_write_leaves_the_file_as_it_was(tmp_path):
    from s4fusion_ros.files import write_atomically
    path = tmp_path / 'train_state.pt'
    path.write_bytes(b'the last checkpoint')

    def dies_halfway(file):
        file.write(b'half a checkpoint')
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, dies_halfway)
    assert path.read_bytes() == b'the last checkpoint' and list(tmp_path.iterdir()) == [path]
