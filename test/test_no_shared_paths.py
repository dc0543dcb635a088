"""The product never points at the development workspace's shared/ folder: README.md and every
text file of the package (code, comments, docstrings, help, notices) name their data by argument
and say where it comes from in the repository's own docs."""

import pathlib

import pytest

from paths import REPO


def text_files():
    """README.md and every file under s4fusion_ros/ but binary ones (a NUL byte)."""
    paths = [REPO / 'README.md'] + sorted(p for p in (REPO / 's4fusion_ros').rglob('*')
                                          if p.is_file())
    for path in paths:
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
    assert {'README.md', 's4fusion_ros/tools/train.py', 's4fusion_ros/sync.py'} <= names


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
