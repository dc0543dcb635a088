"""Atomic file writing (a file is whole or as it was, and a failure names it), the one-writer
folder lock and the path checks of files.py."""

import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from s4fusion_ros.files import (check_writable_folder, held_folder, opencv_path, resolved,
                                sync_tree, write_atomically, write_png, write_text_atomically,
                                write_together)


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


def test_files_written_together_are_all_new_or_all_as_they_were(tmp_path):
    # Weights and their JSON: a write that fails after the first file left the new weights
    # beside the old JSON.
    weights, config = tmp_path / 'model.safetensors', tmp_path / 'model.json'
    weights.write_bytes(b'old weights')
    config.write_text('old config')

    def full_disk(file):
        raise OSError(28, 'No space left on device')
    with pytest.raises(OSError, match='model.json'):
        write_together({weights: lambda file: file.write(b'new weights'), config: full_disk})
    assert (weights.read_bytes(), config.read_text()) == (b'old weights', 'old config')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.json', 'model.safetensors']
    write_together({weights: lambda file: file.write(b'new weights'),
                    config: lambda file: file.write(b'new config')})
    assert (weights.read_bytes(), config.read_text()) == (b'new weights', 'new config')


def test_a_write_goes_to_disk_through_a_hidden_file_before_the_rename(tmp_path, monkeypatch):
    # What a crash could still lose is never renamed to the path, and a reader listing the
    # folder meanwhile sees no half-written file of a name it would take.
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: (
        events.append(('fsync', os.readlink(f'/proc/self/fd/{fd}'))), real_fsync(fd)))
    monkeypatch.setattr(os, 'replace', lambda source, target: (
        events.append(('replace', str(source), str(target))), real_replace(source, target)))
    path = tmp_path / 'manifest.json'

    def write(file):
        file.write(b'{}')
        events.append(('listed', sorted(p.name for p in tmp_path.iterdir())))
    write_atomically(path, write)
    temporary = str(tmp_path / '.manifest.json.tmp')
    assert events == [('listed', ['.manifest.json.tmp']), ('fsync', temporary),
                      ('replace', temporary, str(path))]
    assert path.read_bytes() == b'{}'


def test_sync_tree_syncs_every_file_and_folder_in_it(tmp_path, monkeypatch):
    (tmp_path / 'bag' / 'sub').mkdir(parents=True)
    for name in ('bag/metadata.yaml', 'bag/sub/data.mcap'):
        (tmp_path / name).write_text('x')
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: (
        synced.append(os.readlink(f'/proc/self/fd/{fd}')), real_fsync(fd)))
    sync_tree(tmp_path / 'bag')
    assert sorted(synced) == sorted(str(tmp_path / name) for name in (
        'bag', 'bag/sub', 'bag/metadata.yaml', 'bag/sub/data.mcap'))


def test_an_error_of_the_write_keeps_the_file_it_names(tmp_path):
    # Only an error naming no file is given the path written: a source file that is missing
    # is named as itself.
    def copy_missing(file):
        raise FileNotFoundError(2, 'No such file or directory', 'source.bin')
    with pytest.raises(FileNotFoundError) as raised:
        write_atomically(tmp_path / 'copy.bin', copy_missing)
    assert raised.value.filename == 'source.bin'
    assert list(tmp_path.iterdir()) == []


def test_a_symlink_loop_is_an_os_error_naming_the_path(tmp_path):
    (tmp_path / 'a').symlink_to(tmp_path / 'b')
    (tmp_path / 'b').symlink_to(tmp_path / 'a')
    with pytest.raises(OSError, match=f'{tmp_path / "a"}: '):
        resolved(tmp_path / 'a')
    assert resolved(tmp_path) == tmp_path.resolve()


def test_a_folder_is_checked_where_it_would_be_made(tmp_path):
    check_writable_folder(tmp_path / 'runs' / 'today' / 'fused')  # two folders to make
    assert list(tmp_path.iterdir()) == []  # and nothing made yet
    (tmp_path / 'file').write_text('x')
    with pytest.raises(NotADirectoryError, match='is not a folder'):
        check_writable_folder(tmp_path / 'file' / 'fused')
    read_only = tmp_path / 'read_only'
    read_only.mkdir(mode=0o500)
    if os.access(read_only, os.W_OK):  # root: mode bits do not stop it, procfs does
        read_only = pathlib.Path('/proc/1')
    with pytest.raises(PermissionError, match='is not writable'):
        check_writable_folder(read_only / 'fused')


def test_one_process_at_a_time_holds_a_folder(tmp_path):
    folder = tmp_path / 'out'
    with held_folder(folder, RuntimeError('busy')):
        assert folder.is_dir()
        with pytest.raises(RuntimeError, match='busy'):
            with held_folder(folder, RuntimeError('busy')):
                pass
        (folder / 'fused.png').write_bytes(b'x')
    with held_folder(folder, RuntimeError('busy')):  # released after the block
        pass
    assert (folder / 'fused.png').exists()
    # A folder it made and left empty is removed; one that was there stays, empty or not.
    with held_folder(tmp_path / 'refused', RuntimeError('busy')):
        pass
    existing = tmp_path / 'existing'
    existing.mkdir()
    with held_folder(existing, RuntimeError('busy')):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ['existing', 'out']


def test_a_name_that_is_not_utf8_is_refused_for_opencv_and_written_as_its_bytes(tmp_path):
    latin1 = os.fsdecode(b'caf\xe9.png')  # held as a surrogate
    with pytest.raises(ValueError, match='not UTF-8'):
        opencv_path(tmp_path / latin1)
    assert opencv_path(tmp_path / 'café.png') == str(tmp_path / 'café.png')
    manifest = tmp_path / 'manifest.txt'
    write_text_atomically(manifest, f'{latin1}\ncafé\n')
    assert manifest.read_bytes() == b'caf\xe9.png\ncaf\xc3\xa9\n'
