"""Atomic file writing: a file is whole or as it was, and a failure names it."""

import subprocess
import sys

import cv2
import numpy as np
import pytest

from s4fusion_ros.files import write_png


def test_png_round_trips_into_a_new_folder_and_leaves_no_temporary(tmp_path):
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    path = tmp_path / 'made' / 'fused.png'
    write_png(path, image)
    np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), image)
    assert sorted(p.name for p in path.parent.iterdir()) == ['fused.png']


def test_an_image_png_cannot_hold_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / 'fused.png'
    write_png(path, np.full((4, 4), 7, np.uint8))
    before = path.read_bytes()
    with pytest.raises(OSError, match='fused.png: cannot encode a uint8 \\(4, 4, 2\\) image'):
        write_png(path, np.zeros((4, 4, 2), np.uint8))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['fused.png']


def test_a_write_the_disk_refuses_names_the_file_and_keeps_the_old_one(tmp_path):
    # A full disk (here: a file size limit, which fails the write the same way) gave
    # '[Errno 28] No space left on device' naming no file.
    path = tmp_path / 'fused.png'
    write_png(path, np.zeros((4, 4), np.uint8))
    before = path.read_bytes()
    code = ('import resource, sys, numpy as np, pathlib\n'
            'from s4fusion_ros.files import write_png\n'
            'resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n'
            'noise = np.random.default_rng(0).integers(0, 255, (256, 256), np.uint8)\n'
            'try:\n    write_png(pathlib.Path(sys.argv[1]), noise)\n'
            'except OSError as error:\n    print(error)\n')
    done = subprocess.run([sys.executable, '-c', code, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.strip() == f"[Errno 27] File too large: '{path}'", done.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['fused.png']
