"""The package as ROS 2 tools find and test it.

An ament prefix (pip installs too), colcon's test extra, setup.py options that do not break pip,
package.xml dependencies, and a pytest that launch_testing's plugin loads into.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ElementTree

import pytest

from paths import REPO

PACKAGE = 's4fusion_ros'
LOOKUP = """
import os, sys
from ament_index_python.packages import get_package_prefix, get_package_share_directory
share, prefix = get_package_share_directory(sys.argv[1]), get_package_prefix(sys.argv[1])
print(share)
print(prefix)
"""


def ament_lookup(prefix, **env) -> tuple[pathlib.Path, pathlib.Path]:
    """(share directory, prefix) as ament_index_python finds them via `prefix` (a path list)."""
    pytest.importorskip('ament_index_python', reason='ament_index_python is not installed')
    done = subprocess.run([sys.executable, '-c', LOOKUP, PACKAGE], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, 'AMENT_PREFIX_PATH': str(prefix), **env})
    assert done.returncode == 0, done.stderr
    share, found = done.stdout.split()
    return pathlib.Path(share), pathlib.Path(found)


def check_ament_layout(prefix: pathlib.Path, **env) -> None:
    """The share files and executables where ros2 launch, ros2 run and launch_ros look."""
    share, found = ament_lookup(prefix, **env)
    assert found == prefix and share == prefix / 'share' / PACKAGE
    for name in ('package.xml', 'launch/s4fusion.launch.py', 'config/s4fusion.yaml',
                 'config/fastdds_profile.xml'):
        assert (share / name).is_file(), name
    assert (share / 'package.xml').read_text() == (REPO / 'package.xml').read_text()
    for name in ('s4fusion_node', 's4fusion-play', 's4fusion-demo'):
        assert os.access(prefix / 'lib' / PACKAGE / name, os.X_OK), name
    # The executable under lib/ runs this installation's Python.
    done = subprocess.run([str(prefix / 'lib' / PACKAGE / 's4fusion-play'), '--help'],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert done.returncode == 0 and 'usage: s4fusion-play' in done.stdout, done.stderr


def test_this_installation_is_an_ament_prefix():
    """The prefix the package runs from is one ament finds.

    scripts/setup.sh installs the package editable into the venv and lays out the prefix; colcon
    installs it into install/s4fusion_ros, which AMENT_PREFIX_PATH names.
    """
    from s4fusion_ros import ament_prefix
    prefix = pathlib.Path(sys.prefix)
    try:
        distribution = ament_prefix.installed_distribution(prefix)
    except ament_prefix.PrefixError:  # not pip-installed here: colcon's prefix, if any
        _, prefix = ament_lookup(os.environ.get('AMENT_PREFIX_PATH', ''))
        distribution = None
    check_ament_layout(prefix)
    if distribution is not None and ament_prefix.editable_source(distribution) == REPO:
        # Editable: the launch file is the source's, so an edit needs no reinstall.
        launch_file = prefix / 'share' / PACKAGE / 'launch/s4fusion.launch.py'
        assert launch_file.resolve() == REPO / 'launch/s4fusion.launch.py'


def copy_source(destination: pathlib.Path) -> pathlib.Path:
    """The package's source as a clone has it, without what setup, builds and runs leave."""
    shutil.copytree(REPO, destination, ignore=shutil.ignore_patterns(
        '.git', '.venv', 'build', 'install', 'log', '*.egg-info', 'demo_output', 'runs',
        '__pycache__', '.pytest_cache', '.hypothesis', '.gpu'))
    return destination


def pip_install_into(prefix: pathlib.Path, *source: str) -> None:
    """pip install `source` (a folder, or -e and a folder) into `prefix`, as scripts/setup.sh."""
    # --ignore-installed: else pip uninstalls the package from this environment first.
    done = subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps',
                           '--ignore-installed', '--no-build-isolation',
                           '--disable-pip-version-check', '--prefix', str(prefix), *source],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def make_ament_prefix(prefix: pathlib.Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 's4fusion_ros.ament_prefix', str(prefix)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_a_plain_pip_install_is_an_ament_prefix(tmp_path):
    source, prefix = copy_source(tmp_path / 'source'), tmp_path / 'prefix'
    pip_install_into(prefix, str(source))
    # pip's record names the folder it installed from; that folder may be gone since.
    shutil.rmtree(source)
    site = sysconfig.get_path('purelib', vars={'base': str(prefix), 'platbase': str(prefix)})
    env = {'PYTHONPATH': site}
    done = make_ament_prefix(prefix, **env)
    assert done.returncode == 0, done.stdout + done.stderr
    check_ament_layout(prefix, **env)
    # pip installed the share/ files themselves (data_files), not links into the source.
    assert not (prefix / 'share' / PACKAGE / 'package.xml').is_symlink()
    # Relative: the prefix may be moved or mounted elsewhere as a whole.
    assert os.readlink(prefix / 'lib' / PACKAGE / 's4fusion-play') == '../../bin/s4fusion-play'


def test_an_editable_install_links_the_share_files_of_its_latest_source(tmp_path):
    # Installed editable from one clone, then from another: the links must follow the second
    # (the launch file of the first clone ran). A file pip put in share/ is kept as it is.
    prefix = tmp_path / 'prefix'
    kept = prefix / 'share' / PACKAGE / 'LICENSE'
    for clone in ('first', 'second'):
        source = copy_source(tmp_path / clone)
        pip_install_into(prefix, '-e', str(source))
        if clone == 'first':
            kept.parent.mkdir(parents=True)
            kept.write_text('as a plain install left it')
        done = make_ament_prefix(prefix, PYTHONPATH=str(source))
        assert done.returncode == 0, done.stdout + done.stderr
    check_ament_layout(prefix, PYTHONPATH=str(source))
    launch_file = prefix / 'share' / PACKAGE / 'launch/s4fusion.launch.py'
    assert launch_file.resolve() == source / 'launch/s4fusion.launch.py'
    assert not os.path.isabs(os.readlink(launch_file))
    assert kept.read_text() == 'as a plain install left it' and not kept.is_symlink()


def test_a_prefix_without_the_package_is_refused_by_name(tmp_path):
    done = make_ament_prefix(tmp_path)
    site = sysconfig.get_path('purelib', vars={'base': str(tmp_path), 'platbase': str(tmp_path)})
    assert (done.returncode, done.stdout, done.stderr) == (
        1, '', f'ament_prefix: {PACKAGE} is not installed in {site}\n')


def colcon(workspace: pathlib.Path, *args: str, env: dict) -> None:
    """Run colcon in ``workspace`` with this Python, as README's robot section does."""
    done = subprocess.run([sys.executable, '-m', 'colcon', *args], cwd=workspace,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def sourced(setup_script: pathlib.Path) -> dict:
    """The environment after sourcing a colcon install's setup.sh, as a shell on a robot."""
    done = subprocess.run(['sh', '-c', f'. "{setup_script}" && env -0'], capture_output=True,
                          timeout=60, check=True)
    return dict(entry.split('=', 1) for entry in done.stdout.decode().split('\0') if entry)


@pytest.mark.parametrize('symlink', [False, True], ids=['install', 'symlink-install'])
def test_colcon_builds_and_tests_the_package_as_in_a_workspace(tmp_path, symlink):
    """The README's workspace commands with the real colcon: build, source, find, test."""
    pytest.importorskip('colcon_ros', reason='colcon (colcon-ros) is not installed')
    workspace = tmp_path / 'ros2_ws'
    copy_source(workspace / 'src' / PACKAGE)
    # Its own colcon home: no user's defaults or mixins change the build.
    env = {**os.environ, 'COLCON_HOME': str(tmp_path / 'colcon_home')}
    colcon(workspace, 'build', '--packages-select', PACKAGE,
           *(['--symlink-install'] if symlink else []), env=env)
    prefix = workspace / 'install' / PACKAGE
    env = sourced(workspace / 'install' / 'setup.sh')
    assert env['AMENT_PREFIX_PATH'].split(os.pathsep)[0] == str(prefix)
    check_ament_layout(prefix, **env)
    if symlink:  # the share files are the source's, so an edit needs no rebuild
        launch_file = prefix / 'share' / PACKAGE / 'launch/s4fusion.launch.py'
        assert launch_file.resolve() == (workspace / 'src' / PACKAGE /
                                         'launch/s4fusion.launch.py').resolve()
    # colcon test runs this package's pytest (found through the test extra) in its build folder.
    colcon(workspace, 'test', '--packages-select', PACKAGE, '--pytest-args', '-k',
           'test_setup_options_are_valid_for_this_setuptools', env=env)
    results = ElementTree.parse(workspace / 'build' / PACKAGE / 'pytest.xml').getroot()
    suite = results if results.tag == 'testsuite' else results.find('testsuite')
    counts = {key: int(suite.get(key)) for key in ('tests', 'failures', 'errors', 'skipped')}
    assert counts['failures'] == counts['errors'] == 0, counts
    assert counts['tests'] - counts['skipped'] == 1, counts


def setup_distribution():
    """setup.py and setup.cfg as setuptools reads them (no build)."""
    from setuptools import distutils  # noqa: F401 - setuptools' distutils for run_setup
    from distutils.core import run_setup
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return run_setup('setup.py', stop_after='config')
    finally:
        os.chdir(cwd)


def test_setup_options_are_valid_for_this_setuptools():
    """Every option setup.cfg / setup.py give a command exists; colcon's layout stays.

    setuptools 80+ dropped develop's script_dir: setting it broke editable installs.
    """
    from setuptools.command.develop import develop
    distribution = setup_distribution()
    for command in ('develop', 'install'):
        distribution.get_command_obj(command)  # DistutilsOptionError for an unknown option
    assert distribution.get_command_obj('install').install_scripts == '$base/lib/s4fusion_ros'
    if any(option[0] == 'script-dir=' for option in develop.user_options):
        assert distribution.get_command_obj('develop').script_dir == '$base/lib/s4fusion_ros'


def test_colcon_test_finds_pytest_in_the_test_extra():
    """colcon test runs pytest only when extras_require['test'] names it."""
    packaging = pytest.importorskip('packaging.requirements')
    import pytest as installed
    test_extra = setup_distribution().extras_require['test']
    requirements = {r.name: r for r in map(packaging.Requirement, test_extra)}
    assert {'pytest', 'hypothesis', 'pycodestyle'} <= set(requirements)
    assert installed.__version__ in requirements['pytest'].specifier
    assert '9.0.0' not in requirements['pytest'].specifier


OLD_LAUNCH_TESTING_PLUGIN = '''
"""The hook as launch_testing's pytest plugin declared it before the 2026 fixes."""


def pytest_pycollect_makemodule(path, parent):
    return None
'''


def test_pytest_loads_launch_testings_old_plugin_hook(tmp_path):
    """pytest 9 refuses `path` in this hook at plugin load (exit 3 for every test run)."""
    (tmp_path / 'old_launch_testing_hooks.py').write_text(OLD_LAUNCH_TESTING_PLUGIN)
    (tmp_path / 'test_trivial.py').write_text('def test_trivial():\n    pass\n')
    env = {name: value for name, value in os.environ.items() if name != 'PYTEST_ADDOPTS'}
    done = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'old_launch_testing_hooks',
                           '-p', 'no:cacheprovider', 'test_trivial.py'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**env, 'PYTHONPATH': str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r'\b1 passed\b', done.stdout), done.stdout
    pinned = re.search(r'^pytest==(\S+)$', (REPO / 'requirements.txt').read_text(), re.M)
    assert pinned and int(pinned.group(1).split('.')[0]) < 9


# What package.xml declares for an import: rosdep keys of Python modules, and the modules that
# only pip provides (the README's robot section installs them). Other imports are ROS packages.
ROSDEP_KEYS = {'numpy': 'python3-numpy', 'cv2': 'python3-opencv', 'yaml': 'python3-yaml',
               'tqdm': 'python3-tqdm', 'setuptools': 'python3-setuptools',
               'pytest': 'python3-pytest', 'hypothesis': 'python3-hypothesis',
               'pycodestyle': 'python3-pycodestyle', 'packaging': 'python3-packaging',
               # Python 3.12 dropped the standard library's distutils: setuptools' stands in.
               'distutils': 'python3-setuptools'}
PIP_ONLY = {'torch', 'numba', 'llvmlite', 'safetensors', 'rosbags',
            'backports',  # backports.zstd, installed with rosbags (Python < 3.14)
            'lz4',  # installed with rosbags too
            'mamba_ssm', 'selective_scan_cuda',  # the optional extra [gpu]: mamba-ssm, its kernel
            'ray'}  # the optional extra [ray]
# Standard library from Python 3.14 on (compression.zstd), tried before its backport.
NEWER_STDLIB = {'compression'}


def imported_modules(*folders: str) -> set[str]:
    """Top-level names of the third-party modules the folders' Python files import."""
    import ast
    local = {path.stem for path in (REPO / 'test').glob('*.py')} | {PACKAGE}
    names = set()
    for folder in folders:
        for path in (REPO / folder).rglob('*.py'):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split('.')[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names.add(node.module.split('.')[0])
    return {name for name in names
            if name not in sys.stdlib_module_names | NEWER_STDLIB and name not in local}


def declared(kinds: tuple[str, ...]) -> set[str]:
    """Dependency keys of package.xml of the given kinds (exec_depend, ...)."""
    root = ElementTree.parse(REPO / 'package.xml').getroot()
    return {element.text for kind in kinds for element in root.iter(kind)}


def keys_for(modules: set[str]) -> set[str]:
    return {ROSDEP_KEYS.get(name, name) for name in modules - PIP_ONLY}


def test_package_xml_declares_what_the_code_imports():
    """rosdep install then brings exactly what the node, tools and launch file use."""
    runtime = declared(('exec_depend', 'depend', 'buildtool_depend'))
    # Not imported: setuptools builds the package, ros2launch is the `ros2 launch` command.
    used = keys_for(imported_modules(PACKAGE, 'launch')) | {'python3-setuptools', 'ros2launch'}
    assert used == runtime, f'undeclared: {used - runtime}; unused: {runtime - used}'
    tests = keys_for(imported_modules('test')) | {'python3-packaging'}  # importorskip'd
    assert tests <= runtime | declared(('test_depend',)), tests - runtime
    assert declared(('test_depend',)) <= tests, declared(('test_depend',)) - tests


def test_pip_only_dependencies_are_named_in_the_readme():
    readme = (REPO / 'README.md').read_text()
    robot = readme[readme.index('## On a robot with a ROS 2 distro'):]
    for name in ('torch', 'numba', 'safetensors', 'rosbags'):
        assert name in robot.split('\n## ')[0], name


def test_no_test_module_skips_itself_at_import_for_want_of_a_pip_only_module():
    """launch_testing's pytest plugin (on a robot) imports each test module while pytest collects
    the folder: a skip raised then, by a module-level importorskip, skips every test of the
    folder, and `colcon test` passes with none run. Module level may skip only for ROS packages."""
    import ast
    for path in sorted((REPO / 'test').glob('*.py')):
        statements = [node for node in ast.parse(path.read_text()).body
                      if isinstance(node, (ast.Assign, ast.Expr))]
        skipped_for = {call.args[0].value.split('.')[0] for node in statements
                       for call in ast.walk(node) if isinstance(call, ast.Call)
                       and getattr(call.func, 'attr', '') == 'importorskip'}
        assert not skipped_for & PIP_ONLY, (
            f'{path.name}: module-level importorskip of {sorted(skipped_for & PIP_ONLY)}; skip '
            'with a mark or inside the tests instead')
