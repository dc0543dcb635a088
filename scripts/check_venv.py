"""Exit 0 when the virtual environment is complete for this checkout, else print what is not
(scripts/setup.sh runs it by the venv's Python, isolated and from /, so that the checkout's own
folder on sys.path cannot stand in for an installed s4fusion_ros).

Complete: every pin of requirements.txt installed at its version (a local build tag such as
torch's +cpu aside) with all the files its install recorded, torch, rclpy and this checkout's
s4fusion_ros importable, the console scripts bound to this venv's Python, and the venv an ament
prefix (s4fusion_ros.ament_prefix). With --damaged it prints the pins installed with files
missing instead (pip takes them as installed, so setup.sh reinstalls them by force).

Usage: VENV/bin/python -I scripts/check_venv.py [--damaged] ROOT VENV
"""

import importlib
import importlib.metadata
import importlib.util
import pathlib
import sys
from collections.abc import Iterator


def pins(root: pathlib.Path) -> Iterator[tuple[str, str]]:
    """(name, version) of each `name==version` line of requirements.txt."""
    for line in (root / 'requirements.txt').read_text().splitlines():
        requirement = line.partition('#')[0].strip()
        if requirement:
            name, _, version = requirement.partition('==')
            yield name, version


def lacks_files(distribution: importlib.metadata.Distribution) -> list:
    """The files its install recorded that are gone (compiled caches aside)."""
    return [file for file in distribution.files or ()
            if '__pycache__' not in file.parts and not file.locate().exists()]


def problems(root: pathlib.Path, venv: pathlib.Path) -> Iterator[str]:
    """What is missing or wrong, one line each."""
    for name, pinned in pins(root):
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            yield f'{name} is not installed'
            continue
        if distribution.version.partition('+')[0] != pinned:
            yield f'{name} {distribution.version} is installed, {pinned} is pinned'
        missing = lacks_files(distribution)
        if missing:
            yield f'{name} lacks {len(missing)} of its files ({missing[0]}, ...)'
    for module in ('torch', 'rclpy'):
        try:
            importlib.import_module(module)
        except Exception as error:  # whatever a broken install raises
            yield f'import {module} fails: {error}'
    spec = importlib.util.find_spec('s4fusion_ros')
    source = root / 's4fusion_ros' / '__init__.py'
    if spec is None or pathlib.Path(spec.origin).resolve() != source.resolve():
        yield f's4fusion_ros is not installed from {root}'
    script = venv / 'bin' / 's4fusion-demo'
    first_line = script.read_text().partition('\n')[0] if script.is_file() else ''
    if first_line != f'#!{venv}/bin/python':
        yield f'{script} does not run {venv}/bin/python'
    for entry in ('share/ament_index/resource_index/packages/s4fusion_ros',
                  'lib/s4fusion_ros/s4fusion_node'):
        if not (venv / entry).exists():
            yield f'{venv / entry} is missing'


def damaged(root: pathlib.Path) -> Iterator[str]:
    """`name==version` of each pin installed with files missing."""
    for name, pinned in pins(root):
        try:
            if lacks_files(importlib.metadata.distribution(name)):
                yield f'{name}=={pinned}'
        except importlib.metadata.PackageNotFoundError:
            pass


def main() -> int:
    """Command line entry."""
    arguments = sys.argv[1:]
    list_damaged = arguments[:1] == ['--damaged']
    root, venv = (pathlib.Path(argument) for argument in arguments[list_damaged:])
    if list_damaged:
        for pin in damaged(root):
            print(pin)
        return 0
    found = list(problems(root, venv))
    if found:
        print('; '.join(found))
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main())
