"""Exit 0 when the virtual environment is complete for this checkout, else print what is not
(scripts/setup.sh runs it by the venv's Python, isolated and from /, so that the checkout's own
folder on sys.path cannot stand in for an installed s4fusion_ros).

Complete: every pin of requirements.txt installed at its version (a local build tag such as
torch's +cpu aside) with all the files its install recorded, what they pulled in at the version
constraints.txt locks it to, torch, rclpy and this checkout's
s4fusion_ros importable, the console scripts bound to this venv's Python, and the venv an ament
prefix (s4fusion_ros.ament_prefix). With --damaged it prints the pins installed with files
missing instead (pip takes them as installed, so setup.sh reinstalls them by force). With --bound
(any Python 3 may run it) it checks only that the venv's scripts run its own Python: a venv
moved or copied from another folder runs the old one's. With --lock it prints constraints.txt
anew from what the venv has installed: what the pins require, transitively, at its version.

Usage: VENV/bin/python -I scripts/check_venv.py [--damaged | --bound | --lock] ROOT VENV
"""

import csv
import importlib
import importlib.metadata
import importlib.util
import pathlib
import re
import sys
from collections.abc import Iterator

LOCK_HEADER = """\
# The versions of what requirements.txt pulls in, as its pins were last installed together: a new
# release of one of them cannot break a set-up from nothing (scripts/setup.sh installs with
# `-c constraints.txt`). Made by scripts/check_venv.py --lock. After changing a pin, install the
# pins without the lock (which may hold the new pin's dependencies back), then write it anew:
#   .venv/bin/python -m pip install -r requirements.txt
#   .venv/bin/python -I scripts/check_venv.py --lock . .venv > constraints.txt
"""


def pins(root: pathlib.Path, file: str = 'requirements.txt') -> Iterator[tuple[str, str]]:
    """(name, version) of each `name==version` line of requirements.txt (or constraints.txt)."""
    for line in (root / file).read_text().splitlines():
        requirement = line.partition('#')[0].strip()
        if requirement:
            name, _, version = requirement.partition('==')
            yield name, version


def canonical(name: str) -> str:
    """A distribution's name as pip compares names (PEP 503)."""
    return re.sub(r'[-_.]+', '-', name).lower()


def lock(root: pathlib.Path) -> Iterator[str]:
    """constraints.txt: what requirements.txt's pins require here, transitively, the pins aside.

    (Distributions that nothing requires, such as the Python packages inside the ROS wheels,
    are not pip's to resolve.)
    """
    from packaging.requirements import Requirement  # the venv has it; --bound runs without
    found = {canonical(d.metadata['Name']): d for d in importlib.metadata.distributions()}
    pinned = {canonical(name) for name, _ in pins(root)}
    needed, waiting = set(), list(pinned)
    while waiting:
        name = waiting.pop()
        if name in needed or name not in found:
            continue
        needed.add(name)
        for line in found[name].requires or ():
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({'extra': ''}):
                waiting.append(canonical(requirement.name))
    yield LOCK_HEADER
    for name in sorted(needed - pinned):
        yield f'{found[name].metadata["Name"]}=={found[name].version}\n'


def off_lock(root: pathlib.Path) -> Iterator[str]:
    """Each locked distribution installed at another version than constraints.txt's."""
    for name, locked in pins(root, 'constraints.txt'):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not needed here (an environment marker left it out)
        if version != locked:
            yield f'{name} {version} is installed, constraints.txt locks {locked}'


def installed(
        root: pathlib.Path) -> Iterator[tuple[str, str, importlib.metadata.Distribution | None]]:
    """(name, pinned version, its installed distribution or None) of each pin."""
    for name, pinned in pins(root):
        try:
            yield name, pinned, importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            yield name, pinned, None


def recorded_files(distribution: importlib.metadata.Distribution) -> list[str]:
    """The files its install recorded, present or not.

    Not Distribution.files: since Python 3.12 it leaves out the files that are gone, so a damaged
    install would look whole. pip records every install in RECORD; the rest (an egg-info, rare
    here) only through Distribution.files."""
    record = distribution.read_text('RECORD')
    if record is None:
        return [str(file) for file in distribution.files or ()]
    return [row[0] for row in csv.reader(record.splitlines()) if row]


def lacks_files(distribution: importlib.metadata.Distribution) -> list[str]:
    """The files its install recorded that are gone (compiled caches aside)."""
    return [file for file in recorded_files(distribution)
            if '__pycache__' not in pathlib.PurePath(file).parts
            and not pathlib.Path(distribution.locate_file(file)).exists()]


def script_python(script: pathlib.Path) -> str:
    """The interpreter a console script pip wrote runs: its `#!` line, or, where the path has a
    space or is too long for one, the `exec` of the `#!/bin/sh` header pip writes instead."""
    lines = script.read_text(errors='replace').split('\n', 2) if script.is_file() else ['']
    if lines[0] == '#!/bin/sh' and len(lines) > 1 and lines[1].startswith("'''exec' \""):
        return lines[1][len("'''exec' \""):].partition('"')[0]
    return lines[0][2:] if lines[0].startswith('#!') else ''


def bound_elsewhere(venv: pathlib.Path) -> str:
    """Why the venv's scripts would not run its own Python ('' when they do).

    The venv may be named through a link (.venv linked to a folder elsewhere): its scripts name
    the folder's real path, or the link's."""
    def own(python: str) -> bool:
        path = pathlib.Path(python)
        return (path.name in ('python', 'python3') and path.is_absolute()
                and path.parent.resolve() == (venv / 'bin').resolve())
    for name in ('pip', 's4fusion-demo'):
        script = venv / 'bin' / name
        if script.is_file() and not own(script_python(script)):
            return f'{script} runs {script_python(script) or "nothing"} (moved or copied?)'
    return ''


def problems(root: pathlib.Path, venv: pathlib.Path) -> Iterator[str]:
    """What is missing or wrong, one line each."""
    for name, pinned, distribution in installed(root):
        if distribution is None:
            yield f'{name} is not installed'
            continue
        if distribution.version.partition('+')[0] != pinned:
            yield f'{name} {distribution.version} is installed, {pinned} is pinned'
        missing = lacks_files(distribution)
        if missing:
            yield f'{name} lacks {len(missing)} of its files ({missing[0]}, ...)'
    yield from off_lock(root)
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
    if not script.is_file():
        yield f'{script} is missing'
    else:
        yield bound_elsewhere(venv)  # '' when bound here, dropped by main
    for entry in ('share/ament_index/resource_index/packages/s4fusion_ros',
                  'lib/s4fusion_ros/s4fusion_node'):
        if not (venv / entry).exists():
            yield f'{venv / entry} is missing'


def damaged(root: pathlib.Path) -> Iterator[str]:
    """`name==version` of each pin installed with files missing."""
    for name, pinned, distribution in installed(root):
        if distribution is not None and lacks_files(distribution):
            yield f'{name}=={pinned}'


def main() -> int:
    """Command line entry."""
    arguments = sys.argv[1:]
    mode = arguments.pop(0) if arguments[0] in ('--damaged', '--bound', '--lock') else ''
    root, venv = (pathlib.Path(argument) for argument in arguments)
    if mode == '--lock':
        print(''.join(lock(root)), end='')
        return 0
    if mode == '--damaged':
        for pin in damaged(root):
            print(pin)
        return 0
    found = [bound_elsewhere(venv)] if mode == '--bound' else list(problems(root, venv))
    found = [problem for problem in found if problem]
    if found:
        print('; '.join(found))
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main())
