"""scripts/check_venv.py, which decides whether scripts/setup.sh reuses .venv: a pin missing, at
another version or with files gone, or the package installed from another checkout, is found."""

import pathlib
import subprocess
import sys

import pytest

from paths import REPO

CHECK = REPO / 'scripts' / 'check_venv.py'


def run_check(*arguments, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), *map(str, arguments)], cwd='/',
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.skipif(not (REPO / '.venv').exists() or not (REPO / '.venv').samefile(sys.prefix),
                    reason="runs in the checkout's own .venv (scripts/test.sh)")
def test_the_venv_the_tests_run_in_is_complete():
    result = run_check(REPO, sys.prefix)
    assert result.returncode == 0 and result.stdout == '', result.stdout + result.stderr


@pytest.mark.skipif(not (REPO / '.venv').exists() or not (REPO / '.venv').samefile(sys.prefix),
                    reason="runs in the checkout's own .venv (scripts/test.sh)")
def test_the_lock_holds_all_that_the_pins_pulled_in_and_no_pin():
    # setup.sh installed with it: a dependency it misses would float to PyPI's newest. Entries
    # this Python does not install (an environment marker, e.g. a backport) are no fault.
    import importlib.metadata
    result = run_check('--lock', REPO, sys.prefix)

    def installed_here(line: str) -> bool:
        name = line.partition('==')[0]
        try:
            return line.startswith('#') or bool(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            return False
    lock = (REPO / 'constraints.txt').read_text().splitlines(keepends=True)
    assert result.stdout == ''.join(filter(installed_here, lock)), (
        'constraints.txt is out of date: scripts/check_venv.py --lock makes it anew\n'
        + result.stdout + result.stderr)


def fake_distribution(site: pathlib.Path, name: str, files: list[str]) -> None:
    """An installed distribution as pip records it: METADATA and a RECORD of its files."""
    info = site / f'{name}-1.0.dist-info'
    info.mkdir(parents=True)
    (info / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n')
    (info / 'RECORD').write_text(''.join(f'{file},,\n' for file in files))
    for file in files[1:]:  # the first one is gone
        (site / file).parent.mkdir(parents=True, exist_ok=True)
        (site / file).write_text('')


def test_missing_wrong_and_damaged_pins_and_another_checkout_are_found(tmp_path):
    site, root = tmp_path / 'site', tmp_path / 'checkout'
    fake_distribution(site, 'fakepkg', ['fakepkg/gone.py', 'fakepkg/__init__.py'])
    root.mkdir()
    (root / 'requirements.txt').write_text(
        '# a comment\nfakepkg==1.0\nno-such-package==2.0\nnumpy==0.0.1  # too old\n')
    (root / 'constraints.txt').write_text('# nothing locked\n')
    env = {'PYTHONPATH': str(site), 'PATH': '/usr/bin:/bin'}
    result = run_check(root, tmp_path / 'venv', env=env)
    assert result.returncode == 1
    for problem in ('fakepkg lacks 1 of its files (fakepkg/gone.py, ...)',
                    'no-such-package is not installed', 'is installed, 0.0.1 is pinned',
                    f's4fusion_ros is not installed from {root}',
                    f'{tmp_path}/venv/bin/s4fusion-demo is missing'):
        assert problem in result.stdout, result.stdout + result.stderr
    # A dependency installed at another version than the lock's; one not installed is no fault.
    (root / 'constraints.txt').write_text('# the lock\nfakepkg==2.0\nno-such-dependency==1.0\n')
    result = run_check(root, tmp_path / 'venv', env=env)
    assert 'fakepkg 1.0 is installed, constraints.txt locks 2.0' in result.stdout
    assert 'no-such-dependency' not in result.stdout
    # pip takes fakepkg as installed: setup.sh reinstalls what --damaged lists by force.
    assert run_check('--damaged', root, tmp_path / 'venv', env=env).stdout == 'fakepkg==1.0\n'
    (root / 'requirements.txt').write_text('no-such-package==2.0\n')
    assert run_check('--damaged', root, tmp_path / 'venv', env=env).stdout == ''  # none at all


@pytest.mark.parametrize('header', [
    '#!{venv}/bin/python\n',
    # pip's header where the path has a space or is too long for a #! line
    '#!/bin/sh\n\'\'\'exec\' "{venv}/bin/python3" "$0" "$@"\n\' \'\'\'\n'])
def test_scripts_bound_to_the_venv_or_to_another_folder_are_told_apart(tmp_path, header):
    venv = tmp_path / 'with space' / '.venv'
    (venv / 'bin').mkdir(parents=True)
    script = venv / 'bin' / 's4fusion-demo'
    script.write_text(header.format(venv=venv) + 'import sys\n')
    assert run_check('--bound', REPO, venv).returncode == 0
    # The same venv moved: its scripts still run the old folder's Python.
    moved = tmp_path / 'moved' / '.venv'
    (tmp_path / 'moved').mkdir()
    venv.rename(moved)
    result = run_check('--bound', REPO, moved)
    assert result.returncode == 1
    assert f'{moved}/bin/s4fusion-demo runs {venv}/bin/python' in result.stdout


def test_set_up_refuses_a_python_older_than_the_package_needs(tmp_path):
    # The package and NumPy 2.4 need 3.11: on 3.10 the set-up made a venv and installed torch
    # before pip failed.
    python3 = tmp_path / 'python3'
    python3.write_text('#!/bin/sh\n'
                       'case "$1" in --version) echo "Python 3.10.13";; *) exit 1;; esac\n')
    python3.chmod(0o755)
    done = subprocess.run(['bash', str(REPO / 'scripts' / 'setup.sh')], capture_output=True,
                          text=True, timeout=60, env={'PATH': f'{tmp_path}:/usr/bin:/bin'})
    assert done.returncode == 1
    assert done.stderr == ('setup: Python 3.11 or newer is needed as python3 (found: Python '
                           '3.10.13)\n')
