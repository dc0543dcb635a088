"""The repository's Python files follow pycodestyle with the line length setup.cfg gives flake8.

ament_flake8 (what `colcon test` runs in a ROS 2 workspace) has no PyPI wheel; pycodestyle is the
checker inside flake8 that covers layout, so the rule holds on machines without a distro too.
"""

import configparser
import pathlib

import pycodestyle

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKED = ('s4fusion_ros', 'test', 'launch', 'scripts', 'setup.py')


def test_python_files_follow_pycodestyle():
    config = configparser.ConfigParser()
    config.read(ROOT / 'setup.cfg')
    files = [str(path) for name in CHECKED for path in
             ([ROOT / name] if name.endswith('.py') else sorted((ROOT / name).rglob('*.py')))]
    assert len(files) > 50
    style = pycodestyle.StyleGuide(max_line_length=config.getint('flake8', 'max-line-length'),
                                   quiet=True)
    report = style.check_files(files)
    assert report.total_errors == 0, '\n'.join(report.get_statistics())
