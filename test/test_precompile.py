"""The CPU kernels compiled ahead: a start of the node then loads them from numba's cache.

scripts/setup.sh runs s4fusion_ros.precompile; without it the node compiles them (15-30 s) before
subscribing.
"""

import subprocess
import sys
import time

import pytest

from ros_harness import Probe, node_log, rclpy, running_node

pytestmark = pytest.mark.ros


def test_a_start_after_precompile_loads_the_kernels_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('NUMBA_CACHE_DIR', str(tmp_path / 'numba'))  # cold, for this test only
    # cwd: `python -m` puts it first on sys.path, and in a colcon workspace's source folder that
    # would compile the source copy, not the installed one the node runs (numba caches per file).
    done = subprocess.run([sys.executable, '-m', 's4fusion_ros.precompile'], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert 'CPU kernels compiled now' in done.stdout, done.stdout
    assert list((tmp_path / 'numba').rglob('*.nbc')), 'nothing cached'
    rclpy.init()
    try:
        probe = Probe('precompile_probe')
        started = time.monotonic()
        with running_node({'device': 'cpu'}) as proc:
            probe.wait_for_node(proc)
            seconds = time.monotonic() - started
            log = node_log(proc)
        probe.destroy_node()
    finally:
        rclpy.shutdown()
    assert 'CPU kernels loaded from the cache' in log, log
    print(f'node subscribed {seconds:.1f} s after its start (warm kernel cache)')


def test_precompile_help_answers_without_compiling(tmp_path, monkeypatch):
    monkeypatch.setenv('NUMBA_CACHE_DIR', str(tmp_path / 'numba'))
    for argv, code, text in ((['--help'], 0, 'usage: python3 -m s4fusion_ros.precompile'),
                             (['--threads', '2'], 2, 'unrecognized arguments: --threads 2')):
        done = subprocess.run([sys.executable, '-m', 's4fusion_ros.precompile', *argv],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == code and text in done.stdout + done.stderr, done
    assert not (tmp_path / 'numba').exists()  # nothing compiled


def test_the_node_starts_where_no_folder_can_hold_the_kernel_cache(tmp_path, monkeypatch):
    # A systemd service or a container with a read-only home and a read-only installation:
    # numba raised "cannot cache function '_exp': no locator available" as the kernels were
    # defined, and the node exited. Here the one folder numba may try is a file.
    blocked = tmp_path / 'not-a-folder'
    blocked.write_text('')
    monkeypatch.setenv('NUMBA_CACHE_DIR', str(blocked))
    monkeypatch.setenv('NUMBA_CACHE_LOCATOR_CLASSES', 'UserProvidedCacheLocator')
    rclpy.init()
    try:
        probe = Probe('uncached_probe')
        with running_node({'device': 'cpu'}) as proc:
            probe.wait_for_node(proc)
            log = node_log(proc)
        probe.destroy_node()
    finally:
        rclpy.shutdown()
    warnings = [line for line in log.splitlines() if 'WARN' in line]
    assert len(warnings) == 1 and 'in memory only' in warnings[0], log
    assert 'Traceback' not in log, log


def test_precompile_fails_where_no_folder_can_hold_the_kernel_cache(tmp_path, monkeypatch):
    # Compiled in memory only, nothing is cached ahead: scripts/setup.sh must not go on as if
    # the next start would load the kernels.
    blocked = tmp_path / 'not-a-folder'
    blocked.write_text('')
    monkeypatch.setenv('NUMBA_CACHE_DIR', str(blocked))
    monkeypatch.setenv('NUMBA_CACHE_LOCATOR_CLASSES', 'UserProvidedCacheLocator')
    done = subprocess.run([sys.executable, '-m', 's4fusion_ros.precompile'], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith('s4fusion_ros.precompile: CPU kernels compiled now, in memory '
                                  'only: no writable folder for their cache'), done.stdout
    assert done.stdout.endswith(' s\n'), done.stdout  # and names no cache folder


# An installation without numba (python -c), where the PyTorch scan runs on the CPU.
WITHOUT_NUMBA = '''
import importlib.abc, sys
class NoNumba(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'numba':
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoNumba())
from s4fusion_ros.precompile import main
sys.exit(main([]))
'''


def test_precompile_without_numba_says_so_and_succeeds(tmp_path):
    # Nothing to cache ahead, so nothing failed: scripts/setup.sh goes on.
    done = subprocess.run([sys.executable, '-c', WITHOUT_NUMBA], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith('s4fusion_ros.precompile: numba is not installed: the slower '
                                  'PyTorch scan runs on the CPU, '), done.stdout
