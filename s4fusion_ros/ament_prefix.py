"""Make a pip installation an ament prefix, as colcon's install/ is one.

`ros2 launch`, `ros2 run` and launch_ros find a package through ament's resource index: the marker
<prefix>/share/ament_index/resource_index/packages/s4fusion_ros, the package's files under
<prefix>/share/s4fusion_ros and its executables under <prefix>/lib/s4fusion_ros. A plain pip
install brings the share/ files (setup.py's data_files) but puts the executables in bin/ only; an
editable install brings neither. This adds what is missing: links to setup.py's data_files in the
source tree of an editable install, and links in lib/s4fusion_ros to the executables in bin/.

    python -m s4fusion_ros.ament_prefix [PREFIX]    (default: this Python's prefix)

Then `AMENT_PREFIX_PATH=PREFIX` (beside a sourced distro: PREFIX:$AMENT_PREFIX_PATH) lets
ament_index_python, `ros2 launch s4fusion_ros ...` and `ros2 run s4fusion_ros ...` find it.
"""

import argparse
import json
import os
import pathlib
import sys
import sysconfig
from importlib import metadata
from urllib.parse import unquote, urlparse

PACKAGE = 's4fusion_ros'
MARKER = pathlib.Path('share/ament_index/resource_index/packages') / PACKAGE


class PrefixError(RuntimeError):
    """The prefix holds no installation of the package, or its files cannot be laid out."""


def installed_distribution(prefix: pathlib.Path) -> metadata.Distribution:
    """Return the package's distribution installed under `prefix` (its site-packages)."""
    site = sysconfig.get_path('purelib', vars={'base': str(prefix), 'platbase': str(prefix)})
    for distribution in metadata.distributions(path=[site]):
        if distribution.metadata['Name'] == PACKAGE:
            return distribution
    raise PrefixError(f'{PACKAGE} is not installed in {site}')


def editable_source(distribution: metadata.Distribution) -> pathlib.Path | None:
    """Return the source tree of an editable install (pip's direct_url.json), else None."""
    text = distribution.read_text('direct_url.json')
    if not text:
        return None
    record = json.loads(text)
    if not record.get('dir_info', {}).get('editable'):
        return None
    return pathlib.Path(unquote(urlparse(record['url']).path))


def data_files(source: pathlib.Path) -> list[tuple[str, list[str]]]:
    """Return setup.py's data_files: (target folder, source paths relative to `source`)."""
    from setuptools import distutils  # noqa: F401 - setuptools' distutils for run_setup
    from distutils.core import run_setup
    cwd = os.getcwd()
    os.chdir(source)  # setup.py globs relative paths
    try:
        return run_setup('setup.py', stop_after='init').data_files
    finally:
        os.chdir(cwd)


def link(target: pathlib.Path, path: pathlib.Path) -> None:
    """Make `path` a relative symbolic link to `target` (replacing an older link)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        return  # a real file, installed by pip (plain install): keep it
    path.symlink_to(os.path.relpath(target, path.parent))


def make_prefix(prefix: pathlib.Path) -> list[pathlib.Path]:
    """Lay out the ament prefix for the installation under `prefix`; return the paths made."""
    prefix = prefix.absolute()
    distribution = installed_distribution(prefix)
    made = []
    source = editable_source(distribution)
    if source is not None:
        for folder, files in data_files(source):
            for name in files:
                path = prefix / folder / pathlib.Path(name).name
                link(source / name, path)
                made.append(path)
    if not (prefix / MARKER).is_file():
        raise PrefixError(f'{prefix / MARKER} is missing: install {PACKAGE} with pip into '
                          f'{prefix} first')
    bin_dir = pathlib.Path(sysconfig.get_path('scripts', vars={'base': str(prefix)}))
    for entry in distribution.entry_points:
        if entry.group != 'console_scripts':
            continue
        executable = bin_dir / entry.name
        if not executable.is_file():
            raise PrefixError(f'{executable} is missing: pip put no console script there')
        path = prefix / 'lib' / PACKAGE / entry.name
        link(executable, path)
        made.append(path)
    return made


def main(argv: list[str] | None = None) -> int:
    """Console use: python -m s4fusion_ros.ament_prefix [PREFIX]."""
    parser = argparse.ArgumentParser(prog='python -m s4fusion_ros.ament_prefix',
                                     description=__doc__.splitlines()[0])
    parser.add_argument('prefix', nargs='?', type=pathlib.Path, default=pathlib.Path(sys.prefix),
                        help='the installation prefix (default: %(default)s)')
    args = parser.parse_args(argv)
    try:
        made = make_prefix(args.prefix)
    except PrefixError as error:
        print(f'ament_prefix: {error}', file=sys.stderr)
        return 1
    print(f'ament_prefix: {args.prefix} is an ament prefix for {PACKAGE} ({len(made)} links); '
          f'use it with AMENT_PREFIX_PATH={args.prefix.absolute()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
