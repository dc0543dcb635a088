"""Where the tests find the repository and the installed executables (the image data: conftest's
ivif_dir fixture)."""

import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def executable(name: str) -> pathlib.Path:
    """A console script of the installation under test.

    pip puts it beside the Python that runs the tests (scripts/setup.sh's .venv); colcon puts it
    in lib/s4fusion_ros of the package's prefix, which `colcon test` names in AMENT_PREFIX_PATH.
    """
    beside_python = pathlib.Path(sys.executable).parent / name
    if beside_python.exists() or not os.environ.get('AMENT_PREFIX_PATH'):
        return beside_python
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix
    try:
        return pathlib.Path(get_package_prefix('s4fusion_ros')) / 'lib' / 's4fusion_ros' / name
    except PackageNotFoundError:
        return beside_python
