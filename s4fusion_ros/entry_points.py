"""Console entry points: set up the process the package runs in, then import and run the tool.

Importing s4fusion_ros changes nothing in the host process; the commands this package runs own
their process, so they set it up here, before the tool's imports load OpenMP (torch), numba and
OpenCV. `python -m s4fusion_ros.tools.fuse` (and the other commands' modules) gets the same
set-up from its package's __init__ (set_up_for_python_m) and run_tool; only a stop signal while
its imports load is Python's KeyboardInterrupt there.
"""

import importlib
import os
import sys

from .cli import ignore_stop_signals, stop_signals_handled
from .imaging.limits import MAX_PIXELS, MAX_SIDE


def numba_cache_dir() -> str:
    """Return the folder numba caches the CPU kernels in: NUMBA_CACHE_DIR or a per-user one;
    '' for a user without a home folder (HOME unset, and no entry in the password database: a
    container's arbitrary user), whose '~' would be a folder of that name in the working one."""
    # The installed package folder may be read-only, so the default is not numba's own.
    if os.environ.get('NUMBA_CACHE_DIR'):
        return os.environ['NUMBA_CACHE_DIR']
    cache_home = os.environ.get('XDG_CACHE_HOME', '')
    if not os.path.isabs(cache_home):  # a relative one is to be ignored (XDG base directories)
        cache_home = os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(cache_home, 's4fusion_ros', 'numba') if os.path.isabs(cache_home) else ''


def omp_wait_policy() -> str:
    """OpenMP's wait policy for the package's processes: the user's, else PASSIVE."""
    # On a robot other processes share the CPU. OpenMP threads that spin while waiting (the
    # default) then make each of the model's many small parallel regions wait for a descheduled
    # thread: compact at 640x480 went from 0.45 s to 1.5-3.2 s with 2 threads and a busy core,
    # 0.53 s when passive. OpenMP reads this when torch loads it.
    return os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')


def opencv_settings() -> dict[str, str]:
    """OpenCV's image size limits and log level for the package's processes: the user's, else
    these. OpenCV reads them when it loads.

    The limits make it refuse larger images from their headers: a compressed message of a few
    hundred kB can otherwise decode into gigabytes. Its warnings are left out: an undecodable
    message is reported by the package, once per kind of fault and a few seconds, where OpenCV
    logged a line per frame (`PNG input buffer is incomplete`). Messages libpng and libjpeg
    print themselves still come.
    """
    return {name: os.environ.get(name, str(value)) for name, value in (
        ('OPENCV_IO_MAX_IMAGE_WIDTH', MAX_SIDE), ('OPENCV_IO_MAX_IMAGE_HEIGHT', MAX_SIDE),
        ('OPENCV_IO_MAX_IMAGE_PIXELS', MAX_PIXELS), ('OPENCV_LOG_LEVEL', 'ERROR'))}


# The Fast DDS configuration a user may have chosen, which the package's processes then keep.
FASTDDS_CHOICES = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE',
                   'FASTDDS_BUILTIN_TRANSPORTS')
# Fast DDS 2 (ROS 2 Humble to Jazzy) reads its profile from FASTRTPS_DEFAULT_PROFILES_FILE, 3
# (Kilted on) from FASTDDS_DEFAULT_PROFILES_FILE; Kilted's rmw_fastrtps warns of the old name.
FASTDDS_2_DISTROS = ('humble', 'iron', 'jazzy')
# The shared memory segment of the package's Fast DDS profile (data/fastdds_profile.xml), which
# Fast DDS reserves whole when a process starts.
FASTDDS_SEGMENT_BYTES = 16 * 1024 * 1024


def fastdds_settings(shared_memory: str = '/dev/shm') -> dict[str, str]:
    """The package's Fast DDS profile (data/fastdds_profile.xml: shared memory segments that hold
    two large images) for its processes, under the name the distro's Fast DDS reads
    (FASTDDS_2_DISTROS); none where the user configured Fast DDS, or where
    `shared_memory` has no room for a few segments (a container's 64 MB /dev/shm: Fast DDS would
    fail to set up shared memory and send the images over UDP). Fast DDS reads it when rclpy
    makes the process's participant."""
    if any(os.environ.get(name) for name in FASTDDS_CHOICES):
        return {}
    try:
        free = os.statvfs(shared_memory)
    except OSError:
        return {}
    if free.f_bavail * free.f_frsize < 4 * FASTDDS_SEGMENT_BYTES:
        return {}
    profile = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                           'fastdds_profile.xml')
    name = ('FASTRTPS_DEFAULT_PROFILES_FILE' if os.environ.get('ROS_DISTRO') in FASTDDS_2_DISTROS
            else 'FASTDDS_DEFAULT_PROFILES_FILE')
    return {name: profile}


# How often a progress bar is redrawn where stderr is not a terminal (tqdm reads
# TQDM_MININTERVAL for its mininterval).
LOG_PROGRESS_INTERVAL_S = 1


def open_closed_standard_streams() -> None:
    """Give a standard stream the process was started without (`>&-`, `2>&-`) /dev/null.

    Python leaves sys.stdout (sys.stderr) None then, and the tools' writes and flushes failed
    with a traceback after their work was done (exit 1); and the next file opened (rcl's log
    file, a DDS socket) took the descriptor, getting whatever C code writes to it.
    """
    for number, name in ((0, 'stdin'), (1, 'stdout'), (2, 'stderr')):
        if getattr(sys, name) is None:
            devnull = open(os.devnull, 'r' if number == 0 else 'w')
            try:
                os.fstat(number)
            except OSError:  # closed: keep the files opened later off it
                os.dup2(devnull.fileno(), number)
            setattr(sys, name, devnull)


def configure_process() -> None:
    """Set OpenMP's wait policy, numba's cache folder, OpenCV's image size limits and log level
    and Fast DDS's profile, keeping values the user chose; give a closed standard stream
    /dev/null."""
    open_closed_standard_streams()
    os.environ['OMP_WAIT_POLICY'] = omp_wait_policy()
    if not sys.stderr.isatty():
        # The progress bars (on stderr) redraw up to 10 times a second; in a log file, CI's or
        # journald's, each redraw stays, all on one line: once a second there. The user's
        # TQDM_MININTERVAL stands.
        os.environ.setdefault('TQDM_MININTERVAL', str(LOG_PROGRESS_INTERVAL_S))
    os.environ.update(opencv_settings())
    os.environ.update(fastdds_settings())
    # numba reads these at its first import; its config when each cached kernel is defined, in
    # case numba was imported already.
    numba_settings = {'NUMBA_CACHE_DIR': numba_cache_dir()}
    if not numba_settings['NUMBA_CACHE_DIR']:
        # No home: only the package's own folder, if writable; numba's next choice,
        # ~/.cache/numba, would be relative too.
        numba_settings['NUMBA_CACHE_LOCATOR_CLASSES'] = os.environ.get(
            'NUMBA_CACHE_LOCATOR_CLASSES') or 'InTreeCacheLocator'
    os.environ.update(numba_settings)
    if 'numba' in sys.modules:
        for name, value in numba_settings.items():
            setattr(sys.modules['numba'].config, name.removeprefix('NUMBA_'), value)


def set_up_for_python_m() -> None:
    """Set the process up where `python -m` runs one of the commands' modules.

    Python imports the package (so this) before it runs the module, whose imports load torch,
    OpenCV and numba; a process that imports the package otherwise stays as it was.
    """
    # While -m locates its module, sys.argv is ['-m', *arguments] and sys.orig_argv ends with
    # the module's name ('-mNAME' when written together) and the same arguments.
    if sys.argv[:1] == ['-m']:
        module = sys.orig_argv[-len(sys.argv)].removeprefix('-m')
        if module in MODULES:
            configure_process()


def run_tool(main) -> int:
    """Run a loaded tool's main; then ignore stop signals while Python shuts down."""
    from tqdm.contrib.logging import logging_redirect_tqdm
    try:
        # Warnings logged by the package (a damaged kernel cache) as lines of their own above
        # a progress bar, not appended to it.
        with logging_redirect_tqdm():
            return main()
    finally:
        # Done, and said so: a stop signal while Python shuts down (torch's and numba's
        # teardown take most of a second) would only turn its exit status into a Ctrl-C's.
        ignore_stop_signals()


# The console commands' modules, which `python -m` also runs (set_up_for_python_m).
MODULES = set()


def _command(module: str):
    MODULES.add(module)

    def main() -> int:
        configure_process()
        # A stop signal while torch, OpenCV and rclpy load (a second or two) is noted and acted
        # on once they are loaded: raised inside their C++ it gave a traceback or, from
        # pybind11, an abort. As the tools' own stop_on_signals, also where a shell started the
        # process with SIGINT ignored.
        stopped = []
        with stop_signals_handled(lambda signum, _frame: stopped.append(signum)):
            tool = importlib.import_module(module)
        if stopped:
            print(f'\n{os.path.basename(sys.argv[0])}: interrupted', file=sys.stderr)
            return 130
        return run_tool(tool.main)
    main.__doc__ = f'Run {module} in a process set up for it.'
    return main


fuse = _command('s4fusion_ros.tools.fuse')
evaluate = _command('s4fusion_ros.tools.evaluate')
bag = _command('s4fusion_ros.tools.bag')
batch = _command('s4fusion_ros.tools.batch')
train = _command('s4fusion_ros.tools.train')
bench = _command('s4fusion_ros.tools.bench')
play = _command('s4fusion_ros.ros.player')
demo = _command('s4fusion_ros.ros.demo')
flood = _command('s4fusion_ros.ros.flood')
