"""s4fusion-fuse and s4fusion-eval on real pairs: the node's engine on files, and the report."""

import csv
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import urllib.parse

import cv2
import numpy as np
import pytest
import torch

from paths import REPO, executable
from s4fusion_ros import settings
from s4fusion_ros.engine import FusionEngine, FusionPipeline, FusionSettings, PreparedPair
from s4fusion_ros.evaluation import baselines, metrics, report
from s4fusion_ros.imaging.color import bgr_to_ycrcb, to_uint8
from s4fusion_ros.imaging.encodings import encode_image
from s4fusion_ros.imaging.normalization import ThermalNormalizer
from s4fusion_ros.imaging.registration import ThermalRegistration
from s4fusion_ros.model import S4Fusion, S4FusionConfig, save_checkpoint, shipped_weights
from s4fusion_ros.runtime import load_fusion_model, threads_kept
from s4fusion_ros.sync import PairSynchronizer
from s4fusion_ros.tools import evaluate, fuse
from s4fusion_ros.training.data import ivif_splits, m3svd_clip, pair_key
from support import address_space_limit, exited, file_size_limit, reading

COLOUR_PAIR = ('roadscene', 'FLIR_00006.jpg')  # gray JPEG IR, colour JPEG visible
GRAY_PAIR = ('tno', '08.png')  # IR and visible PNGs with three equal channels, 256x256


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small images gain nothing from threads, and on a busy machine they wait for each other.
    (evaluate.main's --threads stays with its test.)"""
    with threads_kept():
        torch.set_num_threads(1)
        yield


def tiny_model():
    """Untrained, with its output moved to mid-gray so that no pixel is clamped to black."""
    torch.manual_seed(0)
    model = S4Fusion(S4FusionConfig(dims=(8, 16, 32), d_state=4, fusion_d_state=4,
                                    fusion_blocks=1))
    with torch.no_grad():
        model.head.conv.bias.fill_(0.5)
    return model


@pytest.fixture(scope='module')
def tiny_weights(tmp_path_factory):
    """A small checkpoint: fast, and the same whether trained weights ship or not."""
    path = tmp_path_factory.mktemp('weights') / 'tiny.safetensors'
    save_checkpoint(tiny_model(), path)
    return path


def copy_pairs(ivif_dir, folder, pairs):
    for side in ('ir', 'vi'):
        (folder / side).mkdir(parents=True, exist_ok=True)
        for dataset, name in pairs:
            shutil.copy(ivif_dir / dataset / side / name, folder / side / name)


def read_png(path):
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def test_fuse_writes_what_the_engine_makes_from_the_images(ivif_dir, tmp_path, tiny_weights):
    copy_pairs(ivif_dir, tmp_path, [COLOUR_PAIR, GRAY_PAIR])
    out = tmp_path / 'out'
    assert fuse.main(['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
                      str(out), '--weights', str(tiny_weights), '--device', 'cpu']) == 0
    model = load_fusion_model(str(tiny_weights), device='cpu')
    for (dataset, name), encoding in ((COLOUR_PAIR, 'bgr8'), (GRAY_PAIR, 'mono8')):
        ir = cv2.imread(str(ivif_dir / dataset / 'ir' / name), cv2.IMREAD_GRAYSCALE)
        vi = cv2.imread(str(ivif_dir / dataset / 'vi' / name), cv2.IMREAD_COLOR)
        engine = FusionEngine(model, FusionSettings(output_encoding=encoding))
        # Dataset thermal images are display-ready 8-bit: the model sees them / 255.
        expected = engine.infer(PreparedPair(0, 0, name, ir.astype(np.float32) / 255.0, vi))
        stem = name.rsplit('.', 1)[0]
        fused = read_png(out / 'fused' / f'{stem}.png')
        saliency = read_png(out / 'saliency' / f'{stem}.png')
        assert fused.shape == (vi.shape if encoding == 'bgr8' else ir.shape)
        assert saliency.shape == ir.shape and saliency.dtype == np.uint8 and saliency.max() > 0
        # x / 255 and the normalizer's x * (1 / 255) may differ in the last float bit.
        assert np.abs(fused.astype(int) - expected.fused).max() <= 1
        assert np.abs(saliency.astype(int) - np.rint(expected.saliency * 255)).max() <= 1


def test_fuse_reads_the_visible_files_colour_by_its_channels_and_refuses_16_bit(
        ivif_dir, tmp_path, capsys, tiny_weights):
    # What --vi holds decides the output: a one-channel gray file fuses as its three-channel
    # copy, a colour image whose blue and green agree is still colour, and a 16-bit visible
    # image (the model's colour path is 8-bit) fails alone, naming its file.
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    visible = cv2.imread(str(tmp_path / 'vi' / '08.png'), cv2.IMREAD_COLOR)
    tinted = visible.copy()
    tinted[..., 2] = 255 - visible[..., 2]  # red differs, blue still equals green
    for name, image in (('one_channel.png', visible[..., 0]), ('tinted.png', tinted),
                        ('deep.png', visible.astype(np.uint16) * 257)):
        shutil.copy(tmp_path / 'ir' / '08.png', tmp_path / 'ir' / name)
        cv2.imwrite(str(tmp_path / 'vi' / name), image)
    out = tmp_path / 'out'
    assert fuse.main(['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
                      str(out), '--weights', str(tiny_weights), '--device', 'cpu']) == 1
    errors = capsys.readouterr().err
    assert (f'{fuse.PROG}: {tmp_path / "vi" / "deep.png"}: the visible image must be 8-bit, '
            'got uint16' in errors and 'fused 3 of 4 pairs' in errors), errors
    assert not (out / 'fused' / 'deep.png').exists()
    gray = read_png(out / 'fused' / '08.png')
    assert gray.ndim == 2
    assert np.array_equal(read_png(out / 'fused' / 'one_channel.png'), gray)
    assert read_png(out / 'fused' / 'tinted.png').shape == tinted.shape


def test_the_readme_python_example_writes_what_s4fusion_fuse_writes(
        ivif_dir, tmp_path, monkeypatch):
    readme = (REPO / 'README.md').read_text()
    example = re.search(r'From Python, without ROS.*?```python\n(.*?)```', readme, re.S).group(1)
    copy_pairs(ivif_dir, tmp_path, [('msrs', '00004N.png')])
    monkeypatch.chdir(tmp_path)
    exec(compile(example, 'README.md', 'exec'), {})
    assert fuse.main(['--ir', 'ir', '--vi', 'vi', '--out', 'out', '--device', 'cpu']) == 0
    for output in ('fused', 'saliency'):
        assert np.array_equal(read_png(tmp_path / f'{output}.png'),
                              read_png(tmp_path / 'out' / output / '00004N.png')), output


def test_fuse_gray_writes_the_luminance_eval_scores(ivif_dir, tmp_path, tiny_weights):
    # A toolkit reading the colour PNG with its own gray conversion scores other pixels; --gray
    # writes the Y that s4fusion-eval scores, for the colour pair and the gray one alike.
    copy_pairs(ivif_dir, tmp_path, [COLOUR_PAIR, GRAY_PAIR])
    common = ['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--weights',
              str(tiny_weights), '--device', 'cpu']
    assert fuse.main([*common, '--out', str(tmp_path / 'colour')]) == 0
    assert fuse.main([*common, '--out', str(tmp_path / 'gray'), '--gray']) == 0
    for name in ('FLIR_00006.png', '08.png'):
        colour = read_png(tmp_path / 'colour' / 'fused' / name)
        gray = read_png(tmp_path / 'gray' / 'fused' / name)
        assert gray.ndim == 2
        assert np.array_equal(gray, evaluate.luminance(colour))
        assert np.array_equal(read_png(tmp_path / 'gray' / 'saliency' / name),
                              read_png(tmp_path / 'colour' / 'saliency' / name))


def test_a_file_without_a_partner_fails_the_run_after_the_others(ivif_dir, tmp_path, capsys,
                                                                 tiny_weights):
    # An evaluator expecting one output per file must not go on with fewer (exit code 0).
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    shutil.copy(tmp_path / 'vi' / '08.png', tmp_path / 'vi' / '08_vis.png')
    out = tmp_path / 'out'
    assert fuse.main(['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
                      str(out), '--weights', str(tiny_weights), '--device', 'cpu']) == 1
    errors = capsys.readouterr().err
    assert f'no partner for {tmp_path / "vi" / "08_vis.png"}' in errors
    assert '1 file(s) without a partner (see above)' in errors
    assert sorted(p.name for p in (out / 'fused').iterdir()) == ['08.png']
    assert fuse.main(['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
                      str(out), '--weights', str(tiny_weights), '--device', 'cpu',
                      '--skip-existing']) == 1  # all pairs done, the file still alone
    assert 'all 1 pairs are fused' in capsys.readouterr().err


def test_raw_16_bit_counts_are_flagged_and_stretched_as_the_node_does(ivif_dir, tmp_path,
                                                                      capsys, tiny_weights):
    ir = cv2.imread(str(ivif_dir / 'tno' / 'ir' / GRAY_PAIR[1]), cv2.IMREAD_GRAYSCALE)
    counts = (7000 + ir.astype(np.float64) / 255 * 2000).astype(np.uint16)  # a 14-bit camera
    for side, image in (('ir', counts), ('vi', cv2.imread(
            str(ivif_dir / 'tno' / 'vi' / GRAY_PAIR[1]), cv2.IMREAD_COLOR))):
        (tmp_path / side).mkdir()
        cv2.imwrite(str(tmp_path / side / 'raw.png'), image)
    common = ['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--weights',
              str(tiny_weights), '--device', 'cpu']
    assert fuse.main([*common, '--out', str(tmp_path / 'plain')]) == 0
    assert 'is 16-bit but spans only 7000-9000 of 0-65535' in capsys.readouterr().err
    assert fuse.main([*common, '--out', str(tmp_path / 'stretched'), '--stretch-thermal']) == 0
    assert 'spans only' not in capsys.readouterr().err
    # The node, given these counts as a mono16 frame, normalizes and fuses the same pixels.
    pipeline = FusionPipeline(PairSynchronizer(slop=0.01, queue_size=2), ThermalNormalizer(),
                              ThermalRegistration())
    visible = cv2.imread(str(tmp_path / 'vi' / 'raw.png'), cv2.IMREAD_COLOR)
    pipeline.add_thermal(encode_image(counts, 'mono16'), 10**9, 'ir')
    [pair] = pipeline.add_visible(encode_image(visible, 'bgr8'), 10**9, 'rgb')
    engine = FusionEngine(load_fusion_model(str(tiny_weights), device='cpu'),
                          FusionSettings(output_encoding='mono8'))
    expected = engine.infer(pair).fused
    stretched = read_png(tmp_path / 'stretched' / 'fused' / 'raw.png')
    assert np.abs(stretched.astype(int) - expected).max() <= 1
    assert not np.array_equal(read_png(tmp_path / 'plain' / 'fused' / 'raw.png'), stretched)


def test_fuse_warns_once_of_a_false_colour_or_differently_sized_ir_image(ivif_dir, tmp_path,
                                                                         capsys, tiny_weights):
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    ir = cv2.imread(str(tmp_path / 'ir' / '08.png'), cv2.IMREAD_GRAYSCALE)
    for name in ('jet1.png', 'jet2.png'):  # a palette rendering, as some cameras' video out
        cv2.imwrite(str(tmp_path / 'ir' / name), cv2.applyColorMap(ir, cv2.COLORMAP_JET))
        shutil.copy(tmp_path / 'vi' / '08.png', tmp_path / 'vi' / name)
    height, width = ir.shape
    # Not square, so that the message must give each size width first.
    cv2.imwrite(str(tmp_path / 'ir' / 'small.png'), cv2.resize(ir, (width // 2, height // 4)))
    shutil.copy(tmp_path / 'vi' / '08.png', tmp_path / 'vi' / 'small.png')
    assert fuse.main(['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
                      str(tmp_path / 'out'), '--weights', str(tiny_weights), '--device',
                      'cpu']) == 0
    errors = capsys.readouterr().err
    assert errors.count('is a colour image: it fuses as its luminance') == 1
    assert f'{tmp_path / "ir" / "jet1.png"} is a colour image' in errors
    assert (f'{tmp_path / "ir" / "small.png"} is {width // 2}x{height // 4} and '
            f'{tmp_path / "vi" / "small.png"} {width}x{height}: the IR image is resized') in errors
    assert f'{tmp_path / "ir" / "08.png"}' not in errors
    # Each is warned of once; the summary counts them all (it named only the first).
    assert ('fused 4 of 4 pairs into' in errors and '; 2 pair(s) with a colour IR image' in errors
            and '; 1 pair(s) with the IR resized to the visible size' in errors), errors


def test_an_image_file_past_the_size_limits_fails_alone(ivif_dir, tmp_path, capsys,
                                                        tiny_weights):
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    for side in ('ir', 'vi'):  # the test process has OpenCV's limits, as the commands do
        cv2.imwrite(str(tmp_path / side / 'wide.png'), np.zeros((64, 40000), np.uint8))
    out = tmp_path / 'out'
    assert fuse.main(['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
                      str(out), '--weights', str(tiny_weights), '--device', 'cpu']) == 1
    error = capsys.readouterr().err
    assert f'{tmp_path / "ir" / "wide.png"}: cannot read it' in error and 'Traceback' not in error
    assert sorted(p.name for p in (out / 'fused').iterdir()) == ['08.png']


def test_an_image_past_the_decoding_limits_is_named_with_them(ivif_dir, tmp_path,
                                                              tiny_weights):
    # The line quoted OpenCV's failed check, "(pixels <= CV_IO_MAX_IMAGE_PIXELS)".
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    for side in ('ir', 'vi'):  # 3e8 pixels, each side within the limit: small as a PNG
        cv2.imwrite(str(tmp_path / side / 'huge.png'), np.zeros((15000, 20000), np.uint8))
    proc = subprocess.run(
        [sys.executable, '-m', 's4fusion_ros.tools.fuse', '--ir', str(tmp_path / 'ir'), '--vi',
         str(tmp_path / 'vi'), '--out', str(tmp_path / 'out'), '--weights', str(tiny_weights),
         '--device', 'cpu'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert (f'{tmp_path / "ir" / "huge.png"}: cannot read it (larger than the limit of 32768 '
            'pixels a side or 268435456 pixels)' in proc.stderr), proc.stderr
    assert 'fused 1 of 2 pairs' in proc.stderr


def test_a_pair_too_large_for_the_memory_fails_alone(ivif_dir, tmp_path, tiny_weights):
    # Its failed allocation ended the run in a traceback, the pairs after it not fused; the node
    # and s4fusion-bag drop such a pair and go on.
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    for side in ('ir', 'vi'):  # 12 megapixels, sorted first: the model needs about 2.6 GB
        image = cv2.imread(str(tmp_path / side / GRAY_PAIR[1]), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(tmp_path / side / '01_large.png'),
                    cv2.resize(image, (4000, 3000), interpolation=cv2.INTER_NEAREST))
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, '-m', 's4fusion_ros.tools.fuse', '--ir', str(tmp_path / 'ir'), '--vi',
         str(tmp_path / 'vi'), '--out', str(out), '--weights', str(tiny_weights), '--device',
         'cpu'], capture_output=True, text=True, timeout=120,
        preexec_fn=address_space_limit(1 << 30))  # a real allocation failure
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert f'{tmp_path / "ir" / "01_large.png"}: fusing its pair failed: ' in proc.stderr
    assert 'fused 1 of 2 pairs' in proc.stderr
    assert sorted(p.name for p in (out / 'fused').iterdir()) == ['08.png']


def test_an_address_space_limit_too_small_to_load_the_kernels_is_named(ivif_dir, tmp_path):
    # Just above what torch, OpenCV and numba take loaded, numba's LLVM cannot load: the run
    # ended on "Could not find/load shared object file 'libllvmlite.so' ... the permissions are
    # incorrect", which sends a user after a broken installation.
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    proc = subprocess.run(
        [sys.executable, '-m', 's4fusion_ros.tools.fuse', '--ir', str(tmp_path / 'ir'), '--vi',
         str(tmp_path / 'vi'), '--out', str(tmp_path / 'out'), '--device', 'cpu'],
        capture_output=True, text=True, timeout=120, preexec_fn=address_space_limit(50 << 20))
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert re.search(r'^s4fusion-fuse: .* \(this process reached its address space limit of '
                     r'[\d.]+ GiB, ulimit -v: an allocation failed, whatever the error says; '
                     r'allow more\)$', proc.stderr, re.MULTILINE), proc.stderr


def test_fuse_refuses_a_jpeg_cut_short_and_reads_a_name_that_is_not_utf8(ivif_dir, tmp_path,
                                                                         capsys, tiny_weights):
    # The cut JPEG was fused with its missing rows gray (libjpeg only warns); the Latin-1 name
    # crashed the process inside cv2.imread (a segmentation fault, every pair lost).
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    latin1 = os.fsdecode(b'caf\xe9.png')
    for side in ('ir', 'vi'):
        shutil.copy(tmp_path / side / GRAY_PAIR[1], tmp_path / side / latin1)
        image = cv2.imread(str(tmp_path / side / GRAY_PAIR[1]), cv2.IMREAD_UNCHANGED)
        jpeg = cv2.imencode('.jpg', image)[1].tobytes()
        (tmp_path / side / 'cut.jpg').write_bytes(jpeg if side == 'ir' else jpeg[:len(jpeg) // 2])
        # A motion photo: a whole JPEG, then its video (here a second JPEG's bytes, scan
        # markers and all), which was taken for a scan cut short.
        (tmp_path / side / 'motion.jpg').write_bytes(jpeg + jpeg[:len(jpeg) // 2])
    out = tmp_path / 'out'
    assert fuse.main(['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
                      str(out), '--weights', str(tiny_weights), '--device', 'cpu']) == 1
    errors = capsys.readouterr().err
    assert (f'{tmp_path / "vi" / "cut.jpg"}: a JPEG cut short (no end-of-image marker after its '
            'last scan)') in errors
    assert f'fused 3 of 4 pairs into {out}' in errors
    assert sorted(p.name for p in (out / 'fused').iterdir()) == sorted([GRAY_PAIR[1], latin1,
                                                                        'motion.png'])


def with_exif_orientation(jpeg, orientation):
    """A JPEG file's bytes with an EXIF segment holding only its Orientation tag."""
    entry = struct.pack('>HHIHH', 0x0112, 3, 1, orientation, 0)  # SHORT, one value
    tiff = b'MM' + struct.pack('>HI', 42, 8) + struct.pack('>H', 1) + entry + bytes(4)
    segment = b'Exif\x00\x00' + tiff
    return jpeg[:2] + b'\xff\xe1' + struct.pack('>H', len(segment) + 2) + segment + jpeg[2:]


def test_fuse_turns_a_photo_upright_as_its_exif_orientation_says(ivif_dir, tmp_path, capsys,
                                                                 tiny_weights):
    # A visible photo stored on its side with "rotate 90 clockwise to show" was fused sideways:
    # its IR partner resized onto it, the scene torn apart.
    copy_pairs(ivif_dir, tmp_path / 'upright', [COLOUR_PAIR])
    name = COLOUR_PAIR[1]
    copy_pairs(ivif_dir, tmp_path / 'tagged', [COLOUR_PAIR])
    visible = cv2.imread(str(tmp_path / 'upright' / 'vi' / name))
    stored = cv2.rotate(visible, cv2.ROTATE_90_COUNTERCLOCKWISE)
    (tmp_path / 'tagged' / 'vi' / name).write_bytes(
        with_exif_orientation(cv2.imencode('.jpg', stored, [cv2.IMWRITE_JPEG_QUALITY, 100])[1]
                              .tobytes(), 6))
    for folder in ('upright', 'tagged'):
        assert fuse.main(['--ir', str(tmp_path / folder / 'ir'), '--vi',
                          str(tmp_path / folder / 'vi'), '--out', str(tmp_path / folder / 'out'),
                          '--weights', str(tiny_weights), '--device', 'cpu']) == 0
    assert 'resized' not in capsys.readouterr().err
    upright, tagged = (read_png(tmp_path / folder / 'out' / 'fused' / pathlib.Path(name)
                                .with_suffix('.png')) for folder in ('upright', 'tagged'))
    assert tagged.shape == upright.shape
    assert np.abs(tagged.astype(int) - upright).mean() < 2  # JPEG saved once more


def test_fuse_reports_unmatched_names_and_unreadable_files(ivif_dir, tmp_path, capsys,
                                                           tiny_weights):
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    shutil.copy(tmp_path / 'ir' / '08.png', tmp_path / 'ir' / 'lonely.png')
    shutil.copy(tmp_path / 'ir' / '08.png', tmp_path / 'ir' / 'broken.png')
    (tmp_path / 'vi' / 'broken.png').write_bytes(b'not a png')
    out = tmp_path / 'out'
    # Earlier runs' outputs: the fused image of the pair that now fails, a saliency map alone.
    for kind, name in (('fused', 'broken.png'), ('saliency', '08.png')):
        (out / kind).mkdir(parents=True)
        (out / kind / name).write_bytes(b'stale')
    command = ['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out', str(out),
               '--weights', str(tiny_weights), '--device', 'cpu']
    assert fuse.main(command) == 1  # an earlier run's output stays unless told otherwise
    assert '2 output(s) exist' in capsys.readouterr().err
    assert (out / 'fused' / 'broken.png').read_bytes() == b'stale'
    assert (out / 'saliency' / '08.png').read_bytes() == b'stale'
    code = fuse.main(command + ['--overwrite'])
    errors = capsys.readouterr().err
    assert code == 1
    assert f'no partner for {tmp_path / "ir" / "lonely.png"}' in errors
    assert f'{tmp_path / "vi" / "broken.png"}: not a readable image' in errors
    assert f'fused 1 of 2 pairs into {out}; 1 file(s) without a partner skipped' in errors
    assert sorted(p.name for p in (out / 'fused').iterdir()) == ['08.png']
    # Written into an input folder itself (--ir X/fused --out X), the inputs would go.
    for kind in ('fused', 'saliency'):
        inputs = tmp_path / kind / kind
        shutil.copytree(tmp_path / 'ir', inputs)
        before = (inputs / '08.png').read_bytes()
        assert fuse.main(['--ir', str(inputs), *command[2:4], '--out', str(tmp_path / kind),
                          *command[6:], '--overwrite']) == 1
        assert f'{inputs} is an input folder' in capsys.readouterr().err
        assert (inputs / '08.png').read_bytes() == before
    # An output folder that is a symlink loop: one line, not a traceback.
    (tmp_path / 'loop').mkdir()
    (tmp_path / 'loop' / 'fused').symlink_to(tmp_path / 'loop' / 'fused')
    assert fuse.main([*command[:4], '--out', str(tmp_path / 'loop'), *command[6:]]) == 1
    assert 'Symlink loop' in capsys.readouterr().err


def test_a_pair_of_broken_links_is_named_not_left_out(ivif_dir, tmp_path, capsys,
                                                      tiny_weights):
    # Folders of links into a dataset that moved: a pair of dangling links was skipped without
    # a word (exit 0), and one on a side alone made its partner "without a partner".
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    for side in ('ir', 'vi'):
        (tmp_path / side / 'gone.png').symlink_to(tmp_path / 'moved' / side / 'gone.png')
    shutil.copy(tmp_path / 'vi' / '08.png', tmp_path / 'vi' / 'half.png')
    (tmp_path / 'ir' / 'half.png').symlink_to(tmp_path / 'moved' / 'half.png')
    out = tmp_path / 'out'
    assert fuse.main(['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
                      str(out), '--weights', str(tiny_weights), '--device', 'cpu']) == 1
    errors = capsys.readouterr().err
    for name in ('gone.png', 'half.png'):
        assert (f'{tmp_path / "ir" / name}: cannot read it (No such file or directory)'
                in errors), errors
    assert 'no partner' not in errors and 'fused 1 of 3 pairs' in errors
    assert sorted(p.name for p in (out / 'fused').iterdir()) == ['08.png']


def test_fuse_names_the_pairs_that_would_write_one_output(ivif_dir, tmp_path, capsys,
                                                          tiny_weights):
    # a.png and a.jpg (each with its partner) both make a.png: the message said
    # "several inputs would write the same output: ['08'].png".
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    for side in ('ir', 'vi'):
        shutil.copy(tmp_path / side / '08.png', tmp_path / side / '08.jpg')
    assert fuse.main(['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
                      str(tmp_path / 'out'), '--weights', str(tiny_weights), '--device',
                      'cpu']) == 1
    assert ('the pairs 08.jpg, 08.png would write the same outputs, 08.png: rename them apart'
            in capsys.readouterr().err)
    assert not (tmp_path / 'out').exists()


def fused_two_pairs(ivif_dir, tmp_path, tiny_weights):
    """(out, the s4fusion-fuse command, {output: bytes}) of the colour and the gray pair fused
    into tmp_path/out."""
    copy_pairs(ivif_dir, tmp_path, [COLOUR_PAIR, GRAY_PAIR])
    out = tmp_path / 'out'
    command = ['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out', str(out),
               '--weights', str(tiny_weights), '--device', 'cpu']
    assert fuse.main(command) == 0
    return out, command, {path: path.read_bytes() for path in out.rglob('*.png')}


def test_fuse_skip_existing_fuses_only_the_pairs_a_cut_run_left(ivif_dir, tmp_path, capsys,
                                                                tiny_weights):
    out, command, whole = fused_two_pairs(ivif_dir, tmp_path, tiny_weights)
    colour, gray = (name.rsplit('.', 1)[0] + '.png' for _, name in (COLOUR_PAIR, GRAY_PAIR))
    # Cut short: the colour pair done, the gray pair between its two writes.
    (out / 'saliency' / gray).unlink()
    (out / 'fused' / gray).write_bytes(b'cut')
    stamp = (out / 'fused' / colour).stat().st_mtime_ns
    capsys.readouterr()
    assert fuse.main(command) == 1
    assert '--skip-existing' in capsys.readouterr().err
    assert fuse.main(command + ['--skip-existing']) == 0
    assert f'fused 1 of 1 pairs into {out}; 1 already under {out} skipped' in (
        capsys.readouterr().err)
    assert {path: path.read_bytes() for path in out.rglob('*.png')} == whole
    assert (out / 'fused' / colour).stat().st_mtime_ns == stamp  # not written again
    assert fuse.main(command + ['--skip-existing']) == 0
    assert f'all 2 pairs are fused under {out}' in capsys.readouterr().err
    # Other settings than those that made the outputs: refused, naming them; nothing touched.
    record = (out / 's4fusion-fuse.json').read_bytes()
    other = tiny_model()
    with torch.no_grad():
        other.head.conv.bias.fill_(0.4)
    save_checkpoint(other, tmp_path / 'other.safetensors')
    for options, named in ((['--gray'], 'gray: False -> True'),
                           (['--inference-size', '128x96'], 'inference_size: [0, 0] -> [128, 96]'),
                           (['--stretch-thermal'], 'stretch_thermal: False -> True'),
                           (['--weights', str(tmp_path / 'other.safetensors')], 'weights_sha256')):
        assert fuse.main(command + ['--skip-existing'] + options) == 1
        assert named in capsys.readouterr().err
    assert {path: path.read_bytes() for path in out.rglob('*.png')} == whole
    assert (out / 's4fusion-fuse.json').read_bytes() == record
    with pytest.raises(SystemExit):
        fuse.main(command + ['--skip-existing', '--overwrite'])
    assert 'not allowed with argument' in capsys.readouterr().err


def test_fuse_stopped_by_a_full_disk_says_what_was_written_and_how_to_go_on(
        ivif_dir, tmp_path, capsys, tiny_weights):
    out, command, whole = fused_two_pairs(ivif_dir, tmp_path, tiny_weights)
    colour, gray = (name.rsplit('.', 1)[0] + '.png' for _, name in (COLOUR_PAIR, GRAY_PAIR))
    shutil.rmtree(out)
    capsys.readouterr()
    # A real write failure: the gray pair (fused first, by name) fits under the file size
    # limit, the colour pair's fused image does not.
    limit = len(whole[out / 'fused' / colour]) - 1
    assert max(len(whole[out / kind / gray]) for kind in ('fused', 'saliency')) < limit
    with file_size_limit(limit):
        status = fuse.main(command)
    error = capsys.readouterr().err
    assert status == 1 and (
        f"File too large: '{out / 'fused' / colour}'; 1 of the 2 pairs were written before it "
        '(--skip-existing fuses the rest)') in error, error
    assert fuse.main(command + ['--skip-existing']) == 0
    assert f'fused 1 of 1 pairs into {out}; 1 already under {out} skipped' in (
        capsys.readouterr().err)
    assert {path: path.read_bytes() for path in out.rglob('*.png')} == whole


def test_fuse_skip_existing_fuses_again_what_other_pictures_of_the_same_names_made(
        ivif_dir, tmp_path, capsys, tiny_weights):
    """Datasets numbered alike (00000.png in both), or an image replaced in place: the outputs
    under --out were made from other pictures, and --skip-existing kept them as done."""
    for folder, dataset in (('a', 'msrs'), ('b', 'm3fd')):
        for side in ('ir', 'vi'):
            (tmp_path / folder / side).mkdir(parents=True)
            source = sorted((ivif_dir / dataset / side).glob('*.png'))[0]
            shutil.copy(source, tmp_path / folder / side / '00000.png')

    def run(folder, out, *options):
        return fuse.main(['--ir', str(tmp_path / folder / 'ir'), '--vi',
                          str(tmp_path / folder / 'vi'), '--out', str(tmp_path / out),
                          '--weights', str(tiny_weights), '--device', 'cpu', *options])

    def outputs(out):
        return {path.relative_to(tmp_path / out): path.read_bytes()
                for path in (tmp_path / out).rglob('*.png')}
    assert run('b', 'b_alone') == 0 and run('a', 'out') == 0
    capsys.readouterr()
    assert run('b', 'out', '--skip-existing') == 0
    assert '1 fused again, their outputs not made from these source files' in (
        capsys.readouterr().err)
    assert outputs('out') == outputs('b_alone')
    assert run('b', 'out', '--skip-existing') == 0  # made from these files now: kept
    assert 'all 1 pairs are fused' in capsys.readouterr().err
    shutil.copy(tmp_path / 'a' / 'ir' / '00000.png', tmp_path / 'b' / 'ir' / '00000.png')
    assert run('b', 'out', '--skip-existing') == 0
    assert run('b', 'b_replaced') == 0
    assert outputs('out') == outputs('b_replaced') != outputs('b_alone')


def test_fuse_resuming_a_cut_overwrite_never_keeps_the_run_before(ivif_dir, tmp_path, capsys,
                                                                  monkeypatch, tiny_weights):
    """A run with --overwrite and new settings, cut after its first pair and resumed, gives
    what one whole run with those settings gives: no output of the run before survives."""
    copy_pairs(ivif_dir, tmp_path, [COLOUR_PAIR, GRAY_PAIR])
    command = ['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--weights',
               str(tiny_weights), '--device', 'cpu', '--gray']
    assert fuse.main(command + ['--out', str(tmp_path / 'whole')]) == 0
    out = tmp_path / 'out'
    assert fuse.main(command[:-1] + ['--out', str(out)]) == 0  # colour, the run before
    written, write_png = [], fuse.write_png

    def cut_after_the_first_pair(path, image):
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C
        written.append(path)
        write_png(path, image)
    monkeypatch.setattr(fuse, 'write_png', cut_after_the_first_pair)
    capsys.readouterr()
    assert fuse.main(command + ['--out', str(out), '--overwrite']) == 130
    assert 'fused again' not in capsys.readouterr().err  # --overwrite fuses every pair
    monkeypatch.undo()
    assert fuse.main(command + ['--out', str(out), '--skip-existing']) == 0
    for path in (tmp_path / 'whole').rglob('*.png'):
        assert (out / path.relative_to(tmp_path / 'whole')).read_bytes() == path.read_bytes()
    (out / 's4fusion-fuse.json').unlink()  # outputs nothing describes: not resumed
    assert fuse.main(command + ['--out', str(out), '--skip-existing']) == 1


def test_fuse_never_leaves_other_pairs_outputs_of_other_settings_beside_its_own(
        ivif_dir, tmp_path, capsys, tiny_weights):
    for folder, pair in (('colour', COLOUR_PAIR), ('gray', GRAY_PAIR)):
        copy_pairs(ivif_dir, tmp_path / folder, [pair])
    out = tmp_path / 'out'

    def run(folder, *options):
        return fuse.main(['--ir', str(tmp_path / folder / 'ir'), '--vi',
                          str(tmp_path / folder / 'vi'), '--out', str(out), '--weights',
                          str(tiny_weights), '--device', 'cpu', *options])
    assert run('colour') == 0
    before = {path: path.read_bytes() for path in out.rglob('*') if path.is_file()}
    for options in (['--gray'], ['--gray', '--overwrite'], ['--gray', '--skip-existing']):
        capsys.readouterr()
        assert run('gray', *options) == 1
        assert (f'{out} holds 2 output(s) of other pairs (FLIR_00006.png, ...) not made with '
                'these settings (gray: False -> True)') in capsys.readouterr().err
        assert {path: path.read_bytes() for path in out.rglob('*') if path.is_file()} == before
    assert run('gray') == 0  # the same settings: the record describes both pairs' outputs
    assert sorted(p.name for p in (out / 'fused').iterdir()) == ['08.png', 'FLIR_00006.png']
    capsys.readouterr()
    assert run('colour', '--skip-existing') == 0  # and still what they were made from
    assert 'all 1 pairs are fused' in capsys.readouterr().err


def test_fuse_skip_existing_fuses_again_a_source_changed_in_size_or_time_alone(
        ivif_dir, tmp_path, capsys, tiny_weights):
    """A picture edited in place keeps its size in an uncompressed format, and one copied with
    its time (cp -p) keeps its time: either alone tells that the outputs are of another."""
    def picture(dataset, side, size):
        source = sorted((ivif_dir / dataset / side).glob('*.png'))[0]
        return cv2.resize(cv2.imread(str(source), cv2.IMREAD_GRAYSCALE), size,
                          interpolation=cv2.INTER_AREA)
    for side in ('ir', 'vi'):
        (tmp_path / side).mkdir()
        cv2.imwrite(str(tmp_path / side / '0.bmp'), picture('msrs', side, (160, 120)))
    ir = tmp_path / 'ir' / '0.bmp'
    command = ['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
               str(tmp_path / 'out'), '--weights', str(tiny_weights), '--device', 'cpu',
               '--skip-existing']
    assert fuse.main(command) == 0
    for size in ((160, 120), (120, 90)):  # same bytes, a later time; other bytes, same time
        before = ir.stat()
        cv2.imwrite(str(ir), picture('m3fd', 'ir', size))
        times = (before.st_atime_ns, before.st_mtime_ns + 10**9 * (size == (160, 120)))
        os.utime(ir, ns=times)
        assert (ir.stat().st_size == before.st_size) == (size == (160, 120))
        capsys.readouterr()
        assert fuse.main(command) == 0
        assert '1 fused again, their outputs not made from these source files' in (
            capsys.readouterr().err)


def test_fuse_skip_existing_refuses_another_detail_gain(ivif_dir, tmp_path, capsys):
    # The gain on the Laplacian base's details is part of the model's recorded configuration,
    # not of its weights file: the outputs of another gain must not be kept.
    torch.manual_seed(0)
    model = S4Fusion(S4FusionConfig(dims=(8, 16, 32), d_state=4, fusion_d_state=4,
                                    fusion_blocks=1, base='laplacian'))
    save_checkpoint(model, tmp_path / 'laplacian.safetensors')
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    command = ['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
               str(tmp_path / 'out'), '--weights', str(tmp_path / 'laplacian.safetensors'),
               '--device', 'cpu']
    assert fuse.main(command) == 0
    capsys.readouterr()
    assert fuse.main(command + ['--skip-existing', '--detail-gain', '1.5']) == 1
    assert 'model.detail_gain: 1.0 -> 1.5' in capsys.readouterr().err


def test_fuse_refuses_a_run_record_it_cannot_read_or_write_before_touching_outputs(
        ivif_dir, tmp_path, capsys, tiny_weights):
    copy_pairs(ivif_dir, tmp_path, [GRAY_PAIR])
    out = tmp_path / 'out'
    command = ['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out', str(out),
               '--weights', str(tiny_weights), '--device', 'cpu']
    assert fuse.main(command) == 0
    outputs = {path: path.read_bytes() for path in out.rglob('*.png')}
    record = out / fuse.RUN_RECORD
    record.write_text('[]\n')  # JSON, but no record: it was a traceback
    capsys.readouterr()
    assert fuse.main(command + ['--skip-existing']) == 1
    assert (f'--skip-existing: the outputs under {out} were not made with these settings '
            f'({fuse.RUN_RECORD} is not a run record)') in capsys.readouterr().err
    record.unlink()
    record.mkdir()  # the outputs were removed, then the record could not be written
    assert fuse.main(command + ['--overwrite']) == 1
    assert f'{record} is a folder: it must be free for the run record' in (
        capsys.readouterr().err)
    assert {path: path.read_bytes() for path in out.rglob('*.png')} == outputs


def test_report_names_the_base_settings_the_hashed_weights_run_at():
    # The gain and contrast are in the JSON, outside the hash: the report must say which ran.
    lines = {preset: evaluate.describe_weights(
        evaluate.OursConfig(preset, shipped_weights(preset))) for preset in ('authors', 'compact')}
    assert 'parameters, detail gain 1.1, base contrast 1.4)' in lines['compact']
    assert 'detail gain' not in lines['authors'].split(';')[0]


def test_report_names_the_network_its_config_describes_not_the_jsons_label(tmp_path):
    # The JSON's 'preset' and 'parameters' are labels anyone can edit; the config decides what
    # ran. Compact tensors whose JSON says "authors" must not be reported as the authors preset.
    model = S4Fusion(S4FusionConfig.preset('compact'))
    path, json_path = save_checkpoint(model, tmp_path / 'mislabelled.safetensors')
    meta = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**meta, 'preset': 'authors', 'parameters': 3410893}))
    line = evaluate.describe_weights(evaluate.OursConfig('mislabelled', path))
    assert f'preset compact, {model.num_parameters()} parameters, detail gain 1.1' in line
    # The compact network at another gain is that network, not the preset; an edited width is
    # no preset's network.
    meta['config']['detail_gain'] = 1.15
    json_path.write_text(json.dumps(meta))
    assert ', the compact network, ' in evaluate.describe_weights(
        evaluate.OursConfig('gain', path))
    assert S4FusionConfig.from_dict({**meta['config'], 'dims': [8, 16, 32]}).describe() \
        == 'a custom network'


def test_report_names_the_weights_a_run_started_from_without_their_records(tmp_path):
    # A chain of fine-tunings nests each earlier run's whole record: the report names the start
    # and counts the runs behind it (the JSON keeps them).
    first = {'steps': 10, 'data': ['roadscene/a.jpg']}
    second = {'steps': 20, 'initialised_from': {'file': 'x.safetensors', 'sha256': 'a' * 64,
                                                'training': first}}
    path, _ = save_checkpoint(tiny_model(), tmp_path / 'tuned.safetensors', extra_meta={
        'training': {'steps': 30, 'initialised_from': {
            'file': 'y.safetensors', 'sha256': 'b' * 64, 'training': second}}})
    line = evaluate.describe_weights(evaluate.OursConfig('tuned', path))
    assert line.endswith('; training: steps 30; initialised_from y.safetensors (sha256 '
                         + 'b' * 16 + "; 2 earlier training runs recorded in the weights' JSON)")
    assert 'roadscene' not in line
    # Started from weights saved without a training record: say so, count nothing.
    assert evaluate._lineage({'file': 'z.safetensors', 'sha256': 'c' * 64, 'training': None}) \
        == 'z.safetensors (sha256 ' + 'c' * 16 + '; its training unrecorded)'
    # A chain ending in something that is not a record is unrecorded too, not a fresh start.
    assert evaluate._lineage({'file': 'y', 'sha256': 'b' * 64, 'training': {
        'initialised_from': 'x.safetensors'}}).endswith(
        "1 earlier training run recorded in the weights' JSON, the training before them "
        'unrecorded)')


def test_training_overlap_counts_a_packed_copy_of_a_pair_as_that_pair(tmp_path):
    # Weights trained on gpu_train.py's packed split list 'msrs-train/00556D.jpg' for the ivif
    # layout's 'msrs/00556D.png': the report must count it, and keep datasets apart. Fine-tuned
    # from weights trained on the layout, they count each pair once.
    path, _ = save_checkpoint(tiny_model(), tmp_path / 'packed.safetensors', extra_meta={
        'training': {'data': ['msrs-train/00556D.jpg', 'm3svd-frames-train/0111_1716_0002.jpg',
                              'roadscene-train/FLIR_00018.jpg'],
                     'initialised_from': {'training': {'data': [
                         'msrs/00556D.png', 'roadscene/FLIR_00018.jpg', 'videos/0111_1716_0010',
                     ]}}}})
    evaluated = ['msrs/00556D.png', 'frames/0111_1716_0002.png', 'roadscene/FLIR_00006.jpg',
                 'tno/00556D.png', 'my-msrs/00556D.png']
    note = evaluate.training_overlap(evaluate.OursConfig('packed', path), evaluated)
    assert note == ('packed: 2 of the 5 evaluated pairs are among its 4 training pairs '
                    '(frames/0111_1716_0002.png, msrs/00556D.png).')


def test_pair_key_leaves_names_outside_the_packed_layout_as_they_are():
    assert pair_key('my-msrs/00556D.png') == 'my-msrs/00556D'
    assert pair_key('videos/clip.v2_0010') == 'videos/clip.v2_0010'  # a frame, not a file
    assert pair_key('m3svd-videos-train/clip.v2_0010.jpg') == 'videos/clip.v2_0010'
    # Only the -train suffix and the ivif layout's nested datasets are packing's.
    assert pair_key('my-msrs-train/00556D.jpg') == 'my-msrs/00556D'
    assert pair_key('my-data-train/a.jpg') == pair_key('my-data/a.png') == 'my-data/a'
    # A dataset unpacked as TNO/ is the layout's tno/: its test pairs must count as trained on.
    assert pair_key('TNO/01.png') == pair_key('tno/01.png') == 'tno/01'


def test_fuse_refuses_a_detail_gain_out_of_range_and_one_folder_for_both(tmp_path, capsys):
    (tmp_path / 'ir').mkdir()
    with pytest.raises(SystemExit) as exit_info:
        fuse.main(['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path), '--out',
                   str(tmp_path / 'o'), '--detail-gain', '-1'])
    assert exit_info.value.code == 2 and '--detail-gain' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        fuse.main(['--ir', str(tmp_path), '--vi', f'{tmp_path}/.', '--out', str(tmp_path / 'o')])
    assert exit_info.value.code == 2 and '--ir and --vi are one folder' in (
        capsys.readouterr().err)
    (tmp_path / 'a').symlink_to(tmp_path / 'b')
    (tmp_path / 'b').symlink_to(tmp_path / 'a')
    with pytest.raises(SystemExit) as exit_info:  # it was a traceback
        fuse.main(['--ir', str(tmp_path / 'a'), '--vi', str(tmp_path), '--out', str(tmp_path)])
    assert exit_info.value.code == 2 and 'Symlink loop' in capsys.readouterr().err


def test_fuse_takes_0x0_for_full_resolution_and_fails_folders_without_a_pair(
        tmp_path, capsys, tiny_weights):
    # 0x0, the default the help names, was refused by a minimum of 1; two empty folders (a
    # wrong path's typo'd twin, say) exit 1, not 0 with "all 0 pairs are fused".
    command = ['--ir', str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
               str(tmp_path / 'out'), '--weights', str(tiny_weights), '--device', 'cpu']
    assert fuse.parse_args([*command, '--inference-size', '0x0']).inference_size == (0, 0)
    for side in ('ir', 'vi'):
        (tmp_path / side).mkdir()
    assert fuse.main(command) == 1
    assert (f'no pairs with the same file name (or the same name with another extension) in '
            f'{tmp_path / "ir"} and {tmp_path / "vi"}') in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('threads', ['0', '-1'])
def test_eval_refuses_a_thread_count_below_one(tmp_path, capsys, threads):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(['--data', str(tmp_path), '--threads', threads])
    assert exit_info.value.code == 2 and '--threads must be >= 1' in capsys.readouterr().err


def table_rows(text, dataset):
    """{method: [cell, ...]} of a dataset's metric table, bold markers removed."""
    section = text.split(f'## {dataset} ')[1].split('**Wins:**')[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip().strip('*') for c in line.strip('|').split('|')]
        if line.startswith('| ') and cells[0] != 'Method':
            rows[cells[0]] = cells[1:]
    return rows


def test_eval_report_numbers_are_the_metrics_of_the_saved_outputs(ivif_dir, tmp_path,
                                                                  tiny_weights):
    out, grid = tmp_path / 'quality.md', tmp_path / 'grid.png'
    assert evaluate.main(['--data', str(ivif_dir), '--datasets', 'tno42', '--limit', '2',
                          '--methods', 'ours,average,stored', '--weights', str(tiny_weights),
                          '--device', 'cpu', '--out', str(out), '--grid', str(grid)]) == 0
    text = out.read_text()
    rows = table_rows(text, 'tno42')
    ours = f'S4Fusion ({tiny_weights.parent.name}/tiny)'
    assert list(rows) == [ours, 'Average', 'DenseFuse (stored outputs)']
    names = ['01.png', '02.png']
    tno = ivif_dir / 'tno'
    sources = [[cv2.imread(str(tno / side / n), cv2.IMREAD_GRAYSCALE) for side in ('ir', 'vi')]
               for n in names]
    # Rounded half up, as MATLAB's uint8((A + B) / 2): half to even made a comb of even values.
    average = [((ir.astype(np.int32) + vi + 1) // 2).astype(np.uint8) for ir, vi in sources]
    stored = [cv2.imread(str(tno / 'fused' / 'DenseFuse' / n), cv2.IMREAD_GRAYSCALE)
              for n in names]
    for method, outputs in (('Average', average), ('DenseFuse (stored outputs)', stored)):
        scores = [metrics.evaluate_all(f, ir, vi) for f, (ir, vi) in zip(outputs, sources)]
        expected = [report.format_value(np.mean([s[m] for s in scores])) for m in metrics.METRICS]
        assert rows[method][:len(metrics.METRICS)] == expected, method
    assert rows['DenseFuse (stored outputs)'][-1] == 'stored'
    assert float(rows['Average'][-1]) >= 0.0
    assert re.search(rf'- {re.escape(ours)} beats every other method \(Average, DenseFuse '
                     r'\(stored outputs\)\) on \d+ of 12 metrics', text)
    assert f'| {ours} vs | EN |' in text  # the paired comparison
    assert '[quality_pairs.csv](quality_pairs.csv)' in text
    with open(tmp_path / 'quality_pairs.csv', newline='') as table:
        per_pair = list(csv.DictReader(table))
    assert [(row['pair'], row['method']) for row in per_pair] == [
        (name, method) for method in rows for name in ('01.png', '02.png')]
    average_ssim = np.mean([float(row['SSIM']) for row in per_pair if row['method'] == 'Average'])
    assert report.format_value(average_ssim) == rows['Average'][metrics.METRICS.index('SSIM')]
    assert 'Only the first 2 pairs' in text and 'its JSON holds no training information' in text
    image = read_png(grid)
    assert image.shape[0] == report.GRID_LABEL + report.GRID_HEIGHT and image.shape[2] == 3
    assert f'![IR / VI / fused / saliency]({grid.name})' in text


def test_the_grid_scales_each_image_to_the_row_height_in_columns_of_the_widest(ivif_dir):
    # A square TNO pair above a wider RoadScene one: each cell keeps its image's aspect, and a
    # column is as wide as its widest cell.
    rows = [(f'{dataset}: {name}', [cv2.imread(str(ivif_dir / dataset / side / name))
                                    for side in ('ir', 'vi')])
            for dataset, name in (GRAY_PAIR, COLOUR_PAIR)]
    height = 100
    grid = report.make_grid(rows, ['IR', 'visible'], height)
    scaled = [[cv2.resize(image, (round(image.shape[1] * height / image.shape[0]), height),
                          interpolation=cv2.INTER_AREA) for image in images]
              for _, images in rows]
    widths = [max(row[col].shape[1] for row in scaled) for col in range(2)]
    assert scaled[0][0].shape[1] < scaled[1][0].shape[1]
    assert grid.shape == (report.GRID_LABEL + 2 * height, sum(widths), 3)
    # The second row's visible image, below its label (which is drawn from its first cell on).
    top = report.GRID_LABEL + height + 30
    visible = scaled[1][1][30:]
    np.testing.assert_array_equal(grid[top:, widths[0]:widths[0] + visible.shape[1]], visible)


def pair_names(count):
    return tuple(f'{index:02d}.png' for index in range(count))


def scores(values):
    """Per-pair metric dicts where every metric takes `values[i]` on pair i."""
    return [dict.fromkeys(metrics.METRICS, value) for value in values]


def test_best_and_wins_compare_the_printed_values():
    ours = report.MethodScores('ours', True, scores([2.0, 4.0]))  # mean 3
    other = report.MethodScores('other', False, scores([3.0004]))  # prints 3.000 too
    worse = report.MethodScores('worse', False, scores([1.0]))
    dataset = report.DatasetScores('d', pair_names(2), [ours, other, worse])
    assert report.best_methods(dataset, 'EN') == {'ours', 'other'}
    assert report.best_methods(dataset, 'MSE') == {'worse'}
    assert report.wins(dataset) == {'ours': []}
    other.scores = scores([2.5])
    assert report.wins(dataset) == {'ours': [m for m in metrics.METRICS if m != 'MSE']}
    assert report.reference_wins(dataset) == {'other': [], 'worse': ['MSE']}
    assert '| ours | **3.000** |' in '\n'.join(report.metric_table(dataset))


def test_an_undefined_mean_is_neither_won_nor_lost():
    # A rival whose SCD cannot be computed (its output is a source: NaN on every pair) has not
    # lost on SCD: ours beat it there before.
    ours = report.MethodScores('ours', True, scores([3.0]))
    copy = report.MethodScores('copy', False, scores([2.0]))
    copy.scores[0]['SCD'] = math.nan
    dataset = report.DatasetScores('d', pair_names(1), [ours, copy])
    assert 'SCD' not in report.wins(dataset)['ours']
    assert 'SCD' not in report.head_to_head(dataset)['ours']['copy']
    assert report.best_methods(dataset, 'SCD') == {'ours'}
    # Beside a rival that is defined, ours wins it as its bold cell says.
    lower = report.MethodScores('lower', False, scores([2.0]))
    dataset.methods.append(lower)
    assert 'SCD' in report.wins(dataset)['ours']
    assert 'SCD' not in report.head_to_head(dataset)['ours']['copy']
    copy.scores[0]['EN'] = ours.scores[0]['EN'] = lower.scores[0]['EN'] = math.nan
    assert report.best_methods(dataset, 'EN') == set()
    assert 'EN' not in report.wins(dataset)['ours']


def test_head_to_head_counts_each_rival_and_says_whether_most_are_won():
    ours = report.MethodScores('ours', True, scores([3.0]))
    lower = report.MethodScores('lower', False, scores([2.0]))  # ours wins all but MSE
    mixed = report.MethodScores('mixed', False, scores([3.0]))
    mixed.scores[0].update(dict.fromkeys(metrics.METRICS[:6], 2.0))  # EN..CC: 6 of 12, not most
    dataset = report.DatasetScores('d', pair_names(1), [ours, lower, mixed])
    won_mixed = list(metrics.METRICS[:6])
    assert report.head_to_head(dataset) == {'ours': {
        'lower': [m for m in metrics.METRICS if m != 'MSE'], 'mixed': won_mixed}}
    line = report.wins_lines(dataset)[1]
    assert f'lower {len(metrics.METRICS) - 1}, mixed {len(won_mixed)}' in line
    assert 'not most against every one' in line
    mixed.scores = scores([2.0])
    assert '(most against every one)' in report.wins_lines(dataset)[1]


def test_paired_comparison_calls_only_consistent_differences_wins_or_losses():
    rival_values = [float(v) for v in range(1, 21)]
    rival = report.MethodScores('rival', False, scores(rival_values))
    ahead = report.MethodScores('ahead', True, scores([v + 0.5 for v in rival_values]))
    # Same mean as the rival, better on half of the pairs: no call either way.
    swings = report.MethodScores('swings', True, scores(
        [v + (1.0 if i % 2 else -1.0) for i, v in enumerate(rival_values)]))
    dataset = report.DatasetScores('d', pair_names(20), [ahead, swings, rival])
    compared = report.paired_comparisons(dataset)
    assert compared['ahead']['rival']['EN'] == report.PairedComparison('W', 1.0)
    assert compared['ahead']['rival']['MSE'] == report.PairedComparison('L', 0.0)  # lower wins
    assert compared['swings']['rival']['EN'] == report.PairedComparison('~', 0.5)


def test_paired_comparison_of_clips_frames_judges_whole_clips():
    # Ahead by 1 on each of clip a's ten frames, behind by 0.2 on each of clip b's: as twenty
    # independent pairs that is a consistent lead, but one clip of two says the opposite.
    rival = report.MethodScores('rival', False, scores([0.0] * 20))
    ours = report.MethodScores('ours', True, scores([1.0] * 10 + [-0.2] * 10))
    as_pairs = report.DatasetScores('d', pair_names(20), [ours, rival])
    as_clips = report.DatasetScores('d', pair_names(20), [ours, rival],
                                    pair_clips=('a',) * 10 + ('b',) * 10)
    assert report.paired_comparisons(as_pairs)['ours']['rival']['EN'].verdict == 'W'
    assert report.paired_comparisons(as_clips)['ours']['rival']['EN'] == \
        report.PairedComparison('~', 0.5)
    context = report.ReportContext('s4fusion-eval', 'today', 'cpu', [], [], [])
    text = report.render([as_clips], context)
    assert 'frames of 2 clips' in text and 'With 2 clips, too few for a bootstrap' in text
    assert 'clips' not in report.render([as_pairs], context)
    # Two clips are too few for an interval: a call needs both clips to agree.
    ours.scores = scores([1.0] * 10 + [0.2] * 10)
    assert report.paired_comparisons(as_clips)['ours']['rival']['EN'].verdict == 'W'
    # One clip (or one pair): nothing to compare it with, no verdict.
    one_clip = report.DatasetScores('d', pair_names(20), [ours, rival], pair_clips=('a',) * 20)
    assert report.paired_comparisons(one_clip)['ours']['rival']['EN'] == \
        report.PairedComparison('~', 1.0)
    assert 'frames of 1 clip,' in report.render([one_clip], context)
    one_pair = report.DatasetScores('d', pair_names(1), [report.MethodScores(
        'ours', True, scores([1.0])), report.MethodScores('rival', False, scores([0.0]))])
    assert report.paired_comparisons(one_pair)['ours']['rival']['EN'].verdict == '~'
    # A clip without a defined value leaves one clip to judge: that is no verdict either.
    undefined_in_b = scores([1.0] * 10 + [math.nan] * 10)
    as_clips.methods[0].scores = undefined_in_b
    assert report.paired_comparisons(as_clips)['ours']['rival']['EN'] == \
        report.PairedComparison('~', 1.0)
    with pytest.raises(ValueError, match='d: 19 clips for 20 pairs'):
        report.DatasetScores('d', pair_names(20), [ours, rival], pair_clips=('a',) * 19)


def test_paired_comparison_bootstraps_from_enough_clips():
    # Eleven clips of two frames, ten ahead by 1 and one behind by 0.5: every clip agreeing is
    # not needed where the clips are enough for an interval; the interval still calls it.
    clips = tuple(chr(ord('a') + index // 2) for index in range(22))
    rival = report.MethodScores('rival', False, scores([0.0] * 22))
    ours = report.MethodScores('ours', True, scores([1.0] * 20 + [-0.5] * 2))
    dataset = report.DatasetScores('d', pair_names(22), [ours, rival], pair_clips=clips)
    assert report.paired_comparisons(dataset)['ours']['rival']['EN'].verdict == 'W'
    text = report.render([dataset], report.ReportContext('s4fusion-eval', 'today', 'cpu', [],
                                                         [], []))
    assert 'frames of 11 clips' in text and 'too few for a bootstrap' not in text
    # Clips without a defined value do not count towards an interval: with four of eleven
    # left, every one must agree, and one behind leaves it open.
    ours.scores = scores([1.0] * 6 + [-0.5] * 2 + [math.nan] * 14)
    assert report.paired_comparisons(dataset)['ours']['rival']['EN'] == \
        report.PairedComparison('~', 0.75)
    # Five independent pairs are too few: one against the others leaves it open.
    few = report.DatasetScores('f', pair_names(5), [
        report.MethodScores('ours', True, scores([1.0, 1.0, 1.0, 1.0, -0.5])),
        report.MethodScores('rival', False, scores([0.0] * 5))])
    assert report.paired_comparisons(few)['ours']['rival']['EN'] == \
        report.PairedComparison('~', 0.8)
    assert 'With 5 pairs, too few' in report.render([few], report.ReportContext(
        's4fusion-eval', 'today', 'cpu', [], [], []))


def test_report_notes_a_verdict_of_too_few_defined_clips_where_the_split_has_enough():
    # Eleven clips, but EN defined on four of them only: that verdict needs every clip to
    # agree, not the interval the legend gives; the report said nothing of it.
    clips = tuple(chr(ord('a') + index // 2) for index in range(22))
    rival = report.MethodScores('rival', False, scores([0.0] * 22))
    ours = report.MethodScores('ours', True, scores([1.0] * 22))
    for score in ours.scores[8:]:
        score['EN'] = math.nan
    dataset = report.DatasetScores('d', pair_names(22), [ours, rival], pair_clips=clips)
    text = ' '.join(report.render([dataset], report.ReportContext(
        's4fusion-eval', 'today', 'cpu', [], [], [])).split())
    assert ('Where a metric is defined for both methods on fewer than 6 clips, there is no '
            'bootstrap interval (ours vs rival: EN (4 clips)): W there means') in text
    ours.scores = scores([1.0] * 22)  # every comparison has its interval: no such note
    text = report.render([dataset], report.ReportContext('s4fusion-eval', 'today', 'cpu', [],
                                                         [], []))
    assert 'Where a metric is defined for both methods' not in text


def test_eval_notes_validation_pairs_near_test_frames_of_the_whole_splits(ivif_dir):
    # Scored on 3 pairs of roadscene_val alone: the note still counts the whole splits.
    args = evaluate.parse_args(['--data', str(ivif_dir), '--datasets', 'roadscene_val',
                                '--limit', '3', '--out', 'q.md'])
    notes = evaluate.data_notes(args, [], ivif_splits(ivif_dir), [])
    (note,) = [n for n in notes if 'roadscene_val pairs lie' in n]
    assert note.startswith('9 of the 20 roadscene_val pairs lie within 30 frames of one of the '
                           '67 roadscene67 test pairs (FLIR_04593.jpg, ')


def test_eval_names_the_clips_of_the_splits_of_clips_frames(ivif_dir):
    args = evaluate.parse_args(['--data', str(ivif_dir), '--datasets',
                                'm3svd_val,tno42,roadscene67', '--limit', '12', '--out', 'q.md'])
    splits, validation, clips = evaluate.evaluation_splits(args, ivif_splits(ivif_dir))
    assert validation == {'m3svd_val', 'roadscene_val'}
    assert list(clips) == ['m3svd_val', 'roadscene67']  # no clips are known for TNO's pairs
    assert len(clips['roadscene67']) == 12
    assert len(splits['m3svd_val']) == len(clips['m3svd_val']) == 12
    assert clips['m3svd_val'] == tuple(map(m3svd_clip, splits['m3svd_val']))
    assert len(set(clips['m3svd_val'])) == 2


def test_eval_report_resamples_the_clips_of_a_split_of_clips_frames(
        ivif_dir, tmp_path, tiny_weights):
    # The clips and the validation splits evaluation_splits names must reach the report: the
    # first 11 pairs of m3svd_val are frames of 2 clips, too few for an interval.
    out = tmp_path / 'q.md'
    assert evaluate.main(['--data', str(ivif_dir), '--datasets', 'm3svd_val', '--limit', '11',
                          '--methods', 'ours,average', '--weights', str(tiny_weights),
                          '--device', 'cpu', '--out', str(out)]) == 0
    text = ' '.join(out.read_text().split())
    assert '## m3svd_val (11 pairs, validation split)' in text
    assert 'The pairs of this split are frames of 2 clips' in text
    assert 'With 2 clips, too few for a bootstrap interval' in text


def test_paired_comparison_leaves_undefined_pairs_out_and_needs_the_same_pairs():
    rival = report.MethodScores('rival', False, scores([1.0, 2.0, 3.0, 4.0]))
    ours = report.MethodScores('ours', True, scores([2.0, 3.0, 4.0, math.nan]))
    compared = report.paired_comparisons(report.DatasetScores('d', pair_names(4), [ours, rival]))
    assert compared['ours']['rival']['SD'] == report.PairedComparison('W', 1.0)
    rival.scores = rival.scores[:3]
    with pytest.raises(ValueError, match='rival not scored on each of the 4 pairs'):
        report.paired_comparisons(report.DatasetScores('d', pair_names(4), [ours, rival]))


def test_report_shows_a_paired_table_per_configuration_of_ours():
    rival = report.MethodScores('rival', False, scores([1.0, 2.0, 3.0]))
    ours = report.MethodScores('ours', True, scores([2.0, 3.0, 4.0]))
    context = report.ReportContext('s4fusion-eval', 'today', 'cpu', [], [], [])
    text = report.render([report.DatasetScores('d', pair_names(3), [ours, rival])], context)
    assert '**Paired over the pairs:**' in text
    assert '| ours vs | ' + ' | '.join(metrics.METRICS) + ' | W / L / ~ |' in text
    assert '| rival | W 100% |' in text and '| 11 / 1 / 0 |' in text
    assert '## d (3 pairs)\n' in text


def test_a_comparison_without_a_defined_pair_is_shown_apart_and_not_counted():
    # SCD of a stored copy of the IR image is undefined on every pair: the comparison was shown
    # '~' and counted as within noise.
    rival = report.MethodScores('copy of IR', False, scores([1.0, 2.0, 3.0]))
    for score in rival.scores:
        score['SCD'] = math.nan
    ours = report.MethodScores('ours', True, scores([2.0, 3.0, 4.0]))
    context = report.ReportContext('s4fusion-eval', 'today', 'cpu', [], [], [])
    text = report.render([report.DatasetScores('d', pair_names(3), [ours, rival])], context)
    cells = ['W 100%'] * len(metrics.METRICS)
    cells[metrics.METRICS.index('SCD')] = '—'
    cells[metrics.METRICS.index('MSE')] = 'L 0%'
    assert '| copy of IR | ' + ' | '.join(cells) + ' | 10 / 1 / 0 |' in text
    assert ('—: no pair has both values defined (the metric is undefined on every pair for one '
            'of the two), so no comparison, left out of the W / L / ~ counts.') in ' '.join(
        text.split())  # the legend, its lines joined


def test_wins_count_other_methods_only_on_the_metrics_the_split_compares():
    # Two configurations of ours are not each other's rivals, and a published table without
    # SSIM compares 11 metrics: the line counts those won of those compared.
    compared = tuple(metric for metric in metrics.METRICS if metric != 'SSIM')
    dataset = report.DatasetScores('d', pair_names(1), [
        report.MethodScores('ours a', True, scores([3.0])),
        report.MethodScores('ours b', True, scores([2.5])),
        report.MethodScores('rival', False, scores([2.0]))], metrics=compared)
    won = [metric for metric in compared if metric != 'MSE']
    assert report.wins(dataset) == {'ours a': won, 'ours b': won}
    assert report.head_to_head(dataset) == {'ours a': {'rival': won}, 'ours b': {'rival': won}}
    assert report.wins_lines(dataset)[1] == (
        f'- ours b beats every other method (rival) on 10 of 11 metrics: {", ".join(won)}.')


def test_means_leave_undefined_pairs_out_and_an_undefined_first_row_is_not_the_best():
    # Ours, the first row, with SCD undefined on every pair: the best was taken as its NaN, and
    # no cell of the column was bold.
    ours = report.MethodScores('ours', True, scores([3.0, 5.0]))
    for score in ours.scores:
        score['SCD'] = math.nan
    rival = report.MethodScores('rival', False, scores([1.0, math.nan]))
    dataset = report.DatasetScores('d', pair_names(2), [ours, rival])
    assert rival.mean('EN') == 1.0 and rival.undefined('EN') == 1
    assert report.best_methods(dataset, 'SCD') == {'rival'}
    assert '| rival | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | **1.000** |' in \
        '\n'.join(report.metric_table(dataset))


def test_values_below_a_tenth_are_compared_at_the_four_decimals_printed():
    # The toolkit's MSE on [0, 1] (published values): at three decimals 0.0396 and 0.0404 both
    # read 0.040, a tie no method won.
    dataset = report.DatasetScores('d', pair_names(1), [
        report.MethodScores('ours', True, scores([0.0396])),
        report.MethodScores('rival', False, scores([0.0404]))])
    assert report.best_methods(dataset, 'MSE') == {'ours'}
    assert 'MSE' in report.wins(dataset)['ours']
    assert [report.format_value(value) for value in (0.0396, 99.96, 100.0, 2502.84)] == [
        '0.0396', '99.960', '100.0', '2502.8']


def test_the_bootstrap_of_enough_clips_resamples_whole_clips():
    # Eight clips of ten frames, four ahead (by 2, 2, 2 and 1) and four behind by 1: as 80
    # independent pairs the lead holds in nearly every resample, but eight clips are few and
    # another draw of them could reverse it.
    ahead_by = [2.0, -1.0, 2.0, -1.0, 2.0, -1.0, 1.0, -1.0]
    ours = report.MethodScores('ours', True, scores(np.repeat(ahead_by, 10)))
    rival = report.MethodScores('rival', False, scores([0.0] * 80))
    clips = tuple(np.repeat(list('abcdefgh'), 10))
    as_clips = report.DatasetScores('d', pair_names(80), [ours, rival], pair_clips=clips)
    as_pairs = report.DatasetScores('d', pair_names(80), [ours, rival])
    assert report.paired_comparisons(as_clips)['ours']['rival']['EN'].verdict == '~'
    assert report.paired_comparisons(as_pairs)['ours']['rival']['EN'].verdict == 'W'


def test_six_pairs_get_the_95_percent_interval_of_resamples_with_replacement():
    # Six units are enough for an interval: one pair behind by 0.1 does not leave it open.
    six = report.DatasetScores('d', pair_names(6), [
        report.MethodScores('ours', True, scores([1.0] * 5 + [-0.1])),
        report.MethodScores('rival', False, scores([0.0] * 6))])
    assert report.paired_comparisons(six)['ours']['rival']['EN'].verdict == 'W'
    context = report.ReportContext('s4fusion-eval', 'today', 'cpu', [], [], [])
    assert 'too few for a bootstrap' not in report.render([six], context)
    # Ten pairs ahead by 1, two behind by 1.5: about 3.7% of resamples have a mean below 0,
    # inside the 2.5% tail a 95% interval keeps; a 90% interval, or resamples that count a pair
    # drawn twice once, made it W.
    twelve = report.DatasetScores('d', pair_names(12), [
        report.MethodScores('ours', True, scores([1.0] * 10 + [-1.5] * 2)),
        report.MethodScores('rival', False, scores([0.0] * 12))])
    assert report.paired_comparisons(twelve)['ours']['rival']['EN'].verdict == '~'


def test_a_tie_is_neither_a_pair_won_nor_a_lead():
    # Equal on one of four pairs and ahead on the others: better on 75% of them, and every
    # pair must favour ours for a W where they are too few for an interval.
    dataset = report.DatasetScores('d', pair_names(4), [
        report.MethodScores('ours', True, scores([1.0, 1.0, 1.0, 0.0])),
        report.MethodScores('rival', False, scores([0.0] * 4))])
    assert report.paired_comparisons(dataset)['ours']['rival']['EN'] == \
        report.PairedComparison('~', 0.75)


@pytest.mark.filterwarnings('error')  # a resample of undefined clips alone divided 0 by 0
def test_clips_without_a_defined_value_are_left_out_of_the_interval():
    # Eleven clips of two frames, six of them undefined: five are too few for an interval, so
    # the one behind (by 0.01) leaves it open; the bootstrap of the eleven said W.
    clips = tuple(chr(ord('a') + index // 2) for index in range(22))
    rival = report.MethodScores('rival', False, scores([0.0] * 22))
    ours = report.MethodScores('ours', True, scores([1.0] * 8 + [-0.01] * 2 + [math.nan] * 12))
    dataset = report.DatasetScores('d', pair_names(22), [ours, rival], pair_clips=clips)
    assert report.paired_comparisons(dataset)['ours']['rival']['EN'] == \
        report.PairedComparison('~', 0.8)
    # Six of twenty pairs defined, all ahead: some resamples draw none of the six, no mean.
    dataset = report.DatasetScores('d', pair_names(20), [
        report.MethodScores('ours', True, scores([1.0] * 6 + [math.nan] * 14)),
        report.MethodScores('rival', False, scores([0.0] * 20))])
    assert report.paired_comparisons(dataset)['ours']['rival']['EN'].verdict == 'W'


def test_a_split_without_rivals_has_no_paired_table_and_its_time_is_per_pair():
    dataset = report.DatasetScores('d', pair_names(2), [
        report.MethodScores('ours', True, scores([2.0, 3.0]), seconds=3.0)])
    text = report.render([dataset], report.ReportContext('s4fusion-eval', 'today', 'cpu', [],
                                                         [], []))
    assert '| **2.500** | 1.500 |\n' in text
    assert 'No other method was evaluated on this dataset.' in text
    assert 'Paired over the pairs' not in text and ' vs |' not in text


@pytest.mark.filterwarnings('error')  # the NaN arithmetic printed RuntimeWarnings too
def test_an_infinite_psnr_is_noted_and_outweighs_every_finite_difference(ivif_dir):
    # Where a pair's IR and visible images are one image, the plain average equals both: PSNR is
    # infinite. Its mean read "inf" without a word, and 0 * inf in the bootstrap's sums made the
    # paired PSNR verdict '~', where MSE (of which a pair's PSNR is a falling function) said L.
    pairs = [tuple(cv2.imread(str(ivif_dir / 'tno' / side / f'0{index}.png'),
                              cv2.IMREAD_GRAYSCALE)[:96, :96] for side in ('ir', 'vi'))
             for index in range(1, 7)]
    pairs.append((pairs[0][0], pairs[0][0]))  # one image as both sources

    def scored(fuse):
        return [metrics.evaluate_all(to_uint8(fuse(ir, vi)), ir, vi) for ir, vi in pairs]

    base = functools.partial(baselines.fuse_laplacian, detail_gain=1.1, base_contrast=1.4)
    ours = report.MethodScores('ours', True, scored(base))
    average = report.MethodScores('Average', False, scored(baselines.fuse_average))
    dataset = report.DatasetScores('d', pair_names(len(pairs)), [ours, average])
    compared = report.paired_comparisons(dataset)['ours']['Average']
    assert compared['MSE'] == compared['PSNR'] == report.PairedComparison('L', 0.0)
    text = report.render([dataset], report.ReportContext('s4fusion-eval', 'today', 'cpu', [],
                                                         [], []))
    assert '| **inf** |' in text
    assert ('- d, Average: PSNR is infinite on 1 of 7 pairs (its output equals both sources '
            'there), and so is its mean.') in text


def test_report_marks_the_validation_split():
    methods = [report.MethodScores('ours', True, scores([2.0, 3.0])),
               report.MethodScores('rival', False, scores([1.0, 2.0]))]
    context = report.ReportContext('s4fusion-eval', 'today', 'cpu', [], [], [])
    text = report.render([report.DatasetScores('val', pair_names(2), methods, validation=True)],
                         context)
    assert '## val (2 pairs, validation split)\n' in text


def test_checkpoints_of_one_name_in_two_runs_are_labelled_apart():
    # s4fusion-train --keep-every keeps runs/<run>/checkpoints/s4fusion_<preset>-step<N>.*
    kept = [pathlib.Path(f'runs/{run}/checkpoints/s4fusion_authors-step000500.safetensors')
            for run in ('a', 'b')]
    latest = pathlib.Path('runs/a/s4fusion_authors.safetensors')
    configs, _, _ = evaluate.ours_configs([*kept, latest])
    assert [config.label for config in configs] == [
        'S4Fusion (a/checkpoints/s4fusion_authors-step000500)',
        'S4Fusion (b/checkpoints/s4fusion_authors-step000500)',
        'S4Fusion (runs/a/s4fusion_authors)']
    assert [config.weights for config in configs] == [*kept, latest]
    with pytest.raises(ValueError, match='names a checkpoint twice'):
        evaluate.ours_configs([latest, pathlib.Path('runs/b/../a/s4fusion_authors.safetensors')])


def test_shipped_configurations_are_skipped_when_their_weights_are_missing(tmp_path):
    def shipped(preset):
        return tmp_path / f's4fusion_{preset}.safetensors'

    configs, skipped, _ = evaluate.ours_configs([], shipped)
    assert configs == []
    assert [line.split(':')[0] for line in skipped] == ['S4Fusion authors', 'S4Fusion compact']
    assert 's4fusion_compact.safetensors is missing' in skipped[1]
    save_checkpoint(tiny_model(), shipped('compact'))
    configs, skipped, _ = evaluate.ours_configs([], shipped)
    size = tuple(settings.SPECS['inference_size'].default)
    expected = [evaluate.OursConfig('S4Fusion compact', shipped('compact'))]
    if all(size):  # the node's CPU defaults run the model at a reduced size
        expected.append(evaluate.OursConfig(
            f'S4Fusion compact, CPU defaults ({size[0]}x{size[1]})', shipped('compact'), size))
    assert configs == expected and len(skipped) == 1


def test_recorded_training_labels_follow_the_fine_tuning_chain():
    labels = evaluate.recorded_training_labels
    base = {'data': ['roadscene/a.jpg', 'msrs/b.png'], 'steps_done': 9}
    tuned = {'data': ['roadscene/c.jpg'], 'initialised_from': {'sha256': 'x', 'training': base}}
    assert labels(tuned) == {'roadscene/a.jpg', 'msrs/b.png', 'roadscene/c.jpg'}
    assert labels({'data': [], 'initialised_from': {'training': None}}) is None
    assert labels({'steps': 3}) is None
    assert evaluate._brief(tuned) == ('{data: (1 items), initialised_from: {sha256: x, training: '
                                      '{data: (2 items), steps_done: 9}}}')


def test_report_files_default_beside_the_report(tmp_path):
    """A report written elsewhere (a validation run) leaves docs/ alone."""
    args = evaluate.parse_args(['--data', str(tmp_path), '--out', str(tmp_path / 'val.md')])
    assert args.grid == tmp_path / 'val_grid.png'
    assert args.pairs_csv == tmp_path / 'val_pairs.csv'


def test_the_report_records_placeholders_for_the_data_folders(tmp_path):
    argv = ['--data', str(tmp_path / 'ivif'), '--threads', '2', '--flicker',
            str(tmp_path / 'videos')]
    assert evaluate.recorded_command(evaluate.parse_args(argv), argv) == (
        's4fusion-eval --data IVIF_DIR --threads 2 --flicker VIDEO_DIR')
    argv = [f'--data={tmp_path}/ivif/', '--limit', '3', '--out', 'val.md']
    assert evaluate.recorded_command(evaluate.parse_args(argv), argv) == (
        's4fusion-eval --data=IVIF_DIR --limit 3 --out val.md')


@pytest.mark.parametrize('partial', [['--limit', '3'], ['--datasets', 'm3svd_val'],
                                     ['--folder', 'pairs'], ['--methods', 'ours'],
                                     ['--weights', 'w.safetensors']])
def test_a_partial_run_must_name_its_report(tmp_path, capsys, partial):
    # The default --out is the shipped report: part of a run must not replace it.
    with pytest.raises(SystemExit):
        evaluate.parse_args(['--data', str(tmp_path), *partial])
    assert (f'{partial[0]}: a partial run needs its own --out (the default docs/quality.md is '
            'the whole report)') in capsys.readouterr().err
    assert evaluate.parse_args(['--data', str(tmp_path)]).out == pathlib.Path('docs/quality.md')


def per_pair(csv_path):
    """{(split, method, pair): {metric: text}} of a report's per-pair CSV."""
    with open(csv_path, newline='') as table:
        return {(row['dataset'], row['method'], row['pair']): row
                for row in csv.DictReader(table)}


def test_eval_scores_a_folder_of_your_own_as_it_scores_the_ivif_splits(ivif_dir, tmp_path):
    # The first three msrs22 pairs as a folder of one's own, with two methods' stored outputs:
    # the plain average saved losslessly under another extension, and one with an output missing.
    names = sorted(pair.name for pair in evaluate.ivif_splits(ivif_dir).tests['msrs22'])[:3]
    heldout = tmp_path / 'heldout'
    copy_pairs(ivif_dir, heldout, [('msrs', name) for name in names])
    average = evaluate.gray_method(baselines.fuse_average)
    for name in names:
        pair = evaluate.Pair(name, heldout / 'ir' / name, heldout / 'vi' / name)
        fused = average(fuse.read_pair(pair), pair).fused
        for method in ('Average', 'Partial'):
            if method == 'Average' or name != names[1]:
                (heldout / 'fused' / method).mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(heldout / 'fused' / method / f'{name[:-4]}.bmp'), fused)
    out = tmp_path / 'q.md'
    assert evaluate.main(['--data', str(ivif_dir), '--datasets', 'msrs22', '--limit', '3',
                          '--folder', str(heldout), '--methods', 'average,stored',
                          '--out', str(out)]) == 0
    text = out.read_text()
    assert '## heldout (3 pairs)' in text and '## msrs22 (3 pairs)' in text
    assert list(table_rows(text, 'heldout')) == ['Average', 'Average (stored outputs)']
    values = per_pair(tmp_path / 'q_pairs.csv')
    for name in names:
        computed = values['heldout', 'Average', name]
        assert computed == {**values['msrs22', 'Average', name], 'dataset': 'heldout'}
        assert {**values['heldout', 'Average (stored outputs)', name],
                'method': 'Average'} == computed
    assert ('- Skipped: Partial (stored outputs) on heldout: 1 of the 3 outputs cannot be '
            f'scored, so no row for it; the first: {names[1]}: no output in '
            f'{heldout / "fused" / "Partial"}.') in text
    assert f'heldout = the pairs of `{heldout}`' in text and 'were not run here' in text
    assert 'stored outputs on msrs22' not in text  # an ivif split without any is no fault


def test_the_reports_links_lead_to_its_table_and_grid_whatever_their_names(
        pair_folder, tmp_path):
    # A report named as results often are (a date, a space, a '#'): its links were the names as
    # they are, which Markdown ends at the space (no link, no image shown) and cuts at '#'.
    out = tmp_path / 'results 2026-12-07 #2 (50% Übung).md'
    assert evaluate.main(['--folder', str(pair_folder), '--methods', 'ours,average', '--limit',
                          '1', '--device', 'cpu', '--out', str(out)]) == 0
    # A CommonMark link destination: no space or control character, balanced parentheses; a
    # '#' starts its fragment and a '%' an escape.
    targets = re.findall(r'\]\(([^()\s]+)\)', out.read_text())
    assert [urllib.parse.urlsplit(target).fragment for target in targets] == ['', '']
    assert sorted(out.parent / urllib.parse.unquote(target) for target in targets) == [
        tmp_path / f'{out.stem}_grid.png', tmp_path / f'{out.stem}_pairs.csv']


def test_a_hidden_folder_beside_the_stored_outputs_is_no_method(ivif_dir, tmp_path):
    # Jupyter's .ipynb_checkpoints in fused/ was taken for a method: a spurious Skipped line.
    pairs = tmp_path / 'pairs'
    copy_pairs(ivif_dir, pairs, [GRAY_PAIR])
    for method in ('Mine', '.ipynb_checkpoints'):
        (pairs / 'fused' / method).mkdir(parents=True)
    shutil.copy(pairs / 'vi' / GRAY_PAIR[1], pairs / 'fused' / 'Mine' / GRAY_PAIR[1])
    out = tmp_path / 'q.md'
    assert evaluate.main(['--folder', str(pairs), '--methods', 'stored', '--out',
                          str(out)]) == 0
    text = out.read_text()
    assert list(table_rows(text, 'pairs')) == ['Mine (stored outputs)'] and 'Skipped' not in text


def test_a_stored_output_left_out_is_named_with_the_reason(ivif_dir, tmp_path):
    # An output in an extension not read (WebP), or two of the pair's stem, was reported as
    # "no output, or several": the user could not tell which, nor which file was passed over.
    pairs = tmp_path / 'pairs'
    copy_pairs(ivif_dir, pairs, [GRAY_PAIR])
    stem = GRAY_PAIR[1][:-4]
    image = cv2.imread(str(pairs / 'vi' / GRAY_PAIR[1]))
    # Extensions read in either case ('.JPG' as a camera names its files).
    for method, names in (('Fine', ['.bmp']), ('Webp', ['.webp']), ('Twice', ['.bmp', '.JPG']),
                          ('Absent', [])):
        (pairs / 'fused' / method).mkdir(parents=True)
        for suffix in names:
            assert cv2.imwrite(str(pairs / 'fused' / method / (stem + suffix)), image)
    out = tmp_path / 'q.md'
    assert evaluate.main(['--folder', str(pairs), '--methods', 'stored', '--out',
                          str(out)]) == 0
    text = out.read_text()
    assert list(table_rows(text, 'pairs')) == ['Fine (stored outputs)']
    fused = pairs / 'fused'
    for method, reason in (
            ('Absent', f'no output in {fused / "Absent"}'),
            ('Twice', f'several outputs in {fused / "Twice"} ({stem}.JPG, {stem}.bmp), so none '
                      'is taken for it'),
            ('Webp', f'no output in {fused / "Webp"} of an extension read (.png .jpg .jpeg .bmp '
                     f'.tif .tiff): {stem}.webp is none')):
        assert (f'- Skipped: {method} (stored outputs) on pairs: 1 of the 1 outputs cannot be '
                f'scored, so no row for it; the first: {GRAY_PAIR[1]}: {reason}.\n') in text


def test_stored_outputs_of_any_depth_but_8_bit_are_refused_by_one_rule(ivif_dir, tmp_path):
    # A float TIFF was refused as needing "8 or 16 bit", and a 16-bit PNG then as "8-bit outputs
    # only": the metrics score stored outputs as saved on their 0-255 scale, so 8-bit alone.
    pairs = tmp_path / 'pairs'
    copy_pairs(ivif_dir, pairs, [GRAY_PAIR])
    stem = GRAY_PAIR[1][:-4]
    image = cv2.imread(str(pairs / 'vi' / GRAY_PAIR[1]), cv2.IMREAD_GRAYSCALE)
    for method, name, pixels in (('Eight', stem + '.png', image),
                                 ('Sixteen', stem + '.png', image.astype(np.uint16) * 257),
                                 ('Float', stem + '.tiff', image.astype(np.float32) / 255)):
        (pairs / 'fused' / method).mkdir(parents=True)
        assert cv2.imwrite(str(pairs / 'fused' / method / name), pixels)
    out = tmp_path / 'q.md'
    assert evaluate.main(['--folder', str(pairs), '--methods', 'stored', '--out',
                          str(out)]) == 0
    text = out.read_text()
    assert list(table_rows(text, 'pairs')) == ['Eight (stored outputs)']
    for method, name, depth in (('Sixteen', stem + '.png', 'uint16'),
                                ('Float', stem + '.tiff', 'float32')):
        assert (f'- Skipped: {method} (stored outputs) on pairs: 1 of the 1 outputs cannot be '
                f'scored, so no row for it; the first: {pairs / "fused" / method / name}: '
                f'unsupported pixel type {depth} (need 8 bit).\n') in text


def test_eval_saves_the_images_it_scores_for_other_toolkits(ivif_dir, tmp_path):
    names = sorted(pair.name for pair in evaluate.ivif_splits(ivif_dir).tests['msrs22'])[:2]
    heldout = tmp_path / 'heldout'
    copy_pairs(ivif_dir, heldout, [('msrs', name) for name in names])
    (heldout / 'fused' / 'Mine').mkdir(parents=True)
    for name in names:
        shutil.copy(heldout / 'vi' / name, heldout / 'fused' / 'Mine' / name)
    saved = tmp_path / 'saved'
    assert evaluate.main(['--folder', str(heldout), '--methods', 'average,laplacian,stored',
                          '--out', str(tmp_path / 'q.md'), '--save-outputs', str(saved)]) == 0
    assert sorted(p.relative_to(saved / 'heldout').as_posix() for p in saved.rglob('*.png')) == [
        f'{folder}/{name}' for folder in ('fused/Average', 'fused/Laplacian_pyramid', 'ir', 'vi')
        for name in names]  # stored outputs are files already
    values = per_pair(tmp_path / 'q_pairs.csv')
    for name in names:
        # The sources' luminance as OpenCV gives it (MSRS's visible images are in colour).
        ir = cv2.imread(str(heldout / 'ir' / name), cv2.IMREAD_GRAYSCALE)
        vi = cv2.cvtColor(cv2.imread(str(heldout / 'vi' / name)), cv2.COLOR_BGR2YCrCb)[..., 0]
        written = cv2.imread(str(saved / 'heldout' / 'fused' / 'Average' / name),
                             cv2.IMREAD_UNCHANGED)
        scored = metrics.evaluate_all(evaluate.luminance(written), ir, vi)
        assert values['heldout', 'Average', name] == {
            'dataset': 'heldout', 'pair': name, 'method': 'Average',
            **{metric: repr(float(scored[metric])) for metric in metrics.METRICS}}
    # A split of clips' frames says each saved pair's clip, for a scorer that resamples clips.
    assert evaluate.main(['--data', str(ivif_dir), '--datasets', 'm3svd_val', '--limit', '3',
                          '--methods', 'average', '--out', str(tmp_path / 'clips.md'),
                          '--save-outputs', str(saved)]) == 0
    pairs = evaluate.ivif_splits(ivif_dir).validation['m3svd_val'][:3]
    assert (saved / 'm3svd_val' / 'clips.csv').read_text().splitlines() == ['pair,clip'] + [
        f'{pathlib.Path(pair.name).stem}.png,{m3svd_clip(pair)}' for pair in pairs]
    assert not (saved / 'heldout' / 'clips.csv').exists()
    # The folder written is a split to score again: the same numbers, as stored outputs.
    assert evaluate.main(['--folder', str(saved / 'heldout'), '--methods', 'stored',
                          '--out', str(tmp_path / 'again.md')]) == 0
    again = per_pair(tmp_path / 'again_pairs.csv')
    for method, name in itertools.product(('Average', 'Laplacian pyramid'), names):
        assert again['heldout', f'{evaluate.method_folder(method)} (stored outputs)', name] == {
            **values['heldout', method, name],
            'method': f'{evaluate.method_folder(method)} (stored outputs)'}


def test_eval_saves_outputs_only_where_they_overwrite_no_other_image(ivif_dir, tmp_path, capsys):
    name = sorted(pair.name for pair in evaluate.ivif_splits(ivif_dir).tests['msrs22'])[0]
    heldout = tmp_path / 'heldout'
    copy_pairs(ivif_dir, heldout, [('msrs', name)])
    # Never into a split's own folder: its pairs and stored outputs would be overwritten.
    before = {path: path.read_bytes() for path in heldout.rglob('*.png')}
    assert evaluate.main(['--folder', str(heldout), '--methods', 'average', '--out',
                          str(tmp_path / 'q3.md'), '--save-outputs', str(tmp_path)]) == 1
    assert (f'--save-outputs {tmp_path}: {heldout} holds the pairs of the split heldout, which '
            'it would overwrite' in capsys.readouterr().err)
    assert {path: path.read_bytes() for path in heldout.rglob('*.png')} == before
    with pytest.raises(ValueError, match='would share the folder S4Fusion_a_b'):
        evaluate.check_save_outputs(tmp_path, {}, [evaluate.Method('S4Fusion (a/b)', None),
                                                   evaluate.Method('S4Fusion (a_b)', None)])
    assert (evaluate.method_folder("Laplacian pyramid 1.1/1.4 (S4Fusion compact's base)")
            == 'Laplacian_pyramid_1.1_1.4_S4Fusion_compact_s_base')
    with pytest.raises(SystemExit):
        evaluate.parse_args(['--flicker', str(tmp_path), '--save-outputs', str(tmp_path / 's'),
                             '--out', str(tmp_path / 'q.md')])
    assert '--save-outputs and --flicker' in capsys.readouterr().err


def test_pairs_of_one_stem_each_need_their_own_output_and_are_never_saved_as_one(
        ivif_dir, tmp_path, capsys):
    # a.png and a.jpg are two pairs (matched by their exact names). A stored output a.png was
    # scored for a.jpg too, and --save-outputs wrote both pairs as a.png, the later over the
    # earlier. The JPEG pair is the PNG pair compressed: of its size, as an output must be.
    pairs = tmp_path / 'clash'
    copy_pairs(ivif_dir, pairs, [GRAY_PAIR])
    for side in ('ir', 'vi'):
        (pairs / side / GRAY_PAIR[1]).rename(pairs / side / 'a.png')
        image = cv2.imread(str(pairs / side / 'a.png'), cv2.IMREAD_GRAYSCALE)
        assert cv2.imwrite(str(pairs / side / 'a.jpg'), image, [cv2.IMWRITE_JPEG_QUALITY, 50])
    for method, names in (('Half', ['a.png']), ('Both', ['a.png', 'a.jpg'])):
        (pairs / 'fused' / method).mkdir(parents=True)
        for name in names:
            shutil.copy(pairs / 'ir' / name, pairs / 'fused' / method / name)
    out = tmp_path / 'q.md'
    assert evaluate.main(['--folder', str(pairs), '--methods', 'stored', '--out',
                          str(out)]) == 0
    assert list(table_rows(out.read_text(), 'clash')) == ['Both (stored outputs)']
    half = pairs / 'fused' / 'Half'
    assert (f'- Skipped: Half (stored outputs) on clash: 1 of the 2 outputs cannot be scored, so '
            f'no row for it; the first: a.jpg: no output of that exact name in {half} (the '
            'pairs a.jpg, a.png share a stem, so each needs an output of its own exact name).'
            ) in out.read_text()
    # --limit 1 leaves a.png out, but a.png's output is still no output of a.jpg.
    assert evaluate.main(['--folder', str(pairs), '--methods', 'stored', '--limit', '1',
                          '--out', str(out)]) == 0
    assert list(table_rows(out.read_text(), 'clash')) == ['Both (stored outputs)']
    assert [key[2] for key in per_pair(tmp_path / 'q_pairs.csv')] == ['a.jpg']
    capsys.readouterr()
    saved = tmp_path / 'saved'
    assert evaluate.main(['--folder', str(pairs), '--methods', 'average', '--out', str(out),
                          '--save-outputs', str(saved)]) == 1
    error = capsys.readouterr().err
    assert ('--save-outputs: the pairs a.jpg, a.png of the split clash would be saved as one '
            'file, a.png: rename them apart') in error
    assert 'pairs in' not in error and not saved.exists()


def test_eval_refuses_an_unwritable_report_before_scoring(ivif_dir, tmp_path, capsys):
    # Found only once every pair was scored (12 minutes for the full report), before.
    pairs = tmp_path / 'pairs'
    copy_pairs(ivif_dir, pairs, [GRAY_PAIR])
    (tmp_path / 'file').write_text('')
    out = tmp_path / 'file' / 'q.md'
    assert evaluate.main(['--folder', str(pairs), '--methods', 'average', '--out',
                          str(out)]) == 1
    error = capsys.readouterr().err
    assert f'{out.parent}: {tmp_path / "file"} is not a folder' in error
    assert 'pairs in' not in error  # no split was scored
    for option, value, message in (
            ('--pairs-csv', tmp_path / 'file' / 'p.csv', 'is not a folder'),
            ('--grid', tmp_path / 'file' / 'g.png', 'is not a folder')):
        assert evaluate.main(['--folder', str(pairs), '--methods', 'average', '--out',
                              str(tmp_path / 'q.md'), option, str(value)]) == 1
        error = capsys.readouterr().err
        assert message in error and 'pairs in' not in error, option
    assert evaluate.main(['--folder', str(pairs), '--methods', 'average', '--out',
                          str(tmp_path)]) == 1
    assert f'--out {tmp_path} is a folder' in capsys.readouterr().err
    # A folder still to be made: the report was written as a file of the folder's name.
    with pytest.raises(SystemExit, match='2'):
        evaluate.main(['--folder', str(pairs), '--methods', 'average', '--out',
                       f'{tmp_path / "reports"}{os.sep}'])
    assert "names a folder: name the file in it" in capsys.readouterr().err
    assert not (tmp_path / 'reports').exists()
    # A folder or the report itself as the table or the grid: the report (and the reading
    # below its marker) was overwritten by the PNG or the CSV, or the run failed at its end.
    report = tmp_path / 'q.md'
    report.write_text('kept\n')
    for option, value, message in (
            ('--grid', tmp_path, f'--grid {tmp_path} is a folder'),
            ('--pairs-csv', tmp_path, f'--pairs-csv {tmp_path} is a folder'),
            ('--grid', report, f'--out and --grid both name {report}'),
            ('--pairs-csv', tmp_path / '.' / 'q.md', '--out and --pairs-csv both name')):
        assert evaluate.main(['--folder', str(pairs), '--methods', 'average', '--out',
                              str(report), option, str(value)]) == 1
        error = capsys.readouterr().err
        assert message in error and 'pairs in' not in error, option
    assert report.read_text() == 'kept\n'


def test_eval_refuses_to_replace_a_file_without_the_reading_marker(ivif_dir, tmp_path, capsys):
    # A report whose marker line was deleted, or another file named as --out by mistake, was
    # replaced with its text lost, exit 0. Found before any scoring.
    pairs = tmp_path / 'pairs'
    copy_pairs(ivif_dir, pairs, [GRAY_PAIR])
    out = tmp_path / 'q.md'
    argv = ['--folder', str(pairs), '--methods', 'average', '--out', str(out)]
    assert evaluate.main(argv) == 0
    capsys.readouterr()
    marker = next(line for line in out.read_text().splitlines()
                  if line.startswith(report.READING_MARKER))
    without_marker = out.read_text().replace(marker, '') + '\nmy reading\n'
    for text in (without_marker, '# Lab notes\nthree weeks of notes\n'):
        out.write_text(text)
        assert evaluate.main(argv) == 1
        error = capsys.readouterr().err
        assert (f'--out {out} holds text and no reading marker, so the report would replace it: '
                'if it is a report, put the marker line back above what is to stay '
                f'({marker}); else name another --out') in error
        assert 'pairs in' not in error and out.read_text() == text
    out.write_text(' \n')  # nothing to lose
    assert evaluate.main(argv) == 0 and out.read_text().startswith('# Fusion quality')


def test_eval_keeps_what_is_below_the_reading_marker_byte_for_byte(ivif_dir, tmp_path):
    # It gained a blank line where the reading was right under the marker, lost all but one of
    # several blank lines, and had its CRLF (a file edited on Windows) made LF.
    pairs = tmp_path / 'pairs'
    copy_pairs(ivif_dir, pairs, [GRAY_PAIR])
    out = tmp_path / 'q.md'
    argv = ['--folder', str(pairs), '--methods', 'average', '--out', str(out)]
    assert evaluate.main(argv) == 0
    marker = report.READING_MARKER_LINE.encode()
    generated = out.read_bytes().partition(marker)[0] + marker
    for below in (b'', b'\nMy reading right under it.\n',
                  b'\r\n\r\n\r\n\r\nMy reading, caf\xe9 in Latin-1\r\n\r\n\r\n  indented\r\n'):
        out.write_bytes(generated + below)
        assert evaluate.main(argv) == 0
        assert out.read_bytes().partition(marker)[2] == below


def test_eval_writes_a_pair_name_that_is_not_utf8_as_the_file_system_holds_it(ivif_dir, tmp_path,
                                                                              tiny_weights):
    # Every pair was scored, then writing the table failed ('surrogates not allowed') and
    # nothing was written; with ours, drawing the pair's name in the grid then crashed the
    # process (cv2.putText, exit 139). The report records the folder, its name not UTF-8
    # either; run as a command, whose stderr shows such a name escaped (pytest's capture
    # refuses it), and which a crash must not take pytest down with.
    pairs = tmp_path / os.fsdecode(b'p\xe9')
    copy_pairs(ivif_dir, pairs, [GRAY_PAIR])
    latin1 = os.fsdecode(b'caf\xe9.png')
    for side in ('ir', 'vi'):
        (pairs / side / GRAY_PAIR[1]).rename(pairs / side / latin1)
    out = tmp_path / 'q.md'
    for _ in range(2):  # the second run reads the first's report (its reading below a marker)
        done = subprocess.run([executable('s4fusion-eval'), '--folder', pairs, '--methods',
                               'ours,average', '--weights', tiny_weights, '--device', 'cpu',
                               '--threads', '1', '--out', out], capture_output=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr.decode(errors='replace')
    assert b'caf\xe9' in (tmp_path / 'q_pairs.csv').read_bytes()
    assert b'p\xe9' in out.read_bytes()
    assert read_png(tmp_path / 'q_grid.png').shape[0] == report.GRID_LABEL + report.GRID_HEIGHT


def test_eval_names_the_pairs_it_cannot_score_before_scoring(ivif_dir, tmp_path, capsys):
    # A pair of different sizes (which s4fusion-fuse resizes) stopped the run at that pair,
    # after the ones before it were scored, and nothing was written.
    pairs = tmp_path / 'pairs'
    copy_pairs(ivif_dir, pairs, [GRAY_PAIR])
    ir = cv2.imread(str(pairs / 'ir' / GRAY_PAIR[1]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(pairs / 'ir' / 'zz.png'), ir[::2, ::2])
    shutil.copy(pairs / 'vi' / GRAY_PAIR[1], pairs / 'vi' / 'zz.png')
    # Too small for VIF: it failed after every pair was scored, naming none.
    for side in ('ir', 'vi'):
        cv2.imwrite(str(pairs / side / 'small.png'), ir[:24, :40])
    out = tmp_path / 'q.md'
    assert evaluate.main(['--folder', str(pairs), '--methods', 'average', '--out',
                          str(out)]) == 1
    error = capsys.readouterr().err
    assert (f'--folder {pairs}: 2 of its 3 pairs cannot be scored: small.png: 40x24 is smaller '
            'than the 25x25 the metrics need; zz.png: IR (128, 128) and visible (256, 256) '
            'differ in size') in error, error
    assert 'pairs in' not in error and not out.exists()


def test_eval_scores_16_bit_ir_as_8_bit_the_same_for_every_method(ivif_dir, tmp_path, capsys):
    # s4fusion-fuse and training read 16-bit IR as value / 65535; the evaluation refused it.
    eight, sixteen = tmp_path / 'eight', tmp_path / 'sixteen'
    for folder in (eight, sixteen):
        copy_pairs(ivif_dir, folder, [GRAY_PAIR])
    ir = cv2.imread(str(eight / 'ir' / GRAY_PAIR[1]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(sixteen / 'ir' / GRAY_PAIR[1]), ir.astype(np.uint16) * 257)
    scores = []
    for folder in (eight, sixteen):
        assert evaluate.main(['--folder', str(folder), '--methods', 'average,laplacian',
                              '--out', str(tmp_path / f'{folder.name}.md')]) == 0
        rows = (tmp_path / f'{folder.name}_pairs.csv').read_text().splitlines()
        scores.append([row.split(',', 1)[1] for row in rows])  # without the split's name
    assert scores[0] == scores[1]  # v * 257 / 65535 * 255 is v
    assert 'raw camera counts' not in capsys.readouterr().err
    # Raw counts of a 14-bit core fill a sliver of the range: scored so, they read nearly black.
    cv2.imwrite(str(sixteen / 'ir' / GRAY_PAIR[1]), ir.astype(np.uint16) * 8 + 3000)
    assert evaluate.main(['--folder', str(sixteen), '--methods', 'average', '--out',
                          str(tmp_path / 'raw.md')]) == 0
    assert '1 of 1 IR images in --folder' in capsys.readouterr().err


def test_eval_stopped_by_sigterm_ends_as_for_ctrl_c(ivif_dir, tmp_path):
    # kill and service managers send SIGTERM: it ended the run at once, with no word, and
    # could leave a report's temporary file behind. The message named the report only, not
    # the split --save-outputs was writing, left with part of its pairs.
    pairs = tmp_path / 'pairs'
    copy_pairs(ivif_dir, pairs, [('tno', f'{index:02d}.png') for index in range(1, 43)])
    out, saved = tmp_path / 'q.md', tmp_path / 'saved'
    proc = subprocess.Popen([sys.executable, '-m', 's4fusion_ros.tools.evaluate', '--folder',
                             str(pairs), '--methods', 'ours,gff', '--threads', '1', '--out',
                             str(out), '--save-outputs', str(saved)], stderr=subprocess.PIPE,
                            text=True)
    with reading(proc, proc.stderr) as said:
        # tqdm's first line: scoring has begun (False at once if it ended before)
        assert said.wait_for('pairs:', 300), said.text()
        proc.send_signal(signal.SIGTERM)
        assert exited(proc, 120), said.text()
    error = said.text()
    assert proc.returncode == 130, error
    assert (f"interrupted; {out} was not written; {saved / 'pairs'} is incomplete: it has this "
            "run's images of only the pairs scored before it was stopped") in error
    assert 'Traceback' not in error
    assert not list(tmp_path.glob('.*.tmp')) and not out.exists()


def test_eval_scores_the_enhanced_base_without_ours(ivif_dir, tmp_path, capsys):
    # --methods base needs ours' weights only to know which base they refine; it gave no row.
    pairs = tmp_path / 'pairs'
    copy_pairs(ivif_dir, pairs, [GRAY_PAIR])
    out = tmp_path / 'q.md'
    assert evaluate.main(['--folder', str(pairs), '--methods', 'base,average', '--weights',
                          str(shipped_weights('compact')), '--out', str(out)]) == 0
    text = out.read_text()
    assert "| Laplacian pyramid 1.1/1.4 (S4Fusion (weights/s4fusion_compact)'s base) |" in text
    assert '| S4Fusion (weights/s4fusion_compact) |' not in text
    assert 'evaluated pairs are among' not in text  # ours was not scored: no overlap count
    assert evaluate.main(['--folder', str(pairs), '--methods', 'base', '--weights',
                          str(shipped_weights('authors')), '--out', str(out)]) == 1
    assert 'base: none of the weights refines an enhanced Laplacian base' in (
        capsys.readouterr().err)


def test_seafusion_weights_torch_refuses_are_named_on_one_line(ivif_dir, tmp_path, capsys):
    # load_state_dict's first line named no fault ('Error(s) in loading state_dict for
    # SeAFusion:'), the weights-only refusal's first line only advice, in bold.
    pairs = tmp_path / 'pairs'
    copy_pairs(ivif_dir, pairs, [COLOUR_PAIR])
    published = torch.load(ivif_dir / 'weights' / 'seafusion' / 'SeAFusion.pth',
                           weights_only=True)
    missing = {**published, 'extra.weight': torch.zeros(1)}
    del missing['decode1.bn.bias']
    misshapen = {**published, 'decode1.bn.bias': torch.zeros(2, 2)}
    for name, content, fault in (
            ('missing.pth', missing, 'Error(s) in loading state_dict for SeAFusion: Missing '
             'key(s) in state_dict: "decode1.bn.bias"; Unexpected key(s) in state_dict: '
             '"extra.weight"'),
            ('misshapen.pth', misshapen, 'Error(s) in loading state_dict for SeAFusion: size '
             'mismatch for decode1.bn.bias: copying a param with shape torch.Size([2, 2]) from '
             'checkpoint, the shape in current model is torch.Size([1])'),
            ('numpy.pth', {'x': np.float64(1)}, 'Unsupported global: GLOBAL '
             'numpy._core.multiarray.scalar was not an allowed global by default')):
        weights = tmp_path / name
        torch.save(content, weights)
        assert evaluate.main(['--folder', str(pairs), '--methods', 'seafusion',
                              '--seafusion-weights', str(weights), '--out',
                              str(tmp_path / 'q.md')]) == 1
        assert capsys.readouterr().err == (
            f"s4fusion-eval: {weights}: not SeAFusion's published weights ({fault})\n")


def test_eval_of_a_folder_needs_no_ivif_data_and_names_what_it_cannot_score(
        ivif_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv('S4FUSION_IVIF_DATA', raising=False)
    pairs = tmp_path / 'pairs'
    copy_pairs(ivif_dir, pairs, [COLOUR_PAIR])
    out = tmp_path / 'q.md'

    def run(*argv):
        code = evaluate.main([*argv, '--out', str(out)])
        return code, capsys.readouterr().err

    assert run('--folder', str(pairs), '--methods', 'average,seafusion,stored')[0] == 0
    text = out.read_text()
    assert ('- Skipped: SeAFusion: no weights (--seafusion-weights, or --data IVIF_DIR holding '
            'weights/seafusion/SeAFusion.pth).') in text
    assert f'- Skipped: stored outputs on pairs: no {pairs / "fused"}/<METHOD>/ folder.' in text
    assert 'ivif_splits' not in text  # no note on splits that were not evaluated

    # An output of the wrong size, or of the wrong width alone: its method is left out, found
    # before any scoring.
    height, width = cv2.imread(str(pairs / 'vi' / COLOUR_PAIR[1])).shape[:2]
    small, narrow = (pairs / 'fused' / method / COLOUR_PAIR[1] for method in ('Small', 'Narrow'))
    for path, size in ((small, (8, 8)), (narrow, (height, width - 1))):
        path.parent.mkdir(parents=True)
        cv2.imwrite(str(path), np.zeros(size, np.uint8))
    code, err = run('--folder', str(pairs), '--methods', 'stored')
    assert code == 1 and 'pairs: no method to score' in err
    assert f'{small} is 8x8, its pair {width}x{height}' in err
    assert f'{narrow} is {width - 1}x{height}, its pair {width}x{height}' in err

    weights = tmp_path / 'not_seafusion.pth'
    torch.save({'foo': torch.zeros(2)}, weights)
    code, err = run('--folder', str(pairs), '--methods', 'seafusion', '--seafusion-weights',
                    str(weights))
    assert code == 1 and f"{weights}: not SeAFusion's published weights" in err
    # An interrupted download: the reason torch gives is empty, and its first line failed.
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    code, err = run('--folder', str(pairs), '--methods', 'seafusion', '--seafusion-weights',
                    str(empty))
    assert code == 1 and err == (f"s4fusion-eval: {empty}: empty or cut short, not SeAFusion's "
                                 'published weights in full (download them again)\n')
    for argv, message in (
            (['--seafusion-weights', str(tmp_path / 'absent.pth')], 'not a file'),
            (['--seafusion-weights', str(weights), '--methods', 'average'],
             'seafusion is not among --methods'),
            (['--weights', str(weights), '--methods', 'average,seafusion'],
             '--weights: neither ours nor base is among --methods'),
            (['--flicker', str(tmp_path)], '--folder and --flicker')):
        with pytest.raises(SystemExit):
            evaluate.parse_args(['--folder', str(pairs), *argv, '--out', str(out)])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(['--data', str(tmp_path), '--seafusion-weights', str(weights)])
    assert '--seafusion-weights: a partial run needs its own --out' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(['--datasets', ',', '--out', str(out)])
    assert 'nothing to evaluate' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # names what was given: --datasets was not
        evaluate.parse_args(['--folder', str(pairs)])
    assert '\n' + 's4fusion-eval: error: --folder: a partial run needs its own --out' in (
        capsys.readouterr().err)

    code, err = run('--folder', str(tmp_path / 'absent'))
    assert code == 1 and f'{tmp_path / "absent" / "ir"}: missing (expected ir/ and vi/' in err
    shutil.copytree(pairs, tmp_path / 'other' / 'pairs')
    code, err = run('--folder', str(pairs), '--folder', str(tmp_path / 'other' / 'pairs'))
    assert code == 1 and 'a split named pairs is already evaluated' in err
    shutil.copytree(pairs, tmp_path / 'tno42')
    code, err = run('--folder', str(tmp_path / 'tno42'))
    assert code == 1 and 'a split named tno42 is an ivif split' in err


def test_a_report_the_disk_refuses_leaves_its_table_and_grid_as_they_were(
        ivif_dir, tmp_path, capsys, tiny_weights):
    pairs, out = tmp_path / 'pairs', tmp_path / 'q.md'
    copy_pairs(ivif_dir, pairs, [GRAY_PAIR])
    command = ['--folder', str(pairs), '--out', str(out), '--threads', '1']
    assert evaluate.main([*command, '--methods', 'average']) == 0
    table = out.with_name('q_pairs.csv')
    earlier = {path: path.read_bytes() for path in (out, table)}
    capsys.readouterr()
    # A real write failure: the new table fits under the file size limit, the report does not.
    limit = 1024
    assert len(earlier[table]) < limit // 2 and len(earlier[out]) > 2 * limit
    with file_size_limit(limit):
        status = evaluate.main([*command, '--methods', 'average,max'])
    error = capsys.readouterr().err
    assert status == 1 and f"File too large: '{out}'" in error, error
    assert {path: path.read_bytes() for path in (out, table)} == earlier
    assert sorted(path.name for path in tmp_path.iterdir()) == ['pairs', 'q.md', 'q_pairs.csv']
    # With ours, the grid (written first, larger than the limit) is refused: none is written.
    ours = [*command, '--weights', str(tiny_weights), '--device', 'cpu']
    assert evaluate.main([*ours, '--methods', 'ours']) == 0
    grid = out.with_name('q_grid.png')
    earlier = {path: path.read_bytes() for path in (out, table, grid)}
    assert len(earlier[grid]) > limit
    capsys.readouterr()
    with file_size_limit(limit):
        status = evaluate.main([*ours, '--methods', 'ours,average'])
    error = capsys.readouterr().err
    assert status == 1 and f"File too large: '{grid}'" in error, error
    assert {path: path.read_bytes() for path in (out, table, grid)} == earlier


def test_a_folder_split_takes_the_name_of_the_folder_it_is(ivif_dir, tmp_path, monkeypatch):
    # Training records label pairs folder/name: "--folder ." must give those labels too.
    copy_pairs(ivif_dir, tmp_path / 'msrs', [('msrs', '00556D.png')])
    monkeypatch.chdir(tmp_path / 'msrs')
    args = evaluate.parse_args(['--folder', '.', '--out', 'q.md'])
    splits, _, _ = evaluate.evaluation_splits(args, None)
    assert [pair.label for pair in splits['msrs']] == ['msrs/00556D.png']
    # A stored output is the file of the pair's whole stem, not of a longer name sharing it.
    (tmp_path / 'M').mkdir()
    (tmp_path / 'M' / 'scene.1.jpg').write_bytes(b'')
    pairs = [evaluate.Pair(name, tmp_path, tmp_path) for name in ('scene.png', 'scene.1.png')]
    outputs = evaluate.StoredOutputs(tmp_path / 'M', pairs)
    assert outputs.path(pairs[0]) is None
    assert outputs.path(pairs[1]) == tmp_path / 'M' / 'scene.1.jpg'


def test_ours_against_the_values_the_toolkit_published_for_other_methods(ivif_dir, tmp_path,
                                                                         tiny_weights):
    out = tmp_path / 'q.md'
    # Average runs too: only ours is scored as the toolkit scores it, and is ours there.
    assert evaluate.main(['--data', str(ivif_dir), '--datasets', 'tno42', '--limit', '2',
                          '--methods', 'ours,average,published', '--weights', str(tiny_weights),
                          '--device', 'cpu', '--out', str(out)]) == 0
    text = out.read_text()
    section = 'tno42, published values (MATLAB toolkit)'
    header = next(line for line in text.split(f'## {section} ')[1].splitlines()
                  if line.startswith('| Method'))
    compared = [metric for metric in metrics.METRICS if metric != 'SSIM']  # none in the table
    assert header == '| Method | ' + ' | '.join(
        f'{m} {"↓" if m == "MSE" else "↑"}' for m in compared) + ' |'  # and no s/pair
    rows = table_rows(text, section)
    ours = f'S4Fusion ({tiny_weights.parent.name}/tiny)'
    assert len(rows) == 10 and list(rows)[0] == ours
    # Ours: the toolkit's definitions on the outputs scored above.
    method = evaluate.ours_method(evaluate.OursConfig(ours, tiny_weights),
                                  load_fusion_model(str(tiny_weights), 'auto', 'cpu'))
    scores, plain = [], []
    for pair in evaluate.ivif_splits(ivif_dir).tests['tno42'][:2]:
        source = fuse.read_pair(pair)
        scored = (fuse.luminance(method.fuse(source, pair).fused),
                  *evaluate.sources_luminance(source, pair))
        scores.append(metrics.evaluate_all(*scored, matlab_compat=True))
        plain.append(metrics.evaluate_all(*scored))
    assert rows[ours] == [report.format_value(np.mean([s[m] for s in scores]))
                          for m in compared]
    # Its paragraph names each metric the toolkit's definitions change (it left out Qabf).
    described = text.split(f'## {section} ')[1].split('| Method')[0]
    changed = [m for m in compared if [s[m] for s in scores] != [s[m] for s in plain]]
    assert 'Qabf' in changed and all(re.search(rf'\b{m}\b', described) for m in changed)
    # The others: the published values, as the table holds them.
    with open(ivif_dir / 'tno' / 'reference' / 'matlab_per_image_metrics.csv') as table:
        u2fusion = [row for row in csv.DictReader(table)
                    if row['method'] == 'U2Fusion' and row['image'] in ('01.png', '02.png')]
    assert rows['U2Fusion (published values)'] == [report.format_value(np.mean(
        [float(row['value']) for row in u2fusion if row['metric'] == m])) for m in compared]
    assert 'published' not in (tmp_path / 'q_pairs.csv').read_text()  # not redistributed
    wins = text.split(f'## {section} ')[1].split('**Paired')[0]
    assert re.search(rf'- {re.escape(ours)} beats every other method \(DenseFuse \(published '
                     r'values\), .*\) on \d+ of 11 metrics', wins)


def test_a_method_the_published_table_lacks_a_pair_of_is_skipped_by_name(
        ivif_dir, tmp_path, tiny_weights):
    # Its mean over the other pairs would not be comparable: the row is left out, and said so.
    pairs = tmp_path / 'pairs'
    copy_pairs(ivif_dir, pairs, [GRAY_PAIR, ('tno', '01.png')])
    (pairs / 'reference').mkdir()
    with open(ivif_dir / 'tno' / evaluate.PUBLISHED_TABLE) as table:
        kept = [row for row in csv.DictReader(table)
                if row['image'] in ('01.png', '08.png') and row['method'] in ('U2Fusion', 'PMGI')
                and not (row['method'] == 'PMGI' and row['image'] == '08.png')]
    with open(pairs / evaluate.PUBLISHED_TABLE, 'w', newline='') as table:
        writer = csv.DictWriter(table, ['image', 'method', 'metric', 'value'])
        writer.writeheader()
        writer.writerows(kept)
    out = tmp_path / 'q.md'
    assert evaluate.main(['--folder', str(pairs), '--methods', 'ours,published', '--weights',
                          str(tiny_weights), '--device', 'cpu', '--out', str(out)]) == 0
    text = out.read_text()
    rows = table_rows(text, 'pairs, published values (MATLAB toolkit)')
    assert list(rows)[1:] == ['U2Fusion (published values)']
    assert (f'- Skipped: PMGI (published values) on pairs: {pairs / evaluate.PUBLISHED_TABLE} '
            'has no values for 1 of the 2 pairs (08.png).') in text


def test_the_enhanced_base_of_ours_is_a_row_of_its_own(ivif_dir, tmp_path):
    # What compact's network adds shows only against the pyramid it refines, with its gain and
    # contrast: one row for it (the CPU-defaults row shares it), none for a model without one,
    # nor for one refining the plain pyramid (gain and contrast 1: the Laplacian pyramid row).
    from s4fusion_ros.model.pyramid import laplacian_fuse
    compact = load_fusion_model(str(shipped_weights('compact')), 'auto', 'cpu')
    authors = load_fusion_model(str(shipped_weights('authors')), 'auto', 'cpu')
    gain, contrast = compact.model.config.detail_gain, compact.model.config.base_contrast
    assert (gain, contrast) != (1.0, 1.0)
    plain = tmp_path / 'plain.safetensors'
    save_checkpoint(S4Fusion(S4FusionConfig(dims=(8, 16, 32), d_state=4, fusion_d_state=4,
                                            fusion_blocks=1, base='laplacian')), plain)
    ours = [(evaluate.OursConfig('S4Fusion compact', pathlib.Path('c')), compact),
            (evaluate.OursConfig('S4Fusion compact, CPU defaults', pathlib.Path('c')), compact),
            (evaluate.OursConfig('S4Fusion authors', pathlib.Path('a')), authors),
            (evaluate.OursConfig('S4Fusion plain', plain),
             load_fusion_model(str(plain), 'auto', 'cpu'))]
    bases = evaluate.base_baselines(ours)
    fuses = evaluate.baseline_fuses({'laplacian', 'base', 'gff'}, ours)
    label = f"Laplacian pyramid {gain:g}/{contrast:g} (S4Fusion compact's base)"
    assert list(bases) == [label] and list(fuses) == ['Laplacian pyramid', label, 'GFF']
    assert fuses[label][1] == evaluate.BASE_NOTE and fuses['GFF'][1] == ''
    ir = cv2.imread(str(ivif_dir / 'msrs' / 'ir' / '00004N.png'), cv2.IMREAD_GRAYSCALE)
    vi = cv2.imread(str(ivif_dir / 'msrs' / 'vi' / '00004N.png'), cv2.IMREAD_GRAYSCALE)
    expected = laplacian_fuse(torch.from_numpy(ir / 255.0)[None, None].float(),
                              torch.from_numpy(vi / 255.0)[None, None].float(),
                              detail_gain=gain, base_contrast=contrast)[0, 0].clamp(0, 1)
    np.testing.assert_allclose(fuses[label][0](ir, vi), expected.numpy(), atol=1e-6)
    assert list(evaluate.baseline_fuses({'laplacian', 'gff'}, ours)) == ['Laplacian pyramid',
                                                                         'GFF']


def test_the_reports_environment_names_the_device_the_networks_ran_on(monkeypatch):
    # On a CUDA machine (torch's answers here, as one gives them) the report named its GPU for
    # a run with --device cpu, whose timings were the CPU's, and GPU 0 for --device cuda:1.
    names = {0: 'NVIDIA H200', 1: 'NVIDIA H100 80GB HBM3'}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'get_device_name',
                        lambda device=None: names[getattr(device, 'index', None) or 0])
    assert evaluate.environment('cpu').startswith(f'CPU ({os.cpu_count()} cores), torch ')
    assert evaluate.environment('cuda:1').startswith('NVIDIA H100 80GB HBM3, torch ')
    assert evaluate.environment('auto').startswith('NVIDIA H200, torch ')
    # A device no network could run on: only the baselines ran, on the CPU.
    assert evaluate.environment('cuda:7').startswith('CPU (')


def test_each_method_is_timed_on_every_pair_after_an_untimed_warm_up(ivif_dir):
    # The timing column is the sum of every pair's fusion time; the first pair's first call
    # (lazy initialisation, JIT) is run and left out of it.
    pairs = evaluate.ivif_splits(ivif_dir).tests['tno42'][:3]
    average, runs = evaluate.gray_method(baselines.fuse_average), []

    def recorded(source, pair):
        runs.append((pair.name, average(source, pair)))
        return runs[-1][1]

    dataset = evaluate.evaluate_dataset('tno42', pairs, [evaluate.Method('Average', recorded)],
                                        {})
    assert [name for name, _ in runs] == [pairs[0].name] + [pair.name for pair in pairs]
    assert dataset.methods[0].seconds == sum(images.seconds for _, images in runs[1:])


def test_the_training_overlap_counts_the_evaluated_pairs_of_every_split(ivif_dir, tmp_path):
    # Weights trained on a pair of each of two splits (by their labels, folder/name): the note
    # counts the evaluated pairs of both, not of the last split alone.
    splits = evaluate.ivif_splits(ivif_dir).tests
    trained = [splits['tno42'][0].label, splits['msrs22'][0].label, 'roadscene/elsewhere.jpg']
    weights = tmp_path / 'trained.safetensors'
    save_checkpoint(tiny_model(), weights, {'training': {'data': trained}})
    out = tmp_path / 'q.md'
    assert evaluate.main(['--data', str(ivif_dir), '--datasets', 'tno42,msrs22', '--limit', '1',
                          '--methods', 'ours', '--weights', str(weights), '--device', 'cpu',
                          '--out', str(out)]) == 0
    assert (f'S4Fusion ({tmp_path.name}/trained): 2 of the 2 evaluated pairs are among its 3 '
            f'training pairs ({", ".join(sorted(trained[:2]))}).') in out.read_text()


def test_eval_saves_jpeg_and_16_bit_pairs_as_the_8_bit_pngs_it_scores(ivif_dir, tmp_path):
    # RoadScene's pairs are JPEG files and frames of clips: each pair is saved as <stem>.png,
    # and clips.csv names the files saved, not the JPEGs.
    saved = tmp_path / 'saved'
    assert evaluate.main(['--data', str(ivif_dir), '--datasets', 'roadscene67', '--limit', '2',
                          '--methods', 'average', '--out', str(tmp_path / 'q.md'),
                          '--save-outputs', str(saved)]) == 0
    splits = evaluate.ivif_splits(ivif_dir)
    stems = [pathlib.Path(pair.name).stem for pair in splits.tests['roadscene67'][:2]]
    written = saved / 'roadscene67'
    assert sorted(path.relative_to(written).as_posix() for path in written.rglob('*')
                  if path.is_file()) == ['clips.csv'] + sorted(
        f'{folder}/{stem}.png' for folder in ('fused/Average', 'ir', 'vi') for stem in stems)
    with open(written / 'clips.csv', newline='') as table:
        assert list(csv.DictReader(table)) == [
            {'pair': f'{stem}.png', 'clip': clip}
            for stem, clip in zip(stems, splits.clips['roadscene67'])]
    # 16-bit IR is saved as the 8-bit image every method fused and was scored against.
    sixteen = tmp_path / 'sixteen'
    copy_pairs(ivif_dir, sixteen, [GRAY_PAIR])
    ir = read_png(sixteen / 'ir' / GRAY_PAIR[1])[..., 0]
    cv2.imwrite(str(sixteen / 'ir' / GRAY_PAIR[1]), ir.astype(np.uint16) * 257)
    assert evaluate.main(['--folder', str(sixteen), '--methods', 'average', '--out',
                          str(tmp_path / 's.md'), '--save-outputs', str(saved)]) == 0
    kept = read_png(saved / 'sixteen' / 'ir' / GRAY_PAIR[1])
    assert kept.dtype == np.uint8 and np.array_equal(kept, ir)


def test_a_baseline_fuses_the_ir_then_the_visible_luminance_in_the_visible_colour(ivif_dir):
    # The pyramid gives ties of detail magnitude to its first image, the IR: on this pair the
    # order shows. A colour visible image lends the output its chrominance.
    pair = fuse.read_pair(evaluate.Pair(COLOUR_PAIR[1], *(
        ivif_dir / COLOUR_PAIR[0] / side / COLOUR_PAIR[1] for side in ('ir', 'vi'))))
    laplacian = evaluate.gray_method(baselines.fuse_laplacian)
    vi_y = evaluate.luminance(pair.visible_bgr)
    expected = to_uint8(baselines.fuse_laplacian(pair.thermal, vi_y))
    assert not np.array_equal(expected, to_uint8(baselines.fuse_laplacian(vi_y, pair.thermal)))
    gray = dataclasses.replace(pair, visible_bgr=cv2.cvtColor(vi_y, cv2.COLOR_GRAY2BGR),
                               visible_is_color=False)
    np.testing.assert_array_equal(laplacian(gray, None).fused, expected)
    colour = laplacian(pair, None).fused
    assert pair.visible_is_color and colour.shape == pair.visible_bgr.shape
    unclipped = (colour.min(axis=2) > 0) & (colour.max(axis=2) < 255)
    assert unclipped.mean() > 0.5
    for got, want in zip(bgr_to_ycrcb(colour)[1:], bgr_to_ycrcb(pair.visible_bgr)[1:]):
        assert np.abs(got - want)[unclipped].mean() < 2 / 255  # rounding only


def test_the_grid_shows_the_first_configuration_of_ours_it_is_labelled_with(ivif_dir):
    # run() labels the grid's fused column with the first configuration of ours: its image.
    pairs = evaluate.ivif_splits(ivif_dir).tests['tno42'][:2]
    methods = [evaluate.Method(label, evaluate.gray_method(fuse), ours=True)
               for label, fuse in (('first', baselines.fuse_average),
                                   ('second', baselines.fuse_max))]
    examples = {}
    evaluate.evaluate_dataset('tno42', pairs, methods, examples)
    source, images = examples['tno42']
    assert source.name == pairs[0].name
    np.testing.assert_array_equal(images.fused, methods[0].fuse(source, pairs[0]).fused)


def test_published_values_are_shown_only_against_ours(ivif_dir, tmp_path):
    # The section compares ours, scored as the toolkit scores it, with the values published for
    # other methods: without ours it would only repeat those values.
    out = tmp_path / 'q.md'
    assert evaluate.main(['--data', str(ivif_dir), '--datasets', 'tno42', '--limit', '1',
                          '--methods', 'average,published', '--out', str(out)]) == 0
    text = out.read_text()
    assert 'published values)' not in text and 'published values (MATLAB' not in text
    # Asked for, the comparison is named as left out, and why.
    assert ('published values on tno42: they are compared with ours alone, and no '
            'configuration of ours was evaluated.') in text
