"""numba's on-disk cache of the CPU kernels: damaged files, a full disk, two cold starts at once.

A power cut soon after the first compile can leave a cache file empty or cut short (numba
renames each file into place whole, but does not fsync it). Such a file made every start fail
until someone deleted it by hand; now it is removed with one warning and the kernel compiles
again. The grid kernel (_cross_scan, the one inference runs) is compiled cold once for the
module, by two processes at once; each test works on its own copy of that cache.
"""

import logging
import os
import pathlib
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys

import numba
import pytest

from paths import executable
from support import as_a_user
import s4fusion_ros
from s4fusion_ros.model.scan import numba_cross_scan_fn

pytestmark = pytest.mark.skipif(numba_cross_scan_fn() is None, reason='numba is not installed')

# One small call of the grid kernel; prints its cache hits and compilations, and its result.
RUN_KERNEL = '''
import numpy as np
from s4fusion_ros.model import scan_numba
rng = np.random.default_rng(0)
m, b, h, w, d, rank, n = 2, 1, 4, 4, 16, 2, 4
y = scan_numba.cross_selective_scan_numba(
    rng.random((m, b, h * w, d)), rng.random((m, b, h * w, 4 * (rank + 2 * n))),
    rng.random((4, d, rank)), rng.random((4, d)), -rng.random((4, d, n)), rng.random((4, d)),
    h, w)
stats = scan_numba._cross_scan.stats
print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()), float(y.sum()))
'''


def start_kernel(cache, prefix=(), **options):
    return subprocess.Popen([*prefix, sys.executable, '-c', RUN_KERNEL], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cache.parent,
                            env={**os.environ, 'NUMBA_CACHE_DIR': str(cache)}, **options)


def finish(process):
    """(cache hits, compilations, result, stderr) of a start_kernel process that succeeded."""
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    hits, misses, result = out.split()
    return int(hits), int(misses), result, err


@pytest.fixture(scope='module')
def compiled(tmp_path_factory):
    """A cache folder two processes compiled the kernel into together, and its result."""
    cache = tmp_path_factory.mktemp('kernels') / 'numba'
    both = [start_kernel(cache), start_kernel(cache)]
    runs = [finish(process) for process in both]
    assert all(misses == 1 for _, misses, _, _ in runs), runs
    assert runs[0][2] == runs[1][2]
    return cache, runs[0][2]


def copy_of(compiled, tmp_path):
    cache = tmp_path / 'numba'
    shutil.copytree(compiled[0], cache)
    index, = cache.rglob('scan_numba._cross_scan-*.nbi')
    data, = cache.rglob('scan_numba._cross_scan-*.nbc')
    return cache, index, data


def test_two_cold_starts_at_once_leave_a_cache_the_next_start_loads(compiled, tmp_path):
    cache, _, _ = copy_of(compiled, tmp_path)
    hits, misses, result, _ = finish(start_kernel(cache))
    assert (hits, misses, result) == (1, 0, compiled[1])


def signature(compiled):
    """The one signature the kernel was compiled for, as its intact cache index names it."""
    index, = compiled[0].rglob('*.nbi')
    with open(index, 'rb') as f:  # numba's index: its version, then (source stamp, overloads)
        pickle.load(f)
        (sig, _, _), = pickle.loads(f.read())[1]
    return sig


def load(cache, sig, caplog):
    """numba's load of the kernel from folder `cache` through the class of cache its dispatcher
    has (as at a call); and the warnings logged meanwhile."""
    from s4fusion_ros.model import scan_numba
    kernel = scan_numba._cross_scan
    caplog.clear()
    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.WARNING):
        patch.setattr(numba.config, 'CACHE_DIR', str(cache))
        loaded = type(kernel._cache)(kernel.py_func).load_overload(sig, kernel.targetctx)
    return loaded, [record.getMessage() for record in caplog.records]


DAMAGE = {
    'empty': lambda data: b'',
    'cut in half': lambda data: data[:len(data) // 2],
    'garbage': lambda data: bytes(range(256)) * (len(data) // 256 + 1),
}


@pytest.mark.parametrize('which', ['index', 'data'])
@pytest.mark.parametrize('damage', DAMAGE)
def test_a_damaged_cache_file_is_removed_and_read_as_a_miss(compiled, tmp_path, caplog, which,
                                                            damage):
    cache, index, data = copy_of(compiled, tmp_path)
    sig = signature(compiled)
    loaded, warnings = load(cache, sig, caplog)
    assert loaded is not None and warnings == []  # intact, it loads
    damaged = index if which == 'index' else data
    damaged.write_bytes(DAMAGE[damage](damaged.read_bytes()))
    loaded, warnings = load(cache, sig, caplog)
    assert loaded is None
    assert not damaged.exists()
    assert len(warnings) == 1 and f'{damaged} was damaged' in warnings[0], warnings


def test_an_index_naming_a_missing_data_file_is_a_miss(compiled, tmp_path, caplog):
    # numba's own handling; a full disk leaves this (numba writes the index first).
    cache, index, data = copy_of(compiled, tmp_path)
    data.unlink()
    assert load(cache, signature(compiled), caplog) == (None, [])


def test_a_cache_file_it_may_not_read_is_compiled_over(compiled, tmp_path):
    # A cache folder two users share (NUMBA_CACHE_DIR), one of them with umask 077: the other's
    # node exited at its start with "Permission denied" on the index instead of compiling.
    cache, index, _ = copy_of(compiled, tmp_path)
    index.chmod(0)
    hits, misses, result, err = finish(start_kernel(cache, as_a_user()))
    assert (hits, misses, result) == (0, 1, compiled[1])
    assert err == (f's4fusion_ros: cannot read the numba cache file {index} (Permission '
                   'denied): the kernel compiles again\n'), err
    assert finish(start_kernel(cache, as_a_user()))[:2] == (1, 0)  # cached afresh


def test_fuse_after_a_power_cut_left_the_index_empty_recovers_once(compiled, ivif_dir,
                                                                   tmp_path):
    cache, index, _ = copy_of(compiled, tmp_path)
    index.write_bytes(b'')  # what a power cut after an un-synced first write can leave
    for side in ('ir', 'vi'):
        (tmp_path / side).mkdir()
        shutil.copy(ivif_dir / 'msrs' / side / '00004N.png', tmp_path / side)
    done = subprocess.run(
        [executable('s4fusion-fuse'), '--ir', tmp_path / 'ir', '--vi', tmp_path / 'vi', '--out',
         tmp_path / 'out', '--device', 'cpu'], capture_output=True, text=True, timeout=600,
        cwd=tmp_path, env={**os.environ, 'NUMBA_CACHE_DIR': str(cache)})
    assert done.returncode == 0, done.stderr
    # One line of its own, not appended to the progress bar (which redraws after '\r').
    lines = [line.rsplit('\r', 1)[-1] for line in done.stderr.split('\n')]
    assert [line for line in lines if 'numba' in line] == [
        f's4fusion_ros: the numba cache file {index} was damaged (EOFError: Ran out of input): '
        'removed, the kernel compiles again'], done.stderr
    hits, misses, _, err = finish(start_kernel(cache))  # the next start: cached again
    assert (hits, misses, err) == (1, 0, '')


def test_the_node_logs_a_damaged_cache_file_through_rcl(compiled, tmp_path, monkeypatch):
    # Through the node's logger, so /rosout carries it: Python's logging printed a bare line
    # that rqt_console, a log aggregator and --log-level never saw.
    harness = pytest.importorskip('ros_harness')
    cache, index, _ = copy_of(compiled, tmp_path)
    index.write_bytes(b'')
    monkeypatch.setenv('NUMBA_CACHE_DIR', str(cache))
    with harness.running_node({'device': 'cpu', 'inference_size': [160, 120]}) as proc:
        harness.wait_for_log(proc, 'model warmed up', timeout=300)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, harness.node_log(proc)
    log = harness.node_log(proc)
    lines = [line for line in log.splitlines() if 'cache file' in line]
    assert len(lines) == 1 and re.fullmatch(
        r'\[WARN\] \[[0-9.]+\] \[s4fusion_node\]: ' + re.escape(
            f's4fusion_ros: the numba cache file {index} was damaged (EOFError: Ran out of '
            'input): removed, the kernel compiles again'), lines[0]), log


def _no_room_for_the_cache():
    # Writes past 64 KiB fail (EFBIG) as on a full disk (ENOSPC): the kernel's data file is
    # larger, its index smaller.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))


def test_a_kernel_that_cannot_be_cached_runs_compiled_in_memory(compiled, tmp_path):
    cache = tmp_path / 'numba'
    hits, misses, result, err = finish(start_kernel(cache, preexec_fn=_no_room_for_the_cache))
    assert (hits, misses, result) == (0, 1, compiled[1])
    assert 'could not cache the numba kernel _cross_scan' in err and 'File too large' in err, err


def test_precompile_says_which_kernels_a_full_disk_left_uncached_and_fails(tmp_path):
    # It warned that the kernel could not be cached, then said 'CPU kernels compiled now and
    # cached for the next start' and exited 0, so scripts/setup.sh went on as if it were.
    done = subprocess.run([sys.executable, '-m', 's4fusion_ros.precompile'], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, preexec_fn=_no_room_for_the_cache,
                          env={**os.environ, 'NUMBA_CACHE_DIR': str(tmp_path / 'numba')})
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'could not cache the numba kernel _cross_scan' in done.stderr, done.stderr
    assert ('CPU kernels compiled now; not cached, as the warnings above say, so compiled again '
            'at the next start: _cross_scan') in done.stdout, done.stdout


def test_a_user_without_a_home_folder_gets_no_cache_in_the_working_folder(tmp_path):
    # HOME unset for a user the password database does not know (a container's arbitrary
    # user): '~' stays as it is, and the kernels were cached in a folder '~' made in whatever
    # folder the node or tool was started from. A relative HOME takes the same path here.
    script = ('from s4fusion_ros.entry_points import configure_process; configure_process()\n'
              'from s4fusion_ros.model import scan_numba\n'
              'print(scan_numba.cache_folder())\n')
    env = {name: value for name, value in os.environ.items() if name not in (
        'NUMBA_CACHE_DIR', 'NUMBA_CACHE_LOCATOR_CLASSES', 'XDG_CACHE_HOME')}
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**env, 'HOME': 'relative'})
    assert done.returncode == 0, done.stderr
    folder = done.stdout.strip()
    assert folder == 'None' or os.path.isabs(folder), folder
    assert list(tmp_path.iterdir()) == []


def test_a_user_without_a_home_or_a_writable_package_caches_nothing(tmp_path):
    # Numba's folders after the package's own (a read-only install) are under '~', and a
    # relative XDG_CACHE_HOME is to be ignored: either made a cache folder in the working one.
    # numba imported before the settings (a process that imported it first) must follow them.
    package = tmp_path / 'site' / 's4fusion_ros'
    shutil.copytree(pathlib.Path(s4fusion_ros.__file__).parent, package,
                    ignore=shutil.ignore_patterns('__pycache__'))
    folders = [package, *(path for path in package.rglob('*') if path.is_dir())]
    for folder in folders:
        folder.chmod(0o555)
    script = ('import numba\n'
              'from s4fusion_ros.entry_points import configure_process; configure_process()\n'
              'from s4fusion_ros.model import scan_numba\n'
              'print(scan_numba.cache_folder())\n')
    env = {name: value for name, value in os.environ.items() if name not in (
        'NUMBA_CACHE_DIR', 'NUMBA_CACHE_LOCATOR_CLASSES')}
    work, home = tmp_path / 'work', tmp_path / 'home'
    work.mkdir()
    runs = []
    try:
        for home_folder in ('relative', str(home)):
            runs.append(subprocess.run(
                [*as_a_user(), sys.executable, '-c', script], capture_output=True, text=True,
                timeout=300, cwd=work, env={**env, 'HOME': home_folder,
                                            'XDG_CACHE_HOME': 'relative-cache',
                                            'PYTHONPATH': str(package.parent)}))
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert [done.returncode for done in runs] == [0, 0], [done.stderr for done in runs]
    assert runs[0].stdout == 'None\n'  # a subfolder per source folder in the second:
    assert pathlib.Path(runs[1].stdout.strip()).parent == home / '.cache/s4fusion_ros/numba'
    assert list(work.iterdir()) == []


def test_precompile_names_the_folder_numba_cached_the_kernels_in(tmp_path):
    # Where NUMBA_CACHE_DIR cannot be written numba caches in the next folder it can: precompile
    # named NUMBA_CACHE_DIR all the same, so the cache was looked for where it was not.
    blocked = tmp_path / 'not-a-folder'
    blocked.write_text('')
    env = {name: value for name, value in os.environ.items() if name != 'XDG_CACHE_HOME'}
    done = subprocess.run(
        [sys.executable, '-m', 's4fusion_ros.precompile'], capture_output=True, text=True,
        timeout=600, cwd=tmp_path, env={
            **env, 'NUMBA_CACHE_DIR': str(blocked), 'HOME': str(tmp_path),
            # Not the package's own folder, which a checkout run as root may write.
            'NUMBA_CACHE_LOCATOR_CLASSES': 'UserProvidedCacheLocator,UserWideCacheLocator'})
    assert done.returncode == 0, done.stderr
    folder, = (tmp_path / '.cache' / 'numba').iterdir()
    assert done.stdout.endswith(f' ({folder})\n'), done.stdout
