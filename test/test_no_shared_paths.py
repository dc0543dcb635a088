"""The product never points at the development workspace's shared/ folder: README.md, docs/,
scripts/, the packaging files and every text file of the package (code, comments, docstrings,
help, notices) name their data by argument and say where it comes from in the repository's own
docs. Only the tests read it (test/conftest.py), where S4FUSION_IVIF_DATA is not set."""

import os
import pathlib
import subprocess

import pytest

from paths import REPO

NOT_PRODUCT = {'test', '.git', '.venv', 'build', 'install', 'log', '.pytest_cache', '.hypothesis',
               'runs', 'demo_output', '.gpu'}


def product_files() -> list[pathlib.Path]:
    """The files git tracks, the tests aside; where there is no git (a colcon workspace copy),
    the folders but the tests and what tools and builds make."""
    try:
        listed = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO, capture_output=True,
                                check=True).stdout.decode().split('\0')
        return [REPO / name for name in listed
                if name and not name.startswith('test/') and (REPO / name).is_file()]
    except (OSError, subprocess.CalledProcessError):
        pass
    paths = []
    for folder, subfolders, files in os.walk(REPO):
        if pathlib.Path(folder) == REPO:
            subfolders[:] = [name for name in subfolders if name not in NOT_PRODUCT]
        paths += [pathlib.Path(folder, name) for name in files]
    return paths


def text_files():
    """Every file the product consists of, binary ones (a NUL byte) aside."""
    for path in product_files():
        data = path.read_bytes()
        if b'\0' not in data:
            yield path, data


def test_readme_and_package_do_not_refer_to_shared():
    hits = [f'{path.relative_to(REPO)}:{number}: {line.decode(errors="replace").strip()}'
            for path, data in text_files()
            for number, line in enumerate(data.splitlines(), 1) if b'shared/' in line]
    assert not hits, 'references to shared/:\n' + '\n'.join(hits)


def test_the_check_reads_the_package():
    names = {path.relative_to(REPO).as_posix() for path, _ in text_files()}
    assert {'README.md', 's4fusion_ros/tools/train.py', 's4fusion_ros/sync.py',
            'requirements.txt', 'scripts/make_sample_bag.py', 'docs/training.md',
            'launch/s4fusion.launch.py'} <= names


def test_train_and_eval_take_their_data_folder_as_an_argument(monkeypatch):
    from s4fusion_ros.tools import evaluate, train
    monkeypatch.delenv('S4FUSION_IVIF_DATA', raising=False)
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(['--out', 'runs/x'])
    with pytest.raises(SystemExit):
        evaluate.parse_args([])
    assert evaluate.parse_args(['--flicker', 'videos']).data is None  # flicker reads no --data
    assert train.build_parser().parse_args(['--data', 'd', '--out', 'o']).data == pathlib.Path('d')
    monkeypatch.setenv('S4FUSION_IVIF_DATA', '/data/ivif')
    assert train.build_parser().parse_args(['--out', 'o']).data == pathlib.Path('/data/ivif')
    assert evaluate.parse_args([]).data == pathlib.Path('/data/ivif')
