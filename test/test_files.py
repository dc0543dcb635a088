"""Atomic file writing: a file is whole or as it was, and a failure names it."""

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
