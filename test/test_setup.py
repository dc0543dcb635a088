"""scripts/check_venv.py, which decides whether scripts/setup.sh reuses .venv: a pin missing, at
another version or with files gone, or the package installed from another checkout, is found."""

import pathlib
import shutil
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


def test_a_venv_named_through_a_link_is_bound_to_itself(tmp_path):
    # .venv linked to a folder elsewhere: its scripts name the folder's real path, and the check
    # named through the link took it for a venv moved or copied, to be made afresh each time.
    venv = tmp_path / 'disk' / 'venv'
    (venv / 'bin').mkdir(parents=True)
    (venv / 'bin' / 's4fusion-demo').write_text(f'#!{venv}/bin/python\nimport sys\n')
    (tmp_path / 'checkout').mkdir()
    (tmp_path / 'checkout' / '.venv').symlink_to(venv)
    result = run_check('--bound', REPO, tmp_path / 'checkout' / '.venv')
    assert result.returncode == 0, result.stdout


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


def fake_set_up(tmp_path: pathlib.Path, pip_does: str) -> tuple[pathlib.Path, dict]:
    """A checkout with this one's set-up files and a `python3` whose venvs have no pip but one
    that logs its arguments to pip.log and then does `pip_does` (Python): set-up.sh runs to its
    first pip step in a second or two, creating no real environment."""
    root = tmp_path / 'checkout'
    (root / 'scripts').mkdir(parents=True)
    for name in ('scripts/setup.sh', 'scripts/check_venv.py', 'requirements.txt',
                 'constraints.txt', 'setup.py'):
        (root / name).write_bytes((REPO / name).read_bytes())
    (root / 'launch').mkdir()
    (root / 'config').mkdir()
    bin_folder = tmp_path / 'bin'
    bin_folder.mkdir()
    python3 = bin_folder / 'python3'
    python3.write_text(
        '#!/bin/sh\n'
        f'if [ "$1" = -m ] && [ "$2" = venv ]; then shift 2; exec "{sys.executable}" -m venv '
        f'--without-pip "$@"; fi\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    (tmp_path / 'pip.py').write_text(
        'import os, signal, sys, time\n'
        f'with open({str(tmp_path / "pip.log")!r}, "a") as log:\n'
        '    log.write(" ".join(sys.argv[1:]) + "\\n")\n' + pip_does)
    return root, {'PATH': f'{bin_folder}:/usr/bin:/bin', 'HOME': str(tmp_path)}


def venv_with_fake_pip(venv: pathlib.Path, pip_module: pathlib.Path) -> None:
    """An (incomplete) venv whose `python -m pip` runs pip_module."""
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True,
                   timeout=60)
    site = next(venv.glob('lib/python3*/site-packages'))
    (site / 'pip').mkdir()
    (site / 'pip' / '__init__.py').write_text('')
    (site / 'pip' / '__main__.py').write_text(pip_module.read_text())


def run_set_up(root: pathlib.Path, env: dict) -> subprocess.CompletedProcess:
    # A session of its own: the fake pip's Ctrl-C reaches the set-up's process group only.
    return subprocess.run(['bash', str(root / 'scripts' / 'setup.sh')], capture_output=True,
                          text=True, timeout=120, env=env, cwd='/', start_new_session=True)


def test_ctrl_c_during_the_torch_step_stops_the_set_up(tmp_path):
    # A terminal's Ctrl-C reaches pip and the script: pip exits 1, and the set-up took that for
    # an unreachable CPU index and went on to fetch PyPI's multi-GB CUDA torch.
    root, env = fake_set_up(tmp_path, (
        'try:\n'
        '    os.kill(0, signal.SIGINT)\n'
        '    time.sleep(10)\n'
        'except KeyboardInterrupt:\n'
        '    sys.exit("ERROR: Operation cancelled by user")\n'))
    venv_with_fake_pip(root / '.venv', tmp_path / 'pip.py')
    done = run_set_up(root, env)
    calls = (tmp_path / 'pip.log').read_text().splitlines()
    assert len(calls) == 1 and 'torch==' in calls[0], calls
    assert done.returncode == 130, done.stdout + done.stderr
    assert 'CUDA build' not in done.stderr
    assert done.stderr.endswith(f'setup: interrupted (the next run completes {root}/.venv)\n')
    assert not (root / '.venv' / '.s4fusion-setup-complete').exists()


def test_a_failed_pip_step_is_told_as_the_set_up_s_own_last_word(tmp_path):
    # Without PyPI the output ended with pip's "No matching distribution found for
    # torch==2.13.0 (from versions: none)", just after "installing PyPI's, the CUDA build".
    root, env = fake_set_up(tmp_path, 'sys.exit("ERROR: No matching distribution found")\n')
    venv_with_fake_pip(root / '.venv', tmp_path / 'pip.py')
    done = run_set_up(root, env)
    assert done.returncode == 1
    torch_pin = next(line for line in (REPO / 'requirements.txt').read_text().splitlines()
                     if line.startswith('torch=='))
    assert done.stderr.splitlines()[-1] == (
        f"setup: installing PyPI's {torch_pin} failed (pip says why above; is PyPI out of "
        f"reach?): {root}/.venv is left incomplete, the next run completes it")


def test_two_set_ups_at_once_take_turns(tmp_path):
    # demo.sh and test.sh started together: the second removed the venv the first was installing
    # into ("it is not a virtual environment") and both ran pip into one folder at once.
    root, env = fake_set_up(tmp_path, '')
    (tmp_path / 'pip.py').write_text(  # a pip that takes a second, then fails
        'import sys, time\n'
        f'log = open({str(tmp_path / "pip.log")!r}, "a")\n'
        'log.write("start\\n"); log.flush(); time.sleep(1); log.write("end\\n"); log.close()\n'
        'sys.exit("ERROR: offline")\n')
    venv_with_fake_pip(root / '.venv', tmp_path / 'pip.py')
    both = [subprocess.Popen(['bash', str(root / 'scripts' / 'setup.sh')], env=env, cwd='/',
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [process.communicate(timeout=120)[0] for process in both]
    calls = (tmp_path / 'pip.log').read_text().split()
    assert calls == ['start', 'end'] * 4, (calls, outputs)  # two pip calls each, one at a time
    assert any('another set-up of' in output for output in outputs), outputs


@pytest.mark.parametrize('made', [True, False])
def test_dot_venv_may_be_a_link_to_a_folder_elsewhere(tmp_path, made):
    # Python's venv refuses to make a venv through a link: "Error: Unable to create directory
    # '.../.venv'", and nothing was installed, whether the folder it names existed or not.
    root, env = fake_set_up(tmp_path, 'sys.exit("ERROR: offline")\n')
    elsewhere = tmp_path / 'disk' / 'venv'
    elsewhere.parent.mkdir()
    if made:
        venv_with_fake_pip(elsewhere, tmp_path / 'pip.py')
    (root / '.venv').symlink_to(elsewhere)
    done = run_set_up(root, env)
    assert 'Unable to create directory' not in done.stderr, done.stderr
    assert (root / '.venv').is_symlink() and (elsewhere / 'pyvenv.cfg').is_file()
    if made:  # its (fake) pip was asked for torch
        assert 'torch==' in (tmp_path / 'pip.log').read_text()
    else:  # the new venv has no pip at all
        assert 'No module named pip' in done.stderr, done.stderr
    assert f'{elsewhere} is left incomplete' in done.stderr


@pytest.mark.skipif(not shutil.which('git'), reason='needs git')
def test_git_ignores_dot_venv_as_a_link_too(tmp_path):
    # '.venv/' matches a folder only: a linked .venv showed as untracked.
    (tmp_path / '.gitignore').write_bytes((REPO / '.gitignore').read_bytes())
    (tmp_path / 'venv').mkdir()
    (tmp_path / '.venv').symlink_to(tmp_path / 'venv')
    subprocess.run(['git', 'init', '-q', str(tmp_path)], check=True, timeout=60)
    status = subprocess.run(['git', 'status', '--porcelain', '--', '.venv'], cwd=tmp_path,
                            capture_output=True, text=True, check=True, timeout=60).stdout
    assert status == ''
