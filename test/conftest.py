"""Shared test fixtures: the real image data (one fixture finds it); DDS kept on loopback per test
run."""

import atexit
import faulthandler
import glob
import os
import pathlib
import shutil
import signal
import sys
import tempfile

import pytest

from paths import REPO
from s4fusion_ros.cli import STOP_SIGNALS
from s4fusion_ros.entry_points import configure_process

# Every test run keeps DDS on this machine, in a domain of its own (concurrent runs rarely
# collide), with ROS logs in a temporary folder. Child processes (the node under test) inherit
# this.
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
# The test process is set up as the package's commands set up theirs, before any test module
# imports torch or numba.
configure_process()
# 1-55, plus a worker's offset below: among ROS 2's safe domains (0-101; above, the DDS ports
# reach Linux's ephemeral range, where another process's socket may hold one), not 0 (every ROS 2
# default) and, with up to four workers, below the demo's 60-99.
os.environ.setdefault('ROS_DOMAIN_ID', str(1 + os.getpid() % 55))
# pytest-xdist's workers ('gw0', 'gw1', ...) inherit one environment: each takes the next domain,
# or their nodes and topics of the same names would meet.
_WORKER = os.environ.get('PYTEST_XDIST_WORKER')
if _WORKER:
    os.environ['ROS_DOMAIN_ID'] = str(int(os.environ['ROS_DOMAIN_ID']) + int(_WORKER[2:]))
os.environ['ROS_LOG_DIR'] = tempfile.mkdtemp(prefix='s4fusion-roslog-')
atexit.register(shutil.rmtree, os.environ['ROS_LOG_DIR'], True)  # each run left one
# A child that crashes (SIGSEGV, SIGABRT) prints its threads' Python stacks in the output that a
# failing test shows, where a bare exit code -11 said nothing of where.
os.environ['PYTHONFAULTHANDLER'] = '1'
# A shell starts a background job with SIGINT ignored, and an ignored signal stays ignored in every
# child: the tools under test would then run through the Ctrl-C the tests send them. A handled
# SIGINT is reset to the default in a child, as a terminal gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A test still running after this many seconds hangs (the slowest take about 70 s).
HANG_S = 600
_HANG_REPORT_FD = pytest.StashKey[int]()


def pytest_configure(config):
    """Keep a descriptor of the run's stderr for the hang watchdog (a test's own is captured)."""
    config.stash[_HANG_REPORT_FD] = os.dup(sys.__stderr__.fileno())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """End a test that hangs: after HANG_S, every thread's stack goes to the run's stderr and the
    process exits (pytest-xdist names the test, starts a new worker and the run goes on), where a
    hang held a CI run to its limit and printed nothing. faulthandler's watchdog is a C thread:
    it fires where a thread blocks in C with the GIL held (an rclpy call into the middleware),
    which stops pytest-timeout's Python timer. Opt-in soaks set their own length.

    A tool's main run in the test process sets the stop signals' handlers and
    sys.unraisablehook for the life of the process (cli.stop_on_signals), as a command does: they
    are put back after each test (its fixtures included). Left, the next SIGINT a test sent this
    process left both stop signals ignored, and so in every child started later (a Python child
    ran on through its Ctrl-C), and pytest no longer reported exceptions lost in finalizers."""
    handlers = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    unraisablehook = sys.unraisablehook
    if item.get_closest_marker('soak') is None:
        report_fd = item.config.stash[_HANG_REPORT_FD]
        faulthandler.dump_traceback_later(HANG_S, exit=True, file=report_fd)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()
        for number, handler in handlers.items():
            signal.signal(number, handler)
        sys.unraisablehook = unraisablehook


_SHM_BEFORE = set(glob.glob('/dev/shm/fastdds_*')) | set(glob.glob('/dev/shm/sem.fastdds_*'))


def _paths_in_use():
    """Files any process has open or mapped (other test runs may share /dev/shm)."""
    used = set()
    for proc in glob.glob('/proc/[0-9]*'):
        try:
            used.update(os.readlink(fd) for fd in glob.glob(f'{proc}/fd/*'))
            with open(f'{proc}/maps') as maps:
                used.update(line.split(None, 5)[-1].strip() for line in maps
                            if '/dev/shm/' in line)
        except OSError:
            continue
    return used


def pytest_sessionfinish(session, exitstatus):
    """Remove the Fast DDS shared-memory files this run left behind and nobody uses."""
    # What follows the last test (this scan of /proc, the interpreter's exit: Ray's exit hook, a
    # thread left running) is no test's: a hang there gets the same watchdog, never cancelled.
    faulthandler.dump_traceback_later(HANG_S, exit=True,
                                      file=session.config.stash[_HANG_REPORT_FD])
    leftovers = set(glob.glob('/dev/shm/fastdds_*')) | set(glob.glob('/dev/shm/sem.fastdds_*'))
    in_use = _paths_in_use()
    for path in leftovers - _SHM_BEFORE - in_use:
        try:
            os.remove(path)
        except OSError:
            pass


@pytest.fixture(scope='session')
def ivif_dir():
    """The ivif data folder (README, "Data and licences"), the only way tests find the real
    image data: $S4FUSION_IVIF_DATA, else the workspace's ../shared/data/ivif beside this
    checkout. Tests that need it skip where it is absent."""
    path = pathlib.Path(os.environ.get('S4FUSION_IVIF_DATA') or
                        REPO.parent / 'shared' / 'data' / 'ivif')
    if not (path / 'msrs').is_dir():
        pytest.skip(f'image data not found at {path} (set S4FUSION_IVIF_DATA)')
    return path


@pytest.fixture(scope='session')
def msrs_pair(ivif_dir):
    """One real MSRS pair as (ir uint8 (H, W), vi uint8 BGR (H, W, 3)), 640x480."""
    import cv2
    name = '00004N.png'
    ir = cv2.imread(str(ivif_dir / 'msrs' / 'ir' / name), cv2.IMREAD_GRAYSCALE)
    vi = cv2.imread(str(ivif_dir / 'msrs' / 'vi' / name), cv2.IMREAD_COLOR)
    return ir, vi


@pytest.fixture(scope='module')
def ros_context():
    """rclpy initialised for a test module that talks to nodes (imported here, where it is used:
    the suite runs without rclpy too)."""
    import rclpy
    rclpy.init()
    yield
    rclpy.shutdown()


@pytest.fixture()
def pair_folder(tmp_path, ivif_dir):
    """A folder with ir/ and vi/ holding two real MSRS pairs."""
    for side in ('ir', 'vi'):
        (tmp_path / 'pairs' / side).mkdir(parents=True)
        for name in ('00004N.png', '00055D.png'):
            shutil.copy(ivif_dir / 'msrs' / side / name, tmp_path / 'pairs' / side / name)
    return tmp_path / 'pairs'


@pytest.fixture(scope='session')
def ray_home():
    """A temporary HOME, where Ray 2.60 writes its token, for every Ray of the test session.

    Once a process has started Ray with token authentication, the Rays it starts later look for
    the token in HOME too, so the Ray tests of all modules share this one (a session fixture here,
    not in a test module, so there is one). No usage reports are sent, and an empty
    ray_bootstrap_config.yaml stops Ray asking cloud metadata servers where it runs (see
    s4fusion_ros.batch.cluster.private_home).
    """
    home = tempfile.mkdtemp(prefix='s4fusion-ray-')
    pathlib.Path(home, 'ray_bootstrap_config.yaml').write_text('{}\n')
    patch = pytest.MonkeyPatch()
    patch.setenv('HOME', home)
    patch.setenv('RAY_USAGE_STATS_ENABLED', '0')
    yield pathlib.Path(home)
    patch.undo()
    shutil.rmtree(home, ignore_errors=True)
